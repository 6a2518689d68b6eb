"""Load and save Hugging Face causal-LM folders (config.json + safetensors + tokenizer files), local only.

Any HF causal-LM folder works: the tiny demo models, a student exported by a run, or a downloaded production
checkpoint. Nothing here touches the network (`local_files_only=True`); a missing folder is a CheckpointError
that says what was found and how to get a model (the caller's `hint`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TokenizersBackend,
)

from distill.errors import CheckpointError, ConfigError

DEFAULT_HINT = "set teacher.path / student.path to a Hugging Face model folder (config.json + *.safetensors)"
_WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_folder(path: str | Path, *, hint: str | None = None, need_weights: bool = True) -> Path:
    """The folder as a Path if it holds a config.json (and weights); otherwise a CheckpointError with `hint`."""
    path = Path(path)
    hint = hint or DEFAULT_HINT
    if not path.exists():
        raise CheckpointError(f"model path {path} does not exist; {hint}")
    if not path.is_dir():
        raise CheckpointError(f"model path {path} is a file, not a model folder; {hint}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"model folder {path} has no config.json (found: {_listing(path)}); {hint}")
    if need_weights and not any(next(path.glob(p), None) for p in _WEIGHT_PATTERNS):
        raise CheckpointError(
            f"model folder {path} has no weights (*.safetensors or pytorch_model*.bin; found: {_listing(path)}); "
            f"{hint}"
        )
    return path


def _listing(path: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in path.iterdir())
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) if names else "nothing"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """'float32' | 'bfloat16' | 'float16' | torch.dtype -> torch.dtype; 'auto' keeps the checkpoint's dtype."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; valid: {', '.join([*_DTYPES, 'auto'])}")
    return _DTYPES[dtype]


def load_causal_lm(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    hint: str | None = None,
) -> PreTrainedModel:
    """Load a causal LM from a local HF folder, in eval mode.

    dtype defaults to fp32: transformers 5 loads in the checkpoint's dtype ("auto") otherwise, and bf16 is
    about 2x slower than fp32 on these CPUs. Use attn_implementation="eager" when attention maps are needed.
    """
    folder = check_model_folder(path, hint=hint)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    return model.eval()


def load_tokenizer(path: str | Path, *, hint: str | None = None) -> PreTrainedTokenizerBase:
    """Load the tokenizer saved in a local HF folder."""
    folder = check_model_folder(path, hint=hint, need_weights=False)
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"model folder {folder} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}; "
            f"found: {_listing(folder)}); {hint or DEFAULT_HINT}"
        )
    if _declares_generic_tokenizer(folder):
        return TokenizersBackend.from_pretrained(folder, local_files_only=True)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer_folder(path: str | Path):
    """A tokenizer-only folder (tokenizer.json + tokenizer_config.json, no model): `student.tokenizer`."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise CheckpointError(
            f"student.tokenizer={folder} holds no tokenizer.json / tokenizer_config.json; point it at a folder "
            "written by save_pretrained (e.g. `distill prepare-demo prepare.student_vocab_size=320` makes one)."
        )
    if (folder / "config.json").is_file():
        return load_tokenizer(folder)
    return TokenizersBackend.from_pretrained(folder, local_files_only=True)


def _declares_generic_tokenizer(folder: Path) -> bool:
    """True if tokenizer_config.json names the generic tokenizers-library class and tokenizer.json exists.

    transformers 5 quirk: for some model types (qwen2, phi3, ...) AutoTokenizer ignores that declared class and
    rebuilds the model family's own tokenizer (Qwen2Tokenizer: byte-level BPE) around the saved vocabulary,
    which silently tokenizes a custom word-level tokenizer into nothing. Loading the declared class directly
    keeps the saved tokenizer.json pipeline exactly.
    """
    config_file = folder / "tokenizer_config.json"
    if not (config_file.is_file() and (folder / "tokenizer.json").is_file()):
        return False
    declared = json.loads(config_file.read_text()).get("tokenizer_class")
    return declared in _GENERIC_TOKENIZER_CLASSES


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path
) -> Path:
    """Write `model` (safetensors) and `tokenizer` to `out_dir`, atomically.

    Everything is written to a temporary sibling folder first and renamed into place, so a reader (or a
    crash) never sees a half-written model. An existing `out_dir` is replaced.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        model.save_pretrained(tmp)  # transformers 5 always writes safetensors
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`. A directory rename cannot overwrite a non-empty one, so the old one steps aside."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
