"""The objective wires student outputs and TeacherBatch tensors into registry terms with the right shifts."""

import torch
import torch.nn.functional as F

from distill.models.tiny import build_model, tiny_config
from distill.teacher.engine import TeacherEngine
from distill.training.objective import Objective, TermSpec, chunk_rows

V = 64


def _batch(seed=0, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (b, t), generator=g)
    attn = torch.ones(b, t, dtype=torch.bool)
    attn[0, -3:] = False  # right padding
    loss_mask = attn.clone()
    loss_mask[:, :4] = False  # a "prompt"
    loss_mask[:, -1] = False
    loss_mask[0, -4:] = False  # last real token of row 0 has no next token
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def _model(arch, seed):
    return build_model(tiny_config(arch, V, pad_token_id=0, eos_token_id=0), seed=seed)


def test_ce_term_equals_hf_shifted_loss():
    model = _model("tiny_qwen2", 0)
    batch = _batch()
    obj = Objective([TermSpec("ce", "ce", 1.0)], temperature=1.0, chunk_size=0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    sums = obj(out, batch)
    # HF convention: labels[t] is predicted from position t-1; ours: loss_mask[t] trains the prediction of t+1.
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, 1:] = torch.where(batch["loss_mask"][:, :-1], batch["input_ids"][:, 1:], -100)
    hf = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long(), labels=labels
    ).loss
    n = int(batch["loss_mask"].sum())
    torch.testing.assert_close(sums["ce"] / n, hf, rtol=1e-5, atol=1e-6)


def test_forward_kl_through_teacher_batch_equals_naive_full_vocab():
    teacher = TeacherEngine(_model("tiny_deepseek_v3", 1), topk=V)
    student = _model("tiny_qwen2", 2)
    batch = _batch(1)
    tb = teacher.score((0, 0), batch["input_ids"], batch["attention_mask"], batch["loss_mask"]).to_torch()
    obj = Objective(
        [TermSpec("kd", "forward_kl", 1.0), TermSpec("ce", "ce", 0.5)], temperature=2.0, chunk_size=5
    )
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    sums = obj(out, tb)
    mask = batch["loss_mask"]
    t_logp = F.log_softmax(teacher.logits(batch["input_ids"], batch["attention_mask"])[mask].double() / 2, -1)
    s_logp = F.log_softmax(out.logits[mask].double() / 2, -1)
    naive = 4 * (t_logp.exp() * (t_logp - s_logp)).sum()
    torch.testing.assert_close(sums["kd"].double(), naive, rtol=1e-5, atol=1e-6)
    total = obj.weighted_total(sums)
    torch.testing.assert_close(total, sums["kd"] + 0.5 * sums["ce"])


def test_zero_weight_terms_are_dropped_and_teacher_needs_follow_terms():
    obj = Objective(
        [TermSpec("ce", "ce", 1.0), TermSpec("kd", "forward_kl", 0.0)], temperature=1.0, chunk_size=0
    )
    assert [t.label for t in obj.terms] == ["ce"]
    assert not obj.needs_teacher
    obj = Objective(
        [TermSpec("h", "hidden_mse", 1.0, layer_map=[(2, 4), (1, 2)])],
        temperature=1.0,
        chunk_size=0,
        student_hidden_size=8,
        teacher_hidden_size=16,
    )
    assert obj.needs_teacher and obj.needs_student_hidden
    assert obj.teacher_hidden_layers == [2, 4]
    assert sum(p.numel() for p in obj.parameters()) > 0  # the learned projection trains with the student


def test_auto_chunk_rows_scale_with_vocab():
    assert chunk_rows(0, 151936) == 16  # the floor: ~2.4M logits
    assert chunk_rows(0, 32064) == 32
    assert chunk_rows(0, 384) >= 2048  # a tiny-vocab micro-batch is one chunk
    assert chunk_rows(7, 384) == 7
