"""The wire format every layer shares: TeacherBatch, the unit that travels teacher -> buffer -> student and lands
in the offline cache, its BatchId, and the next-token label rule. A leaf: it imports nothing of the package.

Arrays are numpy so Ray's object store shares them zero-copy. numpy has no bfloat16, so bf16 payloads are
stored as their raw uint16 bit pattern and tagged in `float_dtypes`; `to_torch()` restores the real dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch

BatchId = tuple[int, int]  # (epoch, index): global order; decides which rank and micro-step consume it

ROUTE = "teacher"
"""With several teachers, a micro-batch's [B] field: each row's teacher (its index in the run's `teachers`)."""
ENSEMBLE = -1
"""ROUTE's value for a row that every teacher of the ensemble scores (their mixture)."""
ENSEMBLE_NAME = "ensemble"
"""What routing rules and data fields call the ensemble."""

_TORCH_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_FLOAT_FIELDS = ("topk_logits", "hidden", "attention")
_ID_FIELDS = ("input_ids", "topk_ids", "position_ids")  # int32 on the wire, int64 in torch


def tensor_to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """Detach to CPU numpy; bf16 goes out as its uint16 bit pattern. Returns (array, dtype name)."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy(), name
    return t.numpy(), name


def readonly_tensor(a: np.ndarray) -> torch.Tensor:
    """Zero-copy tensor over a numpy array that may be read-only (Ray's object store hands those out).

    torch warns because writing through such a tensor is undefined; teacher outputs are never written to.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(a))


def numpy_to_tensor(a: np.ndarray, dtype_name: str) -> torch.Tensor:
    t = readonly_tensor(a)
    if dtype_name == "bfloat16":
        return t.view(torch.bfloat16)
    return t


@dataclass
class TeacherBatch:
    """Compact teacher outputs for one batch of B sequences of length T.

    input_ids      [B, T] int32   tokens (shared tokenizer unless a token map is configured)
    attention_mask [B, T] bool    real tokens (False on padding)
    loss_mask      [B, T] bool    positions whose *next* token is trained (prompt and padding masked)
    topk_ids       [B, T, k] int32  teacher's k most likely next tokens
    topk_logits    [B, T, k] float  their raw logits at T=1 (temperature is the loss's business)
    log_normalizer [B, T] fp32    full-vocab logsumexp at T=1, so the tail mass outside top-k is known
    hidden         [B, T, L_sel, H_t] optional teacher hidden states of the configured layers
    attention      [B, L_sel, T, T] optional head-averaged attention maps of the configured layers
    position_ids   [B, T] int32   optional, packed rows only: positions restarting at 0 at every document;
                                  the student's forward needs them for the per-document mask the teacher used
                                  (`model_inputs`). None on unpacked batches (and on batches from before the field).
    aligned        [B, T] bool    optional, cross-tokenizer batches only: student positions with a teacher
                                  counterpart (distill.xtok); hidden states and attention maps exist there only,
                                  so feature terms compare those positions. None: every position has one.
    """

    batch_id: BatchId
    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logits: np.ndarray
    log_normalizer: np.ndarray
    hidden: np.ndarray | None = None
    attention: np.ndarray | None = None
    float_dtypes: dict[str, str] = field(default_factory=dict)
    # Last, so positional construction keeps its meaning; a class-level default, so a TeacherBatch pickled
    # before this field existed unpickles with None.
    position_ids: np.ndarray | None = None
    aligned: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.topk_ids.shape[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array field that is present, by name."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                out[f.name] = v
        return out

    @classmethod
    def from_torch(cls, batch_id: BatchId, **tensors: torch.Tensor | None) -> TeacherBatch:
        """Build from torch tensors (any device); floats keep their dtype (bf16 via uint16 bits)."""
        arrays: dict[str, np.ndarray | None] = {}
        dtypes: dict[str, str] = {}
        for name, t in tensors.items():
            if t is None:
                arrays[name] = None
                continue
            arrays[name], dtypes[name] = tensor_to_numpy(t)
        return cls(batch_id=tuple(batch_id), float_dtypes=dtypes, **arrays)  # type: ignore[arg-type]

    def tensor(self, name: str) -> torch.Tensor | None:
        """One field as a torch tensor (zero-copy from numpy where possible)."""
        a = getattr(self, name)
        if a is None:
            return None
        return numpy_to_tensor(a, self.float_dtypes.get(name, str(a.dtype)))

    def to_torch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor | None]:
        """All fields as tensors on `device`; ids as int64 (what embedding/gather kernels want)."""
        out: dict[str, torch.Tensor | None] = {}
        for f in fields(self):
            if f.name in ("batch_id", "float_dtypes"):
                continue
            t = self.tensor(f.name)
            if t is not None and f.name in _ID_FIELDS:
                t = t.long()
            out[f.name] = None if t is None else t.to(device)
        return out


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """labels[b, t] = input_ids[b, t + 1]; the last position has no next token (its loss_mask is False)."""
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def model_inputs(batch: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    """The attention inputs of a forward (teacher or student) over `batch`.

    Packed rows carry `position_ids` [B, T] that restart at 0 at every document (and at the filler tail).
    transformers builds a per-document causal mask from them (block-diagonal; varlen under flash-attention)
    only when no 2-D attention mask is passed, so a packed batch goes in as position_ids alone; an unpacked
    one as its padding mask.
    """
    if batch.get("position_ids") is not None:
        return {"attention_mask": None, "position_ids": batch["position_ids"]}
    return {"attention_mask": batch["attention_mask"].long(), "position_ids": None}


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) int64 [B, T] of `prompts` padded on the left, so every row ends where
    decoder-only generation continues it."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attend = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attend[row, width - len(p) :] = 1
    return ids, attend


def cut_after_stop(row: list[int], stop_id: int) -> list[int]:
    """A generated row up to and including its first stop token (the padding after it dropped)."""
    return row[: row.index(stop_id) + 1] if stop_id in row else row
