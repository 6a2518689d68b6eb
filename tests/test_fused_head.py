"""The fused head + loss (distill.losses.fused, distill.models.head) against the unfused reference path.

The reference is the plain computation: logits = hidden @ W^T (+ b, soft-capped), every term on those logits
through its registered call, the weighted sum differentiated by autograd. Pure and fast (CPU, tiny, fp32).
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import distill.losses as L
from distill.batch import TeacherBatch
from distill.errors import ConfigError
from distill.losses.fused import fused_block_rows
from distill.models.head import check_fusable, check_fusable_type, headless_forward
from distill.models.tiny import build_model, tiny_config
from distill.teacher.topk import topk_with_normalizer
from distill.training.objective import Objective, TermSpec
from distill.training.reference import student_forward

N, H, V, K = 24, 16, 40, 6
REL = 1e-5
TEACHER_TERMS = ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv"]


def _inputs(seed: int, *, k: int = K, bias: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, H, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(V, generator=g)).requires_grad_() if bias else None
    ids, logits, lse = topk_with_normalizer(3 * torch.randn(N, V, generator=g), k)
    teacher = L.TopKTeacher(ids=ids, logits=logits, log_normalizer=lse)
    # Masked rows, among them a run of 8 (a whole chunk of 4 and more is masked) and the last row.
    mask = torch.ones(N, dtype=torch.bool)
    mask[[0, 3, N - 1]] = False
    mask[10:18] = False
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, teacher, mask, labels


def _mapped_teacher(seed: int) -> L.MappedTopKTeacher:
    """A cross-tokenizer teacher: top-k mapped into the student vocabulary, some ids unmapped (-1)."""
    g = torch.Generator().manual_seed(seed)
    ids, logits, lse = topk_with_normalizer(3 * torch.randn(N, 2 * V, generator=g), K)
    student_ids = torch.where(ids < V, ids, torch.full_like(ids, -1))
    return L.MappedTopKTeacher(ids=student_ids, logits=logits, log_normalizer=lse)


def _unfused(hidden, weight, bias, teacher, mask, labels, terms, *, temperature, softcap=None):
    """Per-term sums through materialised logits (each term's registered call)."""
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return [
        L.get(name)(logits, teacher, mask, temperature=temperature, labels=labels, chunk_size=4, **params)[0]
        for name, params in terms
    ]


def _fused(hidden, weight, bias, teacher, mask, labels, terms, weights, *, temperature, softcap=None):
    row_terms = [
        L.get(name).row_term(teacher, mask, vocab_size=V, temperature=temperature, labels=labels, **params)[0]
        for name, params in terms
    ]
    sums = L.fused_head_loss_sums(hidden, weight, bias, row_terms, weights, chunk_size=4, softcap=softcap)
    return [sums[i] for i in range(len(terms))]


def _grads(total, tensors, retain_graph=False):
    return torch.autograd.grad(total, [t for t in tensors if t is not None], retain_graph=retain_graph)


def _assert_close(got, want, rel=REL):
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max().clamp(min=1e-12)
        assert (g - w).abs().max() <= rel * scale, (float((g - w).abs().max()), float(scale))


def _check(terms, weights, *, temperature, teacher=None, k=K, bias=False, softcap=None, seed=0):
    hidden, weight, b, topk, mask, labels = _inputs(seed, k=k, bias=bias)
    teacher = topk if teacher is None else teacher
    args = (hidden, weight, b, teacher, mask, labels, terms)
    want = _unfused(*args, temperature=temperature, softcap=softcap)
    got = _fused(*args, weights, temperature=temperature, softcap=softcap)
    _assert_close(got, want)
    want_total = sum(w * s for w, s in zip(weights, want, strict=True))
    got_total = sum(w * s for w, s in zip(weights, got, strict=True))
    _assert_close(_grads(got_total, (hidden, weight, b)), _grads(want_total, (hidden, weight, b)))
    return got, want


@pytest.mark.parametrize("name", [*TEACHER_TERMS, "ce"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_every_logit_term_matches_the_unfused_path(name, temperature):
    params = {"jsd": {"beta": 0.3}}.get(name, {})
    got, _ = _check([(name, params)], [1.0], temperature=temperature)
    assert float(got[0].detach()) > 0


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "uld"])
def test_mapped_cross_tokenizer_teacher_matches(name):
    _check([(name, {})], [0.7], temperature=2.0, teacher=_mapped_teacher(3))


def test_k_equal_to_the_vocabulary_bias_and_softcap_match():
    _check([("forward_kl", {}), ("ce", {})], [1.0, 0.5], temperature=2.0, k=V, bias=True, softcap=3.0)


def test_several_terms_share_one_pass_and_one_gradient():
    """CE at T 1 with three teacher terms at T 2, one of them on a selected subset of rows: the sums and the
    gradient of the weighted total equal the unfused ones, and backward asked for a single term (what the
    gradient-share measurement does) gets that term's own gradient by recomputation."""
    terms = [
        ("ce", {}),
        ("forward_kl", {}),
        ("jsd", {"beta": 0.5}),
        ("reverse_kl", {"select_by": "confidence", "select_threshold": 0.3}),
    ]
    weights = [0.5, 1.0, 0.25, 2.0]
    hidden, weight, _, teacher, mask, labels = _inputs(5)
    args = (hidden, weight, None, teacher, mask, labels, terms)
    want = _unfused(*args, temperature=2.0)
    got = _fused(*args, weights, temperature=2.0)
    _assert_close(got, want)
    with L.chunked.retained_backward():
        single = _grads(weights[3] * got[3], (hidden, weight), retain_graph=True)
        single_reference = _grads(weights[3] * want[3], (hidden, weight), retain_graph=True)
    _assert_close(single, single_reference)
    # The whole weighted total, divided by a token count as the trainer does, after the measurement.
    total = sum(w * s for w, s in zip(weights, got, strict=True)) / 37.0
    reference = sum(w * s for w, s in zip(weights, want, strict=True)) / 37.0
    _assert_close(_grads(total, (hidden, weight)), _grads(reference, (hidden, weight)))


def test_all_rows_masked_gives_zero_loss_and_zero_gradient():
    hidden, weight, _, teacher, mask, labels = _inputs(1)
    mask = torch.zeros_like(mask)
    (loss,) = _fused(
        hidden, weight, None, teacher, mask, labels, [("forward_kl", {})], [1.0], temperature=1.0
    )
    grads = _grads(loss, (hidden, weight))
    assert float(loss.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads)


def test_without_grad_only_the_losses_are_computed():
    hidden, weight, _, teacher, mask, labels = _inputs(2)
    with torch.no_grad():
        got = _fused(hidden, weight, None, teacher, mask, labels, [("ce", {})], [1.0], temperature=1.0)
    want = _unfused(hidden, weight, None, teacher, mask, labels, [("ce", {})], temperature=1.0)
    assert not got[0].requires_grad
    _assert_close(got, want)


def test_bf16_head_tracks_the_fp32_reference_loosely():
    hidden, weight, _, teacher, mask, labels = _inputs(4)
    terms = [("forward_kl", {}), ("ce", {})]
    want = _unfused(hidden, weight, None, teacher, mask, labels, terms, temperature=1.0)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    got = _fused(h16, w16, None, teacher, mask, labels, terms, [1.0, 0.5], temperature=1.0)
    _assert_close(got, want, rel=2e-2)
    grads = _grads(got[0] + 0.5 * got[1], (h16, w16))
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16
    _assert_close([g.float() for g in grads], _grads(want[0] + 0.5 * want[1], (hidden, weight)), rel=5e-2)


def test_bad_shapes_are_refused_with_the_fix():
    hidden, weight, _, _, mask, labels = _inputs(0)
    row = L.get("ce").row_term(None, mask, vocab_size=V, labels=labels)[0]
    with pytest.raises(ConfigError, match=r"hidden must be \[N, H\] and weight \[V, H\]"):
        L.fused_head_loss_sums(hidden, weight.T, None, [row], [1.0], chunk_size=4)
    with pytest.raises(ConfigError, match="one per term"):
        L.fused_head_loss_sums(hidden, weight, None, [row], [1.0, 2.0], chunk_size=4)
    with pytest.raises(ConfigError, match="flatten"):
        L.fused_head_loss_sums(hidden[:5], weight, None, [row], [1.0], chunk_size=4)


def test_block_rows_follow_the_head_shape():
    assert fused_block_rows(8192, 64, 151936, 16) == 112  # a tiny head: 2^24 logits per block
    assert fused_block_rows(8192, 2048, 151936, 16) == 128  # Qwen2.5-3B: the block's logits ~ hidden states
    assert fused_block_rows(8192, 64, 40, 4) >= 8192  # a test vocabulary: one block


def test_blocks_of_several_chunks_match():
    """Many chunks per block and many blocks (a tiny BLOCK_ELEMENTS), with masked holes between chunks."""
    from distill.losses import fused

    original = fused.BLOCK_ELEMENTS
    fused.BLOCK_ELEMENTS = 3 * 4 * V  # blocks of 12 rows, chunks of 4
    try:
        _check([("forward_kl", {}), ("ce", {})], [1.0, 0.5], temperature=2.0, bias=True)
    finally:
        fused.BLOCK_ELEMENTS = original


# ------------------------------------------------------------------------------------------- architectures
def _arch(name: str, vocab: int = 64):
    """A tiny model of each fusable architecture (and one that is not)."""
    small = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
    if name in ("tiny_qwen2", "tiny_phi3"):
        return build_model(tiny_config(name, vocab_size=vocab), seed=0)
    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, **small))
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(vocab_size=vocab, num_key_value_heads=2, **small))
    if name == "gemma3_softcap":
        config = Gemma3TextConfig(
            vocab_size=vocab, num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, **small
        )
        return Gemma3ForCausalLM(config)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4))


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_phi3", "llama", "mistral", "gemma3_softcap"])
def test_headless_forward_and_head_give_the_models_own_logits(name):
    model = _arch(name).eval()
    check_fusable(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        out = headless_forward(model, input_ids=ids, attention_mask=mask, position_ids=None)
        logits = out.last_hidden_state @ out.head.weight.T
        if out.head.softcap is not None:
            logits = out.head.softcap * torch.tanh(logits / out.head.softcap)
    assert (name == "gemma3_softcap") == (out.head.softcap is not None)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_unknown_architectures_and_lora_heads_are_refused():
    with pytest.raises(ConfigError, match=r"'gpt2' architecture .* loss.fused_head=false"):
        check_fusable(_arch("gpt2"))
    with pytest.raises(
        ConfigError, match=r"'granite' architecture"
    ):  # from config.json, before any model exists
        check_fusable_type("granite")
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_arch("tiny_qwen2"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ConfigError, match=r"not a plain nn\.Linear .* lora\.target_modules"):
        check_fusable(lora)
    check_fusable(get_peft_model(_arch("tiny_qwen2"), LoraConfig(r=2, target_modules=["q_proj"])))


# ----------------------------------------------------------------------------------------------- objective
def _teacher_batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 20
    ids = torch.randint(1, vocab, (b, t), generator=g)
    attention = torch.ones(b, t, dtype=torch.bool)
    attention[1, 14:] = False
    loss_mask = attention.clone()
    loss_mask[:, :3] = False
    loss_mask[1, 13:] = False
    loss_mask[:, -1] = False
    topk_ids, topk_logits, lse = topk_with_normalizer(3 * torch.randn(b, t, vocab, generator=g), 8)
    return TeacherBatch.from_torch(
        (0, 0),
        input_ids=ids.int(),
        attention_mask=attention,
        loss_mask=loss_mask,
        topk_ids=topk_ids,
        topk_logits=topk_logits,
        log_normalizer=lse,
    ).to_torch()


@pytest.mark.parametrize("lora", [False, True])
def test_objective_fused_equals_unfused_on_a_student(lora):
    """The same student and batch through both paths: equal term sums and equal parameter gradients (a
    LoRA-wrapped student too, whose head is frozen: only the adapters and hidden states get gradients)."""
    terms = [TermSpec("ce", "ce", 0.5), TermSpec("kd", "forward_kl", 1.0)]
    batch = _teacher_batch(64)
    results = []
    for fused in (False, True):
        model = _arch("tiny_qwen2")
        if lora:
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(0)  # the adapters' init
            model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        objective = Objective(terms, temperature=2.0, chunk_size=8, fused_head=fused)
        sums = objective(student_forward(model, objective, batch), batch)
        total = objective.weighted_total(sums) / 40.0
        params = [p for p in model.parameters() if p.requires_grad]
        results.append(([sums["ce"], sums["kd"]], torch.autograd.grad(total, params)))
    (want_sums, want_grads), (got_sums, got_grads) = results
    _assert_close(got_sums, want_sums)
    _assert_close(got_grads, want_grads)
