"""TeacherEngine: top-k + log-normaliser, hidden-state and attention selection, TeacherBatch round trip."""

from __future__ import annotations

import math

import pytest
import torch

from distill.errors import ConfigError
from distill.models import build_model, save_model, tiny_config
from distill.teacher import TeacherBatch, TeacherEngine, topk_with_normalizer
from distill.teacher.engine import length_groups

VOCAB, K = 48, 5
PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def teacher():
    """Tiny DeepSeek-V3 (MLA + MoE) with eager attention so attention maps are available."""
    config = tiny_config("tiny_deepseek_v3", VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    return build_model(config, seed=0, attn_implementation="eager")


@pytest.fixture(scope="module")
def inputs():
    """B=3, T=9; the last row is right-padded after 5 tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 5:], mask[2, 5:] = PAD, 0
    loss_mask = mask.bool().clone()
    loss_mask[:, :2] = False  # the prompt
    return ids, mask, loss_mask


def reference(model, ids, mask):
    with torch.inference_mode():
        return model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)


def test_topk_and_log_normalizer_match_full_logits(teacher, inputs):
    ids, mask, loss_mask = inputs
    engine = TeacherEngine(teacher, K)
    batch = engine.score((0, 7), ids, mask, loss_mask)
    full = engine.logits(ids, mask)
    assert torch.equal(full, reference(teacher, ids, mask).logits)

    values, top_ids = torch.topk(full, K, dim=-1)
    t = batch.to_torch()
    assert batch.topk_ids.dtype.name == "int32" and batch.topk_ids.shape == (3, 9, K)
    assert torch.equal(t["topk_ids"], top_ids)
    assert torch.equal(t["topk_logits"], values)
    assert torch.allclose(t["log_normalizer"], torch.logsumexp(full.double(), -1).float(), rtol=0, atol=1e-6)
    assert t["log_normalizer"].dtype == torch.float32
    assert batch.batch_id == (0, 7) and batch.num_tokens == int(loss_mask.sum())
    assert batch.hidden is None and batch.attention is None


def test_chunked_log_normalizer_equals_unchunked():
    logits = torch.randn(2, 7, 33, dtype=torch.bfloat16)
    ids, values, lse = topk_with_normalizer(logits, 4)
    _, _, lse_chunked = topk_with_normalizer(logits, 4, chunk_rows=3)
    assert torch.equal(lse, lse_chunked) and lse.dtype == torch.float32
    assert ids.dtype == torch.int32 and values.dtype == torch.bfloat16


def test_hidden_state_selection_matches_output_hidden_states(teacher, inputs):
    ids, mask, loss_mask = inputs
    layers = (0, 2, teacher.config.num_hidden_layers)  # embeddings, a middle layer, the final-norm output
    engine = TeacherEngine(teacher, K, hidden_layers=layers, hidden_dtype=torch.float32)
    hidden = engine.score((0, 0), ids, mask, loss_mask).tensor("hidden")
    assert hidden.shape == (3, 9, len(layers), teacher.config.hidden_size)
    ref = reference(teacher, ids, mask).hidden_states
    for slot, layer in enumerate(layers):
        assert torch.equal(hidden[:, :, slot], ref[layer])


def test_attention_maps_are_head_averaged_and_normalised(teacher, inputs):
    ids, mask, loss_mask = inputs
    engine = TeacherEngine(teacher, K, attention_layers=(0, 3), attention_dtype=torch.float32)
    attention = engine.score((0, 0), ids, mask, loss_mask).tensor("attention")
    assert attention.shape == (3, 2, 9, 9)
    ref = reference(teacher, ids, mask).attentions
    assert torch.allclose(attention[:, 1], ref[3].mean(dim=1), atol=1e-7)
    assert torch.allclose(attention.sum(-1), torch.ones(3, 2, 9), atol=1e-5)
    assert torch.all(attention.triu(diagonal=1) == 0)  # causal
    assert torch.all(attention[2, :, :5, 5:] == 0)  # real tokens never look at the padding


def test_batch_round_trip_keeps_bf16_features(teacher, inputs):
    ids, mask, loss_mask = inputs
    engine = TeacherEngine(
        teacher, K, hidden_layers=(1, 4), attention_layers=(2,), logits_dtype=torch.bfloat16
    )
    batch = engine.score((3, 1), ids, mask, loss_mask)
    assert batch.float_dtypes["hidden"] == "bfloat16" and batch.float_dtypes["attention"] == "bfloat16"
    t = batch.to_torch()
    assert t["hidden"].dtype == torch.bfloat16 and t["attention"].dtype == torch.bfloat16
    assert t["topk_logits"].dtype == torch.bfloat16 and t["topk_ids"].dtype == torch.int64
    assert torch.equal(t["input_ids"], ids) and torch.equal(t["loss_mask"], loss_mask)
    assert torch.equal(t["attention_mask"], mask.bool())
    ref = reference(teacher, ids, mask)
    assert torch.equal(t["hidden"][:, :, 1], ref.hidden_states[4].bfloat16())
    assert torch.equal(t["attention"][:, 0], ref.attentions[2].mean(dim=1).bfloat16())
    assert torch.allclose(t["attention"].float().sum(-1), torch.ones(3, 1, 9), atol=2e-2)  # bf16 rounding


def test_constructor_validation(teacher):
    with pytest.raises(ConfigError, match=f"topk=49 must be in \\[1, vocab size {VOCAB}\\]"):
        TeacherEngine(teacher, VOCAB + 1)
    with pytest.raises(ConfigError, match=r"hidden_layers \[5\] out of range: valid indices are 0..4"):
        TeacherEngine(teacher, K, hidden_layers=(0, 5))
    with pytest.raises(ConfigError, match=r"attention_layers \[-1\] out of range: valid indices are 0..3"):
        TeacherEngine(teacher, K, attention_layers=(-1,))


def test_attention_needs_eager_implementation(tmp_path):
    config = tiny_config("tiny_qwen2", VOCAB, pad_token_id=PAD, eos_token_id=EOS)
    sdpa = build_model(config, seed=0, attn_implementation="sdpa")
    with pytest.raises(
        ConfigError, match=r"attn_implementation='sdpa'.*load it with attn_implementation='eager'"
    ):
        TeacherEngine(sdpa, K, attention_layers=(0,))
    # Loading from a folder picks eager by itself when attention maps are asked for.
    folder = save_model(sdpa, None, tmp_path / "teacher")
    engine = TeacherEngine.from_pretrained(folder, K, attention_layers=(1,))
    assert engine.model.config._attn_implementation == "eager"


def test_generate_is_greedy(teacher):
    engine = TeacherEngine(teacher, K)
    prompt = torch.tensor([[1, 5, 9, 11]])
    out = engine.generate(
        prompt, max_new_tokens=4, eos_token_id=VOCAB + 1
    )  # an id never produced: no early stop
    assert out.shape == (1, 8) and torch.equal(out[:, :4], prompt)
    seq = prompt
    for _ in range(4):  # the same continuation by hand: argmax of the last position, no cache
        seq = torch.cat([seq, engine.logits(seq)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_teacher_batch_is_the_wire_type(teacher, inputs):
    ids, mask, loss_mask = inputs
    batch = TeacherEngine(teacher, K).score((1, 2), ids, mask, loss_mask)
    assert isinstance(batch, TeacherBatch) and batch.k == K
    assert set(batch.arrays()) == {
        "input_ids",
        "attention_mask",
        "loss_mask",
        "topk_ids",
        "topk_logits",
        "log_normalizer",
    }
    assert batch.position_ids is None  # unpacked: no position_ids on the wire


def test_score_batch_scores_a_stream_batch_like_score(teacher, inputs):
    """`score_batch` reads the stream micro-batch's fields; an unpacked one scores exactly as `score` (packed ones:
    tests/test_packing.py)."""
    ids, mask, loss_mask = inputs
    engine = TeacherEngine(teacher, K)
    by_fields = engine.score((0, 3), ids, mask, loss_mask).to_torch()
    stream_batch = {"input_ids": ids, "attention_mask": mask.bool(), "loss_mask": loss_mask}
    by_batch = engine.score_batch((0, 3), stream_batch).to_torch()
    for name, value in by_fields.items():
        if value is None:
            assert by_batch[name] is None, name
        else:
            assert torch.equal(by_batch[name], value), name


def test_mla_teacher_on_padded_sdpa_equals_eager_attention(inputs):
    """MLA's value heads are narrower than its q/k heads; the engine pads them so SDPA keeps its fused kernel
    (distill.teacher.attention). Same logits as eager attention, padding rows included."""
    from distill.teacher.attention import PADDED_SDPA

    config = tiny_config("tiny_deepseek_v3", VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    assert config.v_head_dim < config.qk_nope_head_dim + config.qk_rope_head_dim  # the case being fixed
    eager = build_model(config, seed=0, attn_implementation="eager")
    engine = TeacherEngine(build_model(config, seed=0, attn_implementation="sdpa"), topk=K)
    assert engine.model.config._attn_implementation == PADDED_SDPA
    ids, mask, loss_mask = inputs
    with torch.inference_mode():
        want = eager(ids, attention_mask=mask).logits
        got = engine.model(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)
    out = engine.score((0, 0), ids, mask, loss_mask)
    ref_ids, _, _ = topk_with_normalizer(want, K)
    assert torch.equal(torch.as_tensor(out.topk_ids)[valid].long(), ref_ids[valid].long())


def test_length_groups_score_rows_of_similar_length_without_the_others_padding(teacher):
    """Rows of lengths 9, 3, 8, 4, 9, 2 as 3 forwards (widths 3, 8, 9): on every real token the outputs equal
    one forward over the whole batch; past a group's width they are the placeholder (uniform top-k, zeros)."""
    lengths = [9, 3, 8, 4, 9, 2]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (len(lengths), 9), generator=g)
    mask = torch.arange(9) < torch.tensor(lengths)[:, None]
    ids[~mask] = PAD
    loss_mask = mask.clone()
    loss_mask[:, 0] = False
    kwargs = dict(hidden_layers=[0, 2], attention_layers=[1])
    whole = TeacherEngine(teacher, K, **kwargs).score((0, 1), ids, mask, loss_mask).to_torch()
    grouped = (
        TeacherEngine(teacher, K, length_groups=3, **kwargs).score((0, 1), ids, mask, loss_mask).to_torch()
    )

    for name in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(grouped[name], whole[name])
    assert torch.equal(grouped["topk_ids"][mask], whole["topk_ids"][mask])
    for name in ("topk_logits", "log_normalizer"):
        torch.testing.assert_close(grouped[name][mask], whole[name][mask], rtol=1e-5, atol=1e-5)
    # hidden states and attention maps are stored in bf16: a last-bit rounding flip is allowed
    torch.testing.assert_close(grouped["hidden"][mask], whole["hidden"][mask], rtol=1e-2, atol=1e-3)
    keys = mask[:, None, :, None] & mask[:, None, None, :]  # attention between real tokens
    torch.testing.assert_close(grouped["attention"][keys], whole["attention"][keys], rtol=1e-2, atol=1e-3)

    # Row 1 (length 3) sits in the narrowest group (width 3): its positions 3.. were never computed.
    assert torch.equal(grouped["topk_ids"][1, 3:], torch.arange(K).expand(6, K))
    assert torch.all(grouped["topk_logits"][1, 3:] == 0)
    assert torch.allclose(grouped["log_normalizer"][1, 3:], torch.tensor(math.log(K)))
    assert torch.all(grouped["hidden"][1, 3:] == 0) and torch.all(grouped["attention"][1, :, 3:] == 0)
    # Row 2 (length 8) shares width 8 with row 3; its position 8 lies past that width.
    assert torch.all(grouped["topk_logits"][2, 8] == 0) and not torch.all(grouped["topk_logits"][2, 7] == 0)


def test_length_groups_keep_one_forward_when_cutting_saves_nothing():
    full = torch.ones(4, 6, dtype=torch.bool)
    assert length_groups(full, 2) is None  # every row is as wide as the batch
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert length_groups(left, 2) is None  # left padding: a width cut would drop real tokens
    right = torch.arange(6) < torch.tensor([2, 6, 3, 5])[:, None]
    assert length_groups(right, 1) is None
    groups = length_groups(right, 2)
    assert [(rows.tolist(), width) for rows, width in groups] == [([0, 2], 3), ([3, 1], 6)]
    assert [len(rows) for rows, _ in length_groups(right, 9)] == [1, 1, 1, 1]  # no more groups than rows
    with pytest.raises(ConfigError, match="length_groups"):
        TeacherEngine(build_model(tiny_config("tiny_qwen2", VOCAB), seed=0), K, length_groups=0)
