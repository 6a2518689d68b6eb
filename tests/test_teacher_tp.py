"""Tensor-parallel teacher over real gloo process groups: TP=2 scores exactly like TP=1.

One spawn of 2 ranks loads every tiny model once and records what the tests check (scored batches, local
parameter shapes, vocab-parallel top-k of random logits); the tests compare those records with a TP=1
reference built in the test process. A second spawn of 3 ranks checks that an impossible TP size fails on
every rank before any weight is read.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distill.errors import ConfigError, TopologyError
from distill.models import build_model, save_model, tiny_config
from distill.teacher import TeacherEngine, topk_with_normalizer
from distill.teacher.tp_plan import (
    check_tp_size,
    expected_local_shape,
    kv_heads_for_rank,
    rule_for,
    sharding_mismatches,
    teacher_tp_plan,
    tp_plan_overrides,
)

pytestmark = pytest.mark.distributed

VOCAB, K = 64, 5  # the vocabulary divides by TP 2: each rank holds 32 token ids
# name -> (tiny arch, config overrides). deepseek: MLA + MoE (4 routed experts, 1 shared), layer 0 dense.
# qwen2: GQA, 4 heads / 2 KV heads, so TP 2 shards the KV heads. qwen2_kv3: 6 heads / 3 KV heads, so TP 2
# replicates the KV projections and each rank trims them to the KV heads its query heads read.
MODELS = {
    "deepseek": ("tiny_deepseek_v3", {}),
    "qwen2": ("tiny_qwen2", {}),
    "qwen2_kv3": ("tiny_qwen2", {"num_attention_heads": 6, "num_key_value_heads": 3}),
}
# Scoring options per run; "deepseek_tp_experts" reloads the DeepSeek folder with experts sliced, not split.
RUNS = {
    "deepseek": ("deepseek", "expert_parallel", {"hidden_layers": (0, 2, 4), "attention_layers": (0, 3)}),
    "deepseek_tp_experts": ("deepseek", "tensor_parallel", {}),
    "qwen2": ("qwen2", "expert_parallel", {"hidden_layers": (1, 4)}),
    "qwen2_kv3": ("qwen2_kv3", "expert_parallel", {"hidden_layers": (4,), "attention_layers": (2,)}),
}
FP32 = {"hidden_dtype": torch.float32, "attention_dtype": torch.float32}
# Random-logits cases for the bare vocab-parallel top-k: (vocab, k, dtype). 51 splits 26 + 25; with 7 tokens
# rank 1 holds 3 < k = 5 and pads its candidates.
RANDOM_CASES = [(64, K, torch.float32), (51, 8, torch.bfloat16), (7, 5, torch.float32)]


def batch_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B=3, T=9 token ids, attention mask (row 2 right-padded after 5 tokens), loss mask."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[2, 5:], mask[2, 5:] = 0, 0
    return ids, mask, mask.bool()


def random_logits(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """[2, 5, vocab] continuous values, so the top-k has no ties."""
    return torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(vocab)).to(dtype)


# ------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    """Run fn(rank, world, port, *args) on `world` ranks; a rank's exception fails the test with its traceback."""
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _join_world(rank: int, world: int, port: int):
    """The env the Ray teacher actor sets, then the package's own init (what production runs)."""
    from distill.teacher import parallel

    env = {
        "RANK": rank,
        "WORLD_SIZE": world,
        "LOCAL_RANK": rank,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
    }
    os.environ.update({name: str(value) for name, value in env.items()})
    torch.set_num_threads(1)  # 2 cores shared by the ranks
    parallel.init_from_env("gloo")
    return parallel


def _local_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of this rank's shard (full shape when replicated)."""
    local = {name: getattr(p, "to_local", lambda p=p: p)() for name, p in model.named_parameters()}
    return {name: tuple(t.shape) for name, t in local.items()}


def _tp_worker(rank: int, world: int, port: int, folders: dict[str, str], out_dir: str) -> None:
    parallel = _join_world(rank, world, port)
    try:
        ids, mask, loss_mask = batch_inputs()
        record: dict = {"runs": {}, "random": []}
        for run, (model, experts, kwargs) in RUNS.items():
            engine = TeacherEngine.tensor_parallel(folders[model], K, experts=experts, **kwargs, **FP32)
            record["runs"][run] = {
                "batch": engine.score((0, 1), ids, mask, loss_mask).to_torch(),
                "shapes": _local_shapes(engine.model),
                "logits": engine.logits(ids, mask),
                "generated": engine.generate(ids[:1, :4], 3, eos_token_id=VOCAB + 1),
            }
        for vocab, k, dtype in RANDOM_CASES:
            full = random_logits(vocab, dtype)
            chunk = -(-vocab // world)  # torch's Shard(0) split: ceil(V / tp) per rank
            local = full[..., rank * chunk : (rank + 1) * chunk]
            topk = parallel.vocab_parallel_topk_with_normalizer(local, k, None, rank * chunk)
            record["random"].append(topk)
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        parallel.teardown()


def _load_worker(rank: int, world: int, port: int, folder: str, out_dir: str, replicated: str = "") -> None:
    """Load `folder` TP-sharded and record the TopologyError message (or that it loaded). `replicated`: a rule
    left out (handed to transformers as `replicate`) of the plan, which the check at load must name."""
    parallel = _join_world(rank, world, port)
    if replicated:
        parallel._loader_plan = lambda plan: {
            n: "replicate" if n.endswith(replicated) else s for n, s in plan.items()
        }
    try:
        parallel.load_tp_model(folder)
        message = "loaded without error"
    except TopologyError as err:
        message = str(err)
    finally:
        parallel.teardown()
    Path(out_dir, f"rank{rank}.txt").write_text(message)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp_models")
    out = {}
    for name, (arch, overrides) in MODELS.items():
        model = build_model(tiny_config(arch, VOCAB, **overrides), seed=0)
        out[name] = str(save_model(model, None, root / name))
    return out


@pytest.fixture(scope="module")
def tp2(folders, tmp_path_factory) -> list[dict]:
    """The records of both ranks of one TP=2 run."""
    out_dir = tmp_path_factory.mktemp("tp2_out")
    _spawn(_tp_worker, 2, folders, str(out_dir))
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def reference(folders: dict[str, str], run: str) -> tuple[TeacherEngine, dict]:
    """The TP=1 engine of a run and its scored batch."""
    model, _, kwargs = RUNS[run]
    engine = TeacherEngine.from_pretrained(folders[model], K, **kwargs, **FP32)
    return engine, engine.score((0, 1), *batch_inputs()).to_torch()


# -------------------------------------------------------------------------------------------- TP=2 runs
@pytest.mark.parametrize("run", list(RUNS))
def test_tp2_batch_matches_tp1(tp2, folders, run):
    _, ref = reference(folders, run)
    got = tp2[0]["runs"][run]["batch"]
    assert torch.equal(got["topk_ids"], ref["topk_ids"])
    assert torch.allclose(got["topk_logits"], ref["topk_logits"], rtol=0, atol=1e-4)
    assert torch.allclose(got["log_normalizer"], ref["log_normalizer"], rtol=0, atol=1e-4)
    for name in ("hidden", "attention"):
        assert (got[name] is None) == (ref[name] is None)
        if ref[name] is not None:
            assert got[name].shape == ref[name].shape
            assert torch.allclose(got[name], ref[name], rtol=0, atol=1e-4)
    assert torch.equal(got["input_ids"], ref["input_ids"]) and torch.equal(got["loss_mask"], ref["loss_mask"])


@pytest.mark.parametrize("run", list(RUNS))
def test_every_rank_returns_the_same_batch(tp2, run):
    first, second = (tp2[r]["runs"][run]["batch"] for r in range(2))
    assert first.keys() == second.keys()
    for name, t in first.items():
        assert (t is None and second[name] is None) or torch.equal(t, second[name]), name


def test_full_vocab_logits_and_greedy_generation_match_tp1(tp2, folders):
    engine, _ = reference(folders, "deepseek")
    ids, mask, _ = batch_inputs()
    got = tp2[1]["runs"]["deepseek"]
    assert got["logits"].shape == (3, 9, VOCAB)
    assert torch.allclose(got["logits"], engine.logits(ids, mask), rtol=0, atol=1e-4)
    assert torch.equal(got["generated"], engine.generate(ids[:1, :4], 3, eos_token_id=VOCAB + 1))


def test_mla_attention_lm_head_and_experts_are_sharded(tp2):
    """Heads split in two on q_b_proj / kv_b_proj / o_proj; low-rank projections replicated; 2 of 4 experts."""
    full = _local_shapes(build_model(tiny_config("tiny_deepseek_v3", VOCAB), seed=0))
    for rank in range(2):
        shapes = tp2[rank]["runs"]["deepseek"]["shapes"]
        attn = "model.layers.1.self_attn"
        for proj, dim in (("q_b_proj", 0), ("kv_b_proj", 0), ("o_proj", 1)):
            name = f"{attn}.{proj}.weight"
            assert shapes[name][dim] * 2 == full[name][dim] and shapes[name][1 - dim] == full[name][1 - dim]
        for proj in ("q_a_proj", "kv_a_proj_with_mqa", "kv_a_layernorm"):
            assert shapes[f"{attn}.{proj}.weight"] == full[f"{attn}.{proj}.weight"]
        assert shapes["lm_head.weight"] == (VOCAB // 2, full["lm_head.weight"][1])
        dense_down = "model.layers.0.mlp.down_proj.weight"
        assert shapes[dense_down][1] * 2 == full[dense_down][1]
        experts, inner, hidden = full["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, H]
        assert shapes["model.layers.1.mlp.experts.gate_up_proj"] == (experts // 2, inner, hidden)
        sliced = tp2[rank]["runs"]["deepseek_tp_experts"]["shapes"]["model.layers.1.mlp.experts.gate_up_proj"]
        assert sliced == (experts, inner // 2, hidden)


@pytest.mark.parametrize(("run", "kv_rows"), [("qwen2", 24), ("qwen2_kv3", 48)])
def test_gqa_query_heads_sharded_kv_heads_sharded_or_replicated(tp2, run, kv_rows):
    """qwen2: 2 KV heads / TP 2 -> one KV head (24 rows = head_dim) per rank. qwen2_kv3: 6 query heads, 3 KV
    heads: rank 0 reads KV heads 0, 0, 1 -> one copy per query head (3 x 16 rows)."""
    for rank in range(2):
        shapes = tp2[rank]["runs"][run]["shapes"]
        assert shapes["model.layers.2.self_attn.q_proj.weight"][0] == 48  # half of the query heads
        assert shapes["model.layers.2.self_attn.o_proj.weight"][1] == 48
        assert shapes["model.layers.2.self_attn.k_proj.weight"][0] == kv_rows
        assert shapes["model.layers.2.self_attn.v_proj.weight"][0] == kv_rows


@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_vocab_parallel_topk_equals_single_process(tp2, case):
    vocab, k, dtype = RANDOM_CASES[case]
    ids, values, lse = topk_with_normalizer(random_logits(vocab, dtype), k)
    for rank in range(2):
        got_ids, got_values, got_lse = tp2[rank]["random"][case]
        assert got_ids.dtype == torch.int32 and got_values.dtype == dtype and got_lse.dtype == torch.float32
        assert torch.equal(got_ids, ids) and torch.equal(got_values, values)
        assert torch.allclose(got_lse, lse, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- failing layouts
def test_tp3_on_8_heads_fails_on_every_rank_before_loading(folders, tmp_path):
    """The folder's weights are garbage: reaching the loader would raise something else than TopologyError."""
    folder = tmp_path / "teacher"
    folder.mkdir()
    shutil.copy(Path(folders["deepseek"]) / "config.json", folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    _spawn(_load_worker, 3, str(folder), str(tmp_path))
    for rank in range(3):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "TP size 3 does not divide num_attention_heads=8" in message, message
        assert "[1, 2, 4, 8]" in message


def test_a_rule_the_loader_did_not_apply_fails_at_load_naming_the_parameter(folders, tmp_path):
    """kv_b_proj left out of the loader's plan: it loads replicated, and every rank refuses to go on."""
    _spawn(_load_worker, 2, folders["deepseek"], str(tmp_path), "self_attn.kv_b_proj")
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert f"not sharded as planned on rank {rank} of TP 2 (transformers " in message, message
        assert "model.layers.0.self_attn.kv_b_proj.weight: rule colwise expects local shape" in message
        assert "model.layers.0.self_attn.q_b_proj.weight" not in message  # only what is wrong is listed


# -------------------------------------------------------------------------- pure layout rules, no processes
def _meta_plans(config):
    from distill.teacher.parallel import _architecture

    return _architecture(config)


@pytest.mark.parametrize("experts", ["expert_parallel", "tensor_parallel"])
def test_teacher_plan_places_every_expert_explicitly(experts):
    """The loader gets the expert rules from us (transformers 5.25 dropped them from the model's TP plan)."""
    config = tiny_config("tiny_deepseek_v3", VOCAB)
    shapes, names, plans = _meta_plans(config)
    plan, expected = teacher_tp_plan(config, 2, experts=experts, model_plans=plans, names=names)
    gate_up = "model.layers.*.mlp.experts.gate_up_proj"
    if experts == "expert_parallel":
        assert gate_up not in plan and expected[gate_up] == "grouped_gemm"  # the loader's EP plan shards them
    else:
        assert plan[gate_up] == expected[gate_up] == "packed_colwise"
        assert plan["model.layers.*.mlp.experts.down_proj"] == "rowwise"
        assert plan["model.layers.*.mlp.experts"] == "local_params"
    assert plan["lm_head"] == "colwise" and plan["model.layers.*.self_attn.kv_a_proj_with_mqa"] == "replicate"
    assert "model.layers.*.self_attn.q_proj" not in plan  # q_lora_rank is set: only q_b_proj exists
    assert set(plan) <= names and set(expected) <= names
    # Every parameter of a correct rank-1 load passes the check; one replicated expert does not.
    local = {
        name: expected_local_shape(shape, rule_for(name, expected), 2, 1) for name, shape in shapes.items()
    }
    assert sharding_mismatches(local, shapes, expected, 2, 1) == []
    local["model.layers.1.mlp.experts.gate_up_proj"] = shapes["model.layers.1.mlp.experts.gate_up_proj"]
    (problem,) = sharding_mismatches(local, shapes, expected, 2, 1)
    assert problem.startswith("model.layers.1.mlp.experts.gate_up_proj: rule ")


@pytest.mark.parametrize(
    ("full", "style", "tp", "rank", "want"),
    [
        # torch's Shard chunking: ceil(51 / 2) = 26 rows on rank 0, 25 on rank 1
        ((51, 8), "colwise", 2, 1, (25, 8)),
        ((51,), "colwise", 2, 0, (26,)),  # a column-parallel bias is sharded with its rows
        ((8, 6), "rowwise", 2, 0, (8, 3)),
        ((6,), "rowwise", 2, 0, (6,)),  # a row-parallel bias is replicated (added once after the all-reduce)
        ((4, 512, 192), "packed_colwise", 2, 0, (4, 256, 192)),
        ((4, 512, 192), "grouped_gemm", 2, 1, (2, 512, 192)),
        ((7, 3), "replicate", 4, 3, (7, 3)),
        ((7, 3), None, 4, 3, (7, 3)),
    ],
)
def test_expected_local_shape(full, style, tp, rank, want):
    assert expected_local_shape(full, style, tp, rank) == want


def test_an_unknown_style_cannot_be_checked():
    with pytest.raises(ConfigError, match="unknown parallel style 'fancy_new_style'"):
        expected_local_shape((4, 4), "fancy_new_style", 2, 0)


def test_tied_parameters_take_the_rule_of_either_name():
    """A tied lm_head shards the embedding it shares; the check reads the rule through either name."""
    full = {"embed.weight": (64, 8), "lm_head.weight": (64, 8)}
    local = {"embed.weight": (32, 8), "lm_head.weight": (32, 8)}
    tied = [{"embed.weight", "lm_head.weight"}]
    assert sharding_mismatches(local, full, {"lm_head": "colwise"}, 2, 0, tied) == []
    assert len(sharding_mismatches(local, full, {"lm_head": "colwise"}, 2, 0)) == 1


def test_check_tp_size_quotes_the_numbers():
    deepseek = tiny_config("tiny_deepseek_v3", VOCAB, num_attention_heads=16, n_routed_experts=6, n_group=3)
    check_tp_size(deepseek, 2)
    expected = r"TP size 4 does not divide the 6 routed experts.*\[1, 2, 3, 6\]"
    with pytest.raises(TopologyError, match=expected):
        check_tp_size(deepseek, 4)
    check_tp_size(deepseek, 4, experts="tensor_parallel")  # slices every expert's 256-wide intermediate dim
    with pytest.raises(ConfigError, match="unknown experts mode 'ep'"):
        check_tp_size(deepseek, 2, experts="ep")
    check_tp_size(tiny_config("tiny_qwen2", VOCAB), 4)  # 2 KV heads and TP 4: replicated, not an error


def test_plan_shards_mla_by_heads_and_keeps_the_vocab_shard():
    plan = tp_plan_overrides(tiny_config("tiny_deepseek_v3", VOCAB), 2)
    assert plan == {
        "lm_head": "colwise",
        "model.layers.*.self_attn.q_b_proj": "colwise",
        "model.layers.*.self_attn.kv_b_proj": "colwise",
        "model.layers.*.self_attn.o_proj": "rowwise",
    }
    no_q_lora = tp_plan_overrides(tiny_config("tiny_deepseek_v3", VOCAB, q_lora_rank=None), 2)
    assert "model.layers.*.self_attn.q_proj" in no_q_lora
    qwen = tiny_config("tiny_qwen2", VOCAB)
    assert tp_plan_overrides(qwen, 2)["model.layers.*.self_attn.k_proj"] == "colwise"
    assert tp_plan_overrides(qwen, 4)["model.layers.*.self_attn.v_proj"] == "replicate"


@pytest.mark.parametrize(
    ("heads", "kv", "tp", "rank", "expected"),
    [
        (8, 1, 4, 3, ([0], 2)),  # MQA: every rank keeps the one KV head
        (8, 2, 4, 1, ([0], 2)),  # TP a multiple of the KV heads: one KV head per rank
        (8, 2, 4, 2, ([1], 2)),
        (6, 3, 2, 0, ([0, 0, 1], 1)),  # KV heads straddle the rank's query heads: one copy per query head
        (6, 3, 2, 1, ([1, 2, 2], 1)),
    ],
)
def test_kv_heads_for_rank(heads, kv, tp, rank, expected):
    assert kv_heads_for_rank(heads, kv, tp, rank) == expected


def test_single_process_falls_back_to_plain_loading(folders):
    """Outside torch.distributed the TP constructor is the plain one (TP=1)."""
    ids, mask, loss_mask = batch_inputs()
    engine = TeacherEngine.tensor_parallel(folders["qwen2"], K)
    ref = TeacherEngine.from_pretrained(folders["qwen2"], K)
    got, want = engine.score((0, 0), ids, mask, loss_mask), ref.score((0, 0), ids, mask, loss_mask)
    assert (got.topk_ids == want.topk_ids).all() and (got.topk_logits == want.topk_logits).all()


def test_init_from_env_names_the_missing_variables(monkeypatch):
    from distill.teacher.parallel import init_from_env

    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TopologyError, match=r"\['WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'\] are not set"):
        init_from_env("gloo")
