"""EndpointTeacher: scores batches through a running vLLM or SGLang server's prompt log-probs.

teacher.backend=endpoint, for teams that already serve the teacher: one POST per batch (every prompt of the batch
as token ids), in one of two dialects (`teacher.endpoint_api`):
  vllm    the OpenAI completions API at <url>/completions with `prompt_logprobs=k` (vLLM's extension);
  sglang  SGLang's native <url>/generate with `return_logprob`, `logprob_start_len=0` and `top_logprobs_num=k`:
          `meta_info.input_top_logprobs` holds, per prompt position, [log-prob, token id, text] triples, most
          likely first (None at position 0). logprob_start_len=0 also keeps SGLang's radix cache from serving
          cached positions (it only matches prefixes before logprob_start_len), and the scoring request's
          sampling parameters are neutral (T 1, top-p 1, no top-k) so no temperature or top-p normalisation
          touches the log-probs (SGLang applies them to the log-probs it returns unless
          SGLANG_RETURN_ORIGINAL_LOGPROB is set).
Each prompt is sent with one extra token appended: attention is causal, so that token changes no earlier position,
and its prompt entry is the distribution after the last real token (the one the hf engine puts at the last
position), without reading the generated step's log-probs (OpenAI-format ones are keyed by decoded text).

The API key comes from the environment only (`teacher.endpoint_api_key_env`); it is sent as a bearer token and
never logged or put in an error message. Stdlib HTTP: one request at a time per client (a TeacherGroup replica).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from distill.batch import BatchId, TeacherBatch
from distill.errors import ConfigError
from distill.teacher.logprobs import Entries, score_served_batch

ENDPOINT_APIS = ("vllm", "sglang")


def check_endpoint_api(api: str) -> None:
    """ConfigError unless `api` names a dialect this client speaks."""
    if api not in ENDPOINT_APIS:
        raise ConfigError(
            f"teacher.endpoint_api={api!r} is unknown; valid: {', '.join(ENDPOINT_APIS)} (vllm: the completions "
            "API with prompt_logprobs; sglang: SGLang's /generate with input_top_logprobs)"
        )


def json_entries(position: Mapping[str, Mapping] | None) -> Entries:
    """One prompt_logprobs entry of the JSON reply ({"<id>": {"logprob", "rank", ...}}) -> {id: (log-prob, rank)}."""
    return {int(token): (float(v["logprob"]), int(v["rank"])) for token, v in (position or {}).items()}


def sglang_entries(position: Sequence[Sequence] | None) -> Entries:
    """One input_top_logprobs entry of SGLang's reply ([[log-prob, id, text], ...], most likely first) ->
    {id: (log-prob, rank)}."""
    return {int(token): (float(logprob), rank) for rank, (logprob, token, *_) in enumerate(position or [], 1)}


class EndpointTeacher:
    """Client of one server. url: its base URL (vLLM: ending in /v1; SGLang: the server's root, a trailing /v1 is
    dropped); model: the served model name (vLLM; SGLang serves one model); api: `vllm` or `sglang`."""

    def __init__(
        self,
        url: str,
        model: str,
        topk: int,
        *,
        api: str = "vllm",
        api_key: str | None = None,
        logits_dtype: torch.dtype = torch.float32,
        timeout_s: float = 600.0,
    ) -> None:
        check_endpoint_api(api)
        url = url.rstrip("/")
        self.url = url.removesuffix("/v1") if api == "sglang" else url
        self.model, self.topk, self.api = model, topk, api
        self._api_key = api_key
        self.logits_dtype, self.timeout_s = logits_dtype, timeout_s

    def __repr__(self) -> str:  # never the key
        return f"EndpointTeacher(url={self.url!r}, model={self.model!r}, topk={self.topk}, api={self.api!r})"

    def _post(self, route: str, body: dict) -> dict | list:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.url}/{route}", data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            if err.code in (401, 403):
                raise ConfigError(
                    f"the teacher endpoint {self.url} refused the API key (HTTP {err.code}); set the key in the "
                    "environment variable named by teacher.endpoint_api_key_env"
                ) from None
            if "logprobs" in detail and "max" in detail:
                raise ConfigError(
                    f"the teacher endpoint {self.url} cannot return teacher.topk={self.topk} log-probs per position "
                    f"({detail}); start it with --max-logprobs {self.topk} or lower teacher.topk"
                ) from None
            raise ConfigError(f"the teacher endpoint {self.url} answered HTTP {err.code}: {detail}") from None
        except urllib.error.URLError as err:
            raise ConfigError(
                f"cannot reach the teacher endpoint {self.url} ({err.reason}); is the server running? "
                "(teacher.endpoint_url)"
            ) from None

    def score_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[Entries]]:
        """Per prompt of n tokens, its n positions' entries (position i: the distribution of token i + 1)."""
        sent = [[*p, p[0]] for p in prompts]  # the extra token: see the module docstring
        served = self._sglang_positions(sent) if self.api == "sglang" else self._vllm_positions(sent)
        if len(served) != len(prompts):
            raise ConfigError(
                f"the teacher endpoint {self.url} returned {len(served)} results for {len(prompts)} prompts"
            )
        out = []
        for prompt, positions in zip(prompts, served, strict=True):
            if len(positions) <= len(prompt):
                raise ConfigError(
                    f"the teacher endpoint {self.url} returned {len(positions)} log-prob entries for a prompt of "
                    f"{len(prompt) + 1} tokens: it must score every prompt position (teacher.endpoint_api)"
                )
            # Entry 0 is the first token's (no distribution); entries 1..n those after tokens 0..n-1.
            out.append(positions[1 : len(prompt) + 1])
        return out

    def _vllm_positions(self, sent: list[list[int]]) -> list[list[Entries]]:
        body = {
            "model": self.model,
            "prompt": sent,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.topk,
        }
        choices = sorted(self._post("completions", body)["choices"], key=lambda c: c["index"])
        out = []
        for choice in choices:
            entries = choice.get("prompt_logprobs")
            if entries is None:
                raise ConfigError(
                    f"the teacher endpoint {self.url} returned no prompt_logprobs: teacher.backend=endpoint needs a "
                    "vLLM server (the completions API's prompt_logprobs extension)"
                )
            out.append([json_entries(e) for e in entries])
        return out

    def _sglang_positions(self, sent: list[list[int]]) -> list[list[Entries]]:
        body = {
            "input_ids": sent,
            "sampling_params": {"max_new_tokens": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1},
            "return_logprob": True,
            "logprob_start_len": 0,
            "top_logprobs_num": self.topk,
            "return_text_in_logprobs": False,
        }
        replies = self._post("generate", body)
        out = []
        for reply in replies if isinstance(replies, list) else [replies]:
            entries = (reply.get("meta_info") or {}).get("input_top_logprobs")
            if entries is None:
                raise ConfigError(
                    f"the teacher endpoint {self.url} returned no input_top_logprobs for every prompt position: "
                    "teacher.endpoint_api=sglang needs an SGLang server's /generate (return_logprob with "
                    "logprob_start_len=0); for a vLLM server set teacher.endpoint_api=vllm"
                )
            out.append([sglang_entries(e) for e in entries])
        return out

    def score_batch(
        self, batch_id: BatchId, batch: Mapping[str, torch.Tensor | np.ndarray | None]
    ) -> TeacherBatch:
        """A stream micro-batch (input_ids, attention_mask, loss_mask, optional position_ids) -> TeacherBatch."""
        return score_served_batch(self.score_prompts, batch_id, batch, self.topk, self.logits_dtype)
