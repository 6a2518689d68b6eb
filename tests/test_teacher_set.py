"""Several teachers: the ensemble mixture against a naive float64 mixture, routing of examples to teachers, and the
single-process run with a routed pair (one of them through a token map)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

import distill.losses as L
from distill.batch import ENSEMBLE, ROUTE
from distill.config import compose
from distill.data.routing import Router
from distill.errors import ConfigError
from distill.teacher.engine import TeacherEngine
from distill.teacher.ensemble import mix_topk, unplaced_mass_bound
from distill.teacher.teacher_set import TeacherSet, combine, validate_teacher_set

N, V = 12, 40


def dense_teachers(seed: int = 0, m: int = 2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, V, generator=g, dtype=torch.float64) * 2 for _ in range(m)]


def topk_parts(logits: list[torch.Tensor], k: int):
    """Each dense teacher's top-k in wire format (int32 ids, fp32 logits and normaliser)."""
    ids, top, norms = [], [], []
    for z in logits:
        i = z.topk(k, dim=-1).indices
        ids.append(i.int())
        top.append(z.gather(1, i).float())
        norms.append(z.logsumexp(-1).float())
    return ids, top, norms


def mixture_teacher(ids, top, norms, weights) -> L.MappedTopKTeacher:
    return L.MappedTopKTeacher(*mix_topk(ids, top, norms, weights))


def naive_mixture(logits: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t softmax(z_t), float64 [N, V]."""
    w = weights.double() / weights.double().sum(-1, keepdim=True)
    return sum(w[:, t : t + 1] * z.softmax(-1) for t, z in enumerate(logits))


def naive_forward_kl(
    p: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    pt = (p.log() / temperature).softmax(-1)
    qt = (student.double() / temperature).softmax(-1)
    return temperature**2 * (pt * (pt / qt).log()).sum(-1)[mask].sum()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("term", ["forward_kl", "reverse_kl", "jsd"])
def test_ensemble_at_k_equal_v_is_the_dense_mixture(term, temperature):
    """k = V: every teacher's tail is empty, the union is the vocabulary, and the loss on the mixed teacher equals
    the same divergence computed by hand on sum_t w_t softmax(z_t) in float64, masked rows included."""
    logits = dense_teachers()
    weights = torch.tensor([[0.7, 0.3]]).expand(N, 2)
    teacher = mixture_teacher(*topk_parts(logits, V), weights)
    g = torch.Generator().manual_seed(5)
    student = torch.randn(N, V, generator=g, dtype=torch.float64)
    mask = torch.rand(N, generator=g) > 0.3
    mask[0] = False  # a masked-out row adds nothing
    got, count = L.get(term)(student.float(), teacher, mask, temperature=temperature, **_params(term))
    p = (naive_mixture(logits, weights).log() / temperature).softmax(-1)
    q = (student / temperature).softmax(-1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1)  # noqa: E731
    if term == "forward_kl":
        rows = kl(p, q)
    elif term == "reverse_kl":
        rows = kl(q, p)
    else:
        m = 0.3 * p + 0.7 * q
        rows = 0.3 * kl(p, m) + 0.7 * kl(q, m)
    want = temperature**2 * rows[mask].sum()
    assert int(count) == int(mask.sum())
    assert float(got) == pytest.approx(float(want), rel=2e-5, abs=1e-5)


def _params(term: str) -> dict:
    return {"beta": 0.3} if term == "jsd" else {}


def test_topk_ensemble_is_within_its_stated_bound():
    """k < V: against the true mixture coarsened onto the same buckets (union ids + the rest), the mixed teacher's
    buckets are within 2 * eps in L1 (eps from `unplaced_mass_bound`), and forward KL within the mean-value bound
    the module states; the gap is real (not 0), so the check is not empty."""
    logits = dense_teachers(seed=1)
    weights = torch.tensor([[0.5, 0.5]]).expand(N, 2)
    parts = topk_parts(logits, 8)
    teacher = mixture_teacher(*parts, weights)
    union = teacher.ids.long()
    present = union >= 0
    true_mix = naive_mixture(logits, weights)
    p_true = torch.where(present, true_mix.gather(1, union.clamp(min=0)), 0.0)
    p_true = torch.cat([p_true, 1 - p_true.sum(-1, keepdim=True)], -1)
    p_ours = teacher.log_probs(1.0).double().exp()
    l1 = (p_ours - p_true).abs().sum(-1)
    eps = unplaced_mass_bound(*parts, weights)
    assert bool((l1 <= 2 * eps + 1e-6).all())
    assert float(l1.max()) > 1e-4  # teachers disagree on their top-8: some mass is really unplaced
    g = torch.Generator().manual_seed(2)
    student = torch.randn(N, V, generator=g, dtype=torch.float64)
    q = teacher.student_log_probs(student.float(), 1.0).double().exp()
    mask = torch.ones(N, dtype=torch.bool)
    ours = L.get("forward_kl")(student.float(), teacher, mask, temperature=1.0)[0]
    truth = (p_true * (p_true / q).log()).nan_to_num().sum()
    slope = 1 + torch.maximum((p_ours / q).log().abs(), (p_true / q).log().abs()).nan_to_num(posinf=0.0)
    assert abs(float(ours) - float(truth)) <= float(((p_ours - p_true).abs() * slope).sum()) + 1e-4


def test_a_mixture_of_one_is_that_teacher():
    """A routed row (one teacher, weight 1) trains exactly as that teacher alone would, tail included."""
    (z,) = dense_teachers(m=1)
    ids, top, norms = topk_parts([z], 6)
    mixed = mixture_teacher(ids, top, norms, torch.ones(N, 1))
    alone = L.TopKTeacher(ids[0], top[0], norms[0])
    student = torch.randn(N, V, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(N, dtype=torch.bool)
    for temperature in (1.0, 2.0):
        a = L.get("forward_kl")(student, mixed, mask, temperature=temperature)[0]
        b = L.get("forward_kl")(student, alone, mask, temperature=temperature)[0]
        assert float(a) == pytest.approx(float(b), rel=1e-5)


def test_shared_ids_add_up_and_unmapped_entries_stay_in_the_rest():
    """Two teachers listing the same student id give it the sum of their weighted probabilities; an entry with no
    student id (-1, a token map's) is not invented onto any id: its mass stays in the rest."""
    ids = [torch.tensor([[3, 5, -1]]), torch.tensor([[5, 7, 9]])]
    probs = [torch.tensor([[0.5, 0.2, 0.2]]), torch.tensor([[0.6, 0.3, 0.05]])]
    logits = [p.log().float() for p in probs]
    norms = [torch.zeros(1), torch.zeros(1)]
    out_ids, out_logits, norm = mix_topk(ids, logits, norms, torch.tensor([[0.5, 0.5]]))
    assert float(norm[0]) == 0.0  # the entries are log-probabilities
    got = {int(i): float(p) for i, p in zip(out_ids[0], out_logits[0].exp(), strict=True) if i >= 0}
    assert got == pytest.approx({3: 0.25, 5: 0.4, 7: 0.15, 9: 0.025})
    assert int(out_ids[0, 0]) == 5  # most likely first
    rest = 1 - sum(got.values())
    assert rest == pytest.approx(
        0.5 * (1 - 0.7) + 0.5 * (1 - 0.95)
    )  # the tails and the unmapped 0.2, exactly


def test_confidence_weighting_leans_on_the_sure_teacher():
    sure = torch.tensor([[0.9, 0.05]]).log().float()
    unsure = torch.tensor([[0.3, 0.3]]).log().float()
    ids = [torch.tensor([[1, 2]]), torch.tensor([[2, 1]])]
    norms = [torch.zeros(1), torch.zeros(1)]
    batch = {
        "input_ids": torch.zeros(1, 1, dtype=torch.long),
        "attention_mask": torch.ones(1, 1, dtype=torch.bool),
        "loss_mask": torch.ones(1, 1, dtype=torch.bool),
        ROUTE: torch.tensor([ENSEMBLE]),
    }
    from distill.batch import TeacherBatch

    parts = {
        t: TeacherBatch.from_torch(
            (0, 0),
            input_ids=batch["input_ids"].int(),
            attention_mask=batch["attention_mask"],
            loss_mask=batch["loss_mask"],
            topk_ids=ids[t][None].int(),
            topk_logits=z[None],
            log_normalizer=norms[t][None],
        )
        for t, z in enumerate([sure, unsure])
    }
    static = combine((0, 0), batch, parts, [1.0, 1.0], "static")
    by_confidence = combine((0, 0), batch, parts, [1.0, 1.0], "confidence")

    def p(tb):
        probs = torch.tensor(tb.topk_logits[0, 0]).exp().tolist()
        return dict(zip(tb.topk_ids[0, 0].tolist(), probs, strict=True))

    assert p(static)[1] == pytest.approx(0.5 * 0.9 + 0.5 * 0.3)
    w = torch.tensor([0.9, 0.3]) / 1.2
    assert p(by_confidence)[1] == pytest.approx(float(w[0] * 0.9 + w[1] * 0.3), rel=1e-5)


# ---- routing ------------------------------------------------------------------------------------------------
def _routing(**kw):
    return OmegaConf.create({"key": None, "subsets": {}, "default": "ensemble", **kw})


SUBSETS = OmegaConf.create(
    {"ab": {"domains": ["shopping", "travel"], "levels": None}, "c": {"domains": ["baking"], "levels": None}}
)


def test_router_follows_key_then_subsets_then_default():
    route = Router(["math", "code"], _routing(key="teacher", subsets={"ab": "code", "c": "math"}), SUBSETS)
    assert route({"teacher": "math", "domain": "shopping"}) == 0  # the field wins
    assert route({"domain": "travel"}) == 1
    assert route({"domain": "baking"}) == 0
    assert route({"domain": "garden"}) == ENSEMBLE  # default
    assert route({"teacher": "ensemble"}) == ENSEMBLE


def test_router_names_the_known_teachers_for_an_unknown_one():
    route = Router(["math", "code"], _routing(key="teacher", default=None), SUBSETS)
    with pytest.raises(ConfigError, match=r"'chat'.*\['math', 'code'\]"):
        route({"teacher": "chat"})
    with pytest.raises(ConfigError, match="no routing rule places"):
        route({"domain": "garden"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["+routing.subsets={shopping: chat}"],
            r"routing.subsets.shopping='chat' names no teacher.*\['a', 'b'\]",
        ),
        (["+routing.subsets={nowhere: a}"], "data subset 'nowhere'"),
        (["+ensemble.weights={c: 1.0}"], r"ensemble.weights names 'c'"),
        (["ensemble.weighting=vote"], "ensemble.weighting='vote'"),
        (["data.packing=true"], "do not support packed rows"),
        (["loss=kd_features"], "do not support hidden-state or attention terms"),
    ],
)
def test_teacher_set_config_errors_name_the_problem(extra, message):
    cfg = compose(["+teacher@teachers.a=tiny_deepseek_v3", "+teacher@teachers.b=tiny_deepseek_v3", *extra])
    with pytest.raises(ConfigError, match=message):
        validate_teacher_set(cfg)


# ---- real teachers ------------------------------------------------------------------------------------------
def test_every_row_is_scored_by_its_routed_teacher(tiny_teacher, second_teacher):
    """Routed rows carry exactly their own teacher's top-k (as that teacher scores the row alone); ensemble rows
    carry the mixture of both."""
    from distill.data import build_task_dataset, encode_example
    from distill.data.batching import pad_batch
    from distill.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_teacher)
    examples = list(build_task_dataset(["shopping", "baking"], [1], 6, 2, 0)["train"])[:6]
    rows = [
        encode_example(tok, ex, 128) | {ROUTE: r}
        for ex, r in zip(examples, [0, 1, ENSEMBLE, 1, 0, 0], strict=True)
    ]
    batch = pad_batch(rows, tok.pad_token_id)
    engines = [TeacherEngine.from_pretrained(p, 8) for p in (tiny_teacher, second_teacher)]
    scored = TeacherSet(["a", "b"], [e.score_batch for e in engines], [1.0, 1.0], "static").score(
        (0, 0), batch
    )
    mask = batch["loss_mask"]
    alone = [e.score_batch((0, 0), batch) for e in engines]
    for row, r in enumerate(batch[ROUTE].tolist()):
        m = mask[row]
        ids = torch.tensor(scored.topk_ids[row])[m]
        if r != ENSEMBLE:
            own = alone[r]
            want = torch.tensor(own.topk_ids[row])[m]
            assert torch.equal(ids[:, : want.shape[1]].long(), want.long()), f"row {row} not from teacher {r}"
            logp = torch.tensor(scored.topk_logits[row])[m][:, : want.shape[1]]
            own_logp = (
                torch.tensor(own.topk_logits[row])[m] - torch.tensor(own.log_normalizer[row])[m][:, None]
            )
            torch.testing.assert_close(logp, own_logp, rtol=1e-5, atol=1e-5)
            assert bool((ids[:, want.shape[1] :] == -1).all())
        else:
            parts = [
                (
                    torch.tensor(a.topk_ids[row])[m],
                    torch.tensor(a.topk_logits[row])[m],
                    torch.tensor(a.log_normalizer[row])[m],
                )
                for a in alone
            ]
            want_ids, want_logits, _ = mix_topk(*zip(*parts, strict=True), torch.full((int(m.sum()), 2), 0.5))
            assert torch.equal(ids, want_ids[:, : ids.shape[1]])
            torch.testing.assert_close(
                torch.tensor(scored.topk_logits[row])[m], want_logits[:, : ids.shape[1]]
            )
    # A stage that keeps only `a`: every row, b's and the ensemble's too, carries a's own top-k.
    only_a = TeacherSet(
        ["a", "b"], [e.score_batch for e in engines], [1.0, 1.0], "static", lambda _: {"a": 1.0}
    )
    staged = only_a.score((0, 0), batch)
    for row in range(len(rows)):
        m = mask[row]
        want = torch.tensor(alone[0].topk_ids[row])[m]
        assert torch.equal(torch.tensor(staged.topk_ids[row])[m][:, : want.shape[1]].long(), want.long())


def test_local_run_with_two_routed_teachers_one_through_a_token_map(
    tiny_teacher, second_teacher, base_overrides, tmp_path
):
    """The single-process run: rows of shopping/travel go to teacher `a` (through a token map), the rest to `b`;
    both score, the run trains and logs each teacher's throughput, config.yaml shows `a` as the primary."""
    from distill.run import run

    overrides = [
        *base_overrides,
        "+teacher@teachers.a=tiny_deepseek_v3",
        f"teachers.a.path={tiny_teacher}",
        "teachers.a.token_map.enabled=true",
        "+teacher@teachers.b=tiny_deepseek_v3",
        f"teachers.b.path={second_teacher}",
        "+routing.subsets={shopping: a, travel: a}",
        "routing.default=b",
        "train.steps=4",
        "train.log_every=2",
        "eval.generate_examples=0",
    ]
    summary = run(compose(overrides, run_dir=str(tmp_path)))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(
        r["teacher/a/tokens"] > 0 and r["teacher/b/tokens"] > 0 for r in records if "teacher/a/tokens" in r
    )
    assert summary["agreement"] > 0
    # Held-out figures per teacher (its routed rows): they add up to the whole.
    per = {name: {k: summary[f"teachers/{name}/{k}"] for k in ("ce", "agreement", "tokens")} for name in "ab"}
    assert per["a"]["tokens"] > 0 and per["b"]["tokens"] > 0
    assert per["a"]["tokens"] + per["b"]["tokens"] == summary["tokens"]
    mean_ce = sum(v["ce"] * v["tokens"] for v in per.values()) / summary["tokens"]
    assert mean_ce == pytest.approx(summary["ce"], rel=1e-6)
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.teacher.path == str(tiny_teacher)


def test_a_stage_reweights_the_ensemble_and_turns_teachers_off():
    """`curriculum.stages[i].teachers`: the ensemble weights times the stage's multipliers; rows routed to a
    teacher the stage leaves out (or sets to 0) go to the ensemble of the others."""
    from distill.teacher.teacher_set import stage_routing

    route = torch.tensor([0, 1, ENSEMBLE, 2])
    same, weights = stage_routing(route, [1.0, 2.0, 1.0], ["a", "b", "c"], None)
    assert torch.equal(same, route) and weights == [1.0, 2.0, 1.0]
    staged, weights = stage_routing(route, [1.0, 2.0, 1.0], ["a", "b", "c"], {"a": 2.0, "c": 1.0})
    assert staged.tolist() == [0, ENSEMBLE, ENSEMBLE, 2] and weights == [2.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["+curriculum.stages.0.teachers={z: 1.0}"], r"weighs teacher 'z'; the teachers are \['a', 'b'\]"),
        (["+curriculum.stages.0.teachers={a: 0.0}"], "turns every teacher off"),
    ],
)
def test_stage_teacher_errors_name_the_problem(extra, message):
    cfg = compose(["+teacher@teachers.a=tiny_deepseek_v3", "+teacher@teachers.b=tiny_deepseek_v3", *extra])
    with pytest.raises(ConfigError, match=message):
        validate_teacher_set(cfg)
    with pytest.raises(ConfigError, match="the run has one teacher"):
        validate_teacher_set(compose(["+curriculum.stages.0.teachers={a: 1.0}"]))


@pytest.mark.parametrize("command", ["teacher-cache", "generate", "eval"])
def test_one_teacher_commands_refuse_a_set(command):
    from launch.evaluate import evaluate
    from launch.generate import generate
    from launch.teacher_cache import build_cache

    run = {"teacher-cache": build_cache, "generate": generate, "eval": evaluate}[command]
    cfg = compose(["+teacher@teachers.a=tiny_deepseek_v3", "+teacher@teachers.b=tiny_deepseek_v3"])
    with pytest.raises(ConfigError, match=f"distill {command} serves one teacher.*\\['a', 'b'\\]"):
        run(cfg)


def test_each_teacher_has_its_own_share_of_the_cluster():
    """teachers.<name>.replicas / .tp: that teacher's group layout; the others keep cluster.teacher_*."""
    from distill.teacher.teacher_set import teacher_views

    cfg = compose(
        [
            "cluster=sim_2node",
            "+teacher@teachers.a=tiny_deepseek_v3",
            "+teacher@teachers.b=tiny_deepseek_v3",
            "teachers.b.replicas=2",
            "teachers.b.tp=1",
        ]
    )
    views = teacher_views(cfg)
    assert (views["a"].cluster.teacher_replicas, views["a"].cluster.teacher_tp) == (1, 2)
    assert (views["b"].cluster.teacher_replicas, views["b"].cluster.teacher_tp) == (2, 1)
    assert cfg.cluster.teacher_tp == 2  # the run's own config is untouched
