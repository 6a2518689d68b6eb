"""Compact on-disk encodings of a TeacherBatch's top-k part, selected by name.

ids encodings
  int32       plain, 4 B per id
  packed<b>   every id in b bits, a token's k ids packed into ceil(k*b/8) bytes. `packed17` covers any vocab of
              up to 2**17 = 131,072 ids (e.g. 129,280); `packed_ids_name(vocab_size)` gives the smallest name.

logits encodings (log_normalizer is always stored as fp32)
  fp32, fp16, bf16   the raw top-k logits cast to that dtype (bf16 stored as uint16 bits)
  gap8, gap7         each logit's gap to the row's top logit, rounded to a fixed step and stored in 8 or 7
                     bits, plus the row's log top-k mass (fp16). Decoding rebuilds the within-top-k
                     distribution from the gaps and rescales it to the exact stored top-k mass, so the tail
                     bucket (1 - top-k mass) survives the rounding; plain fp16/bf16 casts do not guarantee that.

Top-k+tail semantics (as in distill/losses/teachers.py): a token's teacher is a distribution over its k ids plus
one tail bucket of mass 1 - sum_i exp(topk_logits_i - log_normalizer). `topk_kl` measures what an encoding
changes in that distribution.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distill.batch import TeacherBatch, numpy_to_tensor
from distill.errors import ConfigError

IDS_INT32 = "int32"
_PACKED = re.compile(r"packed(\d+)")


@dataclass(frozen=True)
class _GapCode:
    """Uniform grid on the gap to the row's top logit: codes 0 .. 2**bits - 1, gap = code * step."""

    bits: int
    step: float  # nats; the largest representable gap is (2**bits - 1) * step, larger ones are clipped

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1


# Both grids reach ~15.9 nats below the top logit (relative prob 1e-7); beyond that a token's mass is
# negligible, so clipping it costs nothing measurable. The rounding error is uniform in +-step/2, which adds
# KL ~ step**2/24 * (1 - p_top) nats per token: <= 1.6e-4 (gap8) and <= 6.5e-4 (gap7) even for flat rows.
GAP_CODES = {"gap8": _GapCode(bits=8, step=1 / 16), "gap7": _GapCode(bits=7, step=1 / 8)}
PLAIN_LOGITS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
LOGITS_ENCODINGS = (*PLAIN_LOGITS, *GAP_CODES)
IDS_ENCODINGS = (IDS_INT32, "packed<bits>")  # for messages; packed17 is the 129,280-token vocab's choice

# Stored as they are. position_ids (packed rows) travel with the inputs: a student reading the cache needs the
# per-document mask the teacher scored with.
_PASSTHROUGH = ("input_ids", "attention_mask", "loss_mask", "position_ids", "aligned", "hidden", "attention")
_FLOAT_NAMES = ("float32", "float16", "bfloat16")


def id_bits_for_vocab(vocab_size: int) -> int:
    """ceil(log2(vocab_size)), at least 1: the bits that hold ids 0 .. vocab_size - 1 (exact int math)."""
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1; got {vocab_size}.")
    return max(1, (vocab_size - 1).bit_length())


def packed_ids_name(vocab_size: int) -> str:
    """The smallest packed ids encoding for this vocabulary, e.g. 129280 -> 'packed17'."""
    return f"packed{id_bits_for_vocab(vocab_size)}"


@dataclass(frozen=True)
class Encoding:
    """A validated pair of encoding names; `describe()` is what the manifest records about it."""

    ids: str
    logits: str

    def __post_init__(self) -> None:
        if self.ids != IDS_INT32 and not (_PACKED.fullmatch(self.ids) and 1 <= self._packed_bits() <= 32):
            raise ConfigError(
                f"unknown ids encoding {self.ids!r}; valid: 'int32' or 'packed<bits>' with 1 <= bits <= 32 "
                f"(e.g. 'packed17' for a vocab of up to 131,072; see packed_ids_name(vocab_size))."
            )
        if self.logits not in LOGITS_ENCODINGS:
            raise ConfigError(
                f"unknown logits encoding {self.logits!r}; valid: {', '.join(LOGITS_ENCODINGS)}."
            )

    def _packed_bits(self) -> int:
        match = _PACKED.fullmatch(self.ids)
        return int(match.group(1)) if match else 0

    @property
    def id_bits(self) -> int | None:
        """Bits per packed id, None for plain int32."""
        return self._packed_bits() or None

    @property
    def gap(self) -> _GapCode | None:
        return GAP_CODES.get(self.logits)

    def check_vocab(self, vocab_size: int) -> None:
        """ConfigError when packed ids cannot hold every id of the vocabulary."""
        bits = self.id_bits
        if bits is not None and vocab_size > (1 << bits):
            raise ConfigError(
                f"ids encoding {self.ids!r} holds ids < {1 << bits} but vocab_size is {vocab_size}; "
                f"use {packed_ids_name(vocab_size)!r} or 'int32'."
            )

    def bytes_per_token(self, k: int) -> int:
        """Bytes of one token's top-k payload on disk: ids + logits + log_normalizer (+ log top-k mass)."""
        bits = self.id_bits
        ids = 4 * k if bits is None else _packed_len(k, bits)
        gap = self.gap
        if gap is None:
            logits = k * np.dtype(np.float16 if self.logits != "fp32" else np.float32).itemsize
        else:
            logits = _packed_len(k, gap.bits) + 2  # codes + fp16 log top-k mass
        return ids + logits + 4  # + fp32 log_normalizer

    def describe(self) -> dict[str, Any]:
        gap = self.gap
        return {
            "ids": self.ids,
            "id_bits": self.id_bits,
            "logits": self.logits,
            "logit_bits": gap.bits if gap else None,
            "logit_step": gap.step if gap else None,
        }


def bytes_per_token(k: int, ids: str, logits: str) -> int:
    """Top-k payload bytes per token (ids + logits + log_normalizer) of an encoding, e.g. (64, 'packed17', 'gap7')."""
    return Encoding(ids, logits).bytes_per_token(k)


# ---------------------------------------------------------------------------------------------- bit packing


def _packed_len(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers < 2**bits along the last axis, most significant bit first.

    values [..., n] any integer dtype -> [..., ceil(n * bits / 8)] uint8 (the last byte zero-padded).
    Vectorised through a [..., n, 32] bit matrix: 32 temporary bytes per value, no Python loop per value.
    """
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= (1 << bits)):
        raise ConfigError(
            f"cannot pack values in [{values.min()}, {values.max()}] into {bits} bits (max {(1 << bits) - 1})."
        )
    lead, n = values.shape[:-1], values.shape[-1]
    big_endian = np.ascontiguousarray(values, dtype=">u4")  # big endian: unpackbits yields MSB first
    bit_matrix = np.unpackbits(big_endian.view(np.uint8).reshape(*lead, n, 4), axis=-1)  # [..., n, 32]
    return np.packbits(bit_matrix[..., 32 - bits :].reshape(*lead, n * bits), axis=-1)


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: [..., ceil(n * bits / 8)] uint8 -> [..., n] int32."""
    lead = packed.shape[:-1]
    if packed.shape[-1] != _packed_len(n, bits):
        raise ValueError(
            f"{n} values of {bits} bits need {_packed_len(n, bits)} bytes, got {packed.shape[-1]}"
        )
    bit_matrix = np.unpackbits(packed, axis=-1, count=n * bits).reshape(*lead, n, bits)
    full = np.zeros((*lead, n, 32), dtype=np.uint8)
    full[..., 32 - bits :] = bit_matrix
    return np.packbits(full, axis=-1).view(">u4").reshape(*lead, n).astype(np.int32)


# ------------------------------------------------------------------------------------------ encode / decode


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """logsumexp over the last axis: [..., k] -> [...]."""
    top = x.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True)))[..., 0]


def _logits_fp32(batch: TeacherBatch) -> np.ndarray:
    """topk_logits [B, T, k] as fp32, whatever their stored dtype (bf16 bits included)."""
    return batch.tensor("topk_logits").float().numpy()


def _cast_logits(batch: TeacherBatch, dtype_name: str) -> np.ndarray:
    """The raw logits cast through torch (numpy has no bf16); bf16 comes back as its uint16 bits."""
    t = batch.tensor("topk_logits").to(getattr(torch, dtype_name))
    return t.view(torch.uint16).numpy() if dtype_name == "bfloat16" else t.numpy()


def _encode_gaps(z: np.ndarray, log_normalizer: np.ndarray, code: _GapCode) -> dict[str, np.ndarray]:
    """z [B, T, k] fp32, log_normalizer [B, T] -> codes [B, T, k] uint8 (or packed) + log_topk_mass [B, T] fp16."""
    z64 = z.astype(np.float64)
    gaps = z64.max(axis=-1, keepdims=True) - z64  # >= 0; the row's top logit gets gap 0, exactly
    codes = np.clip(np.rint(gaps / code.step), 0, code.max_code).astype(np.uint8)
    # log(top-k mass) <= 0; a positive value is rounding noise of a negligible tail. fp16 keeps it to ~5e-4
    # relative, i.e. the tail mass (~ -log_mass when the tail is small) to 5e-4 relative as well.
    log_mass = np.minimum(_logsumexp(z64) - log_normalizer.astype(np.float64), 0.0)
    payload = codes if code.bits == 8 else pack_bits(codes, code.bits)
    return {"topk_logits": payload, "log_topk_mass": log_mass.astype(np.float16)}


def _decode_gaps(arrays: dict[str, np.ndarray], code: _GapCode, k: int) -> np.ndarray:
    """codes + log_topk_mass + log_normalizer -> topk_logits [B, T, k] fp32 with the stored top-k mass."""
    payload = arrays["topk_logits"]
    codes = payload if code.bits == 8 else unpack_bits(payload, code.bits, k)
    neg_gaps = -codes.astype(np.float64) * code.step
    within = neg_gaps - _logsumexp(neg_gaps)[..., None]  # log-probs inside the top-k, summing to 1
    offset = arrays["log_normalizer"].astype(np.float64) + arrays["log_topk_mass"].astype(np.float64)
    return (within + offset[..., None]).astype(np.float32)


def _dtype_name(batch: TeacherBatch, name: str) -> str:
    array = getattr(batch, name)
    return batch.float_dtypes.get(name, array.dtype.name)


def encode(batch: TeacherBatch, ids: str, logits: str) -> dict[str, np.ndarray]:
    """The arrays stored for `batch`: top-k part encoded, everything else as it is (bf16 as uint16 bits).

    Keys: input_ids, attention_mask, loss_mask, topk_ids ([B, T, k] int32 or [B, T, ceil(k*b/8)] uint8),
    topk_logits, log_normalizer [B, T] fp32, log_topk_mass [B, T] fp16 (gap encodings only), position_ids,
    hidden, attention (when present). Decode with `decode(arrays, decode_meta(batch, ids, logits))`.
    """
    encoding = Encoding(ids, logits)
    out = {name: getattr(batch, name) for name in _PASSTHROUGH if getattr(batch, name) is not None}
    topk_ids = batch.topk_ids
    out["topk_ids"] = (
        topk_ids.astype(np.int32) if encoding.id_bits is None else pack_bits(topk_ids, encoding.id_bits)
    )
    out["log_normalizer"] = batch.log_normalizer.astype(np.float32)
    gap = encoding.gap
    if gap is None:
        out["topk_logits"] = _cast_logits(batch, PLAIN_LOGITS[logits])
    else:
        out.update(_encode_gaps(_logits_fp32(batch), out["log_normalizer"], gap))
    return {name: np.ascontiguousarray(a) for name, a in out.items()}


def decode_meta(batch: TeacherBatch, ids: str, logits: str) -> dict[str, Any]:
    """What `decode` needs besides the arrays: encoding names, k, batch id, dtypes of hidden/attention."""
    return {
        "ids": ids,
        "logits": logits,
        "k": batch.k,
        "batch_id": list(batch.batch_id),
        "float_dtypes": {
            name: _dtype_name(batch, name)
            for name in ("hidden", "attention")
            if getattr(batch, name) is not None
        },
    }


def decode(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> TeacherBatch:
    """Inverse of `encode`: ids exact; logits exact for fp32, within the encoding's precision otherwise.

    meta: {"ids", "logits", "k", "batch_id": [epoch, index], "float_dtypes": {"hidden": "bfloat16", ...}}.
    Decoded topk_logits are fp32 (fp32 and gap encodings), fp16, or bf16 bits tagged in float_dtypes.
    """
    encoding = Encoding(meta["ids"], meta["logits"])
    k = int(meta["k"])
    bits = encoding.id_bits
    topk_ids = arrays["topk_ids"] if bits is None else unpack_bits(arrays["topk_ids"], bits, k)
    gap = encoding.gap
    if gap is None:
        topk_logits = arrays["topk_logits"]
        logits_dtype = PLAIN_LOGITS[meta["logits"]]
    else:
        topk_logits, logits_dtype = _decode_gaps(arrays, gap, k), "float32"
    float_dtypes = {"topk_logits": logits_dtype, "log_normalizer": "float32", **meta["float_dtypes"]}
    epoch, index = meta["batch_id"]
    return TeacherBatch(
        batch_id=(int(epoch), int(index)),
        input_ids=arrays["input_ids"],
        attention_mask=arrays["attention_mask"],
        loss_mask=arrays["loss_mask"],
        topk_ids=topk_ids.astype(np.int32, copy=False),
        topk_logits=topk_logits,
        log_normalizer=arrays["log_normalizer"],
        hidden=arrays.get("hidden"),
        attention=arrays.get("attention"),
        float_dtypes=float_dtypes,
        position_ids=arrays.get("position_ids"),  # None in unpacked caches and caches from before the field
        aligned=arrays.get("aligned"),  # cross-tokenizer caches only
    )


# ------------------------------------------------------------------------------------------------ KL error

# A decoded tail that vanished where the original had mass is scored against this floor instead of 0, so the
# measurement stays finite but makes the loss visible (p_tail * ~69 nats).
_KL_FLOOR = 1e-30


def _bucket_probs(batch: TeacherBatch, mask: np.ndarray) -> np.ndarray:
    """The top-k+tail teacher of the masked tokens: [N, k + 1] fp64 probabilities (tail last), rows sum to 1."""
    z = numpy_to_tensor(batch.topk_logits, _dtype_name(batch, "topk_logits")).double().numpy()[mask]
    p = np.exp(z - batch.log_normalizer.astype(np.float64)[mask][:, None])
    tail = np.clip(1.0 - p.sum(axis=-1, keepdims=True), 0.0, None)
    buckets = np.concatenate([p, tail], axis=-1)
    # A top-k mass above 1 (rounding) leaves no tail: the loss then renormalises the k buckets, as here.
    return buckets / buckets.sum(axis=-1, keepdims=True)


def per_token_kl(original: TeacherBatch, decoded: TeacherBatch) -> np.ndarray:
    """KL(original top-k+tail teacher || decoded one) of each masked token: [N] fp64 nats."""
    if not np.array_equal(original.topk_ids, decoded.topk_ids):
        raise ValueError("the KL compares the same ids' buckets; the two batches' topk_ids differ")
    mask = original.loss_mask.astype(bool)
    p, q = _bucket_probs(original, mask), _bucket_probs(decoded, mask)
    log_ratio = np.log(np.where(p > 0, p, 1.0)) - np.log(np.where(q > 0, q, _KL_FLOOR))
    return np.where(p > 0, p * log_ratio, 0.0).sum(axis=-1)


def topk_kl(original: TeacherBatch, decoded: TeacherBatch) -> float:
    """Mean over masked tokens of KL(original top-k+tail teacher || decoded one), in nats per token."""
    kl = per_token_kl(original, decoded)
    return float(kl.mean()) if kl.size else 0.0


def encoding_kl(batch: TeacherBatch, ids: str, logits: str) -> float:
    """The KL error (nats/token) that encoding `batch` with (ids, logits) and decoding it adds."""
    decoded = decode(encode(batch, ids, logits), decode_meta(batch, ids, logits))
    return topk_kl(batch, decoded)
