"""Run-level checks that need the models' architecture numbers (read from config.json, never the weights).

Everything here runs before any model is loaded or any process starts, so a bad run fails in a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from distill.config.topology import ModelShape, Topology
from distill.curriculum.build import continual_curriculum, curriculum_from_config
from distill.curriculum.stages import FEATURES, HARD, SOFT, Curriculum
from distill.errors import ConfigError
from distill.losses import get as get_term
from distill.losses.validation import validate_layer_map, validate_term
from distill.teacher.engine import check_length_groups


@dataclass(frozen=True)
class PairFacts:
    """What validation needs to know about the teacher and the student."""

    teacher_vocab: int
    student_vocab: int
    teacher_layers: int
    student_layers: int
    teacher_shape: ModelShape
    same_tokenizer: bool
    """False when the two tokenizers are known to differ (or the vocab sizes do)."""


def validate_run(cfg, facts: PairFacts) -> Topology:
    """Check the loss terms, layer maps, vocabularies and topology of a composed RunConfig."""
    topology = Topology.from_config(cfg.cluster)
    topology.check_model(facts.teacher_shape)
    if cfg.cluster.mode == "ray":
        topology.check_fits()
    elif cfg.cluster.mode != "local":
        raise ConfigError(f"cluster.mode={cfg.cluster.mode!r}: use 'local' (reference) or 'ray'.")
    check_length_groups(cfg.teacher.length_groups)
    _validate_terms(cfg, facts)
    run_curriculum(cfg)
    _validate_sources(cfg)
    if cfg.mode == "continual" and cfg.teacher.cache:
        raise ConfigError(
            "mode=continual keeps each consumed batch's teacher outputs for replay and scores online; unset "
            "teacher.cache (an offline cache is for mode=standard)."
        )
    if cfg.teacher.token_map.enabled:
        _validate_cross_tokenizer(cfg)
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


def _validate_cross_tokenizer(cfg) -> None:
    """What a token map does not cover yet fails here, not mid-run."""
    features = sorted(
        label for label, t in cfg.loss.terms.items() if t.weight and get_term(t.name).kind != "logits"
    )
    if features:
        raise ConfigError(
            f"loss.terms {features} compare hidden states or attention maps position by position, which needs one "
            "tokenization; with teacher.token_map.enabled=true use logit terms only (e.g. loss=kd_xtok)."
        )
    if cfg.teacher.cache:
        raise ConfigError(
            "teacher.cache holds teacher outputs in the teacher's token space; cross-tokenizer runs score online. "
            "Unset teacher.cache or teacher.token_map.enabled."
        )
    if cfg.data.packing:
        raise ConfigError(
            "data.packing=true is not supported with teacher.token_map.enabled; set data.packing=false."
        )


def term_params(term_cfg) -> dict:
    """The LossTermConfig fields that the named term declares as parameters (beta, alpha, select_*, metric)."""
    declared = get_term(term_cfg.name).params
    return {name: term_cfg[name] for name in declared if name in term_cfg}


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


def term_group(name: str) -> str:
    """The curriculum group that scales a term: `hard` (CE), `soft` (logit terms) or `features`."""
    if name == "ce":
        return HARD
    return SOFT if get_term(name).kind == "logits" else FEATURES


def run_curriculum(cfg, steps_for_tokens=None) -> Curriculum:
    """The run's stages: `curriculum.stages` (mode=standard) or one stage per increment (mode=continual).

    Without `steps_for_tokens`, stages measured in tokens count as one step (a check before the data is
    loaded); the run resolves them with its data.
    """
    weights = {label: float(t.weight) for label, t in cfg.loss.terms.items() if t.weight}
    groups = {label: term_group(cfg.loss.terms[label].name) for label in weights}
    common = {
        "train_steps": cfg.train.steps,
        "base_temperature": cfg.loss.temperature,
        "term_weights": weights,
        "term_groups": groups,
    }
    if cfg.mode == "continual":
        return continual_curriculum(cfg.curriculum, cfg.continual, **common)
    if cfg.mode != "standard":
        raise ConfigError(f"mode={cfg.mode!r} is not one of ['standard', 'continual'].")
    if steps_for_tokens is None and any(s.tokens for s in cfg.curriculum.stages):
        stages = [s.tokens for s in cfg.curriculum.stages]
        if all(stages):  # every stage in tokens: nothing to check against train.steps yet
            common["train_steps"] = len(stages)
        return curriculum_from_config(
            cfg.curriculum, **common, steps_for_tokens=lambda *_: 1, check_total=False
        )
    return curriculum_from_config(cfg.curriculum, **common, steps_for_tokens=steps_for_tokens)


def data_sources(cfg) -> list[str]:
    """The data sources the run draws from (curriculum mixes or continual increments), in first-use order."""
    if cfg.mode == "continual":
        return list(cfg.continual.increments)
    names: list[str] = []
    for stage in cfg.curriculum.stages:
        names += [n for n in stage.data if n not in names]
    return names


def _validate_sources(cfg) -> None:
    known = ["train", *cfg.data.subsets]
    for name in data_sources(cfg):
        if name not in known:
            where = "continual.increments" if cfg.mode == "continual" else "a curriculum stage's data mix"
            raise ConfigError(
                f"{where} names dataset {name!r}, which is not defined; known: {known}. Define it under "
                f"data.subsets (e.g. data.subsets.{name}={{domains: [baking]}}) or fix the name."
            )
