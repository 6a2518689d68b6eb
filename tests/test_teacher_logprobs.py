"""TeacherBatch from served prompt log-probs (distill.teacher.logprobs): pure, no vLLM needed.

The served engine's entries are built here from a real model's full log_softmax exactly as vLLM lays them out
(top-k by rank plus the actual token when it ranks below k); the batch they make must carry the same
distribution as the hf engine's raw-logit batch, and every loss term must agree at every temperature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import distill.losses as L
from distill.errors import ConfigError
from distill.models import build_model, tiny_config
from distill.teacher import TeacherEngine
from distill.teacher.logprobs import Segment, batch_from_logprobs, prompt_token_ids, segments, top_entries

VOCAB, K = 64, 6


def served_entries(log_probs: torch.Tensor, actual: int | None, k: int) -> dict[int, tuple[float, int]]:
    """vLLM's entries for one position from its full log-probs [V]: top-k by rank, plus `actual` when outside."""
    order = torch.argsort(log_probs, descending=True)
    rank = {int(tok): r + 1 for r, tok in enumerate(order)}
    out = {int(tok): (float(log_probs[tok]), rank[int(tok)]) for tok in order[:k]}
    if actual is not None:
        out[actual] = (float(log_probs[actual]), rank[actual])
    return out


def served_scoring(model, inputs, k):
    """What a served engine returns for a batch: per segment, its positions' entries (the prompt log-probs of
    the next token, the generated step's at the last position), each prompt scored on its own."""
    scored = []
    for seg in segments(inputs["attention_mask"], inputs.get("position_ids")):
        (ids,) = prompt_token_ids(inputs, [seg])
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).float()
        nxt = [*ids[1:], None]
        scored.append((seg, [served_entries(lp[i], nxt[i], k) for i in range(len(ids))]))
    return scored


@pytest.fixture(scope="module")
def model():
    return build_model(tiny_config("tiny_qwen2", VOCAB), seed=0)


@pytest.fixture(scope="module")
def inputs():
    """B=3, T=10, right padding on the last two rows; the prompt (first 3 tokens) is not trained."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:], mask[2, 4:] = False, False
    ids[~mask] = 0
    loss_mask = mask.clone()
    loss_mask[:, :3] = False
    loss_mask[torch.arange(3), mask.sum(1) - 1] = False  # the last real token has no next token
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "loss_mask": loss_mask.numpy()}


def test_segments_split_padding_and_packed_documents():
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    assert segments(mask) == [Segment(0, 0, 3), Segment(1, 0, 4)]
    positions = np.array([[0, 1, 2, 0], [0, 1, 0, 1]])
    assert segments(mask, positions) == [Segment(0, 0, 3), Segment(1, 0, 2), Segment(1, 2, 4)]


def test_top_entries_drop_the_actual_token_below_k_and_refuse_too_few():
    entries = {5: (-0.1, 1), 9: (-2.0, 2), 3: (-9.0, 40)}  # 3 is the actual token, ranked 40th
    assert top_entries(entries, 2) == ([5, 9], [-0.1, -2.0])
    with pytest.raises(ConfigError, match="max_logprobs to at least 4"):
        top_entries(entries, 4)


def test_served_batch_matches_the_hf_engine(model, inputs):
    """Same ids, log-probs = raw logits - log-normaliser, same tail mass, same shapes and dtypes; padding
    positions get the hf engine's placeholder."""
    hf = TeacherEngine(model, K).score_batch((0, 3), {k: torch.from_numpy(v) for k, v in inputs.items()})
    served = batch_from_logprobs((0, 3), inputs, served_scoring(model, inputs, K), K)
    real = inputs["attention_mask"]
    assert served.batch_id == hf.batch_id
    for name, a in hf.arrays().items():
        assert served.arrays()[name].shape == a.shape and served.arrays()[name].dtype == a.dtype, name
    assert np.array_equal(served.topk_ids[real], hf.topk_ids[real])
    hf_logp = hf.topk_logits - hf.log_normalizer[..., None]
    np.testing.assert_allclose(served.topk_logits[real], hf_logp[real], atol=1e-5)
    assert np.all(served.log_normalizer[real] == 0)
    tail_hf = 1 - np.exp(hf_logp[real].astype(np.float64)).sum(-1)
    tail_served = 1 - np.exp(served.topk_logits[real].astype(np.float64)).sum(-1)
    np.testing.assert_allclose(tail_served, tail_hf, atol=1e-6)
    pad = ~real
    assert np.array_equal(served.topk_ids[pad], np.broadcast_to(np.arange(K), (pad.sum(), K)))
    np.testing.assert_allclose(served.log_normalizer[pad], math.log(K))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("term", ["forward_kl", "reverse_kl", "tv"])
def test_every_temperature_gives_the_hf_loss(model, inputs, temperature, term):
    """The temperature semantics: raw log-probs at T=1 in, the loss's temperature applied to the k + 1 buckets
    (shift invariant), so served and hf batches give the same loss at any T."""
    hf = TeacherEngine(model, K).score_batch((0, 3), {k: torch.from_numpy(v) for k, v in inputs.items()})
    served = batch_from_logprobs((0, 3), inputs, served_scoring(model, inputs, K), K)
    student = torch.randn(3 * 10, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    losses = []
    for batch in (hf, served):
        t = batch.to_torch()
        teacher = L.TopKTeacher(
            t["topk_ids"].flatten(0, 1), t["topk_logits"].flatten(0, 1), t["log_normalizer"].flatten()
        )
        loss, n = L.get(term)(student.float(), teacher, t["loss_mask"].flatten(), temperature=temperature)
        losses.append(float(loss) / float(n))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
    assert losses[0] > 0


def test_packed_rows_are_scored_per_document(model):
    """A packed row's documents are separate prompts: their log-probs equal the hf engine's per-document
    forward (position_ids restarting at 0)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (1, 9), generator=g)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    inputs = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask, "position_ids": positions}
    hf = TeacherEngine(model, K).score_batch((1, 0), inputs)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    served = batch_from_logprobs((1, 0), arrays, served_scoring(model, arrays, K), K)
    assert np.array_equal(served.topk_ids, hf.topk_ids)
    np.testing.assert_allclose(served.topk_logits, hf.topk_logits - hf.log_normalizer[..., None], atol=1e-5)
    assert np.array_equal(served.position_ids, hf.position_ids)
