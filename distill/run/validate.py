"""Run-level checks that need the models' architecture numbers (read from config.json, never the weights).

Everything here runs before any model is loaded or any process starts, so a bad run fails in a second.
"""

from __future__ import annotations

from distill.config.topology import PairFacts, Topology
from distill.data.sources import validate_sources
from distill.errors import ConfigError
from distill.losses import get as loss_term
from distill.losses.validation import validate_layer_map, validate_term
from distill.models.facts import ModelFacts
from distill.models.head import check_fusable_type
from distill.models.resolve import demo_teacher_dir, model_facts, student_facts
from distill.models.tiny import TINY_ARCHS
from distill.teacher.endpoint import check_endpoint_api
from distill.teacher.engine import check_length_groups
from distill.training.build import run_curriculum
from distill.training.objective import term_params


def validate_run(cfg, facts: PairFacts) -> Topology:
    """Check the loss terms, layer maps, vocabularies and topology of a composed RunConfig."""
    topology = Topology.from_config(cfg.cluster)
    topology.check_model(facts.teacher_shape)
    if cfg.cluster.mode == "ray":
        topology.check_fits()
    elif cfg.cluster.mode != "local":
        raise ConfigError(f"cluster.mode={cfg.cluster.mode!r}: use 'local' (reference) or 'ray'.")
    check_length_groups(cfg.teacher.length_groups)
    validate_teacher_backend(cfg)
    _validate_max_length(cfg, facts)
    if cfg.loss.fused_head:
        check_fusable_type(student_facts(cfg, facts.student_vocab).model_type)
    _validate_terms(cfg, facts)
    run_curriculum(cfg)
    validate_sources(cfg)
    if cfg.mode == "continual" and cfg.teacher.cache:
        raise ConfigError(
            "mode=continual keeps each consumed batch's teacher outputs for replay and scores online; unset "
            "teacher.cache (an offline cache is for mode=standard)."
        )
    if cfg.teacher.token_map.enabled:
        pass  # every feature works across tokenizers: logit and feature terms, packing, the offline cache
    elif any(t.name == "uld" and t.weight for t in cfg.loss.terms.values()):
        raise ConfigError(
            "loss term uld compares teacher mass that has no student token, which only exists with a token map; "
            "set teacher.token_map.enabled=true (cross-tokenizer) or remove the uld term."
        )
    elif not facts.same_tokenizer:
        raise ConfigError(
            f"teacher vocabulary ({facts.teacher_vocab} tokens) and student vocabulary ({facts.student_vocab} "
            "tokens) differ (or their tokenizers do), and logit distillation needs a shared token space. Turn on "
            "cross-tokenizer distillation with teacher.token_map.enabled=true (e.g. loss=kd_xtok), or use a "
            "student that shares the teacher's tokenizer (a tiny `student.arch` without student.tokenizer)."
        )
    return topology


# How to get a model with more positions, by role.
_MORE_POSITIONS = {
    "teacher": "a teacher that allows more (a tiny demo teacher prepared when tiny teachers allowed fewer: "
    "`distill prepare-demo prepare.force=true` rebuilds it)",
    "student": "a student that allows more (a tiny student: student.overrides.max_position_embeddings)",
}


def _validate_max_length(cfg, facts: PairFacts) -> None:
    """data.max_length tokens (every packed row has exactly that many) must fit both models' positions."""
    limits = {
        "teacher": _teacher_facts(cfg, facts.teacher_vocab).max_position_embeddings,
        "student": student_facts(cfg, facts.student_vocab).max_position_embeddings,
    }
    for role, limit in limits.items():
        if cfg.data.max_length > limit:
            raise ConfigError(
                f"data.max_length={cfg.data.max_length} exceeds the {role}'s max_position_embeddings={limit}: "
                f"a row would use positions the {role} was not built for. Lower data.max_length to at most "
                f"{limit}, or use {_MORE_POSITIONS[role]}."
            )


def _teacher_facts(cfg, vocab_size: int) -> ModelFacts:
    """The teacher's facts; a prepared demo teacher is read from its folder (it keeps the config it was
    trained with), a demo teacher not prepared yet from its tiny architecture."""
    if not cfg.teacher.path and cfg.teacher.arch in TINY_ARCHS:
        folder = demo_teacher_dir(cfg)
        if (folder / "config.json").is_file():
            return ModelFacts.from_path(folder)
    return model_facts(cfg.teacher, vocab_size)


def _validate_terms(cfg, facts: PairFacts) -> None:
    terms = cfg.loss.terms
    if not terms or all(t.weight == 0 for t in terms.values()):
        raise ConfigError(
            "loss.terms is empty or every weight is 0: the run would train nothing. Give a term weight."
        )
    for label, t in terms.items():
        if t.weight < 0:
            raise ConfigError(f"loss.terms.{label}.weight={t.weight} is negative; weights must be >= 0.")
        validate_term(
            t.name,
            temperature=cfg.loss.temperature,
            k=cfg.teacher.topk,
            # k counts teacher tokens; with a token map the student's vocabulary does not bound it.
            vocab_size=facts.teacher_vocab
            if cfg.teacher.token_map.enabled
            else min(facts.teacher_vocab, facts.student_vocab),
            params=term_params(t),
        )
        if t.name.startswith("hidden"):
            if not t.layer_map:
                raise ConfigError(
                    f"loss.terms.{label} ({t.name}) needs a layer_map [[student, teacher], ...]."
                )
            validate_layer_map([tuple(p) for p in t.layer_map], facts.student_layers, facts.teacher_layers)
        if t.name == "attention_transfer":
            if not t.layer_map:
                raise ConfigError(
                    f"loss.terms.{label} (attention_transfer) needs a layer_map [[student, teacher]]."
                )
            for s, tl in t.layer_map:
                if not (0 <= s < facts.student_layers and 0 <= tl < facts.teacher_layers):
                    raise ConfigError(
                        f"loss.terms.{label}.layer_map pair [{s}, {tl}] is out of range: attention layers are "
                        f"0..{facts.student_layers - 1} for the student and 0..{facts.teacher_layers - 1} for "
                        "the teacher."
                    )


TEACHER_BACKENDS = ("hf", "vllm", "endpoint")


def validate_teacher_backend(cfg) -> None:
    """teacher.backend's own rules, before any cluster time: a known name; vllm runs in the Ray actors (its own
    environment, which must exist); endpoint needs a URL; the served backends ship top-k log-probs only."""
    t = cfg.teacher
    if t.backend not in TEACHER_BACKENDS:
        raise ConfigError(f"teacher.backend={t.backend!r} is unknown; valid: {', '.join(TEACHER_BACKENDS)}")
    if (
        isinstance(t.pipeline_parallel, bool)
        or not isinstance(t.pipeline_parallel, int)
        or t.pipeline_parallel < 1
    ):
        raise ConfigError(f"teacher.pipeline_parallel={t.pipeline_parallel!r} must be an integer >= 1")
    if t.pipeline_parallel > 1 and (t.backend != "vllm" or cfg.cluster.device != "cuda"):
        raise ConfigError(
            f"teacher.pipeline_parallel={t.pipeline_parallel} (a replica across nodes) needs teacher.backend=vllm on "
            f"GPUs (cluster.device=cuda); got backend={t.backend}, device={cfg.cluster.device}. Set it to 1."
        )
    if t.backend == "hf" or t.cache:
        return  # an offline cache replaces the teacher whatever served it
    if t.backend == "vllm":
        from distill.teacher.vllm_env import require_vllm_python

        if cfg.cluster.mode != "ray":
            raise ConfigError(
                "teacher.backend=vllm runs the engine inside the Ray teacher actors (vLLM has its own environment); "
                "use a Ray cluster config (cluster=local_ray, cluster=sim_2node, ...), or teacher.backend=endpoint "
                "against a running `vllm serve` for the single-process path."
            )
        require_vllm_python(t.vllm_python)
    if t.backend == "endpoint":
        check_endpoint_api(t.endpoint_api)
    if t.backend == "endpoint" and not t.endpoint_url:
        raise ConfigError(
            "teacher.backend=endpoint needs teacher.endpoint_url (the server's base URL, e.g. "
            "http://127.0.0.1:8000/v1) and teacher.endpoint_model when the server's model name is not teacher.path."
        )
    if t.token_map.enabled:
        raise ConfigError(
            f"teacher.backend={t.backend} does not support teacher.token_map (cross-tokenizer projection runs on "
            "the hf engine's outputs); use teacher.backend=hf."
        )
    features = [
        label
        for label, term in cfg.loss.terms.items()
        if term.weight and loss_term(term.name).kind != "logits"
    ]
    if features:
        raise ConfigError(
            f"teacher.backend={t.backend} ships top-k log-probs only, but loss.terms {features} need the teacher's "
            "hidden states or attention maps; use teacher.backend=hf or drop those terms."
        )
