"""EndpointTeacher: scores batches through an OpenAI-compatible vLLM server's completions API (prompt log-probs).

teacher.backend=endpoint, for teams that already serve the teacher: one POST per batch (every prompt of the batch
as token ids), `prompt_logprobs=k` (vLLM's extension of the completions API). Each prompt is sent with one extra
token appended: attention is causal, so that token changes no earlier position, and its prompt entry is the
distribution after the last real token (the one the hf engine puts at the last position), without reading the
generated step's OpenAI-format log-probs, which are keyed by decoded text rather than token id.

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


def json_entries(position: Mapping[str, Mapping] | None) -> Entries:
    """One prompt_logprobs entry of the JSON reply ({"<id>": {"logprob", "rank", ...}}) -> {id: (log-prob, rank)}."""
    return {int(token): (float(v["logprob"]), int(v["rank"])) for token, v in (position or {}).items()}


class EndpointTeacher:
    """Client of one server. url: its base URL ending in /v1; model: the served model name."""

    def __init__(
        self,
        url: str,
        model: str,
        topk: int,
        *,
        api_key: str | None = None,
        logits_dtype: torch.dtype = torch.float32,
        timeout_s: float = 600.0,
    ) -> None:
        self.url, self.model, self.topk = url.rstrip("/"), model, topk
        self._api_key = api_key
        self.logits_dtype, self.timeout_s = logits_dtype, timeout_s

    def __repr__(self) -> str:  # never the key
        return f"EndpointTeacher(url={self.url!r}, model={self.model!r}, topk={self.topk})"

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(
            f"{self.url}/completions", data=json.dumps(body).encode(), headers=headers, method="POST"
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
        body = {
            "model": self.model,
            "prompt": [[*p, p[0]] for p in prompts],  # the extra token: see the module docstring
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.topk,
        }
        choices = sorted(self._post(body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise ConfigError(
                f"the teacher endpoint {self.url} returned {len(choices)} choices for {len(prompts)} prompts"
            )
        out = []
        for prompt, choice in zip(prompts, choices, strict=True):
            entries = choice.get("prompt_logprobs")
            if entries is None:
                raise ConfigError(
                    f"the teacher endpoint {self.url} returned no prompt_logprobs: teacher.backend=endpoint needs a "
                    "vLLM server (the completions API's prompt_logprobs extension)"
                )
            out.append([json_entries(e) for e in entries[1 : len(prompt) + 1]])
        return out

    def score_batch(
        self, batch_id: BatchId, batch: Mapping[str, torch.Tensor | np.ndarray | None]
    ) -> TeacherBatch:
        """A stream micro-batch (input_ids, attention_mask, loss_mask, optional position_ids) -> TeacherBatch."""
        return score_served_batch(self.score_prompts, batch_id, batch, self.topk, self.logits_dtype)
