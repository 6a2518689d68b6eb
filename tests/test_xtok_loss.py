"""Cross-tokenizer loss terms: the mapped teacher against naive full-softmax references, ULD, projection."""

import math

import pytest
import torch

import distill.losses as L
from distill.xtok import project_topk

V_T, V_S, K, N = 40, 30, 8, 12


def _teacher_topk(seed: int = 0, n: int = N, k: int = K, v: int = V_T):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, v, generator=g) * 3
    logits, ids = full.topk(k, dim=-1)
    return full, ids, logits, torch.logsumexp(full, dim=-1)


def _mapped(seed: int = 1):
    """A MappedTopKTeacher with some unmapped entries (-1), plus the pieces to build references."""
    full, t_ids, t_logits, lse = _teacher_topk()
    g = torch.Generator().manual_seed(seed)
    table = torch.cat([torch.randperm(V_S, generator=g), torch.full((V_T - V_S,), -1)])
    table = table[torch.randperm(V_T, generator=g)]  # a random injective map, 10 teacher ids unmapped
    s_ids = table[t_ids]
    return L.MappedTopKTeacher(s_ids, t_logits, lse), full, t_ids, t_logits, lse, table


def _naive_mapped_kl(student_logits, full, t_ids, table, temperature):
    """Full softmax reference: teacher buckets = top-k ids that map (to distinct student ids) + one rest bucket
    holding everything else; student buckets = the same student ids + the rest of its vocabulary."""
    out = []
    for r in range(full.shape[0]):
        p_all = torch.softmax(full[r].double(), -1)
        mapped = [(int(t), int(table[t])) for t in t_ids[r] if table[t] >= 0]
        p_buckets = torch.stack([p_all[t] for t, _ in mapped])
        p_rest = 1 - p_buckets.sum()
        t_bucket_logits = torch.log(torch.cat([p_buckets, p_rest[None]])) / temperature
        tp = torch.softmax(t_bucket_logits, -1)
        q_all = torch.softmax(student_logits[r].double() / temperature, -1)
        q = torch.stack([q_all[s] for _, s in mapped])
        qb = torch.cat([q, (1 - q.sum())[None]])
        out.append(temperature**2 * (tp * (tp.log() - qb.log())).sum())
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mapped_forward_kl_matches_naive_reference(temperature):
    teacher, full, t_ids, _, _, table = _mapped()
    assert (~teacher.mapped).any() and teacher.mapped.any()
    x = torch.randn(N, V_S, requires_grad=True)
    mask = torch.ones(N, dtype=torch.bool)
    got, n = L.get("forward_kl")(x, teacher, mask, temperature=temperature, chunk_size=5)
    want = _naive_mapped_kl(x.detach(), full, t_ids, table, temperature).sum()
    assert n == N and torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    got.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tv"])
def test_identity_map_equals_plain_topk_teacher(name):
    """Every id mapped to itself: the cross-tokenizer teacher is the same-tokenizer teacher to the last bit."""
    _, ids, logits, lse = _teacher_topk(v=V_S)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(3)) > 0.2
    x1 = torch.randn(N, V_S, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    a, _ = L.get(name)(x1, L.TopKTeacher(ids, logits, lse), mask, temperature=1.5)
    b, _ = L.get(name)(x2, L.MappedTopKTeacher(ids, logits, lse), mask, temperature=1.5)
    a.backward()
    b.backward()
    assert abs(float(a.detach()) - float(b.detach())) < 1e-6
    assert torch.allclose(x1.grad, x2.grad, atol=1e-7)
    uld, _ = L.get("uld")(x2.detach(), L.MappedTopKTeacher(ids, logits, lse), mask)
    assert float(uld) == 0.0


def _naive_uld(student_logits, teacher, temperature):
    out = []
    full_t = L.TopKTeacher(teacher.ids.clamp(min=0), teacher.logits, teacher.log_normalizer)
    probs = full_t.log_probs(temperature)[:, :-1].exp()
    for r in range(teacher.num_rows):
        un = sorted(
            (float(p) for p, m in zip(probs[r], teacher.mapped[r], strict=True) if not m), reverse=True
        )
        q = torch.softmax(student_logits[r].double() / temperature, -1).tolist()
        mapped_ids = {int(i) for i, m in zip(teacher.ids[r], teacher.mapped[r], strict=True) if m}
        rest = sorted((p for i, p in enumerate(q) if i not in mapped_ids), reverse=True)
        out.append(sum(abs(a - b) for a, b in zip(un, rest, strict=False)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_uld_matches_naive_sorted_l1(temperature):
    teacher, *_ = _mapped()
    x = torch.randn(N, V_S, requires_grad=True)
    mask = torch.ones(N, dtype=torch.bool)
    mask[3] = False
    got, n = L.get("uld")(x, teacher, mask, temperature=temperature, chunk_size=4)
    want = _naive_uld(x.detach(), teacher, temperature)[mask].sum()
    assert int(n) == N - 1 and math.isclose(float(got), float(want), rel_tol=1e-5, abs_tol=1e-6)
    got.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_all_masked_and_empty_rows_give_zero_not_nan():
    teacher, *_ = _mapped()
    x = torch.randn(N, V_S, requires_grad=True)
    for name in ("forward_kl", "uld", "jsd"):
        loss, n = L.get(name)(x, teacher, torch.zeros(N, dtype=torch.bool))
        assert float(loss) == 0.0 and int(n) == 0
    # Rows with no aligned teacher position: every id -1, every logit -inf (what project_topk emits).
    empty = L.MappedTopKTeacher(torch.full((N, K), -1), torch.full((N, K), -torch.inf), torch.zeros(N))
    for name in ("forward_kl", "reverse_kl", "uld"):
        x.grad = None
        loss, _ = L.get(name)(x, empty, torch.ones(N, dtype=torch.bool))
        loss.backward()
        assert float(loss) == 0.0 and torch.isfinite(x.grad).all() and float(x.grad.abs().max()) == 0.0


def test_uld_is_zero_for_teachers_already_in_the_student_vocabulary():
    _, ids, logits, lse = _teacher_topk(v=V_S)
    x = torch.randn(N, V_S, requires_grad=True)
    for teacher in (L.TopKTeacher(ids, logits, lse), L.DenseTeacher(torch.randn(N, V_S))):
        loss, n = L.get("uld")(x, teacher, torch.ones(N, dtype=torch.bool))
        loss.backward()
        assert float(loss.detach()) == 0.0 and int(n) == N and float(x.grad.abs().max()) == 0.0


def test_project_topk_gathers_maps_and_merges_duplicates():
    # One sequence, 3 teacher positions, k=3; two teacher ids map to the same student id 5.
    t_ids = torch.tensor([[[0, 1, 2], [3, 0, 1], [2, 3, 0]]])
    t_logits = torch.tensor([[[3.0, 2.0, 1.0], [4.0, 1.0, 0.0], [2.0, 1.5, 1.0]]])
    lse = torch.tensor([[5.0, 6.0, 7.0]])
    table = torch.tensor([5, 5, -1, 7])
    align = torch.tensor([[2, -1, 0, 1]])  # 4 student positions
    ids, logits, norm = project_topk(t_ids, t_logits, lse, align, table)
    assert ids.tolist() == [[[-1, 7, 5], [-1, -1, -1], [5, -1, -1], [7, 5, -1]]]
    assert norm.tolist() == [[7.0, 0.0, 5.0, 6.0]]
    assert torch.isinf(logits[0, 1]).all()
    # teacher position 0: ids 0 and 1 both -> 5: one entry with their summed probability
    assert math.isclose(float(logits[0, 2, 0]), math.log(math.exp(3) + math.exp(2)), rel_tol=1e-6)
    assert torch.isinf(logits[0, 2, 1]) and float(logits[0, 2, 2]) == 1.0  # merged away; unmapped kept
    assert math.isclose(float(logits[0, 3, 1]), math.log(math.exp(1) + math.exp(0)), rel_tol=1e-6)
    # the merged row's mapped mass is the teacher mass of both ids
    t = L.MappedTopKTeacher(ids[0], logits[0], norm[0])
    p = t.log_probs(1.0)[2].exp()
    assert math.isclose(float(p[0]), (math.exp(3) + math.exp(2)) / math.exp(5), rel_tol=1e-5)
