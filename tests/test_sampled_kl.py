"""The sampled-token reverse-KL estimators (reverse_kl_k1, reverse_kl_k3) against naive float64 references:
values and gradients, top-k teachers (samples inside and outside the top-k) and dense ones, T != 1, all-masked
rows; and k1's expectation over the student's samples equal to the bucketed reverse KL term."""

from __future__ import annotations

import pytest
import torch

from distill import losses
from distill.errors import ConfigError
from distill.losses import DenseTeacher, TopKTeacher

V, K = 12, 4


def _topk_teacher(n: int, seed: int) -> tuple[TopKTeacher, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, V, generator=g) * 2.0
    top = full.topk(K, dim=-1)
    return TopKTeacher(top.indices, top.values, torch.logsumexp(full, dim=-1)), full


def _naive(z: torch.Tensor, teacher: TopKTeacher, labels, mask, temperature: float, estimator: str):
    """float64, no shortcuts: softmax over the vocabulary, k+1 buckets, each bucket tempered as a pseudo-token."""
    q = torch.softmax(z.double(), dim=-1)
    p_top = (teacher.logits.double() - teacher.log_normalizer.double()[:, None]).exp()
    p = torch.cat([p_top, 1 - p_top.sum(-1, keepdim=True)], dim=-1)
    q_top = q.gather(-1, teacher.ids.long())
    s = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], dim=-1)
    p_t = p ** (1 / temperature) / (p ** (1 / temperature)).sum(-1, keepdim=True)
    s_t = s ** (1 / temperature) / (s ** (1 / temperature)).sum(-1, keepdim=True)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(z.shape[0]):
        if not mask[i]:
            continue
        hits = (teacher.ids[i] == labels[i]).nonzero()
        b = int(hits[0]) if len(hits) else K
        log_s, log_t = s_t[i, b].log(), p_t[i, b].log()
        if estimator == "k1":
            k1 = (log_s - log_t).detach()
            total = total + k1 * log_s - (k1 * log_s).detach() + k1
        else:
            r = (log_t - log_s).exp()
            total = total + r - 1 - (log_t - log_s)
    return temperature**2 * total


@pytest.mark.parametrize("estimator", ["k1", "k3"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_top_k_estimators_equal_the_float64_reference(estimator, temperature):
    n = 9
    teacher, full = _topk_teacher(n, seed=1)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(n, V, generator=g, dtype=torch.float64).requires_grad_()
    # Samples inside and outside the teacher's top-k; one row masked out.
    labels = torch.tensor([int(teacher.ids[i, i % K]) if i % 2 else int(full[i].argmin()) for i in range(n)])
    mask = torch.ones(n, dtype=torch.bool)
    mask[3] = False
    term = losses.get(f"reverse_kl_{estimator}")
    got, count = term(z.float(), teacher, mask, temperature=temperature, labels=labels)
    want = _naive(z, teacher, labels, mask, temperature, estimator)
    assert int(count) == n - 1
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    z_f = z.detach().float().requires_grad_()
    term(z_f, teacher, mask, temperature=temperature, labels=labels)[0].backward()
    (want_grad,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(z_f.grad.double(), want_grad, rtol=1e-4, atol=1e-5)
    assert torch.all(z_f.grad[3] == 0)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_dense_teacher_estimators_equal_the_float64_reference(estimator):
    n, temperature = 6, 1.5
    g = torch.Generator().manual_seed(3)
    t_logits = torch.randn(n, V, generator=g, dtype=torch.float64)
    z = torch.randn(n, V, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=g)
    mask = torch.ones(n, dtype=torch.bool)
    log_s = torch.log_softmax(z / temperature, -1).gather(-1, labels[:, None])[:, 0]
    log_t = torch.log_softmax(t_logits / temperature, -1).gather(-1, labels[:, None])[:, 0]
    if estimator == "k1":
        k1 = (log_s - log_t).detach()
        want = (k1 * log_s - (k1 * log_s).detach() + k1).sum() * temperature**2
    else:
        want = ((log_t - log_s).exp() - 1 - (log_t - log_s)).sum() * temperature**2
    z_f = z.detach().float().requires_grad_()
    got, _ = losses.get(f"reverse_kl_{estimator}")(
        z_f, DenseTeacher(t_logits.float()), mask, temperature=temperature, labels=labels
    )
    got.backward()
    (want_grad,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_f.grad.double(), want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_all_masked_rows_give_zero_loss_and_gradient(estimator):
    teacher, _ = _topk_teacher(4, seed=4)
    z = torch.randn(4, V, requires_grad=True)
    loss, count = losses.get(f"reverse_kl_{estimator}")(
        z, teacher, torch.zeros(4, dtype=torch.bool), labels=torch.zeros(4, dtype=torch.long)
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and int(count) == 0
    assert z.grad is None or torch.all(z.grad == 0)


def test_k1_over_the_students_samples_is_the_bucketed_reverse_kl_and_its_gradient():
    """Enumerating every token y the student could sample, weighted by its probability, k1's value and gradient
    are exactly the reverse_kl term's (the k+1-bucket KL(s || t)): the estimator is unbiased."""
    teacher, _ = _topk_teacher(1, seed=5)
    z = torch.randn(1, V, dtype=torch.float64)
    q = torch.softmax(z, -1)[0]
    mask = torch.ones(1, dtype=torch.bool)
    value = torch.zeros((), dtype=torch.float64)
    grad = torch.zeros_like(z)
    for y in range(V):
        zy = z.float().clone().requires_grad_()
        loss, _ = losses.get("reverse_kl_k1")(zy, teacher, mask, labels=torch.tensor([y]))
        loss.backward()
        value += q[y] * loss.double()
        grad += q[y] * zy.grad.double()
    zr = z.float().clone().requires_grad_()
    exact, _ = losses.get("reverse_kl")(zr, teacher, mask)
    exact.backward()
    torch.testing.assert_close(value, exact.double().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, zr.grad.double(), rtol=1e-4, atol=1e-6)


def test_estimators_need_the_sampled_tokens():
    teacher, _ = _topk_teacher(2, seed=6)
    with pytest.raises(ConfigError, match="labels"):
        losses.get("reverse_kl_k1")(torch.randn(2, V), teacher, torch.ones(2, dtype=torch.bool))
