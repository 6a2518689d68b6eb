"""Seeded temperature / top-p sampling of n completions per prompt (no Ray; the Ray worker calls this).

Reproducibility does not depend on batching: completion j of prompt i draws its randomness from its own
generator, seeded by (seed, first_index + i, j), via the Gumbel-max trick (argmax of warped logits + Gumbel
noise is a sample of softmax(warped logits)). So a prompt's completions are the same whether it is sampled
alone, in a batch of 64, on replica 0 or replica 3, or recomputed after a crash; only the float rounding of
left-padded batches can differ.

Tensor parallelism: every TP rank of a replica must call `sample_with_engine` with the same prompts, params and
first_index. The engine's `full_vocab_logits` context all-gathers the vocabulary shards, so every rank sees the
same full logits, draws the same noise and picks the same token; the ranks therefore run the same number of
decode steps and their collectives stay in lockstep. Different seeds per rank would desynchronise them.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from distill.batch import cut_after_stop, left_pad
from distill.errors import ConfigError

if TYPE_CHECKING:
    from distill.teacher.engine import TeacherEngine

Completions = list[list[list[int]]]
"""Per prompt, n completions of token ids (see `sample` for where they end)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; travels to Ray actors as is.

    n               completions per prompt
    temperature     0 means greedy (exactly `model.generate(do_sample=False)`), else the softmax temperature
    top_p           nucleus mass kept (1.0 keeps the whole vocabulary)
    max_new_tokens  completion length cap
    stop_id         token that ends a completion (kept as its last token)
    pad_id          left-padding id of the prompt batch
    seed            base seed; completion j of prompt index i uses a generator seeded by (seed, i, j)
    batch_size      sequences per `generate` call (prompts x n are flattened first)
    """

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_id: int
    pad_id: int
    seed: int
    batch_size: int = 64

    def __post_init__(self) -> None:
        checks = {
            "n": self.n >= 1,
            "temperature": self.temperature >= 0,
            "top_p": 0 < self.top_p <= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "batch_size": self.batch_size >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"sampling parameters out of range: {', '.join(f'{b}={getattr(self, b)}' for b in bad)}; "
                "need n >= 1, temperature >= 0 (0 = greedy), 0 < top_p <= 1, max_new_tokens >= 1, batch_size >= 1"
            )


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed owned by one completion (sha256, not `hash()`, which is salted per process)."""
    digest = hashlib.sha256(f"{seed}/{prompt_index}/{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class GumbelNoise(LogitsProcessor):
    """Adds per-row Gumbel(0, 1) noise, one generator per row, so greedy argmax becomes exact sampling."""

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # One draw of V uniforms per row and step, from that row's own stream: a row's noise does not depend
        # on which other rows share its batch.
        u = torch.stack(
            [torch.rand(scores.shape[-1], generator=g, device=g.device) for g in self.generators]
        ).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(u.dtype).tiny)))
        return scores.float() + gumbel


@torch.inference_mode()
def sample(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop_id: int,
    pad_id: int,
    seed: int,
    first_index: int = 0,
    batch_size: int = 64,
    full_vocab_logits: Callable[[], AbstractContextManager] = contextlib.nullcontext,
) -> Completions:
    """n completions per prompt: `out[i][j]` is completion j of `prompts[i]` (token ids after the prompt).

    A completion ends with `stop_id` if the model emitted it (so callers can tell a finished answer from one cut
    at `max_new_tokens`); it has at most max_new_tokens ids and never contains padding. `first_index` is the
    global index of prompts[0], so sampling a prompt set in pieces gives the same completions as in one call.
    `full_vocab_logits`: see the module docstring (tensor-parallel teachers).
    """
    params = SamplingParams(n, temperature, top_p, max_new_tokens, stop_id, pad_id, seed, batch_size)
    device = next(model.parameters()).device
    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]  # prompt-major: out[i] is contiguous
    flat: list[list[int]] = []
    for start in range(0, len(rows), params.batch_size):
        chunk = rows[start : start + params.batch_size]
        ids, mask = left_pad([prompts[i] for i, _ in chunk], pad_id)
        processors = LogitsProcessorList()
        if temperature > 0:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
            generators = [
                torch.Generator(device=device).manual_seed(row_seed(seed, first_index + i, j))
                for i, j in chunk
            ]
            processors.append(GumbelNoise(generators))
        with full_vocab_logits():
            # do_sample=False on purpose: the argmax over (warped logits + Gumbel noise) is the sample.
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=processors,
                eos_token_id=stop_id,
                pad_token_id=pad_id,
            )
        flat += [cut_after_stop(row, stop_id) for row in out[:, ids.shape[1] :].tolist()]
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


def sample_with_engine(
    engine: TeacherEngine, prompts: Sequence[Sequence[int]], params: SamplingParams, first_index: int = 0
) -> Completions:
    """`sample` through a TeacherEngine: its model, and its full-vocabulary context (TP teachers gather)."""
    return sample(
        engine.model,
        prompts,
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_new_tokens=params.max_new_tokens,
        stop_id=params.stop_id,
        pad_id=params.pad_id,
        seed=params.seed,
        first_index=first_index,
        batch_size=params.batch_size,
        full_vocab_logits=engine.full_vocab_logits,
    )


@dataclass(frozen=True)
class PromptBatch:
    """A slice of the prompt set: `prompts[0]` is prompt number `first_index` (it picks the seeds)."""

    first_index: int
    prompts: list[list[int]]


def local_sample_stream(
    engine: TeacherEngine, batches: Iterable[PromptBatch], params: SamplingParams
) -> Iterator[Completions]:
    """Completions of each batch, in order, from one in-process engine (the Ray twin: distill.cluster.generation)."""
    for batch in batches:
        yield sample_with_engine(engine, batch.prompts, params, batch.first_index)


def count_tokens(completions: Completions) -> int:
    """Generated tokens (stop tokens included) in a `sample` result."""
    return sum(len(c) for per_prompt in completions for c in per_prompt)
