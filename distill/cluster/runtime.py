"""Connecting to Ray and building the Ray-side groups from the run's config (the only config-aware Ray code)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray

from distill.cluster.cache_source import CacheSpec, CacheWorker
from distill.cluster.placement import teacher_layout
from distill.cluster.teacher_group import TeacherGroup, TeacherSpec
from distill.cluster.vllm_worker import (
    EndpointSpec,
    EndpointWorker,
    VllmSpec,
    VllmTeacherWorker,
    vllm_actor_options,
)
from distill.errors import ConfigError


def connect(cluster) -> None:
    """Join `cluster.address` (an existing Ray cluster) or start a local one sized by the config.

    The dashboard is off and everything binds to localhost unless an address says otherwise.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local runs; a shared cluster brings its own auth
    if cluster.address:
        ray.init(address=cluster.address, logging_level="WARNING")
        return
    ray.init(
        address="local",  # a fresh local instance, never whatever cluster happens to be running here
        num_cpus=cluster.cpus_per_node,
        num_gpus=cluster.gpus_per_node,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        logging_level="WARNING",
    )


def fetched_outputs(group: TeacherGroup, inputs):
    """The TeacherBatches of `group.score_stream(inputs)`, fetched into this process, in input order (for
    consumers that need the payload here, e.g. the offline cache writer; the online run leaves them in the store)."""
    for _, ref in group.score_stream(inputs):
        yield ray.get(ref)


def teacher_group_from_config(
    cfg,
    teacher_path: Path,
    hidden_layers,
    attention_layers,
    token_table: np.ndarray | None = None,
    *,
    reserve_cpus: dict[str, float] | None = None,
    name: str = "teacher",
) -> TeacherGroup:
    """The run's TeacherGroup; `token_table` (teacher id -> student id) makes its actors cross-tokenizer;
    `reserve_cpus` (node -> CPUs) is what other teachers' groups of the run hold already; `name` names the group's
    placement groups (one group per teacher).

    teacher.backend picks the actors: TeacherWorker (hf), VllmTeacherWorker (a vLLM engine per replica, in the
    vLLM environment's interpreter) or EndpointWorker (clients of a running server)."""
    c = cfg.cluster
    backend = cfg.teacher.backend
    if backend != "hf":
        if token_table is not None or hidden_layers or attention_layers:
            raise ConfigError(
                f"teacher.backend={backend} ships top-k log-probs only: no hidden states, attention maps or "
                "cross-tokenizer projection; use teacher.backend=hf for feature terms and token maps"
            )
        return served_group_from_config(cfg, teacher_path, reserve_cpus=reserve_cpus, name=name)
    spec = TeacherSpec(
        path=str(teacher_path),
        topk=cfg.teacher.topk,
        dtype=cfg.teacher.dtype,
        logits_dtype=cfg.teacher.logits_dtype,
        attn_implementation=cfg.teacher.attn_implementation,
        length_groups=cfg.teacher.length_groups,
        hidden_layers=tuple(hidden_layers),
        attention_layers=tuple(attention_layers),
        device=c.device,
        backend=c.backend,
        threads=max(1, int(c.cpus_per_teacher_actor)),
        token_table=token_table,
    )
    return TeacherGroup(spec, **teacher_layout(c), reserve_cpus=reserve_cpus, name=name)


def served_group_from_config(
    cfg, teacher_path: Path, *, reserve_cpus: dict[str, float] | None = None, name: str = "teacher"
) -> TeacherGroup:
    """teacher.backend=vllm: one actor per replica holding a vLLM engine of TP cluster.teacher_tp (it reserves
    the whole replica's CPUs/GPUs); teacher.backend=endpoint: cluster.teacher_replicas concurrent clients of the
    server, one CPU each."""
    from distill.teacher.vllm_env import require_vllm_python

    c, t = cfg.cluster, cfg.teacher
    layout = {**teacher_layout(c), "reserve_cpus": reserve_cpus, "name": name}
    if t.backend == "endpoint":
        spec = EndpointSpec(
            url=t.endpoint_url,
            model=t.endpoint_model or str(teacher_path),
            topk=t.topk,
            api=t.endpoint_api,
            api_key_env=t.endpoint_api_key_env,
            logits_dtype=t.logits_dtype,
        )
        return TeacherGroup(spec, worker=EndpointWorker, **{**layout, "tp": 1, "gpus_per_actor": 0.0})
    tp, pp = layout["tp"], t.pipeline_parallel
    threads = max(1, int(c.cpus_per_teacher_actor * tp))
    spec = VllmSpec(
        path=str(teacher_path),
        topk=t.topk,
        dtype=t.dtype,
        logits_dtype=t.logits_dtype,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        device=c.device,
        threads=threads,
    )
    group = TeacherGroup(
        spec,
        worker=VllmTeacherWorker,
        actor_options=vllm_actor_options(str(require_vllm_python(t.vllm_python)), threads, c.device),
        **{
            **layout,
            "tp": 1,
            "cpus_per_actor": layout["cpus_per_actor"] * tp,
            # Pipeline stages on other nodes are vLLM's own Ray workers: the actor then holds no device.
            "gpus_per_actor": layout["gpus_per_actor"] * tp if pp == 1 else 0.0,
        },
    )
    try:
        check_determinism(group)
    except ConfigError:
        group.shutdown()
        raise
    return group


DETERMINISM_TOLERANCE = 1e-3
"""Largest log-prob difference allowed between two scorings of one batch, on a replica or across replicas: the
acceptance bound of the vLLM backend against the hf engine (test_teacher_vllm.py measures ~3e-5 in fp32)."""


def check_determinism(group: TeacherGroup, tolerance: float = DETERMINISM_TOLERANCE) -> None:
    """Before any training step: every replica scores a probe batch twice; ConfigError when a replica differs from
    itself or from replica 0 by more than `tolerance` (or in its top-k ids), naming the replica and the figure."""
    from distill.cluster.vllm_worker import scored_difference

    results = ray.get([rep.actors[0].self_test.remote() for rep in group.replicas])
    _, reference = results[0]
    for index, (repeat, scored) in enumerate(results):
        across = scored_difference(reference, scored)
        if repeat > tolerance or across > tolerance:
            raise ConfigError(
                f"teacher replica {index} is not deterministic enough to distill from: scoring one batch twice "
                f"differs by {repeat:.2e} in log-probs, and from replica 0 by {across:.2e} (inf: different top-k "
                f"ids); the limit is {tolerance:.0e}. Check that every replica runs the same model, dtype and "
                "vLLM build (batch-invariant kernels on GPUs, VLLM_BATCH_INVARIANT=1)."
            )


def cache_group_from_config(cfg, identity: dict) -> TeacherGroup:
    """Readers of the run's offline teacher cache in place of the teacher replicas: as many as
    cluster.teacher_replicas, one CPU actor each (no TP, no GPU), placed where the teachers would be."""
    c = cfg.cluster
    layout = {**teacher_layout(c), "tp": 1, "gpus_per_actor": 0.0}
    spec = CacheSpec(path=str(cfg.teacher.cache), expect=identity, threads=1)
    return TeacherGroup(spec, worker=CacheWorker, **layout)
