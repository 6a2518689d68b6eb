"""teacher.backend=endpoint with teacher.endpoint_api=sglang: the client of SGLang's native /generate
(`input_top_logprobs`), against the hf engine on a tiny Qwen2 at R1's vocabulary (fp32, k = 64), and a local run
through it against the same run with the hf teacher.

SGLang itself cannot run here: the registry's sglang 0.5.23 needs CUDA 13 (flashinfer cu13, cuda-python, a CUDA
build of sglang-kernel and torch 2.14.1), and its CPU engine is built from source. So the server is
`SGLangGenerateFake_NoCUDA`: an HTTP server on 127.0.0.1 that answers /generate in SGLang's reply format (per
prompt `meta_info.input_top_logprobs`: None at position 0, then [log-prob, token id, text] triples, most likely first;
SGLang's tokenizer_manager.detokenize_top_logprobs_tokens), computed with a real transformers forward of the
served model. It checks what the client asks for as SGLang would read it, and requires the bearer key as
`--api-key` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from distill.errors import ConfigError
from distill.teacher import TeacherEngine
from distill.teacher.endpoint import EndpointTeacher
from tests.test_teacher_endpoint import (
    assert_endpoint_run_follows_hf,
    assert_served_batch_matches_hf,
    padded_and_packed_batches,
)
from tests.test_teacher_vllm import tiny_r1_vocab_qwen2

K = 64
KEY_ENV = "DISTILL_TEST_SGLANG_KEY"
# The fields of SGLang's GenerateReqInput the client may send (python/sglang/srt/managers/io_struct.py).
GENERATE_FIELDS = {
    "input_ids",
    "sampling_params",
    "return_logprob",
    "logprob_start_len",
    "top_logprobs_num",
    "return_text_in_logprobs",
}


class SGLangGenerateFake_NoCUDA:
    """/generate of an SGLang server for `model_dir`, computed with transformers in fp32 (see the module
    docstring); `requests` keeps every body received. `drop_top_logprobs` answers as a server asked without
    logprob_start_len would (no input_top_logprobs)."""

    def __init__(self, model_dir, key: str, *, drop_top_logprobs: bool = False) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.key, self.drop_top_logprobs = key, drop_top_logprobs
        self.requests: list[dict] = []

    def answer(self, body: dict) -> list[dict]:
        assert set(body) <= GENERATE_FIELDS, sorted(set(body) - GENERATE_FIELDS)
        k = body["top_logprobs_num"]
        replies = []
        for ids in body["input_ids"]:
            with torch.no_grad():
                logits = self.model(torch.tensor([ids])).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, k, dim=-1)
            rows = [
                [[float(v), int(i), None] for v, i in zip(top.values[t], top.indices[t], strict=True)]
                for t in range(len(ids))
            ]
            meta = {"prompt_tokens": len(ids), "completion_tokens": 1}
            if body.get("return_logprob") and not self.drop_top_logprobs:
                meta["input_top_logprobs"] = [None, *rows[:-1]]  # entry t: the distribution of token t
                meta["output_top_logprobs"] = [rows[-1]]
            replies.append({"text": "", "output_ids": [int(top.indices[-1, 0])], "meta_info": meta})
        return replies

    @contextlib.contextmanager
    def serve(self):
        """Yields the server's base URL (http://127.0.0.1:<free port>)."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {fake.key}":
                    self._reply(401, {"error": "Unauthorized"})
                elif self.path != "/generate":
                    self._reply(404, {"detail": "Not Found"})
                else:
                    fake.requests.append(body)
                    self._reply(200, fake.answer(body))

            def _reply(self, code: int, payload) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


@pytest.fixture(scope="module")
def r1_model(tmp_path_factory):
    return tiny_r1_vocab_qwen2(tmp_path_factory.mktemp("sglang") / "teacher")


def test_sglang_endpoint_matches_hf_at_r1_vocabulary_fp32(r1_model, monkeypatch):
    key = secrets.token_hex(16)
    monkeypatch.setenv(KEY_ENV, key)
    fake = SGLangGenerateFake_NoCUDA(r1_model, key)
    hf_engine = TeacherEngine.from_pretrained(r1_model, K, dtype="float32", length_groups=1)
    with fake.serve() as url:
        client = EndpointTeacher(f"{url}/v1", "teacher", K, api="sglang", api_key=os.environ[KEY_ENV])
        assert key not in repr(client) and client.url == url  # the OpenAI-style /v1 suffix is dropped
        for batch in padded_and_packed_batches():
            served = client.score_batch((0, 1), {k: v.numpy() for k, v in batch.items()})
            hf = hf_engine.score_batch((0, 1), batch)
            assert_served_batch_matches_hf(served, hf, batch["attention_mask"].numpy())
    # One request per batch; every position's log-probs, raw (no temperature or top-p normalisation).
    assert len(fake.requests) == 2 and len(fake.requests[1]["input_ids"]) == 6  # 3 rows x 2 documents
    for body in fake.requests:
        assert body["return_logprob"] is True and body["logprob_start_len"] == 0
        assert body["top_logprobs_num"] == K
        assert body["sampling_params"]["temperature"] == 1.0 and body["sampling_params"]["top_p"] == 1.0


def test_sglang_endpoint_errors_name_the_fix_and_never_the_key(r1_model):
    key = secrets.token_hex(16)
    with SGLangGenerateFake_NoCUDA(r1_model, key).serve() as url:
        with pytest.raises(ConfigError, match="refused the API key") as err:
            EndpointTeacher(url, "teacher", K, api="sglang", api_key="wrong-" + key[:4]).score_prompts(
                [[5, 6]]
            )
        assert key[:4] not in str(err.value)
        with pytest.raises(ConfigError, match="answered HTTP 404"):  # a vLLM-style client against SGLang
            EndpointTeacher(f"{url}/v1", "teacher", K, api="vllm", api_key=key).score_prompts([[5, 6]])
    without = SGLangGenerateFake_NoCUDA(r1_model, key, drop_top_logprobs=True)
    with (
        without.serve() as url,
        pytest.raises(ConfigError, match=r"no input_top_logprobs .* set teacher\.endpoint_api=vllm"),
    ):
        EndpointTeacher(url, "teacher", K, api="sglang", api_key=key).score_prompts([[5, 6]])
    with pytest.raises(ConfigError, match=r"teacher.endpoint_api='tgi' is unknown; valid: vllm, sglang"):
        EndpointTeacher(url, "teacher", K, api="tgi")


def test_a_local_run_through_an_sglang_endpoint_trains_as_the_hf_teacher(
    tiny_teacher, base_overrides, tmp_path, monkeypatch
):
    """teacher.endpoint_api=sglang end to end on the single-process path: the hf run's loss curve."""
    assert_endpoint_run_follows_hf(
        tiny_teacher,
        base_overrides,
        tmp_path,
        monkeypatch,
        serve=lambda teacher, key: SGLangGenerateFake_NoCUDA(teacher, key).serve(),
        endpoint=lambda url: [f"teacher.endpoint_url={url}", "teacher.endpoint_api=sglang"],
    )
