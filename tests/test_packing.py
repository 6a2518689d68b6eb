"""Packing with per-document attention: packed rows carry position_ids that restart per document, every forward
(student, teacher, tensor-parallel teacher) turns them into a per-document causal mask, they travel in the
TeacherBatch, and an 8192-token packed run trains end to end on CPU."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from distill.batch import TeacherBatch, model_inputs
from distill.config import compose
from distill.data import BatchStream, pack_rows, pad_batch
from distill.data.replay import ReplayBuffer
from distill.errors import ConfigError
from distill.models import build_model, save_model, tiny_config
from distill.models.resolve import demo_teacher_dir
from distill.run.validate import validate_run
from distill.teacher import TeacherEngine

VOCAB, K = 64, 5
PAD, EOS = 0, 2
FP32 = {"hidden_dtype": torch.float32, "attention_dtype": torch.float32}
TOL = 1e-6


def doc(start: int, n: int) -> dict:
    """An encoded example of n tokens (ids start, start + 1, ...); its last position is untrained."""
    return {
        "input_ids": [3 + (start + i) % (VOCAB - 3) for i in range(n)],
        "loss_mask": [True] * (n - 1) + [False],
    }


# Row 0 holds documents of 6, 5 and 7 tokens plus 4 filler; row 1 documents of 9 and 8 plus 5 filler.
DOCS = [doc(0, 6), doc(10, 5), doc(20, 7), doc(30, 9), doc(40, 8)]
SEQ_LEN = 22
ROW0_SPANS = [(0, 6), (6, 11), (11, 18)]  # [start, end) of each document of row 0
FILLER0 = (18, 22)


def packed_batch(docs=DOCS) -> dict[str, torch.Tensor]:
    return pad_batch(pack_rows(docs, SEQ_LEN, eos_id=EOS), pad_id=PAD)


def with_first_document_changed(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch with other tokens in row 0's first document."""
    changed = {name: t.clone() for name, t in batch.items()}
    start, end = ROW0_SPANS[0]
    changed["input_ids"][0, start:end] = (changed["input_ids"][0, start:end] + 17) % (VOCAB - 3) + 3
    return changed


def unpacked(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The packed batch with its position_ids dropped: attention then crosses documents."""
    return {name: t for name, t in batch.items() if name != "position_ids"}


def later_documents() -> slice:
    """Row 0's positions after its first document (its other documents and the filler)."""
    return slice(ROW0_SPANS[0][1], SEQ_LEN)


# ---------------------------------------------------------------------------------------------- position_ids
def test_position_ids_restart_at_every_document_and_at_the_filler():
    rows = pack_rows(DOCS, SEQ_LEN, eos_id=EOS)
    assert [len(row["position_ids"]) for row in rows] == [SEQ_LEN, SEQ_LEN]
    assert rows[0]["position_ids"] == [*range(6), *range(5), *range(7), *range(4)]
    assert rows[1]["position_ids"] == [*range(9), *range(8), *range(5)]
    batch = pad_batch(rows, pad_id=PAD)
    assert batch["position_ids"].dtype == torch.int64 and batch["position_ids"].shape == (2, SEQ_LEN)
    assert batch["position_ids"][0].tolist() == rows[0]["position_ids"]
    # A pad_to wider than the packed rows: the padding is one more segment restarting at 0.
    wide = pad_batch(rows, pad_id=PAD, pad_to=SEQ_LEN + 3)
    assert wide["position_ids"][1].tolist() == [*rows[1]["position_ids"], 0, 1, 2]


def test_truncated_example_is_one_segment_from_0():
    (row,) = pack_rows([doc(0, 30)], SEQ_LEN, eos_id=EOS)
    assert row["position_ids"] == list(range(SEQ_LEN))


def test_unpacked_batches_carry_no_position_ids():
    assert "position_ids" not in pad_batch(DOCS, pad_id=PAD)
    assert "position_ids" not in BatchStream(DOCS, 2, seed=0, pad_id=PAD).batch(0, 0)
    padded = BatchStream(DOCS, 2, seed=0, pad_id=PAD, seq_len=SEQ_LEN).batch(0, 0)
    assert "position_ids" not in padded
    assert model_inputs(padded)["position_ids"] is None and model_inputs(padded)["attention_mask"] is not None


def test_packed_stream_batches_carry_position_ids():
    stream = BatchStream(DOCS * 4, 2, seed=1, pad_id=PAD, packing=True, seq_len=SEQ_LEN)
    for _, batch in stream.batches(epoch=0):
        positions = batch["position_ids"]
        assert positions.dtype == torch.int64 and positions.shape == batch["input_ids"].shape
        starts = positions == 0
        assert starts[:, 0].all()
        # Within a segment positions count up by one; every other step is a restart at 0.
        steps = positions[:, 1:] - positions[:, :-1]
        assert torch.equal(steps != 1, starts[:, 1:])
    inputs = model_inputs(stream.batch(0, 0))
    assert inputs["attention_mask"] is None and inputs["position_ids"] is not None


def test_a_batch_mixing_packed_and_unpacked_rows_is_refused():
    rows = [pack_rows(DOCS[:1], SEQ_LEN, eos_id=EOS)[0], DOCS[1]]
    with pytest.raises(ConfigError, match="mixes packed rows"):
        pad_batch(rows, pad_id=PAD)


# ------------------------------------------------------------------------------------- cross-document attention
def student_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], **model_inputs(batch), use_cache=False).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_student_logits_of_a_document_ignore_the_other_documents(attn):
    config = tiny_config("tiny_qwen2", VOCAB, pad_token_id=PAD, eos_token_id=EOS)
    model = build_model(config, seed=0, attn_implementation=attn)
    batch = packed_batch()
    changed = with_first_document_changed(batch)
    after = later_documents()

    packed, packed_changed = student_logits(model, batch), student_logits(model, changed)
    torch.testing.assert_close(packed_changed[0, after], packed[0, after], rtol=0, atol=TOL)
    torch.testing.assert_close(packed_changed[1], packed[1], rtol=0, atol=TOL)  # the other row
    assert (packed_changed[0, : ROW0_SPANS[0][1]] - packed[0, : ROW0_SPANS[0][1]]).abs().max() > 1e-3

    # Without position_ids the same change reaches the later documents: the check above can fail.
    plain, plain_changed = student_logits(model, unpacked(batch)), student_logits(model, unpacked(changed))
    assert (plain_changed[0, after] - plain[0, after]).abs().max() > 1e-3

    # Each document scores exactly as if it were alone in its row (at positions 0..n-1).
    for document, (start, end) in zip(DOCS, ROW0_SPANS, strict=False):
        alone = pad_batch([document], pad_id=PAD)
        torch.testing.assert_close(student_logits(model, alone)[0], packed[0, start:end], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def eager_teacher():
    """Tiny DeepSeek-V3 (MLA + MoE), eager so it can ship attention maps."""
    config = tiny_config("tiny_deepseek_v3", VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    return build_model(config, seed=0, attn_implementation="eager")


def score(engine: TeacherEngine, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    return engine.score_batch((0, 0), batch).to_torch()


TEACHER_OUTPUTS = ("topk_ids", "topk_logits", "log_normalizer", "hidden")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_teacher_outputs_of_a_document_ignore_the_other_documents(eager_teacher, attn):
    """Top-k, log-normaliser, hidden states and attention maps of row 0's later documents do not move when its
    first document changes; with the position_ids dropped they do."""
    if attn == "eager":
        engine = TeacherEngine(eager_teacher, K, hidden_layers=[0, 2, 4], attention_layers=[1, 3], **FP32)
    else:  # the padded-SDPA path the engine switches SDPA models to
        config = tiny_config("tiny_deepseek_v3", VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
        engine = TeacherEngine(
            build_model(config, seed=0, attn_implementation="sdpa"), K, hidden_layers=[4], **FP32
        )
    batch = packed_batch()
    changed = with_first_document_changed(batch)
    after = later_documents()

    packed, packed_changed = score(engine, batch), score(engine, changed)
    assert torch.equal(packed["position_ids"], batch["position_ids"])  # they travel on to the student
    assert torch.equal(packed_changed["topk_ids"][0, after], packed["topk_ids"][0, after])
    for name in ("topk_logits", "log_normalizer", "hidden"):
        torch.testing.assert_close(packed_changed[name][0, after], packed[name][0, after], rtol=0, atol=TOL)
    assert (packed_changed["log_normalizer"][0, :6] - packed["log_normalizer"][0, :6]).abs().max() > 1e-4

    plain, plain_changed = score(engine, unpacked(batch)), score(engine, unpacked(changed))
    assert plain["position_ids"] is None
    assert (plain_changed["log_normalizer"][0, after] - plain["log_normalizer"][0, after]).abs().max() > 1e-4
    assert (plain_changed["topk_logits"][0, after] - plain["topk_logits"][0, after]).abs().max() > 1e-4

    if attn == "eager":
        # Attention maps are block-diagonal: no query attends to another document or to the filler.
        segment = torch.zeros(SEQ_LEN, dtype=torch.long)
        for i, (start, end) in enumerate([*ROW0_SPANS, FILLER0]):
            segment[start:end] = i
        across = segment[:, None] != segment[None, :]
        assert torch.all(packed["attention"][0][:, across] == 0)
        assert (plain["attention"][0][:, across] > 0).any()


def test_packed_teacher_scores_each_document_as_if_alone(eager_teacher):
    engine = TeacherEngine(eager_teacher, K, hidden_layers=[4], **FP32)
    packed = score(engine, packed_batch())
    for document, (start, end) in zip(DOCS, ROW0_SPANS, strict=False):
        alone = score(engine, pad_batch([document], pad_id=PAD))
        assert torch.equal(alone["topk_ids"][0], packed["topk_ids"][0, start:end])
        for name in ("topk_logits", "log_normalizer", "hidden"):
            torch.testing.assert_close(alone[name][0], packed[name][0, start:end], rtol=0, atol=1e-5)


def test_length_groups_cut_packed_rows_with_their_position_ids(eager_teacher):
    """Rows whose filler differs in length: grouped scoring equals one forward on every real token."""
    batch = pad_batch(pack_rows([doc(0, 6), doc(9, 13), doc(30, 4)], SEQ_LEN, eos_id=EOS), pad_id=PAD)
    assert batch["attention_mask"].sum(1).tolist() == [19, 4]
    kwargs = dict(hidden_layers=[2], **FP32)
    whole = score(TeacherEngine(eager_teacher, K, **kwargs), batch)
    grouped = score(TeacherEngine(eager_teacher, K, length_groups=2, **kwargs), batch)
    real = batch["attention_mask"]
    assert torch.equal(grouped["position_ids"], whole["position_ids"])
    assert torch.equal(grouped["topk_ids"][real], whole["topk_ids"][real])
    for name in ("topk_logits", "log_normalizer", "hidden"):
        torch.testing.assert_close(grouped[name][real], whole[name][real], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------- TeacherBatch wire
def teacher_batch(position_ids: torch.Tensor | None) -> TeacherBatch:
    g = torch.Generator().manual_seed(0)
    b, t, k = 2, SEQ_LEN, 3
    return TeacherBatch.from_torch(
        (1, 4),
        input_ids=torch.randint(0, VOCAB, (b, t), generator=g, dtype=torch.int32),
        attention_mask=torch.ones(b, t, dtype=torch.bool),
        loss_mask=torch.ones(b, t, dtype=torch.bool),
        topk_ids=torch.randint(0, VOCAB, (b, t, k), generator=g, dtype=torch.int32),
        topk_logits=torch.randn(b, t, k, generator=g).bfloat16(),
        log_normalizer=torch.randn(b, t, generator=g),
        position_ids=position_ids,
    )


def test_teacher_batch_round_trip_with_position_ids():
    positions = packed_batch()["position_ids"].to(torch.int32)
    tb = teacher_batch(positions)
    assert "position_ids" in tb.arrays() and tb.position_ids.dtype == np.int32
    assert tb.nbytes() == sum(a.nbytes for a in tb.arrays().values())
    t = tb.to_torch()
    assert t["position_ids"].dtype == torch.int64 and torch.equal(t["position_ids"], positions.long())
    assert model_inputs(t)["attention_mask"] is None
    # zero-copy: the tensor view shares the numpy buffer
    assert tb.tensor("position_ids").data_ptr() == tb.position_ids.__array_interface__["data"][0]
    again = TeacherBatch.from_torch(tb.batch_id, **{n: v for n, v in t.items()})
    assert np.array_equal(again.position_ids, tb.position_ids.astype(np.int64))
    assert torch.equal(
        again.to_torch()["topk_logits"], t["topk_logits"]
    )  # bf16 survives beside the new field


def test_teacher_batch_round_trip_without_position_ids():
    tb = teacher_batch(None)
    assert tb.position_ids is None and "position_ids" not in tb.arrays()
    t = tb.to_torch()
    assert t["position_ids"] is None
    assert model_inputs(t)["position_ids"] is None and model_inputs(t)["attention_mask"].dtype == torch.int64


def test_teacher_batch_pickled_before_the_field_existed_still_works():
    tb = teacher_batch(None)
    del tb.__dict__["position_ids"]  # what an instance pickled by the previous code holds
    old = pickle.loads(pickle.dumps(tb))
    assert old.position_ids is None and old.to_torch()["position_ids"] is None
    assert "position_ids" not in old.arrays()


def test_replay_keeps_the_position_ids_of_packed_rows():
    tb = teacher_batch(packed_batch()["position_ids"].to(torch.int32))
    tb.attention_mask[1, 17:] = False  # row 1's filler is dropped from the stored sample
    buf = ReplayBuffer(4, seed=0)
    assert buf.offer(tb, increment=0) == 2
    replay = buf.snapshot().batch((9, 0), 0, 2, pad_id=PAD)
    assert replay.position_ids is not None
    for row in range(2):
        n = int(replay.attention_mask[row].sum())
        assert replay.position_ids[row, :n].tolist() in (
            tb.position_ids[0, :SEQ_LEN].tolist(),
            tb.position_ids[1, :17].tolist(),
        )


# ------------------------------------------------------------------------------------------- the local scorer
def test_the_local_run_scorer_hands_packed_batches_to_the_teacher_with_position_ids(eager_teacher):
    """distill/run/local.py scores through `distill.xtok.build.batch_scorer`: the TeacherBatch it returns (what the
    student trains on) must carry the packed rows' position_ids, or neither forward sees the documents."""
    from distill.xtok.build import batch_scorer

    engine = TeacherEngine(eager_teacher, K)
    batch = packed_batch()
    scored = batch_scorer(compose(), engine, None, None)((0, 0), batch)
    assert scored.position_ids is not None
    assert torch.equal(scored.to_torch()["position_ids"], batch["position_ids"])


# --------------------------------------------------------------------------------------- max positions check
def test_max_length_beyond_the_students_positions_fails_before_training(tmp_path):
    cfg = compose(
        [
            f"prepare.cache_dir={tmp_path}",
            "data.max_length=2048",
            "student.overrides.max_position_embeddings=1024",
        ]
    )
    with pytest.raises(
        ConfigError, match=r"data.max_length=2048 exceeds the student's max_position_embeddings=1024"
    ):
        validate_run(cfg, _facts(cfg))
    fits = compose(
        [
            f"prepare.cache_dir={tmp_path}",
            "data.max_length=1024",
            "student.overrides.max_position_embeddings=1024",
        ]
    )
    validate_run(fits, _facts(fits))


def test_max_length_beyond_a_prepared_teachers_positions_names_the_rebuild(tmp_path):
    cfg = compose([f"prepare.cache_dir={tmp_path}", "data.max_length=8192", "data.packing=true"])
    validate_run(cfg, _facts(cfg))  # tiny teachers and students declare 8192 positions
    # A demo teacher prepared when tiny teachers declared 512: its folder's config is what counts.
    old = tiny_config("tiny_deepseek_v3", 384, max_position_embeddings=512)
    folder = demo_teacher_dir(cfg)
    folder.mkdir(parents=True)
    old.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"teacher's max_position_embeddings=512.*prepare.force=true"):
        validate_run(cfg, _facts(cfg))


def _facts(cfg):
    from distill.models.resolve import pair_facts

    return pair_facts(cfg)


# ------------------------------------------------------------------------------------- tensor-parallel teacher
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, folder: str, out_dir: str) -> None:
    """One TP rank: the env the Ray teacher actor sets, then score the packed batch and its changed copy."""
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
    try:
        kwargs = dict(hidden_layers=(2, 4), attention_layers=(1,), **FP32)
        engine = TeacherEngine.tensor_parallel(folder, K, **kwargs)
        batch = packed_batch()
        record = {
            "packed": score(engine, batch),
            "changed": score(engine, with_first_document_changed(batch)),
        }
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        parallel.teardown()


@pytest.mark.distributed
def test_tensor_parallel_teacher_scores_packed_rows_like_tp1(eager_teacher, tmp_path):
    """TP=2 (vocab-parallel top-k, head-parallel attention maps) over real gloo ranks: the packed scores equal
    TP=1's, and a changed first document leaves the later ones' outputs unmoved on the sharded model too."""
    folder = str(save_model(eager_teacher, None, tmp_path / "teacher"))
    mp.spawn(_tp_worker, args=(2, _free_port(), folder, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    reference = TeacherEngine.from_pretrained(
        folder, K, hidden_layers=(2, 4), attention_layers=(1,), attn_implementation="eager", **FP32
    )
    want = score(reference, packed_batch())
    after = later_documents()
    for record in ranks:
        got, changed = record["packed"], record["changed"]
        assert torch.equal(got["topk_ids"], want["topk_ids"]) and torch.equal(
            got["position_ids"], want["position_ids"]
        )
        for name in ("topk_logits", "log_normalizer", "hidden", "attention"):
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)
        for name in ("topk_logits", "log_normalizer", "hidden"):
            torch.testing.assert_close(changed[name][0, after], got[name][0, after], rtol=0, atol=TOL)


# -------------------------------------------------------------------------------------- an 8k packed run, on CPU
@pytest.fixture
def teacher_8k(tiny_teacher, tmp_path) -> Path:
    """The session's tiny teacher, declaring 8192 positions. A teacher prepared before tiny teachers declared
    8192 says 512; with default RoPE the weights and outputs are the same either way (only the check differs)."""
    folder = tmp_path / "teacher_8k"
    shutil.copytree(tiny_teacher, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = max(config["max_position_embeddings"], 8192)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_packed_8k_run_trains_end_to_end_with_per_document_attention(teacher_8k, base_overrides, tmp_path):
    """experiment=packed_8k through `distill.run.run` (local backend): rows of 8192 tokens, finite losses, and
    both the teacher's and the student's 8192-token forwards take the packed rows' position_ids and no 2-D mask."""
    from transformers import PreTrainedModel

    from distill.run import run
    from distill.tracking.metrics_log import read_metrics

    overrides = [o for o in base_overrides if not o.startswith("experiment=")]
    cfg = compose(
        [*overrides, "experiment=packed_8k", "cluster=local_single", f"teacher.path={teacher_8k}"],
        run_dir=str(tmp_path / "run"),
    )
    assert (cfg.data.max_length, cfg.data.packing, cfg.cluster.micro_batch_size) == (8192, True, 1)

    # Every model forward of the run: (model type, tokens per row, 2-D mask passed, position_ids passed).
    forwards: list[tuple[str, int, bool, bool]] = []

    def spy(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if isinstance(module, PreTrainedModel) and ids is not None:
            mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
            forwards.append(
                (module.config.model_type, ids.shape[-1], mask is not None, positions is not None)
            )

    hook = torch.nn.modules.module.register_module_forward_hook(spy, with_kwargs=True)
    start = time.perf_counter()
    try:
        summary = run(cfg)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    print(f"packed 8k run: {seconds:.1f} s")

    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(cfg.train.steps))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    assert all(math.isfinite(r["loss/forward_kl"]) for r in records)
    assert math.isfinite(summary["ce"])
    # Training forwards see packed rows (the teacher's cut to their real tokens by teacher.length_groups); the
    # evaluation's held-out rows (~100 tokens) are unpacked and keep their padding mask.
    packed = [f for f in forwards if f[1] > 1024]
    assert {model_type for model_type, *_ in packed} == {"deepseek_v3", "qwen2"}, forwards
    assert max(width for model_type, width, *_ in packed if model_type == "qwen2") == 8192
    assert all(not mask and positions for *_, mask, positions in packed), packed
