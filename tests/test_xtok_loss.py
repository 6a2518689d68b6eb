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
    holding everything else; student buckets = the same student ids + the rest of its vocabulary; each side's
    buckets taken at T=1, then every bucket tempered as one pseudo-token (b^(1/T), renormalised)."""

    def tempered(buckets):
        return buckets ** (1 / temperature) / (buckets ** (1 / temperature)).sum()

    out = []
    for r in range(full.shape[0]):
        p_all = torch.softmax(full[r].double(), -1)
        mapped = [(int(t), int(table[t])) for t in t_ids[r] if table[t] >= 0]
        p_buckets = torch.stack([p_all[t] for t, _ in mapped])
        tp = tempered(torch.cat([p_buckets, (1 - p_buckets.sum())[None]]))
        q_all = torch.softmax(student_logits[r].double(), -1)
        q = torch.stack([q_all[s] for _, s in mapped])
        qb = tempered(torch.cat([q, (1 - q.sum())[None]]))
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


def _student_equal_to_teacher(full, t_ids, table):
    """Student logits [N, V_S] whose distribution is the teacher's carried into the student vocabulary: every
    mapped teacher id's probability on its student id, each unmapped teacher id's on a student id outside the
    row's mapped ones (so the student's rest equals the teacher's rest, up to how it is spread)."""
    p = torch.softmax(full.double(), -1)
    q = torch.zeros(full.shape[0], V_S, dtype=torch.float64)
    q.scatter_add_(1, table.clamp(min=0).expand(full.shape[0], -1), p * (table >= 0))
    for r in range(full.shape[0]):
        row_mapped = {int(table[t]) for t in t_ids[r] if table[t] >= 0}
        outside = [s for s in range(V_S) if s not in row_mapped]
        for j, t in enumerate(torch.nonzero(table < 0).flatten().tolist()):
            q[r, outside[j % len(outside)]] += p[r, t]
    return q.log().float()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tv"])
def test_student_equal_to_teacher_is_the_minimum_at_every_temperature(name, temperature):
    """The bug this pins: the student's buckets were tempered over its full vocabulary (its rest bucket
    sum_j q_j^(1/T)) and the teacher's as pseudo-tokens ((sum_j p_j)^(1/T)), so a student equal to the teacher
    paid a large loss at T > 1 and was pushed to empty everything outside the mapped ids."""
    teacher, full, t_ids, _, _, table = _mapped()
    x = _student_equal_to_teacher(full, t_ids, table).requires_grad_()
    mask = torch.ones(N, dtype=torch.bool)
    loss, _ = L.get(name)(x, teacher, mask, temperature=temperature, chunk_size=5)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-4
    if name != "tv":  # |t - s| has no gradient at t == s, only subgradients
        assert float(x.grad.abs().max()) < 1e-4
    # ...and moving mass from the rest onto the mapped ids (what the old loss rewarded) costs.
    sharper = x.detach() + 2.0 * teacher.mapped.new_zeros(N, V_S).scatter_(
        1, teacher.gather_ids(), teacher.mapped
    )
    worse, _ = L.get(name)(sharper, teacher, mask, temperature=temperature)
    assert float(worse) > 0.1


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


def _projected_teacher(seed: int = 5):
    """A MappedTopKTeacher as project_topk builds it, with every case `uld` meets: unmapped entries (uld is not
    0), several teacher ids merged into one student id (-1 with a -inf logit: no mass of their own), student id 0
    mapped in a row that also has unmapped slots (which gather id 0 too), and one unaligned row."""
    _, t_ids, t_logits, lse = _teacher_topk(seed=seed)
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(V_S, (V_T,), generator=g)  # not injective: merges
    table[torch.randperm(V_T, generator=g)[:12]] = -1
    table[t_ids[0, 0]] = 0
    table[t_ids[0, -1]] = -1
    align = torch.arange(N)[None].clone()
    align[0, 2] = -1
    ids, logits, norm = project_topk(t_ids[None], t_logits[None], lse[None], align, table)
    return L.MappedTopKTeacher(ids[0], logits[0], norm[0])


def _naive_uld(student_logits, teacher, temperature):
    """uld per row in float64, straight from the table in distill/losses/terms.py: the teacher's k entries and
    its true tail at T=1 (tail dropped below 1e-6), each tempered as one pseudo-token; its unmapped entries
    (id -1 with mass) sorted, against the student's softmax(z / T) outside the row's mapped ids, sorted, over
    as many places as there are unmapped entries. Differentiable in student_logits."""
    out = []
    for r in range(teacher.num_rows):
        p = (teacher.logits[r].double() - teacher.log_normalizer[r].double()).exp()  # -inf (merged) -> 0
        tail = 1 - p.sum()
        powered = p ** (1 / temperature)
        norm = powered.sum() + (tail ** (1 / temperature) if tail >= 1e-6 else 0.0)
        ids = teacher.ids[r].tolist()
        unmapped = sorted(
            (float(powered[j] / norm) for j in range(len(ids)) if ids[j] < 0 and p[j] > 0), reverse=True
        )
        q = torch.softmax(student_logits[r].double() / temperature, -1)
        outside = [i for i in range(q.shape[0]) if i not in {i for i in ids if i >= 0}]
        q_sorted = q[outside].sort(descending=True).values[: len(unmapped)]
        out.append((torch.tensor(unmapped, dtype=torch.float64) - q_sorted).abs().sum())
    return torch.stack(out)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_uld_value_and_gradient_match_naive_float64(temperature):
    teacher = _projected_teacher()
    has_unmapped = ((teacher.ids < 0) & torch.isfinite(teacher.logits)).any(-1)
    merged = ((teacher.ids < 0) & torch.isinf(teacher.logits)).any(-1)
    assert has_unmapped[0] and has_unmapped.sum() >= 3 and (~has_unmapped).any() and merged.any()
    z = torch.randn(N, V_S, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2
    mask = torch.ones(N, dtype=torch.bool)
    mask[[3, 7]] = False

    x = z.float().requires_grad_()
    got, n = L.get("uld")(x, teacher, mask, temperature=temperature, chunk_size=4)
    got.backward()
    z64 = z.clone().requires_grad_()
    want = _naive_uld(z64, teacher, temperature)[mask].sum()
    want.backward()

    assert int(n) == int(mask.sum()) and float(want.detach()) > 0.1
    assert math.isclose(float(got.detach()), float(want.detach()), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(x.grad.double(), z64.grad, rtol=1e-4, atol=1e-6)
    assert (x.grad[~mask] == 0).all() and (x.grad[~has_unmapped] == 0).all()


def test_all_masked_and_empty_rows_give_zero_not_nan():
    teacher, *_ = _mapped()
    x = torch.randn(N, V_S, requires_grad=True)
    for name in ("forward_kl", "uld", "jsd"):
        loss, n = L.get(name)(x, teacher, torch.zeros(N, dtype=torch.bool))
        assert float(loss.detach()) == 0.0 and int(n) == 0
    # Rows with no aligned teacher position: every id -1, every logit -inf (what project_topk emits).
    empty = L.MappedTopKTeacher(torch.full((N, K), -1), torch.full((N, K), -torch.inf), torch.zeros(N))
    for name in ("forward_kl", "reverse_kl", "jsd", "uld"):
        for temperature in (
            1.0,
            3.0,
        ):  # one bucket on both sides whatever T: nothing to match, nothing to push
            x.grad = None
            loss, _ = L.get(name)(x, empty, torch.ones(N, dtype=torch.bool), temperature=temperature)
            loss.backward()
            assert float(loss.detach()) == 0.0 and torch.isfinite(x.grad).all()
            assert float(x.grad.abs().max()) == 0.0


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
