"""The DeepSpeed student against the single-process reference trainer, on real gloo process groups.

Two spawns run every engine the tests check and record what they saw (per-step loss sums, grad norms, LRs,
logits, checkpoint and export folders); the tests compare those records with a `ReferenceTrainer` run in the
test process on the same global batches, model init, objective (CE + forward KL on a synthetic top-k teacher +
hidden-state MSE through a trained projector) and AdamW settings.

- world size 1: ZeRO-0 (+ the engine's error messages), ZeRO-2 with CPU optimizer offload (checkpointed, resumed
  by a fresh engine, exported to HF), ZeRO-1 with activation checkpointing and the fused head, and ZeRO-2 in bf16
  with the fused head.
- world size 2: ZeRO-1, 2 and 3, one after the other, each rank fed half the rows of every micro-batch (and so
  a different number of trained tokens); the ZeRO-3 run is checkpointed, resumed and exported (gathered); ZeRO-3
  again with the fused head (distill.losses.fused: the head weight gathered inside the loss), against the
  same unfused reference.

DeepSpeed's CPU comm op is JIT-built into TORCH_EXTENSIONS_DIR (~25-100 s): by `make setup` on a CPU machine, else
by the first run; later runs load it in well under a second, whichever process they are (see
`test_every_process_builds_deepspeed_ops_with_its_environments_ninja`).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from distill.batch import TeacherBatch
from distill.config.schema import OptimizerConfig
from distill.errors import ConfigError
from distill.models import build_model, tiny_config
from distill.student import build_ds_config
from distill.teacher import topk_with_normalizer
from distill.training.objective import Objective, TermSpec

pytestmark = pytest.mark.distributed

VOCAB, K, T = 128, 8, 12
ROWS = 4  # rows of one global micro-batch; world size W gives each rank ROWS / W of them
ACCUM = 2  # micro-batches per optimizer step (per rank)
STEPS = 4
RESUME_AT = 2  # checkpoint after this many steps, then a fresh engine continues
TEACHER_HIDDEN = 64  # != the student's 96, so the projector is a real learned map
OPTIM = OptimizerConfig(
    lr=1e-2, weight_decay=0.01, betas=[0.9, 0.95], grad_clip=1.0, schedule="cosine", warmup_steps=1
)
REL = 1e-4

# world size -> {run name: engine options}; each spawn runs its world's runs in order. "hidden": False drops the
# hidden-state term (bf16 cannot run it yet: the objective feeds fp32 features to the bf16 projector).
RUNS = {
    1: {
        "z0": {"zero_stage": 0, "errors": True},
        "z2_offload": {"zero_stage": 2, "offload_optimizer": True, "checkpoint": True, "export": True},
        "z1_act_ckpt": {"zero_stage": 1, "gradient_checkpointing": True, "fused": True},
        "z2_bf16": {"zero_stage": 2, "precision": "bf16", "hidden": False, "fused": True},
    },
    2: {
        "z1": {"zero_stage": 1},
        "z2": {"zero_stage": 2},
        "z3": {"zero_stage": 3, "checkpoint": True, "export": True},
        "z3_fused": {"zero_stage": 3, "fused": True},
    },
}


# --------------------------------------------------------------------------------------------------- data
def student_config():
    return tiny_config("tiny_qwen2", vocab_size=VOCAB, pad_token_id=0, eos_token_id=0)


def make_objective(hidden: bool = True, fused: bool = False) -> Objective:
    terms = [TermSpec("ce", "ce", 0.5), TermSpec("kd", "forward_kl", 1.0)]
    if hidden:
        terms.append(TermSpec("feat", "hidden_mse", 0.1, layer_map=[(2, 1)]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the projector's init
        return Objective(
            terms,
            temperature=2.0,
            chunk_size=16,
            student_hidden_size=96,
            teacher_hidden_size=TEACHER_HIDDEN,
            fused_head=fused,
        )


def global_micro_batch(step: int, micro: int) -> dict[str, torch.Tensor | None]:
    """One micro-batch of the global batch as the student receives it: TeacherBatch.to_torch() of
    [ROWS, T] right-padded rows (lengths differ, first 2 tokens are prompt) with a synthetic top-k teacher."""
    g = torch.Generator().manual_seed(1000 * step + micro)
    ids = torch.randint(1, VOCAB, (ROWS, T), generator=g)
    lengths = torch.randint(5, T + 1, (ROWS,), generator=g)
    pos = torch.arange(T)
    attention = pos[None, :] < lengths[:, None]
    ids[~attention] = 0
    loss_mask = (pos[None, :] >= 2) & (pos[None, :] < lengths[:, None] - 1)
    topk_ids, topk_logits, lse = topk_with_normalizer(3 * torch.randn(ROWS, T, VOCAB, generator=g), K)
    hidden = torch.randn(ROWS, T, 1, TEACHER_HIDDEN, generator=g)
    batch = TeacherBatch.from_torch(
        (step, micro),
        input_ids=ids.int(),
        attention_mask=attention,
        loss_mask=loss_mask,
        topk_ids=topk_ids,
        topk_logits=topk_logits,
        log_normalizer=lse,
        hidden=hidden,
    )
    return batch.to_torch()


def rank_share(batch: dict, rank: int, world: int) -> dict:
    rows = ROWS // world
    return {k: (None if v is None else v[rank * rows : (rank + 1) * rows]) for k, v in batch.items()}


def global_tokens(step: int) -> int:
    return sum(int(global_micro_batch(step, m)["loss_mask"].sum()) for m in range(ACCUM))


def client_state(run: str) -> dict:
    """What a trainer keeps beside the engine: data cursor, RNG state, anything picklable."""
    return {"cursor": [0, RESUME_AT * ACCUM], "run": run, "rng": torch.Generator().manual_seed(7).get_state()}


def probe_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    batch = global_micro_batch(99, 0)
    return batch["input_ids"], batch["attention_mask"]


# ---------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every run of RUNS[world] on this rank; records go to out_dir/<run>/rank<r>.pt."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # 2 cores shared by the ranks
    from distill.student import StudentEngine, destroy_distributed, init_distributed_from_env

    init_distributed_from_env("gloo")
    try:
        for name, opts in RUNS[world].items():
            run_dir = Path(out_dir, name)
            run_dir.mkdir(exist_ok=True)
            torch.save(_run(StudentEngine, name, opts, rank, world, run_dir), run_dir / f"rank{rank}.pt")
    finally:
        destroy_distributed()


def _run(StudentEngine, name: str, opts: dict, rank: int, world: int, run_dir: Path) -> dict:
    ds_config = build_ds_config(
        zero_stage=opts["zero_stage"],
        micro_batch_size=ROWS // world,
        grad_accum_steps=ACCUM,
        world_size=world,
        grad_clip=OPTIM.grad_clip,
        precision=opts.get("precision", "fp32"),
        offload_optimizer=opts.get("offload_optimizer", False),
    )

    def new_engine():
        return StudentEngine(
            build_model(student_config(), seed=0),
            make_objective(opts.get("hidden", True), opts.get("fused", False)),
            optim=OPTIM,
            total_steps=STEPS,
            ds_config=ds_config,
            gradient_checkpointing=opts.get("gradient_checkpointing", False),
        )

    def step(engine, s: int) -> dict:
        micro = [rank_share(global_micro_batch(s, m), rank, world) for m in range(ACCUM)]
        return engine.train_step(s, micro, global_tokens(s))

    engine = new_engine()
    record: dict = {"steps": []}
    for s in range(STEPS):
        record["steps"].append(step(engine, s))
        if opts.get("checkpoint") and s + 1 == RESUME_AT:
            engine.save_checkpoint(run_dir / "ckpt", client_state(name))
    if opts.get("export"):
        record["logits"] = engine.logits(*probe_inputs())
        engine.export_hf(run_dir / "student", None)
    if opts.get("errors"):
        record["errors"] = {
            "one_micro_batch": _error(lambda: engine.train_step(STEPS, [global_micro_batch(0, 0)], 99)),
            "empty_folder": _error(lambda: engine.load_checkpoint(run_dir)),
        }
    if opts.get("checkpoint"):
        resumed = new_engine()
        record["client_state"] = resumed.load_checkpoint(run_dir / "ckpt")
        record["resumed"] = [step(resumed, s) for s in range(RESUME_AT, STEPS)]
    return record


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def _spawn(world: int, out: Path) -> None:
    """Every run of RUNS[world] on `world` spawned ranks, tried a second time if a rank was killed by a signal.

    Once in a full CI run here, a gloo rank died of SIGABRT ("terminate called without an active exception")
    and took the module's every test with it; the same module passed alone and in the next run. A rank that
    raises, or a second signal, fails the tests as before. A failed try's run folders are removed before the
    next, so no record or checkpoint comes from it.
    """
    for attempt in (1, 2):
        try:
            mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
            return
        except mp.ProcessExitedException as err:
            if attempt == 2 or err.signal_name is None:
                raise
            warnings.warn(
                f"world {world}: a rank died of {err.signal_name}; spawning the world again", stacklevel=2
            )
            for name in RUNS[world]:
                shutil.rmtree(out / name, ignore_errors=True)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, list[dict]]:
    """run name -> the record of each rank."""
    out = tmp_path_factory.mktemp("student_ds")
    with pytest.MonkeyPatch.context() as mp_env:
        mp_env.setenv("OMP_NUM_THREADS", "1")  # oversubscribed ranks make torch 5-10x slower here
        mp_env.setenv("DS_ACCELERATOR", "cpu")
        for world in RUNS:
            _spawn(world, out)
    result = {}
    for world, runs in RUNS.items():
        for name in runs:
            result[name] = [torch.load(out / name / f"rank{r}.pt", weights_only=True) for r in range(world)]
            result[name][0]["dir"] = out / name
    return result


@pytest.fixture(scope="module")
def reference() -> dict[str, list]:
    """ReferenceTrainer metrics per step on the full global batches, with and without the hidden term."""
    from distill.training.build import build_reference_trainer

    out = {}
    for hidden in (True, False):
        trainer = build_reference_trainer(
            build_model(student_config(), seed=0), make_objective(hidden), OPTIM, STEPS
        )
        out[hidden] = [
            trainer.train_step(s, [global_micro_batch(s, m) for m in range(ACCUM)]) for s in range(STEPS)
        ]
        out[f"model_{hidden}"] = trainer.student
    return out


def curve(ranks: list[dict], key: str = "steps") -> list[float]:
    """Loss per step: the ranks' weighted loss sums, summed, over the global token count."""
    steps = [r["step"] for r in ranks[0][key]]
    return [sum(rec[key][i]["loss_sum"] for rec in ranks) / global_tokens(s) for i, s in enumerate(steps)]


def assert_close(got, want, rel=REL):
    assert got == pytest.approx(want, rel=rel), (got, want)


# ------------------------------------------------------------------------------------- against reference
@pytest.mark.parametrize("run", ["z0", "z2_offload", "z1_act_ckpt", "z1", "z2", "z3", "z3_fused"])
def test_loss_curve_matches_reference(records, reference, run):
    ref = reference[True]
    ranks = records[run]
    assert_close(curve(ranks), [m.loss for m in ref])
    for i, m in enumerate(ref):
        for label, value in m.terms.items():
            total = sum(rec["steps"][i]["terms"][label] for rec in ranks)
            assert_close(total / m.tokens, value)
        for rec in ranks:  # norm and LR are global: every rank reports the same
            assert_close(rec["steps"][i]["grad_norm"], m.grad_norm)
            assert_close(rec["steps"][i]["lr"], m.lr)
    assert sum(rec["steps"][0]["tokens"] for rec in ranks) == ref[0].tokens


def test_the_reference_really_trains_and_clips(reference):
    """Guards the comparisons above: the steps move the weights, and the clip (1.0) really acts."""
    ids, mask = probe_inputs()
    with torch.no_grad():
        trained = reference["model_True"](input_ids=ids, attention_mask=mask.long()).logits
        initial = build_model(student_config(), seed=0)(input_ids=ids, attention_mask=mask.long()).logits
    assert (trained - initial).abs().max() > 0.1
    assert max(m.grad_norm for m in reference[True]) > OPTIM.grad_clip


def test_ranks_hold_unequal_token_counts(records):
    """The global-token scaling matters: DeepSpeed's plain rank average would weight these shares wrongly."""
    z2 = records["z2"]
    assert z2[0]["steps"][0]["tokens"] != z2[1]["steps"][0]["tokens"]


def test_zero_stages_agree_with_each_other(records):
    base = curve(records["z1"])
    for run in ("z2", "z3"):
        assert_close(curve(records[run]), base, rel=1e-5)


def test_bf16_tracks_the_fp32_curve_loosely(records, reference):
    """bf16 parameters and activations (fp32 master weights): the same curve to bf16 precision."""
    assert_close(curve(records["z2_bf16"]), [m.loss for m in reference[False]], rel=3e-2)


# ------------------------------------------------------------------------------------ checkpoint and export
@pytest.mark.parametrize("run", ["z2_offload", "z3"])
def test_resumed_engine_continues_the_same_curve_exactly(records, run):
    """Module, optimizer partitions, LR schedule and step counters all round-trip bit for bit."""
    for rec in records[run]:
        saved, loaded = client_state(run), rec["client_state"]
        assert loaded.keys() == saved.keys()
        assert loaded["cursor"] == saved["cursor"] and loaded["run"] == saved["run"]
        assert torch.equal(loaded["rng"], saved["rng"])
        assert rec["resumed"] == rec["steps"][RESUME_AT:]  # loss sums, grad norm, lr: equal floats


@pytest.mark.parametrize("run", ["z2_offload", "z3"])
def test_a_real_checkpoint_commits_through_the_store_and_a_damaged_file_is_refused(records, run, tmp_path):
    """The engine's files, as the ranks write them into the folder `CheckpointStore.write` hands them, commit and
    verify; rank 0 switched DeepSpeed's `latest` atomically. A flipped bit in a rank's optimizer partition and a
    truncated model file are refused, each named."""
    from distill.cluster.driver import CheckpointStore
    from distill.errors import CheckpointError

    saved = records[run][0]["dir"] / "ckpt"
    assert (saved / "latest").read_text() == f"global_step{RESUME_AT}"
    assert sorted(p.name for p in saved.iterdir() if p.name.startswith(".")) == []  # no temp file left
    store = CheckpointStore(tmp_path, keep=1, identity={"run": run}, topology={})
    with store.write(RESUME_AT, (0, RESUME_AT * ACCUM)) as folder:
        shutil.copytree(saved, folder, dirs_exist_ok=True)
    path = store.resume_point()
    assert path == tmp_path / f"step-{RESUME_AT}"
    optim = sorted((path / f"global_step{RESUME_AT}").glob("*optim_states.pt"))
    assert len(optim) == len(records[run])  # one partition per rank, each in the manifest
    original = optim[-1].read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    optim[-1].write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{optim[-1]} has sha256 [0-9a-f]+\.\.\., the manifest says"):
        store.resume_point()
    optim[-1].write_bytes(original)  # repaired: complete again
    assert store.resume_point() == path
    model = next((path / f"global_step{RESUME_AT}").glob("*model_states.pt"))
    model.write_bytes(model.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{model} is \d+ bytes, the manifest says \d+ \(truncated"):
        store.resume_point()


def test_engine_checkpoint_files_are_fsynced_and_unreadable_ones_named(tmp_path, monkeypatch):
    """The wrappers `StudentEngine.save_checkpoint` / `load_checkpoint` put around DeepSpeed's checkpoint
    engine: each saved file is fsynced by the rank that wrote it; a file torch cannot read is a CheckpointError
    naming it (torch's own message names no file)."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from distill.errors import CheckpointError
    from distill.student.engine import _fsync_each_save, _naming_unreadable_files

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), fsync(fd))
    )
    checkpoint_engine = TorchCheckpointEngine()
    file = tmp_path / "mp_rank_00_model_states.pt"
    with _fsync_each_save(checkpoint_engine):
        checkpoint_engine.save({"w": torch.ones(64)}, str(file))
    assert synced == [str(file)]
    file.write_bytes(file.read_bytes()[:-20])
    with pytest.raises(RuntimeError, match="unexpected EOF"):  # what DeepSpeed's load raises on its own
        checkpoint_engine.load(str(file))
    with _naming_unreadable_files(checkpoint_engine), pytest.raises(CheckpointError) as err:
        checkpoint_engine.load(str(file))
    assert str(err.value).startswith(f"{file} cannot be loaded (unexpected EOF")


@pytest.mark.parametrize("run", ["z2_offload", "z3"])
def test_export_loads_in_transformers_with_the_engines_logits(records, reference, run):
    from transformers import AutoModelForCausalLM

    folder = records[run][0]["dir"] / "student"
    assert list(folder.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    ids, mask = probe_inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    for rec in records[run]:
        assert torch.allclose(logits, rec["logits"], rtol=0, atol=1e-5)
    # ... and the exported student is the reference's student after the same STEPS steps.
    with torch.no_grad():
        ref_logits = reference["model_True"](input_ids=ids, attention_mask=mask.long()).logits
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-3)
    assert not any("projector" in name for name in model.state_dict())


def test_engine_errors_name_the_problem(records):
    errors = records["z0"][0]["errors"]
    assert errors["one_micro_batch"].startswith("ConfigError: train_step got 1 micro-batches")
    assert "gradient_accumulation_steps=2" in errors["one_micro_batch"]
    assert errors["empty_folder"].startswith("CheckpointError: ")
    assert "holds no DeepSpeed checkpoint (no 'latest' file; found: [" in errors["empty_folder"]


def test_init_distributed_from_env_lists_missing_variables(monkeypatch):
    from distill.errors import TopologyError
    from distill.student import init_distributed_from_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(
        TopologyError, match=r"\['WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'\] are not set"
    ):
        init_distributed_from_env("gloo")


def test_every_process_builds_deepspeed_ops_with_its_environments_ninja(monkeypatch, tmp_path):
    """The environment's ninja goes first on PATH (a system ninja of another version would discard the shared
    build log and rebuild the ops from scratch); without one there, PATH is left alone."""
    from distill.student.engine import use_interpreters_ninja

    env_bin, system_bin = tmp_path / "env" / "bin", tmp_path / "usr" / "bin"
    env_bin.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(env_bin / "python"))
    monkeypatch.setenv("PATH", os.pathsep.join([str(system_bin), str(env_bin)]))
    use_interpreters_ninja()
    assert os.environ["PATH"] == os.pathsep.join([str(system_bin), str(env_bin)])  # no ninja of its own
    (env_bin / "ninja").touch()
    use_interpreters_ninja()
    use_interpreters_ninja()
    assert os.environ["PATH"] == os.pathsep.join([str(env_bin), str(system_bin)])


# ------------------------------------------------------------------------------------ build_ds_config (pure)
def test_ds_config_values():
    cfg = build_ds_config(
        zero_stage=2,
        micro_batch_size=4,
        grad_accum_steps=3,
        world_size=2,
        grad_clip=1.0,
        global_batch_size=24,
    )
    assert cfg["train_batch_size"] == 24
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": False}
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert "optimizer" not in cfg and "scheduler" not in cfg  # torch AdamW client optimizer, project LambdaLR
    assert "zero_force_ds_cpu_optimizer" not in cfg


def test_ds_config_offload_bf16_and_stage3():
    cfg = build_ds_config(
        zero_stage=3,
        micro_batch_size=1,
        grad_accum_steps=1,
        world_size=8,
        grad_clip=0.0,
        precision="bf16",
        offload_optimizer=True,
    )
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW runs on the offloaded partition
    assert cfg["bf16"] == {"enabled": True}
    assert cfg["gradient_clipping"] == 0.0
    assert build_ds_config(zero_stage=0, micro_batch_size=1, grad_accum_steps=1, world_size=1, grad_clip=1)[
        "zero_optimization"
    ] == {"stage": 0}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"zero_stage": 4}, r"zero_stage=4 is not a ZeRO stage; valid: \(0, 1, 2, 3\)"),
        ({"zero_stage": -1}, r"zero_stage=-1 must be an integer >= 0"),
        ({"micro_batch_size": 0}, r"micro_batch_size=0 must be an integer >= 1"),
        ({"grad_accum_steps": 1.5}, r"grad_accum_steps=1.5 must be an integer >= 1"),
        ({"world_size": True}, r"world_size=True must be an integer >= 1"),
        ({"grad_clip": -1.0}, r"grad_clip=-1.0 must be a number >= 0"),
        ({"precision": "fp16"}, r"precision='fp16' is not supported; valid: \('fp32', 'bf16'\)"),
        ({"offload_optimizer": "yes"}, r"offload_optimizer='yes' must be true or false"),
        (
            {"zero_stage": 0, "offload_optimizer": True},
            r"offload_optimizer=true needs ZeRO stage 1, 2 or 3.*got zero_stage=0",
        ),
        (
            {"global_batch_size": 10},
            r"global_batch_size=10 != micro_batch_size=2 x grad_accum_steps=2 x world_size=2 = 8",
        ),
    ],
)
def test_ds_config_rejects_bad_values(change, message):
    kwargs = {
        "zero_stage": 1,
        "micro_batch_size": 2,
        "grad_accum_steps": 2,
        "world_size": 2,
        "grad_clip": 1.0,
    }
    with pytest.raises(ConfigError, match=message):
        build_ds_config(**{**kwargs, **change})


def test_ds_config_module_does_not_import_deepspeed():
    import subprocess
    import sys

    code = "import sys, distill.student; distill.student.build_ds_config; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Os:
    """Pickles as a call of os.getcwd: what a hostile checkpoint file would carry."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_deepspeed_checkpoint_loads_refuse_arbitrary_objects(tmp_path):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    from distill.student.engine import _load_weights_only

    class Engine:  # the one attribute of a DeepSpeedEngine the wrapper replaces a method of
        checkpoint_engine = TorchCheckpointEngine()

    engine = Engine()
    _load_weights_only(engine)
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "ok.pt")
    assert engine.checkpoint_engine.load(str(tmp_path / "ok.pt"))["step"] == 3
    torch.save({"evil": _Os()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"))
