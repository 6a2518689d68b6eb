"""Build the run's objects from the composed config. Entry points call these and pass the objects in."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from distill.config.topology import ModelShape
from distill.config.validate import PairFacts, data_sources, run_curriculum
from distill.curriculum import Curriculum
from distill.data import BatchStream, build_task_dataset, encode_example, load_user_dataset
from distill.data.mixing import MixedStream, Segment
from distill.data.replay import ReplayBuffer
from distill.errors import CheckpointError, ConfigError
from distill.eval import evaluate_model
from distill.eval.report import write_report
from distill.io import atomic_write_json
from distill.models.facts import ModelFacts, arch_config_path
from distill.models.loading import load_causal_lm, load_tokenizer, load_tokenizer_folder
from distill.models.lora import apply_lora
from distill.models.tiny import TINY_ARCHS, build_model, tiny_config
from distill.models.tokenizer import tokenizer_hash
from distill.teacher.engine import TeacherEngine
from distill.tracking.metrics_log import read_metrics
from distill.training.continual import ContinualRun
from distill.training.objective import Objective, TermSpec, term_specs_from_config
from distill.training.reference import ReferenceTrainer, build_optimizer
from distill.training.schedule import curriculum_lr, lr_multiplier
from distill.xtok import CrossTokenizerTeacher, bits_per_char, encode_pairs, load_or_build_token_map

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Bump when the demo teacher's training recipe changes so stale caches are not reused.
DEMO_RECIPE_VERSION = 1


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {sorted(DTYPES)}.")
    return DTYPES[name]


# ---- where the teacher lives ---------------------------------------------------------------------------
def demo_teacher_dir(cfg) -> Path:
    """The prepare-demo teacher's folder, keyed by everything that shapes it."""
    prep = OmegaConf.to_container(cfg.prepare, resolve=True)
    # student_vocab_size shapes only the demo's second tokenizer, never the teacher.
    for volatile in ("cache_dir", "force", "eval_examples", "student_vocab_size"):
        prep.pop(volatile)
    key_src = json.dumps(
        {"arch": cfg.teacher.arch, "prepare": prep, "v": DEMO_RECIPE_VERSION}, sort_keys=True
    )
    key = hashlib.sha256(key_src.encode()).hexdigest()[:12]
    return Path(cfg.prepare.cache_dir) / "teachers" / f"{cfg.teacher.arch}-{key}"


def demo_student_tokenizer_dir(cfg) -> Path:
    """Where `distill prepare-demo prepare.student_vocab_size=N` saves the demo's second tokenizer."""
    p = cfg.prepare
    return Path(p.cache_dir) / "tokenizers" / f"student-v{p.student_vocab_size}-s{p.seed}"


def teacher_dir(cfg) -> Path:
    if cfg.teacher.path:
        return Path(cfg.teacher.path)
    if cfg.teacher.arch in TINY_ARCHS:
        return demo_teacher_dir(cfg)
    raise ConfigError(
        f"teacher={cfg.teacher.name} has no weights on this machine: set teacher.path=<Hugging Face folder>."
    )


def require_teacher(cfg) -> Path:
    path = teacher_dir(cfg)
    if not (path / "config.json").is_file():
        hint = "run `distill prepare-demo` first" if not cfg.teacher.path else "check teacher.path"
        raise CheckpointError(f"teacher checkpoint {path} does not exist or has no config.json; {hint}.")
    return path


# ---- architecture facts (config.json only) -----------------------------------------------------------
def model_facts(model_cfg, vocab_size: int) -> ModelFacts:
    """Facts of a teacher/student config: its folder, a tiny arch, or a shipped production arch config."""
    if model_cfg.path:
        return ModelFacts.from_path(model_cfg.path)
    if model_cfg.arch in TINY_ARCHS:
        overrides = dict(getattr(model_cfg, "overrides", {}) or {})
        return ModelFacts.from_config(tiny_config(model_cfg.arch, vocab_size, **overrides))
    if model_cfg.arch:
        return ModelFacts.from_path(arch_config_path(model_cfg.arch))
    raise ConfigError(f"{model_cfg.name}: set either `arch` or `path`.")


def pair_facts(cfg, tokenizer=None) -> PairFacts:
    """Teacher and student facts. A tiny student borrows the teacher's tokenizer, so it shares the vocab."""
    vocab = len(tokenizer) if tokenizer is not None else cfg.prepare.vocab_size
    t = model_facts(cfg.teacher, vocab)
    s_vocab = t.vocab_size if (cfg.student.arch in TINY_ARCHS and not cfg.student.path) else None
    own = load_tokenizer_folder(cfg.student.tokenizer) if cfg.student.tokenizer else None
    if own is not None and cfg.student.arch in TINY_ARCHS and not cfg.student.path:
        s_vocab = len(own)  # a tiny student built on its own tokenizer
    s = model_facts(cfg.student, s_vocab or vocab)
    same = t.vocab_size == s.vocab_size
    if own is not None:
        same = tokenizer is not None and tokenizer_hash(tokenizer) == tokenizer_hash(own)
    elif cfg.teacher.path and cfg.student.path:
        same = _tokenizers_match(Path(cfg.teacher.path), Path(cfg.student.path), same)
    return PairFacts(
        teacher_vocab=t.vocab_size,
        student_vocab=s.vocab_size,
        teacher_layers=t.num_layers,
        student_layers=s.num_layers,
        teacher_shape=ModelShape(t.num_attention_heads, t.num_key_value_heads, t.num_experts, t.vocab_size),
        same_tokenizer=same,
    )


def _tokenizers_match(teacher: Path, student: Path, fallback: bool) -> bool:
    """Same tokenizer means same token ids, even when embedding tables are padded to different sizes."""
    try:
        return tokenizer_hash(load_tokenizer(teacher)) == tokenizer_hash(load_tokenizer(student))
    except (OSError, ValueError, CheckpointError):
        return fallback


def student_tokenizer(cfg, teacher_tokenizer):
    """The tokenizer the student trains with (see `student_tokenizer_folder`)."""
    folder = student_tokenizer_folder(cfg)
    return load_tokenizer_folder(folder) if folder else teacher_tokenizer


def student_tokenizer_folder(cfg) -> str | None:
    """The folder of the student's own tokenizer: student.tokenizer, else (with a token map) student.path;
    None when the student trains on the teacher's tokenizer."""
    if cfg.student.tokenizer:
        return str(cfg.student.tokenizer)
    if cfg.teacher.token_map.enabled and cfg.student.path:
        return str(cfg.student.path)
    return None


# ---- models ----------------------------------------------------------------------------------------------
def build_student(cfg, tokenizer):
    """The base student (`_base_student`), wrapped in LoRA adapters when `student.lora.enabled`."""
    model = _base_student(cfg, tokenizer)
    return apply_lora(model, cfg.student.lora) if cfg.student.lora.enabled else model


def _base_student(cfg, tokenizer):
    """A student from a checkpoint folder, or a fresh tiny architecture on the teacher's vocabulary."""
    s = cfg.student
    attn = "eager" if _needs_attention(cfg) else None
    if s.path:
        return load_causal_lm(s.path, dtype=s.dtype, attn_implementation=attn)
    if s.arch in TINY_ARCHS:
        config = tiny_config(
            s.arch,
            len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **dict(s.overrides or {}),
        )
        return build_model(config, seed=s.init_seed, attn_implementation=attn).to(torch_dtype(s.dtype))
    raise ConfigError(
        f"student={s.name} has no weights on this machine: set student.path=<Hugging Face folder>."
    )


def _needs_attention(cfg) -> bool:
    return any(t.name == "attention_transfer" and t.weight != 0 for t in cfg.loss.terms.values())


def run_term_specs(cfg) -> list[TermSpec]:
    """The loss terms some step of the run's curriculum trains: what the objective computes and what the
    teacher ships (hidden states or attention maps no stage reads are never produced)."""
    live = set(run_curriculum(cfg).active_labels())
    return [spec for spec in term_specs_from_config(cfg.loss.terms) if spec.label in live]


def build_objective(cfg, student, teacher_hidden_size: int) -> Objective:
    return Objective(
        run_term_specs(cfg),
        temperature=cfg.loss.temperature,
        chunk_size=cfg.loss.chunk_size,
        student_hidden_size=student.config.hidden_size,
        teacher_hidden_size=teacher_hidden_size,
        cross_tokenizer=cfg.teacher.token_map.enabled,
    )


def build_teacher_engine(
    cfg,
    path: Path,
    objective: Objective | None,
    device: str = "cpu",
    *,
    hidden_layers: list[int] | None = None,
    attention_layers: list[int] | None = None,
) -> TeacherEngine:
    """A local teacher shipping the layers the objective reads (or the layers given explicitly)."""
    if hidden_layers is None:
        hidden_layers = objective.teacher_hidden_layers if objective else []
    if attention_layers is None:
        attention_layers = objective.teacher_attention_layers if objective else []
    attn = cfg.teacher.attn_implementation
    if attention_layers and attn is None:
        attn = "eager"
    model = load_causal_lm(path, dtype=cfg.teacher.dtype, attn_implementation=attn)
    return TeacherEngine(
        model,
        topk=cfg.teacher.topk,
        hidden_layers=hidden_layers,
        attention_layers=attention_layers,
        logits_dtype=torch_dtype(cfg.teacher.logits_dtype),
        device=device,
        length_groups=cfg.teacher.length_groups,
    )


# ---- data ------------------------------------------------------------------------------------------------
@dataclass
class DataSlice:
    train_rows: list[dict]
    eval_rows: list[dict]
    eval_examples: list[dict]
    """Raw held-out examples (with `answer` on the embedded task) for exact-match generation."""


@dataclass
class RunData(DataSlice):
    slices: dict[str, DataSlice] = field(default_factory=dict)
    """The data.subsets the run's curriculum or increments draw from, by name (`train`: this whole split)."""


def raw_dataset(cfg):
    """The run's raw train/eval splits: `data.path` (a user dataset) or the embedded task."""
    d = cfg.data
    if d.path:
        return load_user_dataset(
            d.path,
            text_field=d.text_field,
            messages_field=d.messages_field,
            eval_fraction=d.eval_fraction,
            seed=d.seed,
        )
    return build_task_dataset(list(d.domains), list(d.levels), d.num_train, d.num_eval, d.seed)


def build_data(cfg, tokenizer, teacher_tokenizer=None) -> RunData:
    """Encoded train/held-out rows, and the named slices the run mixes; with a token map, rows also carry the
    teacher's tokens and alignment."""
    if cfg.teacher.token_map.enabled and teacher_tokenizer is None:
        raise ConfigError("build_data: a cross-tokenizer run needs the teacher's tokenizer too.")
    ds = raw_dataset(cfg)
    encode = functools.partial(_encode_rows, cfg, tokenizer, teacher_tokenizer)
    train, heldout = encode(ds["train"]), encode(ds["eval"])
    data = RunData(train, heldout, list(ds["eval"]))
    data.slices["train"] = DataSlice(train, heldout, data.eval_examples)
    for name in data_sources(cfg):
        if name in data.slices or name not in cfg.data.subsets:
            continue  # `replay` is built by the run, unknown names failed validation
        sub = cfg.data.subsets[name]
        if sub.path:
            own = load_user_dataset(
                sub.path,
                text_field=cfg.data.text_field,
                messages_field=cfg.data.messages_field,
                eval_fraction=cfg.data.eval_fraction,
                seed=cfg.data.seed,
            )
            part = DataSlice(encode(own["train"]), encode(own["eval"]), list(own["eval"]))
        elif _lacks_subset_fields(sub, ds["train"]):
            # A user dataset without domain / level columns is the target data itself.
            log.warning(
                "data.subsets.%s filters by domain/level, but the dataset has no such fields: using all of it "
                "(give the subset its own `path` to train on another slice)",
                name,
            )
            part = DataSlice(train, heldout, data.eval_examples)
        else:
            keep_train = [i for i, ex in enumerate(ds["train"]) if _in_subset(sub, ex)]
            keep_eval = [i for i, ex in enumerate(ds["eval"]) if _in_subset(sub, ex)]
            part = DataSlice(
                [train[i] for i in keep_train],
                [heldout[i] for i in keep_eval],
                [data.eval_examples[i] for i in keep_eval],
            )
        if not part.train_rows:
            raise ConfigError(
                f"data.subsets.{name} selects no training rows (domains={sub.domains}, levels={sub.levels}, "
                f"path={sub.path}); the run's data has domains={list(cfg.data.domains)} and levels="
                f"{list(cfg.data.levels)}. Add them to data.domains / data.levels or fix the subset."
            )
        data.slices[name] = part
    return data


def _encode_rows(cfg, tokenizer, teacher_tokenizer, examples) -> list[dict]:
    if cfg.teacher.token_map.enabled:
        return encode_pairs(tokenizer, teacher_tokenizer, examples, cfg.data.max_length)
    return [encode_example(tokenizer, ex, cfg.data.max_length) for ex in examples]


def _lacks_subset_fields(sub, split) -> bool:
    columns = set(split.column_names)
    return (sub.domains is not None and "domain" not in columns) or (
        sub.levels is not None and "level" not in columns
    )


def _in_subset(sub, example: dict) -> bool:
    return (sub.domains is None or example.get("domain") in sub.domains) and (
        sub.levels is None or example.get("level") in sub.levels
    )


def batch_scorer(cfg, engine: TeacherEngine, teacher_tokenizer, tokenizer):
    """(batch_id, micro-batch) -> TeacherBatch in the student's token space: the engine itself, or with a
    token map the cross-tokenizer teacher (map built once per tokenizer pair, cached on disk)."""
    table = token_table(cfg, teacher_tokenizer, tokenizer)
    if table is None:
        return lambda batch_id, b: engine.score(batch_id, b["input_ids"], b["attention_mask"], b["loss_mask"])
    return CrossTokenizerTeacher(engine, table).score


def token_table(cfg, teacher_tokenizer, tokenizer) -> np.ndarray | None:
    """teacher id -> student id (-1: none) when `teacher.token_map.enabled` (built once per tokenizer pair,
    cached on disk), else None."""
    if not cfg.teacher.token_map.enabled:
        return None
    return load_or_build_token_map(teacher_tokenizer, tokenizer, cfg.teacher.token_map.cache_dir).ids


def batch_stream(
    cfg, rows: list[dict], tokenizer, *, batch_size: int | None = None, seed: int | None = None
) -> BatchStream:
    return BatchStream(
        rows,
        batch_size=batch_size or cfg.cluster.micro_batch_size,
        seed=cfg.data.seed if seed is None else seed,
        pad_id=tokenizer.pad_token_id,
        packing=cfg.data.packing,
        # Fixed-length rows only when packing; otherwise each batch pads to its longest row (less waste).
        seq_len=cfg.data.max_length if cfg.data.packing else None,
    )


def run_stream(cfg, data: RunData, tokenizer) -> tuple[Curriculum, MixedStream]:
    """The run's curriculum and its numbered batch stream: each stage's (or increment's) data mix laid over the
    stage's stream positions (optimizer steps x batches per step)."""
    per_step = cfg.cluster.grad_accum_steps * cfg.cluster.student_world_size
    streams = {
        # `train` keeps the data seed, so a single-stage run sees exactly the batches of a plain BatchStream;
        # every other slice gets its own permutation seed.
        name: batch_stream(cfg, part.train_rows, tokenizer, seed=_slice_seed(cfg.data.seed, name))
        for name, part in data.slices.items()
    }
    segments: list[Segment] = []

    def steps_for_tokens(index: int, start_step: int, shares, tokens: int) -> int:
        # A provisional open-ended segment for this stage: count its steps until they hold `tokens`.
        probe = MixedStream(streams, [*segments, Segment(start_step * per_step, 2**62, shares)])
        steps, total = 0, 0
        while total < tokens:
            first = (start_step + steps) * per_step
            total += sum(probe.batch_tokens(g) for g in range(first, first + per_step))
            steps += 1
        segments.append(Segment(start_step * per_step, (start_step + steps) * per_step, shares))
        return steps

    curriculum = run_curriculum(cfg, steps_for_tokens)
    segments = [Segment(a * per_step, b * per_step, stage.data) for a, b, stage in curriculum.spans()]
    return curriculum, MixedStream(streams, segments)


def continual_run(cfg, curriculum: Curriculum, stream: MixedStream, tokenizer, *, evaluate) -> ContinualRun:
    """mode=continual: the replay buffer and after-increment evaluations (results in run_dir/continual.json)."""
    r = cfg.continual.replay
    return ContinualRun(
        curriculum,
        stream,
        ReplayBuffer(r.capacity, seed=cfg.train.seed, quota=r.quota),
        per_step=cfg.cluster.grad_accum_steps * cfg.cluster.student_world_size,
        batch_size=cfg.cluster.micro_batch_size,
        pad_id=tokenizer.pad_token_id,
        evaluate=evaluate,
        results_path=Path(cfg.run_dir) / "continual.json",
    )


def evaluate_increments(cfg, model, tokenizer, data: RunData, continual: ContinualRun) -> dict[str, dict]:
    """The model on every increment's held-out slice (CE, token accuracy, exact-match if configured)."""
    return {
        name: evaluate(
            cfg,
            model,
            tokenizer,
            data.slices[name],
            None,
            generate_examples=cfg.continual.eval_generate_examples,
        )
        for name in continual.increments
    }


def write_run_report(cfg, summary: dict, continual: ContinualRun | None = None) -> Path:
    """report.md + PNG plots in the run folder: loss terms per stage, schedules, held-out eval, and for
    continual runs the accuracy matrices with forgetting."""
    run_dir = Path(cfg.run_dir)
    title = f"Distillation report: {cfg.teacher.name} -> {cfg.student.name}, {cfg.curriculum.name}, mode={cfg.mode}"
    return write_report(
        run_dir,
        metrics=[*read_metrics(run_dir / "metrics.jsonl"), *stage_events(run_dir)],
        eval_summary=summary,
        continual=continual.matrices() if continual is not None else None,
        title=title,
    )


def stage_events(run_dir: Path) -> list[dict]:
    """Stage transitions from stages.json as report events (metrics rows are only logged every N steps)."""
    path = Path(run_dir) / "stages.json"
    if not path.is_file():
        return []
    stages = json.loads(path.read_text())["stages"]
    return [
        {"event": "stage_transition", "step": b["first_step"], "from": a["name"], "to": b["name"]}
        for a, b in itertools.pairwise(stages)
    ]


def write_stages(run_dir: Path, curriculum: Curriculum) -> None:
    """stages.json: each stage's name, step span and data mix (for the report and for people)."""
    spans = [
        {"name": st.name, "first_step": a, "last_step": b - 1, "steps": b - a, "data": dict(st.data)}
        for a, b, st in curriculum.spans()
    ]
    atomic_write_json(run_dir / "stages.json", {"stages": spans, "total_steps": curriculum.total_steps})


def _slice_seed(seed: int, name: str) -> int:
    if name == "train":
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "little")


def generation_stop_id(tokenizer) -> int:
    """Chat replies end with <|im_end|>; plain-text models end with EOS."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else tokenizer.eos_token_id


def evaluate(
    cfg, model, tokenizer, data: RunData, teacher_logits=None, *, generate_examples: int | None = None
):
    """`distill.eval.evaluate_model` with the run's `eval.*` settings: every entry point evaluates alike."""
    e = cfg.eval
    summary = evaluate_model(
        model,
        tokenizer,
        data.eval_rows,
        data.eval_examples,
        teacher_logits=teacher_logits,
        stop_id=generation_stop_id(tokenizer),
        batch_size=e.batch_size,
        max_batches=e.max_batches,
        generate_examples=e.generate_examples if generate_examples is None else generate_examples,
        max_new_tokens=e.max_new_tokens,
    )
    if data.eval_rows and "target_chars" in data.eval_rows[0]:
        rows = data.eval_rows[: e.max_batches * e.batch_size] if e.max_batches else data.eval_rows
        summary["bits_per_char"] = bits_per_char(model, rows, tokenizer.pad_token_id, e.batch_size)
    return summary


# ---- training ---------------------------------------------------------------------------------------------
def lr_schedule(cfg, curriculum: Curriculum):
    """step -> LR multiplier: the optimizer's warm-up and decay, restarted at stages with `restart_lr`."""
    o = cfg.optim
    return curriculum_lr(
        curriculum, schedule=o.schedule, warmup_steps=o.warmup_steps, min_ratio=o.min_lr_ratio
    )


def build_reference_trainer(
    model, objective: Objective, optim, steps: int, lr: float | None = None, schedule=None
):
    """AdamW over the student and the objective's projections, with the configured warm-up + decay (or the
    given `schedule`, step -> multiplier)."""
    params = [*model.parameters(), *objective.parameters()]
    optimizer = build_optimizer(
        params, lr=lr or optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, eps=optim.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        schedule
        or (
            lambda step: lr_multiplier(
                step,
                steps,
                schedule=optim.schedule,
                warmup_steps=optim.warmup_steps,
                min_ratio=optim.min_lr_ratio,
            )
        ),
    )
    return ReferenceTrainer(model, objective, optimizer, scheduler, grad_clip=optim.grad_clip)
