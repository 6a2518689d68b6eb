"""Sparse teacher -> student token map, built once per tokenizer pair and cached on disk.

Every teacher id gets one student id or -1 (no counterpart):

1. exact: the teacher token's bytes equal a student token's bytes, after undoing each tokenizer's space
   markers (byte-level 'Ġ'/'Ċ'/... through GPT-2's byte table, SentencePiece '▁' -> ' ' and '<0xNN>' byte
   fallback). Special tokens match only special tokens with the same string.
2. expansion: the teacher token is a concatenation of student tokens; it maps to the FIRST student token of
   that expansion (as GOLD and ULD do): the probability of the teacher's longer token is the probability of
   starting that text, which is what the student's first piece predicts. The expansion is the student
   tokenizer's own encoding of the text when that concatenates back to the same bytes, else the greedy
   longest-prefix split over the student vocabulary (byte fragments that are not valid UTF-8).
3. otherwise -1: that mass goes to the universal-logit-distillation term, not to a guessed token.

The map is stored as safetensors (int32 ids plus an int8 kind per teacher id) under a name made of both
tokenizers' hashes, written atomically (distill.io), so a second run loads it in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load, save
from transformers import PreTrainedTokenizerBase

from distill.io import atomic_write_bytes
from distill.models.tokenizer import tokenizer_hash

MAP_VERSION = 1  # bump when the mapping rules change, so cached maps are rebuilt
UNMAPPED, EXACT, EXPANSION, SPECIAL = 0, 1, 2, 3
KIND_NAMES = {UNMAPPED: "unmapped", EXACT: "exact", EXPANSION: "expansion", SPECIAL: "special"}


def special_strings(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """id -> string of every special token (added tokens flagged special, plus bos/eos/pad/...)."""
    out = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in tokenizer.all_special_ids:
        out.setdefault(i, tokenizer.convert_ids_to_tokens(i))
    return out


@cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte table (the inverse of `bytes_to_unicode`)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, n = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def marker_style(tokenizer: PreTrainedTokenizerBase) -> str:
    """'bytelevel' or 'metaspace' (SentencePiece) or 'plain', from the tokenizer's decoder."""
    decoder = json.dumps(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    if "ByteLevel" in decoder:
        return "bytelevel"
    if "Metaspace" in decoder or "\u2581" in decoder:
        return "metaspace"
    return "plain"


def token_bytes(token: str, style: str) -> bytes | None:
    """The text bytes a vocabulary entry stands for; None if it cannot be decoded."""
    if style == "bytelevel":
        table = _byte_decoder()
        if any(ch not in table for ch in token):
            return None
        return bytes(table[ch] for ch in token)
    if style == "metaspace" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])  # SentencePiece byte fallback
    if style == "metaspace":
        token = token.replace("\u2581", " ")
    return token.encode("utf-8")


@lru_cache(maxsize=8)
def vocab_bytes(tokenizer: PreTrainedTokenizerBase) -> tuple[list[bytes | None], dict[int, str]]:
    """Per id (0..len-1): the token's bytes (None for specials and holes); and id -> special string.

    Cached per tokenizer (read-only results): `encode_pair` needs them for every example, and serialising the
    tokenizer (`marker_style`) per example cost more than the alignment itself."""
    style = marker_style(tokenizer)
    specials = special_strings(tokenizer)
    out: list[bytes | None] = [None] * len(tokenizer)
    for token, i in tokenizer.get_vocab().items():
        if i < len(out) and i not in specials:
            out[i] = token_bytes(token, style)
    return out, specials


@dataclass(frozen=True)
class TokenMap:
    """teacher id -> student id (-1: none) and how it was found (kind, see the module constants)."""

    ids: np.ndarray  # [V_teacher] int32
    kinds: np.ndarray  # [V_teacher] int8

    def counts(self) -> dict[str, int]:
        return {name: int((self.kinds == k).sum()) for k, name in KIND_NAMES.items()}


def build_token_map(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> TokenMap:
    """Build the map (see the module docstring). O(V_teacher) dictionary lookups plus one batch encode."""
    t_bytes, t_special = vocab_bytes(teacher)
    s_bytes, s_special = vocab_bytes(student)
    s_index = {b: i for i, b in enumerate(s_bytes) if b}
    s_special_index = {text: i for i, text in s_special.items()}
    ids = np.full(len(t_bytes), -1, dtype=np.int32)
    kinds = np.zeros(len(t_bytes), dtype=np.int8)
    for i, text in t_special.items():
        if i < len(ids) and text in s_special_index:
            ids[i], kinds[i] = s_special_index[text], SPECIAL
    pending = []
    for i, b in enumerate(t_bytes):
        if not b:
            continue
        if b in s_index:
            ids[i], kinds[i] = s_index[b], EXACT
        else:
            pending.append(i)
    decodable = [i for i in pending if _utf8(t_bytes[i]) is not None]
    texts = [_utf8(t_bytes[i]) for i in decodable]
    encoded = student(texts, add_special_tokens=False)["input_ids"] if texts else []
    first = dict(zip(decodable, encoded, strict=True))
    for i in pending:
        pieces = first.get(i)
        if not pieces or b"".join(s_bytes[p] or b"\0" for p in pieces) != t_bytes[i]:
            pieces = _greedy_split(t_bytes[i], s_index)
        if pieces:
            ids[i], kinds[i] = pieces[0], EXPANSION
    return TokenMap(ids, kinds)


def _utf8(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _greedy_split(b: bytes, index: dict[bytes, int]) -> list[int] | None:
    """Longest-prefix split of `b` over the student's byte strings; None if some byte has no token."""
    out, pos = [], 0
    while pos < len(b):
        for end in range(len(b), pos, -1):
            if b[pos:end] in index:
                out.append(index[b[pos:end]])
                pos = end
                break
        else:
            return None
    return out


def map_key(teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase) -> str:
    """Cache key: both tokenizers' hashes and the map version."""
    src = f"v{MAP_VERSION}:{tokenizer_hash(teacher)}:{tokenizer_hash(student)}"
    return hashlib.sha256(src.encode()).hexdigest()[:20]


def load_or_build_token_map(
    teacher: PreTrainedTokenizerBase, student: PreTrainedTokenizerBase, cache_dir: str | Path
) -> TokenMap:
    """The cached map of this tokenizer pair, built and written (atomically) on first use."""
    path = Path(cache_dir) / f"token_map-{map_key(teacher, student)}.safetensors"
    if path.is_file():
        tensors = load(path.read_bytes())
        return TokenMap(tensors["ids"].numpy(), tensors["kinds"].numpy())
    token_map = build_token_map(teacher, student)
    payload = {"ids": torch.from_numpy(token_map.ids), "kinds": torch.from_numpy(token_map.kinds)}
    atomic_write_bytes(path, save(payload, metadata={k: str(v) for k, v in token_map.counts().items()}))
    return token_map
