"""Where a run's models and tokenizers come from, built beside their configs (`teacher.*`, `student.*`).

A teacher or student is a Hugging Face folder (`path`), a tiny real architecture built fresh (`arch` in
TINY_ARCHS), or a shipped production architecture whose config validates a run without weights. A tiny arch at a
production vocabulary (REAL_VOCAB_ARCHS: tiny_r1, tiny_qwen2_5) comes with its real tokenizer, built from an installed
package into the cache (distill/models/real_tokenizers.py).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import OmegaConf

from distill.config.topology import ModelShape, PairFacts
from distill.errors import CheckpointError, ConfigError
from distill.models.facts import ModelFacts, arch_config_path, load_config
from distill.models.from_teacher import copy_of_teacher, evenly_spaced_layers, student_config
from distill.models.loading import load_causal_lm, load_tokenizer, load_tokenizer_folder, resolve_dtype
from distill.models.real_tokenizers import ensure_real_tokenizer
from distill.models.tiny import REAL_VOCAB_ARCHS, TINY_ARCHS, build_model, tiny_config
from distill.models.tokenizer import tokenizer_hash

# Bump when the demo teacher's training recipe changes so stale caches are not reused.
DEMO_RECIPE_VERSION = 2  # 2: the tiny teacher declares 8,192 positions (packed 8k runs)


# ---- where the teacher lives ---------------------------------------------------------------------------
def demo_teacher_dir(cfg) -> Path:
    """The prepare-demo teacher's folder, keyed by everything that shapes it."""
    prep = OmegaConf.to_container(cfg.prepare, resolve=True)
    # student_vocab_size shapes only the demo's second tokenizer, never the teacher.
    for volatile in ("cache_dir", "force", "eval_examples", "student_vocab_size"):
        prep.pop(volatile)
    # None (all domains) keeps the key that configs had before the field existed; a domain set is keyed as a set.
    domains = prep.pop("teacher_domains")
    if domains is not None:
        prep["teacher_domains"] = sorted(set(domains))
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


def demo_teacher_tokenizer_dir(cfg) -> Path | None:
    """The real tokenizer folder a prepare-demo teacher trains on (a REAL_VOCAB_ARCHS teacher; built on first use),
    or None: prepare-demo trains the local task tokenizer."""
    return _real_vocab_tokenizer_dir(cfg, cfg.teacher)


def require_teacher(cfg) -> Path:
    path = teacher_dir(cfg)
    if not (path / "config.json").is_file():
        hint = "run `distill prepare-demo` first" if not cfg.teacher.path else "check teacher.path"
        raise CheckpointError(f"teacher checkpoint {path} does not exist or has no config.json; {hint}.")
    return path


# ---- architecture facts (config.json only) -----------------------------------------------------------
def model_facts(model_cfg, vocab_size: int) -> ModelFacts:
    """Facts of a teacher/student config: its folder, a tiny arch, or a shipped production arch config."""
    if getattr(model_cfg, "init_from_teacher", False):
        raise ConfigError(
            "a student initialised from the teacher has no facts of its own: use student_facts."
        )
    if model_cfg.path:
        return ModelFacts.from_path(model_cfg.path)
    if model_cfg.arch in TINY_ARCHS:
        overrides = dict(getattr(model_cfg, "overrides", {}) or {})
        return ModelFacts.from_config(tiny_config(model_cfg.arch, vocab_size, **overrides))
    if model_cfg.arch:
        return ModelFacts.from_path(arch_config_path(model_cfg.arch))
    raise ConfigError(f"{model_cfg.name}: set either `arch` or `path`.")


def pair_facts(cfg, tokenizer=None) -> PairFacts:
    """Teacher and student facts. A tiny student borrows the teacher's tokenizer, so it shares the vocab, unless it
    has its own (student.tokenizer, or the real tokenizer of a REAL_VOCAB_ARCHS student)."""
    if tokenizer is None and (real := demo_teacher_tokenizer_dir(cfg)) is not None:
        tokenizer = load_tokenizer_folder(real)  # known before the teacher is prepared
    vocab = len(tokenizer) if tokenizer is not None else cfg.prepare.vocab_size
    t = model_facts(cfg.teacher, vocab)
    s_vocab = t.vocab_size if (cfg.student.arch in TINY_ARCHS and not cfg.student.path) else None
    own_folder = _own_student_tokenizer_dir(cfg)
    own = load_tokenizer_folder(own_folder) if own_folder else None
    if own is not None and cfg.student.arch in TINY_ARCHS and not cfg.student.path:
        s_vocab = len(own)  # a tiny student built on its own tokenizer
    s = student_facts(cfg, s_vocab or vocab)
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


def student_facts(cfg, vocab_size: int) -> ModelFacts:
    """The student's facts; one initialised from the teacher is the teacher's config with its picked layers."""
    if not cfg.student.init_from_teacher:
        return model_facts(cfg.student, vocab_size)
    teacher = load_config(require_teacher(cfg))
    return ModelFacts.from_config(student_config(teacher, teacher_layers_for_student(cfg, teacher)))


def teacher_layers_for_student(cfg, teacher_config) -> list[int]:
    """student.teacher_layers, or student.num_layers (0: half the teacher's) evenly spaced."""
    s = cfg.student
    if s.path or s.arch:
        raise ConfigError(
            "student.init_from_teacher=true builds the student from the teacher's layers; unset student.path "
            f"and student.arch (got path={s.path!r}, arch={s.arch!r}), or set init_from_teacher=false."
        )
    if s.teacher_layers:
        return [int(i) for i in s.teacher_layers]
    depth = teacher_config.num_hidden_layers
    return evenly_spaced_layers(depth, int(s.num_layers) or max(1, depth // 2))


def _tokenizers_match(teacher: Path, student: Path, fallback: bool) -> bool:
    """Same tokenizer means same token ids, even when embedding tables are padded to different sizes."""
    try:
        return tokenizer_hash(load_tokenizer(teacher)) == tokenizer_hash(load_tokenizer(student))
    except (OSError, ValueError, CheckpointError):
        return fallback


# ---- the student ------------------------------------------------------------------------------------------
def student_tokenizer(cfg, teacher_tokenizer):
    """The tokenizer the student trains with (see `student_tokenizer_folder`)."""
    folder = student_tokenizer_folder(cfg)
    return load_tokenizer_folder(folder) if folder else teacher_tokenizer


def student_tokenizer_folder(cfg) -> str | None:
    """The folder of the student's own tokenizer: student.tokenizer, else a REAL_VOCAB_ARCHS student's real one,
    else (with a token map) student.path; None when the student trains on the teacher's tokenizer."""
    own = _own_student_tokenizer_dir(cfg)
    if own is not None:
        return str(own)
    if cfg.teacher.token_map.enabled and cfg.student.path:
        return str(cfg.student.path)
    return None


def _own_student_tokenizer_dir(cfg) -> Path | None:
    """student.tokenizer, or the real tokenizer of a REAL_VOCAB_ARCHS student (built on first use)."""
    if cfg.student.tokenizer:
        return Path(cfg.student.tokenizer)
    return _real_vocab_tokenizer_dir(cfg, cfg.student)


def _real_vocab_tokenizer_dir(cfg, model_cfg) -> Path | None:
    """The cached real tokenizer of a tiny model at a production vocabulary; None for any other model."""
    if model_cfg.path or model_cfg.arch not in REAL_VOCAB_ARCHS:
        return None
    return ensure_real_tokenizer(REAL_VOCAB_ARCHS[model_cfg.arch], cfg.prepare.cache_dir)


def build_student(cfg, tokenizer):
    """The base student (`_base_student`), wrapped in LoRA adapters when `student.lora.enabled`."""
    model = _base_student(cfg, tokenizer)
    if not cfg.student.lora.enabled:
        return model
    from distill.models.lora import apply_lora  # peft is an optional extra: only LoRA runs need it

    return apply_lora(model, cfg.student.lora)


def _base_student(cfg, tokenizer):
    """A student from a checkpoint folder, or a fresh tiny architecture on the teacher's vocabulary."""
    s = cfg.student
    attn = "eager" if _needs_attention(cfg) else None
    if s.init_from_teacher:
        teacher = load_causal_lm(require_teacher(cfg), dtype=s.dtype, attn_implementation=attn)
        return copy_of_teacher(teacher, teacher_layers_for_student(cfg, teacher.config))
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
        if config.vocab_size < len(tokenizer):  # a production-vocabulary arch or an override too small
            raise ConfigError(
                f"student={s.name} ({s.arch}) has {config.vocab_size} embedding rows, fewer than its tokenizer's "
                f"{len(tokenizer)} ids; use the arch with its own tokenizer, or a larger student.overrides.vocab_size."
            )
        return build_model(config, seed=s.init_seed, attn_implementation=attn).to(resolve_dtype(s.dtype))
    raise ConfigError(
        f"student={s.name} has no weights on this machine: set student.path=<Hugging Face folder>."
    )


def _needs_attention(cfg) -> bool:
    return any(t.name == "attention_transfer" and t.weight != 0 for t in cfg.loss.terms.values())
