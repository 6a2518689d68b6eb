"""teacher.backend=vllm: a real vLLM engine (its own environment, scripts/setup_vllm.sh) against the hf engine.

The acceptance of issue 20: a tiny Qwen2 at DeepSeek-R1's vocabulary (129,280) in fp32, k = 64. vLLM runs as
`python -m distill.teacher.vllm_engine` in the vLLM interpreter, exchanging safetensors batches; the hf engine runs
here. Skipped, saying why, only when the vLLM environment is absent (`make test` builds it).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import distill.losses as L
from distill.errors import ConfigError
from distill.teacher import TeacherEngine
from distill.teacher.vllm_engine import (
    check_architecture,
    check_max_logprobs,
    check_vllm_version,
    executor_backend,
)
from distill.teacher.vllm_env import vllm_python

R1_VOCAB, K = 129_280, 64
VLLM_PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(
    VLLM_PYTHON is None or not VLLM_PYTHON.exists(),
    reason="the vLLM environment (.venv-vllm or $DISTILL_VLLM_PYTHON) is absent: run `bash scripts/setup_vllm.sh`",
)


def test_version_guard_names_the_supported_releases():
    check_vllm_version("0.32.0")
    check_vllm_version("0.33.1")
    with pytest.raises(ConfigError, match=r"vLLM 0\.29\.2 is not supported.*0\.32\.x, 0\.33\.x"):
        check_vllm_version("0.29.2")


def test_architecture_guard(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["MyOwnLM"]}')
    with pytest.raises(ConfigError, match=r"no implementation of the teacher's architecture \['MyOwnLM'\]"):
        check_architecture(tmp_path, ["Qwen2ForCausalLM"])
    assert check_architecture(tmp_path, ["MyOwnLM"]) == "MyOwnLM"


def test_each_replica_layout_gets_the_executor_its_platform_has():
    """PP across nodes: vLLM's Ray executor; TP on CPU: its multiprocessing one (vLLM's CPU platform has no Ray
    executor, which it would pick inside a Ray actor); otherwise vLLM's own choice."""
    assert executor_backend(1, 1, "cpu") is None and executor_backend(2, 1, "cuda") is None
    assert executor_backend(2, 1, "cpu") == "mp"
    assert executor_backend(4, 3, "cuda") == "ray"


def test_topk_must_fit_max_logprobs():
    check_max_logprobs(64, 64)
    with pytest.raises(ConfigError, match=r"teacher\.topk=65 exceeds .* max_logprobs=64"):
        check_max_logprobs(65, 64)


def tiny_r1_vocab_qwen2(folder):
    """Tiny Qwen2 at R1's vocabulary: head_dim 64 (vLLM's CPU attention refuses smaller), weights of std 0.3 so
    the next-token distribution is peaked like a trained model's (a 0.02 init is ~uniform over 129k ids, where
    top-k order would be rounding noise)."""
    from distill.models import build_model, save_model, tiny_config

    config = tiny_config(
        "tiny_qwen2",
        R1_VOCAB,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=2,
        intermediate_size=256,
        initializer_range=0.3,
        eos_token_id=1,
    )
    return save_model(build_model(config, seed=0), None, folder)


def score_in_vllm(
    model, batches: dict[str, dict[str, np.ndarray]], folder, *, topk=K, dtype="float32"
) -> dict:
    """Each batch scored by the vLLM engine in its own environment -> its TeacherBatch arrays."""
    names = []
    for name, arrays in batches.items():
        save_file(arrays, str(folder / f"{name}.safetensors"))
        names.append(str(folder / f"{name}.safetensors"))
    cmd = [str(VLLM_PYTHON), "-m", "distill.teacher.vllm_engine", "--model", str(model), "--topk", str(topk)]
    cmd += ["--dtype", dtype, "--out", str(folder / "out"), *names]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: load_file(str(folder / "out" / f"{name}.scored.safetensors")) for name in batches}


@pytest.fixture(scope="module")
def r1_model(tmp_path_factory):
    return tiny_r1_vocab_qwen2(tmp_path_factory.mktemp("vllm-r1-vocab") / "teacher")


@pytest.fixture(scope="module")
def compared(r1_model, tmp_path_factory):
    """(hf TeacherBatch arrays, vLLM TeacherBatch arrays, inputs) for a padded batch and a packed one."""
    folder, model = tmp_path_factory.mktemp("vllm-scored"), r1_model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, R1_VOCAB, (4, 48), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 30:], mask[3, 12:] = False, False
    ids[~mask] = 0
    padded = {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.clone()}
    positions = torch.cat([torch.arange(20), torch.arange(28)]).expand(4, 48).contiguous()
    full = torch.ones_like(mask)
    packed = {"input_ids": torch.randint(2, R1_VOCAB, (4, 48), generator=g), "attention_mask": full}
    packed |= {"loss_mask": full.clone(), "position_ids": positions}
    batches = {"padded": padded, "packed": packed}
    served = score_in_vllm(
        model, {n: {k: v.numpy() for k, v in b.items()} for n, b in batches.items()}, folder
    )
    engine = TeacherEngine.from_pretrained(model, K, dtype="float32", length_groups=1)
    hf = {n: engine.score_batch((0, i), b).arrays() for i, (n, b) in enumerate(batches.items())}
    return hf, served, {n: {k: v.numpy() for k, v in b.items()} for n, b in batches.items()}


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("name", ["padded", "packed"])
def test_vllm_matches_hf_at_r1_vocabulary_fp32(compared, name):
    """Acceptance: top-k ids equal on >= 99% of positions, log-probs within 1e-3, tail mass within 1e-4."""
    hf, served, inputs = compared[0][name], compared[1][name], compared[2][name]
    real = inputs["attention_mask"].astype(bool)
    for field in ("topk_ids", "topk_logits", "log_normalizer", "input_ids", "loss_mask", "attention_mask"):
        assert served[field].shape == hf[field].shape and served[field].dtype == hf[field].dtype, field
    same_ids = (served["topk_ids"] == hf["topk_ids"]).all(-1)[real]
    assert same_ids.mean() >= 0.99, f"top-{K} ids equal on {same_ids.mean():.2%} of positions"
    hf_logp = hf["topk_logits"].astype(np.float64) - hf["log_normalizer"][..., None]
    diff = np.abs(served["topk_logits"] - hf_logp)[real]
    assert diff.max() <= 1e-3, f"max |log-prob difference| {diff.max():.2e}"
    tail_hf = 1 - np.exp(hf_logp[real]).sum(-1)
    tail_served = 1 - np.exp(served["topk_logits"][real].astype(np.float64)).sum(-1)
    assert np.abs(tail_served - tail_hf).max() <= 1e-4
    assert tail_hf.min() > 1e-3, "the tail bucket is exercised (not all mass in the top-k)"
    assert np.all(served["log_normalizer"][real] == 0)
    print(
        f"{name}: ids equal {same_ids.mean():.2%}, max |dlogp| {diff.max():.2e}, "
        f"max |dtail| {np.abs(tail_served - tail_hf).max():.2e}"
    )


@needs_vllm
@pytest.mark.slow
def test_vllm_batches_give_the_hf_loss_at_every_temperature(compared):
    """Temperature semantics with the real engine: raw log-probs at T=1, the loss tempers the k + 1 buckets."""
    hf, served, inputs = compared[0]["padded"], compared[1]["padded"], compared[2]["padded"]
    student = torch.randn(4 * 48, R1_VOCAB, generator=torch.Generator().manual_seed(1))
    mask = torch.from_numpy(inputs["loss_mask"]).flatten()
    for temperature in (1.0, 2.0):
        losses = []
        for arrays in (hf, served):
            teacher = L.TopKTeacher(
                torch.from_numpy(arrays["topk_ids"]).long().flatten(0, 1),
                torch.from_numpy(arrays["topk_logits"]).flatten(0, 1),
                torch.from_numpy(arrays["log_normalizer"]).flatten(),
            )
            loss, n = L.get("forward_kl")(student, teacher, mask, temperature=temperature)
            losses.append(float(loss / n))
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), temperature


def test_determinism_measure_compares_logprobs_and_ids():
    """The self-test's figure (distill.cluster.runtime.check_determinism refuses a replica above 1e-3)."""
    from distill.cluster.vllm_worker import probe_batch, scored_difference
    from distill.teacher.logprobs import batch_from_logprobs, segments

    probe = probe_batch()
    segs = segments(probe["attention_mask"])
    entries = [[{5: (-0.5, 1), 7: (-1.5, 2)} for _ in range(s.end - s.start)] for s in segs]
    a = batch_from_logprobs((0, 0), probe, list(zip(segs, entries, strict=True)), 2)
    assert scored_difference(a, a) == 0.0
    b = batch_from_logprobs((0, 0), probe, list(zip(segs, entries, strict=True)), 2)
    b.topk_logits[0, 3, 1] += 2e-3
    assert scored_difference(a, b) == pytest.approx(2e-3, rel=1e-4)  # fp32 storage
    b.topk_ids[1, 0] = b.topk_ids[1, 0][::-1]
    assert scored_difference(a, b) == float("inf")


@needs_vllm
@pytest.mark.slow
def test_vllm_generation_is_greedy_exact_and_resumable(r1_model, tmp_path):
    """`distill generate` through vLLM: greedy completions equal the hf sampler's; seeded samples of a prompt do
    not depend on the batch it came in (the second job resumes at prompt 1 and must repeat the first's)."""
    import json

    from distill.models.loading import load_causal_lm
    from distill.teacher.sampling import SamplingParams, sample

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, R1_VOCAB, (n,), generator=g).tolist() for n in (5, 9, 7)]
    greedy = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=6, stop_id=1, pad_id=0, seed=0)
    seeded = SamplingParams(n=2, temperature=1.0, top_p=0.9, max_new_tokens=6, stop_id=1, pad_id=0, seed=3)
    jobs = [
        {"prompts": prompts, "params": greedy.__dict__, "first_index": 0},
        {"prompts": prompts, "params": seeded.__dict__, "first_index": 0},
        {"prompts": prompts[1:], "params": seeded.__dict__, "first_index": 1},
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = [str(VLLM_PYTHON), "-m", "distill.teacher.vllm_engine", "--model", str(r1_model), "--topk", "1"]
    proc = subprocess.run(
        [*cmd, "--sample", str(tmp_path / "jobs.json"), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_greedy, got_all, got_resumed = json.loads((tmp_path / "out" / "completions.json").read_text())
    model = load_causal_lm(r1_model, dtype="float32")
    want = sample(model, prompts, **{k: v for k, v in greedy.__dict__.items()})
    assert got_greedy == want
    assert all(len(c) == 2 and all(1 <= len(x) <= 6 for x in c) for c in got_all)
    assert got_resumed == got_all[1:]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["teacher.backend=sglang"], r"teacher.backend='sglang' is unknown; valid: hf, vllm, endpoint"),
        (
            ["teacher.backend=vllm"],
            r"runs the engine inside the Ray teacher actors .* teacher.backend=endpoint",
        ),
        (["teacher.backend=endpoint"], r"needs teacher.endpoint_url"),
        (
            [
                "teacher.backend=endpoint",
                "teacher.endpoint_url=http://127.0.0.1:1",
                "teacher.endpoint_api=tgi",
            ],
            r"teacher.endpoint_api='tgi' is unknown; valid: vllm, sglang",
        ),
        (
            ["teacher.backend=endpoint", "teacher.endpoint_url=http://127.0.0.1:1/v1", "loss=kd_features"],
            r"ships top-k log-probs only, but loss.terms \[.*hidden",
        ),
        (["teacher.pipeline_parallel=2"], r"needs teacher.backend=vllm on GPUs"),
    ],
)
def test_backend_config_is_checked_before_anything_starts(overrides, match):
    from distill.config import compose
    from distill.run.validate import validate_teacher_backend

    with pytest.raises(ConfigError, match=match):
        validate_teacher_backend(compose(overrides))


def test_missing_vllm_environment_says_how_to_build_it(monkeypatch, tmp_path):
    from distill.config import compose
    from distill.run.validate import validate_teacher_backend

    cfg = compose(
        ["cluster=local_ray", "teacher.backend=vllm", f"teacher.vllm_python={tmp_path}/nope/python"]
    )
    with pytest.raises(ConfigError, match=r"does not exist. Build it with `bash scripts/setup_vllm.sh`"):
        validate_teacher_backend(cfg)
