"""Padding, packing and the deterministic numbered batch stream.

Rows are encoded examples: `{"input_ids": list[int], "loss_mask": list[bool]}` (see `formatting`), plus an
optional `attention_mask` (packed rows carry one for their filler tail) and, on packed rows only,
`position_ids` (restarting at 0 at every document; see `pack_rows`). Every batch has a global id
`(epoch, index)`; the same id is always the same batch, which is what lets the teacher, the buffer and a
resumed student agree on the data without shipping it around.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from distill.batch import ROUTE
from distill.errors import ConfigError

BatchId = tuple[int, int]  # (epoch, index), as in distill.batch


def _attention(row: dict) -> list[bool]:
    return row.get("attention_mask") or [True] * len(row["input_ids"])


def pad_batch(rows: Sequence[dict], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `rows` into tensors of shape [B, T], T = `pad_to` or the longest row.

    Returns `input_ids` int64 [B, T], `attention_mask` bool [B, T] (False on padding) and `loss_mask`
    bool [B, T] (always False on padding); packed rows add `position_ids` int64 [B, T] (see `pack_rows`).
    """
    longest = max(len(row["input_ids"]) for row in rows)
    width = longest if pad_to is None else pad_to
    if longest > width:
        raise ConfigError(f"a row has {longest} tokens but pad_to={pad_to}; raise pad_to or truncate rows")
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.int64)
        attention_mask[i, :n] = torch.tensor(_attention(row), dtype=torch.bool)
        loss_mask[i, :n] = torch.tensor(row["loss_mask"], dtype=torch.bool)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    if "position_ids" in rows[0]:
        batch["position_ids"] = _pad_positions(rows, width)
    if "align" in rows[0]:
        batch |= _pad_cross_tokenizer(rows, width)
    if ROUTE in rows[0]:  # several teachers: each row's own (distill/data/routing.py)
        batch[ROUTE] = torch.tensor([row[ROUTE] for row in rows], dtype=torch.int64)
    return batch


def _pad_positions(rows: Sequence[dict], width: int) -> torch.Tensor:
    """position_ids int64 [B, width] of packed rows; padding (packed rows are full-width, so only a wider
    `pad_to`) is one more segment restarting at 0, like the filler, so it never joins a document's attention."""
    if not all("position_ids" in row for row in rows):
        raise ConfigError(
            "a batch mixes packed rows (with position_ids) and unpacked ones; pack every source of a run or none"
        )
    positions = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        n = len(row["position_ids"])
        positions[i, :n] = torch.tensor(row["position_ids"], dtype=torch.int64)
        positions[i, n:] = torch.arange(width - n)
    return positions


def _pad_cross_tokenizer(rows: Sequence[dict], width: int) -> dict[str, torch.Tensor]:
    """The teacher-side fields of cross-tokenizer rows (distill.xtok.encode): teacher_input_ids and
    teacher_attention_mask [B, T_t], align [B, T] (-1 on padding), target_chars [B, T] (0 on padding).

    Teacher padding uses id 0 (every vocabulary has it) under a False attention mask: with right padding
    a causal teacher never attends to it, and no student position aligns to it.
    """
    t_width = max(len(row["teacher_input_ids"]) for row in rows)
    packed = "teacher_position_ids" in rows[0]
    t_positions = torch.zeros((len(rows), t_width), dtype=torch.int64) if packed else None
    t_ids = torch.zeros((len(rows), t_width), dtype=torch.int64)
    t_mask = torch.zeros((len(rows), t_width), dtype=torch.bool)
    align = torch.full((len(rows), width), -1, dtype=torch.int64)
    chars = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        m, n = len(row["teacher_input_ids"]), len(row["align"])
        t_ids[i, :m] = torch.tensor(row["teacher_input_ids"], dtype=torch.int64)
        t_mask[i, :m] = True
        if t_positions is not None:  # packed: the padding is one more segment of its own
            t_positions[i, :m] = torch.tensor(row["teacher_position_ids"], dtype=torch.int64)
            t_positions[i, m:] = torch.arange(t_width - m)
        align[i, :n] = torch.tensor(row["align"], dtype=torch.int64)
        chars[i, :n] = torch.tensor(row["target_chars"], dtype=torch.int64)
    out = {
        "teacher_input_ids": t_ids,
        "teacher_attention_mask": t_mask,
        "align": align,
        "target_chars": chars,
    }
    if t_positions is not None:
        out["teacher_position_ids"] = t_positions
    return out


def _fill(row: dict, seq_len: int, eos_id: int) -> dict:
    """Complete a packed row to exactly seq_len tokens with untrained eos filler; the filler is a segment of
    its own (positions restart at 0), so no document attends to it. Cross-tokenizer rows: the filler aligns to
    no teacher position; the teacher side keeps its own length (padded per batch)."""
    n = len(row["input_ids"])
    filler = seq_len - n
    out = {
        **row,
        "input_ids": row["input_ids"] + [eos_id] * filler,
        "loss_mask": row["loss_mask"] + [False] * filler,
        "attention_mask": [True] * n + [False] * filler,
        "position_ids": row["position_ids"] + list(range(filler)),
    }
    if "align" in row:
        out["align"] = row["align"] + [-1] * filler
        out["target_chars"] = row["target_chars"] + [0] * filler
    return out


def _cut(row: dict, seq_len: int) -> dict:
    """An example's first seq_len tokens (its last kept position untrained); a cross-tokenizer row also keeps
    the teacher tokens up to the last one its kept positions align to."""
    cut = {"input_ids": row["input_ids"][:seq_len], "loss_mask": row["loss_mask"][:seq_len]}
    if cut["loss_mask"]:
        cut["loss_mask"] = [*cut["loss_mask"][:-1], False]  # truncation made a new last position
    if "align" in row:
        cut["align"] = row["align"][:seq_len]
        cut["target_chars"] = row["target_chars"][:seq_len]
        keep = max(cut["align"], default=-1) + 1
        cut["teacher_input_ids"] = row["teacher_input_ids"][: max(keep, 1)]
    return cut


def _append(current: dict, row: dict) -> None:
    """Add one document to a packed row: its tokens, and positions restarting at 0 on both sides; a
    cross-tokenizer document's alignment moves by the teacher tokens already in the row."""
    offset = len(current.get("teacher_input_ids", ()))
    current["input_ids"] += row["input_ids"]
    current["loss_mask"] += row["loss_mask"]
    current["position_ids"] += range(len(row["input_ids"]))
    if "align" in row:
        current.setdefault("teacher_input_ids", [])
        current.setdefault("teacher_position_ids", [])
        current.setdefault("align", [])
        current.setdefault("target_chars", [])
        current["align"] += [a + offset if a >= 0 else -1 for a in row["align"]]
        current["target_chars"] += row["target_chars"]
        current["teacher_input_ids"] += row["teacher_input_ids"]
        current["teacher_position_ids"] += range(len(row["teacher_input_ids"]))


def pack_rows(rows: Sequence[dict], seq_len: int, eos_id: int) -> list[dict]:
    """Greedily pack encoded examples, in order, into rows of exactly `seq_len` tokens.

    An example goes into the current row if it fits, else it starts a new row (examples are never split,
    so a prompt is never separated from its reply); the unused tail of a row is eos filler with
    attention_mask and loss_mask False. An example longer than seq_len is truncated to it.

    Each row carries `position_ids` that restart at 0 at every document and at the filler. Neither loss nor
    attention crosses a document boundary: each example's last position is already masked (the prediction
    of the next document's first token is never trained), and teacher and student forwards turn the
    position_ids into a per-document causal mask (`distill.batch.model_inputs`), so every document is scored
    exactly as if it were alone (its positions included).
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len={seq_len} leaves nothing to predict; use at least 2")
    packed: list[dict] = []
    current: dict = {"input_ids": [], "loss_mask": [], "position_ids": []}
    for row in rows:
        row = _cut(row, seq_len)
        if current["input_ids"] and len(current["input_ids"]) + len(row["input_ids"]) > seq_len:
            packed.append(_fill(current, seq_len, eos_id))
            current = {"input_ids": [], "loss_mask": [], "position_ids": []}
        _append(current, row)
    if current["input_ids"]:
        packed.append(_fill(current, seq_len, eos_id))
    return packed


class BatchStream:
    """A deterministic, numbered stream of batches over encoded rows.

    Batch `(epoch, index)` holds rows `perm[index * B : (index + 1) * B]` of a permutation seeded by
    `(seed, epoch)`, so any batch can be rebuilt from its id alone (`batch(epoch, index)`) and a resumed
    run continues exactly where it stopped (`batches(epoch, start=index)`).

    The last incomplete batch of an epoch is dropped: every step then has the same global batch size,
    which keeps the split across student ranks and micro-steps exact and the loss normalization uniform.

    With `packing`, rows are packed once (after a seeded shuffle, so packs mix examples) into rows of
    exactly `seq_len` tokens, and batches are drawn from the packed rows (with `position_ids` [B, T], one
    segment per document). Without packing, batches are padded to `seq_len` when given (fixed shapes), else
    to their longest row, and carry no position_ids.
    """

    def __init__(
        self,
        rows: Sequence[dict],
        batch_size: int,
        *,
        seed: int,
        pad_id: int,
        packing: bool = False,
        seq_len: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if packing and seq_len is None:
            raise ConfigError("packing=True needs seq_len (the length of every packed row)")
        self.batch_size, self.seed, self.pad_id, self.seq_len = batch_size, seed, pad_id, seq_len
        if packing:
            order = np.random.default_rng([seed, 2**31 - 1]).permutation(len(rows))
            rows = pack_rows([rows[i] for i in order], seq_len, eos_id=pad_id)
        self.rows = list(rows)
        self._cached_perm: tuple[int | None, np.ndarray] = (None, np.empty(0, dtype=np.int64))
        if len(self.rows) < batch_size:
            raise ConfigError(
                f"{len(self.rows)} rows{' after packing' if packing else ''} cannot fill one batch of "
                f"{batch_size}; lower the batch size or use more data"
            )

    @property
    def num_batches(self) -> int:
        """Full batches per epoch (the incomplete tail is dropped)."""
        return len(self.rows) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        # Cached for the current epoch: iteration asks for it once per batch.
        if self._cached_perm[0] != epoch:
            self._cached_perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return self._cached_perm[1]

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """The batch with id `(epoch, index)`; see `pad_batch` for the tensors (packed: + position_ids)."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch index {index} out of range: an epoch has {self.num_batches} batches")
        picked = self._permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return pad_batch([self.rows[i] for i in picked], self.pad_id, pad_to=self.seq_len)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[BatchId, dict[str, torch.Tensor]]]:
        """Yield `((epoch, index), batch)` for index = start .. num_batches - 1."""
        for index in range(start, self.num_batches):
            yield (epoch, index), self.batch(epoch, index)

    def forever(self, start: BatchId = (0, 0)) -> Iterator[tuple[BatchId, dict[str, torch.Tensor]]]:
        """Batches in global order across epochs, from batch id `start` (a resumed run's data cursor)."""
        epoch, index = start
        while True:
            yield from self.batches(epoch, start=index)
            epoch, index = epoch + 1, 0
