"""Typed configuration schema: one dataclass per component, registered in Hydra's ConfigStore.

YAML under `hydra_configs/` only sets values; every key must exist here, so a misspelt key fails when Hydra
composes the config (OmegaConf structured configs are closed), before any model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from distill.config.topology import TopologyFields


@dataclass
class ClusterConfig(TopologyFields):
    """Where processes run and how work is split: the layout's numbers (`TopologyFields`, validated by
    `distill.config.topology.Topology`), the backend and the cluster to join."""

    name: str = "local_single"
    mode: str = "local"
    """`local`: the single-process reference trainer; `ray`: teacher and student actor groups."""
    address: str | None = None
    """Ray address to connect to (`auto` or host:port); None starts a local Ray instance."""
    rollout_actors: int = 1
    """On-policy stages on the Ray path: actors holding a copy of the student that write the rollouts."""
    cpus_per_rollout_actor: float = 1.0
    gpus_per_rollout_actor: float = 0.0


@dataclass
class TokenMapConfig:
    """Cross-tokenizer distillation: align the two tokenizations and map teacher ids to student ids (distill.xtok)."""

    enabled: bool = False
    """Turn on when teacher and student tokenizers differ; the map is built once per pair and cached."""
    cache_dir: str = "${prepare.cache_dir}/token_maps"
    """Where maps are cached, keyed by both tokenizers' hashes."""


@dataclass
class TeacherConfig:
    name: str = MISSING
    arch: str | None = None
    """A tiny architecture from `distill.models.tiny` (trained by `distill prepare-demo`), or a production
    architecture name whose config ships in `distill/models/arch_configs` (validates without weights)."""
    path: str | None = None
    """Any Hugging Face causal-LM folder; None with a tiny `arch` means the prepare-demo teacher."""
    dtype: str = "float32"
    topk: int = 16
    """k: how many teacher logits per position travel to the student."""
    logits_dtype: str = "float32"
    length_groups: int = 2
    """Score each batch as up to this many forwards over rows of similar length, each padded only to its own
    longest row: less teacher compute on padding when rows vary in length (the demo's 16-row batches: 12% fewer
    positions, ~10% less teacher time), the same outputs on real tokens. 1: one forward per batch."""
    attn_implementation: str | None = None
    """None picks `eager` when an attention-transfer term is on (sdpa returns no attention maps)."""
    cache: str | None = None
    """Train from this offline cache (`distill teacher-cache`) instead of running the teacher online."""
    token_map: TokenMapConfig = field(default_factory=TokenMapConfig)
    """Cross-tokenizer distillation (teacher and student with different tokenizers)."""
    backend: str = "hf"
    """Who scores batches: `hf` (transformers forward, the reference), `vllm` (a vLLM engine inside each teacher
    replica's Ray actor, in the vLLM environment of scripts/setup_vllm.sh), `endpoint` (a running vLLM or SGLang
    server at `endpoint_url`, see `endpoint_api`). vllm and endpoint ship top-k log-probs (log-normaliser 0):
    same losses at every temperature (distill/teacher/logprobs.py)."""
    pipeline_parallel: int = 1
    """backend=vllm: pipeline stages per replica, one node each (`distill plan` prints it for a replica that spans
    nodes); vLLM's tensor parallel size is cluster.teacher_tp."""
    vllm_python: str | None = None
    """backend=vllm: the vLLM environment's interpreter; None: $DISTILL_VLLM_PYTHON, else the repo's .venv-vllm."""
    endpoint_url: str | None = None
    """backend=endpoint: the server's base URL, e.g. http://127.0.0.1:8000/v1 (vLLM) or http://127.0.0.1:30000
    (SGLang)."""
    endpoint_api: str = "vllm"
    """backend=endpoint: how the server is asked for prompt log-probs: `vllm` (the OpenAI completions API with
    vLLM's `prompt_logprobs`), `sglang` (SGLang's native /generate with `input_top_logprobs`)."""
    endpoint_model: str | None = None
    """backend=endpoint: the served model name (the server's --served-model-name); None: teacher.path."""
    endpoint_api_key_env: str = "DISTILL_TEACHER_API_KEY"
    """backend=endpoint: the environment variable holding the API key (never in config, never logged)."""
    replicas: int | None = None
    """Several teachers: this teacher's share of the cluster, its replicas; None: cluster.teacher_replicas."""
    tp: int | None = None
    """Several teachers: this teacher's tensor-parallel size; None: cluster.teacher_tp."""


@dataclass
class LoraConfig:
    """Low-rank adapters on the student (peft); the exported student/ is merged back into a plain HF folder."""

    enabled: bool = False
    r: int = 8
    """Adapter rank."""
    alpha: float = 16.0
    """Scaling numerator: the adapter update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] means every attention and MLP projection (never the lm_head)."""


@dataclass
class StudentConfig:
    name: str = MISSING
    arch: str | None = None
    """A tiny architecture built fresh with the teacher's tokenizer and vocabulary, or a production arch name."""
    path: str | None = None
    """Any Hugging Face causal-LM folder to start from; None builds `arch` from scratch."""
    tokenizer: str | None = None
    """The student's own tokenizer folder (cross-tokenizer runs); None: student.path's tokenizer, or the
    teacher's for a tiny `arch`."""
    dtype: str = "float32"
    init_seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    """Extra architecture fields for a tiny `arch` (hidden_size, num_hidden_layers, ...)."""
    gradient_checkpointing: bool = False
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (0-3) of the student ranks in the distributed path."""
    precision: str = "fp32"
    """`fp32` or `bf16` for the DeepSpeed student (bf16 is ~2x slower on CPUs without AVX512-BF16)."""
    offload_optimizer: bool = False
    """ZeRO-Offload: keep optimizer state in CPU memory (stage >= 1)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA fine-tuning: train adapters only, merge them into the weights at export."""
    init_from_teacher: bool = False
    """Build the student as the teacher's architecture with fewer layers, initialised from the teacher's
    embeddings, head and `teacher_layers` (DistilBERT's recipe); needs `arch` and `path` unset."""
    teacher_layers: list[int] = field(default_factory=list)
    """init_from_teacher: the teacher layers copied, in order; empty: `num_layers` evenly spaced."""
    num_layers: int = 0
    """init_from_teacher with no teacher_layers: how many, first and last included (0: half the teacher's)."""


@dataclass
class SubsetConfig:
    """A named slice of the data that a curriculum stage mixes or a continual increment trains on.

    On the embedded task a slice filters the run's train and held-out splits by `domains` / `levels` (None: any);
    `path` names a separate dataset instead (jsonl / parquet / `datasets` folder, split like `data.path`).
    """

    domains: list[str] | None = None
    levels: list[int] | None = None
    path: str | None = None


@dataclass
class DataConfig:
    name: str = "gsm_synth"
    """The embedded task when `path` is None: `gsm_synth` (`#### N` answers) or `gsm_synth_reasoning` (R1-shaped
    `<think>` traces + `\\boxed{N}`, see distill/data/task.py)."""
    path: str | None = None
    """None: the embedded task. Else a jsonl / parquet / `datasets` folder with a text or messages field."""
    text_field: str = "text"
    messages_field: str = "messages"
    domains: list[str] = field(default_factory=lambda: ["shopping", "travel", "baking", "garden"])
    levels: list[int] = field(default_factory=lambda: [1, 2])
    num_train: int = 4000
    num_eval: int = 200
    eval_fraction: float = 0.05
    """Held-out share for user datasets without an eval split."""
    max_length: int = 128
    on_bad_row: str = "error"
    """A user dataset's bad row (malformed JSON line, invalid UTF-8, a missing, non-string or empty text, messages
    that are not {role, content} strings, an unknown chat role): `error` stops the run naming its file and line;
    `skip` leaves it out, counted by reason (`data/skipped/<reason>` in eval.json and the report)."""
    on_long_row: str = "truncate"
    """An example longer than max_length tokens: `truncate` keeps its first max_length tokens
    (`data/truncated_rows`), `drop` leaves it out (`data/dropped_long_rows`), `error` stops the run naming it."""
    packing: bool = False
    seed: int = 0
    trace_tokens: list[int] | None = None
    """gsm_synth_reasoning only: [low, high] length of each `<think>` section in demo-tokenizer tokens (drawn per
    problem); e.g. [1024, 4096]. None for every other dataset."""
    subsets: dict[str, SubsetConfig] = field(default_factory=dict)
    """Named slices for curriculum data mixes and continual increments; `train` always means the whole split."""


@dataclass
class LossTermConfig:
    """One weighted term of the objective; `name` is a `distill.losses` registry name."""

    name: str = MISSING
    weight: float = 1.0
    beta: float = 0.5
    """Generalized JSD interpolation weight (term `jsd`)."""
    alpha: float = 0.1
    """Skew KL mixing weight (terms `skew_forward_kl`, `skew_reverse_kl`)."""
    select_by: str | None = None
    """Selective distillation: `confidence` or `entropy` of the teacher; None trains every token."""
    select_threshold: float = 0.0
    select_keep: str = "above"
    layer_map: list[list[int]] = field(default_factory=list)
    """Hidden-state transfer: [[student_layer, teacher_layer], ...] as hidden_states indices (0 = embeddings)."""
    metric: str = "kl"
    """Attention transfer: `kl` between attention rows, or `mse`."""


@dataclass
class LossConfig:
    temperature: float = 2.0
    chunk_size: int = 0
    """Tokens per chunk in the chunked loss (bounds the fp32 [chunk, V] working set); 0 picks
    max(16, CHUNK_ELEMENTS // V) rows, i.e. ~4 MiB of fp32 per working array whatever the vocabulary."""
    terms: dict[str, LossTermConfig] = field(default_factory=dict)
    """Terms by label; weights 0 disable a term."""
    fused_head: bool = True
    """Compute the student's output head inside the loss, chunk by chunk, with one gradient for every logit term
    (no [B, T, V] logits or per-term [N, V] gradients: what long traces at a 152k vocabulary need). False: the
    unfused reference path over materialised logits."""


@dataclass
class ScheduleConfig:
    """A value over a stage: `start` at its first step, `end` at its last (None: stays at start)."""

    start: float | None = None
    end: float | None = None
    schedule: str = "constant"
    """`constant`, `linear` or `cosine`; either direction (high -> low or low -> high)."""


@dataclass
class OnPolicyConfig:
    """A stage trained on the student's own samples (GKD, on-policy distillation): the student completes each
    on-policy batch's prompts (every row up to its first trained token), the teacher scores prompt + completion,
    and the stage's terms train on the completion tokens."""

    lmbda: float = 1.0
    """GKD's lambda: the share of the stage's batches that are on-policy (drawn per batch from train.seed); the
    others are the dataset's, as in an off-policy stage. (`lambda` is a Python keyword.)"""
    max_new_tokens: int = 64
    temperature: float = 1.0
    """Sampling temperature of the rollouts (not the loss temperature)."""
    top_p: float = 1.0
    max_staleness: int = 0
    """Ray path: the rollouts of step s are written by the weights of step s - max_staleness (0: the weights being
    trained, as GKD and the single-process path; k > 0: step s's rollouts and teacher scoring overlap the k steps
    before it)."""


@dataclass
class StageConfig:
    """One curriculum stage. Exactly one of steps / tokens / fraction gives its length."""

    name: str = MISSING
    steps: int = 0
    tokens: int = 0
    """Length in trained tokens (loss-mask positions); resolved to steps from the stage's own data."""
    fraction: float = 0.0
    """Length as a share of train.steps."""
    terms: dict[str, float] = field(default_factory=dict)
    """Term label or group (`hard`, `soft`, `features`) -> multiplier of its loss.terms weight; unnamed terms are
    off; empty: every term as configured."""
    temperature: ScheduleConfig = field(default_factory=ScheduleConfig)
    """start None: loss.temperature."""
    alpha: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Teacher share of the logit loss (soft x alpha, hard x (1 - alpha)); start None: weights as they are."""
    data: dict[str, float] = field(default_factory=lambda: {"train": 1.0})
    """Source (`train` or a data.subsets name) -> share of the stage's batches."""
    restart_lr: bool = False
    """Restart the LR schedule (warm-up and decay over this stage) at the stage's first step."""
    select_threshold: float | None = None
    """Override the selective-distillation threshold of terms with `select_by` during this stage."""
    on_policy: OnPolicyConfig | None = None
    """Train this stage on the student's own samples (see OnPolicyConfig); None: the dataset's text."""
    teachers: dict[str, float] = field(default_factory=dict)
    """Several teachers: name -> multiplier of its ensemble weight on this stage; an unnamed teacher, or one at 0,
    is off: the rows routed to it go to the ensemble of the others. Empty: every teacher as configured."""


@dataclass
class CurriculumConfig:
    name: str = "single_stage"
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig(name="main", fraction=1.0)])


@dataclass
class ReplayConfig:
    capacity: int = 1024
    """Sequences (with their teacher outputs) kept for replay; 0 disables replay."""
    ratio: float = 0.25
    """Share of each step's batches drawn from the replay buffer, in [0, 1) (increment 0 has nothing to replay)."""
    quota: int = 0
    """>0: at most this many sequences per increment (each increment keeps its own reservoir)."""


@dataclass
class ContinualConfig:
    """`mode=continual`: train on `increments` in order, replaying earlier increments' samples."""

    increments: list[str] = field(default_factory=lambda: ["shopping", "travel", "baking", "garden"])
    """data.subsets names, in training order."""
    steps_per_increment: int = 0
    """0: train.steps split evenly over the increments."""
    restart_lr: bool = True
    """Each increment runs its own LR warm-up and decay."""
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    eval_generate_examples: int = 0
    """Exact-match prompts per increment in the after-increment evaluation (0: CE and token accuracy only)."""


@dataclass
class OptimizerConfig:
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"
    """`cosine`, `linear` or `constant`, after `warmup_steps` of linear warm-up."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps."""
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    """Held-out CE every N steps (0: only at the end)."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """0 disables periodic checkpoints (the final student export still happens)."""
    keep: int = 2
    """Complete checkpoints kept (at least 1); older ones are deleted once a newer one is committed."""
    fallback_to_previous: bool = False
    """`resume=true` when the checkpoint `latest` names is damaged (a file missing, truncated or changed after it
    was written): false refuses to start, naming the file and the newest older complete checkpoint; true resumes
    from that older one with a warning (the steps after it are trained again). For unattended requeues."""


@dataclass
class EvalConfig:
    model: str | None = None
    """`distill eval`: the Hugging Face folder to evaluate (e.g. a run's student/); None evaluates the teacher."""
    max_batches: int = 0
    """0: the whole held-out split."""
    batch_size: int = 32
    generate_examples: int = 100
    """How many held-out prompts are greedy-decoded for exact-match."""
    max_new_tokens: int = 96


@dataclass
class TrackingConfig:
    wandb: bool = False
    """Mirror metrics.jsonl to Weights & Biases (a background thread; never blocks a step)."""
    project: str = "distill"
    wandb_mode: str = "offline"
    """`offline` (files under run_dir/wandb, `wandb sync` later), `online` (API key from WANDB_API_KEY only)."""
    entity: str | None = None
    run_name: str | None = None
    progress: bool = True
    grad_shares: bool = True
    """On logged steps, each loss term's share of the gradient norm (`grad_share/<term>` in metrics.jsonl); warns
    when one term holds > 90%. Costs one extra backward per active term on one micro-batch, and one parameter-sized
    gradient at a time (DeepSpeed ranks: also a second forward of that micro-batch); not under ZeRO-3. Turn off
    for runs at the edge of memory."""


@dataclass
class TeacherCacheConfig:
    """`distill teacher-cache`: teacher outputs for the run's batches, written once and trained from later."""

    dir: str = "${run_dir}/teacher_cache"
    epochs: int | None = None
    """Epochs of the batch stream to cache (batch ids (epoch, index) match the training stream); None: as many as
    the same config's run reads (train.steps x batches per step, rounded up to whole epochs)."""
    ids_encoding: str = "auto"
    """`int32` or `packed<bits>`; `auto` packs with just enough bits for the teacher's vocabulary."""
    logits_encoding: str = "gap7"
    """`fp32`, `fp16`, `bf16`, `gap8`, `gap7` (see bench/cache_encoding.py for bytes/token and KL error)."""
    shard_batches: int = 8
    overwrite: bool = False


@dataclass
class PrepareConfig:
    """`distill prepare-demo`: the tokenizer and the task-trained tiny teacher, cached by their config."""

    cache_dir: str = "${oc.env:DISTILL_CACHE,${oc.env:HOME}/.cache/distill}"
    vocab_size: int = 512
    teacher_arch_overrides: dict[str, Any] = field(default_factory=dict)
    teacher_train_size: int = 8000
    """Problems (all domains, `teacher_levels`) the teacher is trained on; held-out questions never appear."""
    teacher_levels: list[int] = field(default_factory=lambda: [1, 2])
    teacher_domains: list[str] | None = None
    """Train the teacher on these embedded-task domains only (a domain expert for multi-teacher runs); None: all."""
    teacher_steps: int = 400
    student_vocab_size: int = 0
    """>0: also train a second, different tokenizer (seed + 1, this vocab size) for cross-tokenizer demos,
    saved to `distill.models.resolve.demo_student_tokenizer_dir`."""
    teacher_lr: float = 3e-3
    teacher_batch_size: int = 32
    eval_examples: int = 100
    seed: int = 0
    force: bool = False
    """Retrain even if a cached teacher with the same key exists."""


@dataclass
class GenerateConfig:
    """`distill generate`: sample teacher answers to the prompt set, keep those a filter accepts, save a dataset."""

    output: str = "${run_dir}/generated"
    """A `datasets.save_to_disk` DatasetDict folder (train: kept answers, eval: the prompt set's eval split);
    usable as `data.path`. Progress shards live in its progress/ subfolder."""
    samples_per_prompt: int = 4
    temperature: float = 0.8
    """0 = greedy (then one distinct answer per prompt)."""
    top_p: float = 0.95
    max_new_tokens: int = 128
    filter: str = "answer_correct"
    """A `distill.data.filters` name: `answer_correct` (embedded task), `none`, `min_length`, ..."""
    filter_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the filter (e.g. {min_tokens: 8} for min_length)."""
    require_finished: bool = True
    """Drop answers cut at max_new_tokens (no stop token), whatever the filter says."""
    dedupe: bool = True
    """Keep each distinct answer text once per prompt."""
    chunk_prompts: int = 64
    """Prompts per committed shard: a killed run resumes from the last committed shard."""
    batch_size: int = 64
    """Sequences (prompts x samples) per generate call on one teacher replica."""
    seed: int = 0


@dataclass
class ExportConfig:
    """Deployment exports of the student (distill/export): at the end of a run (`export.formats`), or by
    `distill export export.model=<folder>`."""

    model: str | None = None
    """`distill export`: the Hugging Face student folder to export (a run's student/); a run exports its own."""
    formats: list[str] = field(default_factory=list)
    """onnx-fp32, onnx-fp16, onnx-int8, onnx-int4, gguf-f32, gguf-f16, gguf-q8_0, gguf-q4_0. A run: [] exports
    nothing; `distill export`: [] writes every format."""
    out_dir: str | None = None
    """Where each format's folder, export.json and report.md go; None: <run_dir>/exports."""
    evaluate: bool = True
    """Load every export back in its runtime and evaluate it on the held-out split against the fp32 student."""


@dataclass
class RoutingConfig:
    """Which teacher scores each example of a run with several `teachers` (distill/teacher/routing.py)."""

    key: str | None = None
    """A data field whose value names the example's teacher (or `ensemble`), e.g. a `teacher` column."""
    subsets: dict[str, str] = field(default_factory=dict)
    """data.subsets name -> teacher name (or `ensemble`): an example in that slice goes to that teacher (the first
    matching subset, in this order, wins). Checked after `key`."""
    default: str | None = "ensemble"
    """The teacher of an example no rule names (a teacher name or `ensemble`); None: such an example is an error."""


@dataclass
class EnsembleConfig:
    """How the teachers' outputs combine on an example scored by several: their weighted mixture in probability
    space over the union of their top-k ids, each teacher's tail mass kept in the tail (distill/teacher/ensemble.py)."""

    weights: dict[str, float] = field(default_factory=dict)
    """Teacher name -> weight (normalised per token; a teacher left out weighs 0); empty: equal weights."""
    weighting: str = "static"
    """`static`: the weights as given; `confidence`: each weight times the teacher's top-1 probability at that
    token, renormalised (a teacher sure of the next token counts more there)."""


@dataclass
class RunConfig:
    """The root config of `distill`."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    """Several named teachers (each a full teacher config, its own Ray teacher group); empty: `teacher` alone.
    Non-empty: the first is the run's primary teacher (its tokenizer, the held-out evaluation) and `teacher` is
    replaced by it; `routing` sends each example to one of them or to their `ensemble`."""
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    run_dir: str = "."
    """Where config.yaml, metrics.jsonl, checkpoints/ and student/ go (Hydra's run dir by default)."""
    resume: bool = False
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    mode: str = "standard"
    """`standard`: the curriculum over the train data; `continual`: data increments with replay."""
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
