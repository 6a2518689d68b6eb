"""TeacherEngine: one teacher forward -> TeacherBatch (top-k logits, log-normaliser, optional features).

No Ray and no process groups here: the Ray actor wraps this engine, and a tensor-parallel teacher swaps in a
vocab-parallel `topk_with_normalizer` (each rank holds a vocabulary slice; the global top-k and logsumexp need
one all-gather of k candidates per rank; see `TeacherEngine.tensor_parallel` and distill/teacher/parallel.py).
The device is a constructor argument, never assumed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from distill.batch import BatchId, TeacherBatch, model_inputs
from distill.errors import ConfigError
from distill.models.loading import load_causal_lm
from distill.teacher.attention import use_padded_sdpa
from distill.teacher.topk import topk_with_normalizer

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh

TopKFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
HeadMeanFn = Callable[[torch.Tensor], torch.Tensor]


def check_length_groups(groups) -> None:
    """ConfigError unless `groups` (teacher.length_groups) is an integer >= 1."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ConfigError(
            f"teacher.length_groups={groups!r} must be an integer >= 1 (1: one forward per batch)"
        )


def length_groups(attention_mask: torch.Tensor, groups: int) -> list[tuple[torch.Tensor, int]] | None:
    """Rows of a right-padded batch split into up to `groups` groups of similar length: [(row indices, width)],
    width = the group's longest row. None: score the batch in one forward (one group asked for, a mask that is
    not right padding, or no group narrower than the batch)."""
    if groups <= 1:
        return None
    lengths = attention_mask.sum(dim=1)
    width = attention_mask.shape[1]
    if not torch.equal(attention_mask.bool(), torch.arange(width, device=lengths.device) < lengths[:, None]):
        return None  # left padding or holes: only a prefix mask can be cut (a packed row's filler is a tail)
    order = torch.argsort(lengths, stable=True)
    split = [rows for rows in torch.tensor_split(order, min(groups, len(order))) if len(rows)]
    out = [(rows, max(int(lengths[rows].max()), 1)) for rows in split]
    return out if any(w < width for _, w in out) else None


def _cut(rows: torch.Tensor, width: int, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """`rows` of each [B, T] tensor, cut to their first `width` positions (None stays None)."""
    return [None if t is None else t[rows, :width] for t in tensors]


def fill_padding(parts: list[tuple[torch.Tensor, tuple]], shape: tuple[int, int], k: int) -> tuple:
    """Per-group `_forward` outputs back into [B, T, ...] tensors. Positions past a group's width get a
    well-formed placeholder: ids 0..k-1 with equal logits 0 and log-normaliser log k (a uniform top-k; finite,
    so a masked loss multiplies zeros, never NaN), zero hidden states and attention."""
    b, t = shape
    ids, values, lse, hidden, attention = parts[0][1]
    out_ids = torch.arange(k, dtype=ids.dtype).expand(b, t, k).clone()
    out_values = torch.zeros((b, t, k), dtype=values.dtype)
    out_lse = torch.full((b, t), math.log(k), dtype=lse.dtype)
    out_hidden = None if hidden is None else hidden.new_zeros((b, t, *hidden.shape[2:]))
    out_attention = None if attention is None else attention.new_zeros((b, attention.shape[1], t, t))
    for rows, (g_ids, g_values, g_lse, g_hidden, g_attention) in parts:
        w = g_ids.shape[1]
        out_ids[rows, :w], out_values[rows, :w], out_lse[rows, :w] = g_ids.cpu(), g_values.cpu(), g_lse.cpu()
        if out_hidden is not None:
            out_hidden[rows, :w] = g_hidden.cpu()
        if out_attention is not None:
            out_attention[rows, :, :w, :w] = g_attention.cpu()
    return out_ids, out_values, out_lse, out_hidden, out_attention


def _attention_for(attn_implementation: str | None, attention_layers) -> str | None:
    """The attention implementation to load with: the configured one, else eager when attention maps are shipped."""
    return attn_implementation or ("eager" if attention_layers else None)


def mean_over_heads(attention: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, T] -> [B, T, T] fp32 mean over the heads."""
    return attention.float().mean(dim=1)


class TeacherEngine:
    """Scores token batches with a loaded causal LM.

    model             a transformers causal LM (any device; moved to `device`); an SDPA model is switched to
                      `distill.teacher.attention.sdpa_padded_v` (the fused kernel for MLA's narrower value heads)
    topk              k of the top-k next-token distribution kept per position
    hidden_layers     indices into HF `hidden_states`: 0 = embeddings, i = output of the i-th decoder layer; the last
                      index (num_layers) is the final-norm output that feeds the lm_head
    attention_layers  decoder-layer indices (0-based) whose head-averaged attention maps are kept; needs a model
                      loaded with attn_implementation="eager"
    logits_dtype      dtype of the stored top-k logits (the log-normaliser is always fp32)
    hidden_dtype      dtype of stored hidden states; attention_dtype likewise for attention maps
    topk_fn           the top-k/log-normaliser step; a vocab-parallel teacher passes its own
    head_mean_fn      attention maps -> head average; a tensor-parallel teacher (local heads only) passes its own
    full_vocab_logits a context in which the model outputs full-vocabulary logits (for `logits` and `generate`);
                      a vocab-parallel teacher gathers its shards there. See `TeacherEngine.tensor_parallel`.
    length_groups     `score` runs a right-padded batch as up to this many forwards over rows of similar length
                      (sorted by length), each padded only to its own longest row: the teacher spends less on
                      padding (positions past a group's width get `fill_padding`'s values; no loss reads them)
    """

    def __init__(
        self,
        model: PreTrainedModel,
        topk: int,
        *,
        hidden_layers: Sequence[int] = (),
        attention_layers: Sequence[int] = (),
        logits_dtype: torch.dtype = torch.float32,
        hidden_dtype: torch.dtype = torch.bfloat16,
        attention_dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        topk_fn: TopKFn = topk_with_normalizer,
        head_mean_fn: HeadMeanFn = mean_over_heads,
        full_vocab_logits: Callable[[], AbstractContextManager] = contextlib.nullcontext,
        length_groups: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = model.config
        self.topk = topk
        self.hidden_layers = tuple(hidden_layers)
        self.attention_layers = tuple(attention_layers)
        self.logits_dtype = logits_dtype
        self.hidden_dtype = hidden_dtype
        self.attention_dtype = attention_dtype
        self.topk_fn = topk_fn
        self.head_mean_fn = head_mean_fn
        self.full_vocab_logits = full_vocab_logits
        self.length_groups = length_groups
        self._validate()
        use_padded_sdpa(self.model)  # after the check: a model that returns attention maps stays eager

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        topk: int,
        *,
        dtype: str | torch.dtype = "float32",
        attn_implementation: str | None = None,
        hint: str | None = None,
        **kwargs,
    ) -> TeacherEngine:
        """Load a teacher folder and wrap it; without an `attn_implementation`, eager attention is chosen when
        attention maps are asked for (SDPA returns none) and transformers' default otherwise."""
        attn = _attention_for(attn_implementation, kwargs.get("attention_layers"))
        model = load_causal_lm(path, dtype=dtype, attn_implementation=attn, hint=hint)
        return cls(model, topk, **kwargs)

    @classmethod
    def tensor_parallel(
        cls,
        path: str | Path,
        topk: int,
        *,
        group: ProcessGroup | DeviceMesh | None = None,
        dtype: str | torch.dtype = "float32",
        experts: str = "expert_parallel",
        attn_implementation: str | None = None,
        hint: str | None = None,
        **kwargs,
    ) -> TeacherEngine:
        """Load a teacher sharded tensor-parallel over `group` (None: the default world) and wrap it.

        Collective: every rank of the group builds the engine and calls `score` with the same inputs; every rank
        returns the same TeacherBatch (the Ray layer reads rank 0's). A `device` in kwargs is checked against the
        rank's device (TP shards are placed by the loader; TP=1 is moved there). See distill.teacher.parallel.
        """
        from distill.teacher import parallel  # torch.distributed machinery only when TP is asked for

        attn = _attention_for(attn_implementation, kwargs.get("attention_layers"))
        model = parallel.load_tp_model(
            path,
            group=group,
            dtype=dtype,
            attn_implementation=attn,
            experts=experts,
            device=kwargs.pop("device", None),
            hint=hint,
        )
        return cls(model, topk, **parallel.engine_hooks(model), **kwargs)

    # ----------------------------------------------------------------------------------------- validation
    @property
    def vocab_size(self) -> int:
        # The lm_head width, which may exceed the tokenizer's vocabulary (padded embeddings).
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def _validate(self) -> None:
        if not 1 <= self.topk <= self.vocab_size:
            raise ConfigError(f"teacher topk={self.topk} must be in [1, vocab size {self.vocab_size}]")
        check_length_groups(self.length_groups)
        self._check_indices("hidden_layers", self.hidden_layers, self.num_layers + 1, "0 = embeddings")
        self._check_indices("attention_layers", self.attention_layers, self.num_layers, "decoder layers")
        impl = self.config._attn_implementation
        if self.attention_layers and impl != "eager":
            raise ConfigError(
                f"attention_layers={list(self.attention_layers)} needs attention weights, but the teacher uses "
                f"attn_implementation={impl!r}, which returns none; load it with attn_implementation='eager'"
            )

    @staticmethod
    def _check_indices(name: str, indices: tuple[int, ...], count: int, meaning: str) -> None:
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            raise ConfigError(f"{name} {bad} out of range: valid indices are 0..{count - 1} ({meaning})")

    # ------------------------------------------------------------------------------------------- scoring
    @torch.inference_mode()
    def score(
        self,
        batch_id: BatchId,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        loss_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> TeacherBatch:
        """One teacher forward. input_ids, attention_mask, loss_mask [B, T] -> TeacherBatch.

        position_ids [B, T]: packed rows (restarting at 0 per document); the forward then attends within each
        document only (`distill.batch.model_inputs`) and the TeacherBatch carries them on to the student.
        Position t of topk_* / log_normalizer is the distribution of token t+1 (HF logits are not shifted).
        Hidden states come out as [B, T, L_sel, H]; attention maps as [B, L_sel, T, T] (mean over heads).
        """
        groups = length_groups(attention_mask, self.length_groups)
        if groups is None:
            outputs = self._forward(input_ids, attention_mask, position_ids)
        else:
            parts = [
                (rows, self._forward(*_cut(rows, width, input_ids, attention_mask, position_ids)))
                for rows, width in groups
            ]
            outputs = fill_padding(parts, attention_mask.shape, self.topk)
        ids, values, lse, hidden, attention = outputs
        return TeacherBatch.from_torch(
            batch_id,
            input_ids=input_ids.to(torch.int32),
            attention_mask=attention_mask.bool(),
            loss_mask=loss_mask.bool(),
            topk_ids=ids,
            topk_logits=values,
            log_normalizer=lse,
            hidden=hidden,
            attention=attention,
            position_ids=None if position_ids is None else position_ids.to(torch.int32),
        )

    def score_batch(self, batch_id: BatchId, batch: Mapping[str, torch.Tensor | None]) -> TeacherBatch:
        """`score` over a stream micro-batch (`BatchStream.batch`): its input_ids, attention_mask, loss_mask and,
        for packed rows, position_ids. Callers that pass the batch whole never drop a field a packed run needs."""
        return self.score(
            batch_id,
            batch["input_ids"],
            batch["attention_mask"],
            batch["loss_mask"],
            position_ids=batch.get("position_ids"),
        )

    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> tuple:
        """One model forward -> (top-k ids, top-k logits, log-normaliser, hidden or None, attention or None)."""
        positions = None if position_ids is None else position_ids.long()
        attend = model_inputs({"attention_mask": attention_mask, "position_ids": positions})
        out = self.model(
            input_ids=input_ids.to(self.device),
            **{name: None if t is None else t.to(self.device) for name, t in attend.items()},
            output_hidden_states=bool(self.hidden_layers),
            output_attentions=bool(self.attention_layers),
            use_cache=False,
        )
        ids, values, lse = self.topk_fn(out.logits, self.topk)
        hidden = self._select_hidden(out.hidden_states)
        attention = self._select_attention(out.attentions)
        return ids, values.to(self.logits_dtype), lse.float(), hidden, attention

    def _select_hidden(self, hidden_states: tuple[torch.Tensor, ...] | None) -> torch.Tensor | None:
        """(L+1) x [B, T, H] -> [B, T, L_sel, H] in hidden_dtype."""
        if not self.hidden_layers:
            return None
        return torch.stack([hidden_states[i] for i in self.hidden_layers], dim=2).to(self.hidden_dtype)

    def _select_attention(self, attentions: tuple[torch.Tensor, ...] | None) -> torch.Tensor | None:
        """L x [B, heads, T, T] -> [B, L_sel, T, T] in attention_dtype; averaged in fp32 before the cast."""
        if not self.attention_layers:
            return None
        maps = [self.head_mean_fn(attentions[i]) for i in self.attention_layers]
        return torch.stack(maps, dim=1).to(self.attention_dtype)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full next-token logits [B, T, V] in fp32 (evaluation; training uses `score`)."""
        with self.full_vocab_logits():
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                use_cache=False,
            )
        return out.logits.float()

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding. prompt_ids [B, T] (left-padded when B > 1) -> [B, T + n], n <= max_new_tokens.

        Rows that finish early are filled with pad_token_id (falls back to eos) up to the longest row.
        """
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.config.pad_token_id if pad_token_id is None else pad_token_id
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        with self.full_vocab_logits():
            return self.model.generate(
                input_ids=prompt_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos if pad is None else pad,
            )
