"""Connecting to Ray and building the Ray-side groups from the run's config (the only config-aware Ray code)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray

from distill.cluster.cache_source import CacheSpec, CacheWorker
from distill.cluster.placement import teacher_layout
from distill.cluster.teacher_group import TeacherGroup, TeacherSpec


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
    cfg, teacher_path: Path, hidden_layers, attention_layers, token_table: np.ndarray | None = None
) -> TeacherGroup:
    """The run's TeacherGroup; `token_table` (teacher id -> student id) makes its actors cross-tokenizer."""
    c = cfg.cluster
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
    return TeacherGroup(spec, **teacher_layout(c))


def cache_group_from_config(cfg, identity: dict) -> TeacherGroup:
    """Readers of the run's offline teacher cache in place of the teacher replicas: as many as
    cluster.teacher_replicas, one CPU actor each (no TP, no GPU), placed where the teachers would be."""
    c = cfg.cluster
    layout = {**teacher_layout(c), "tp": 1, "gpus_per_actor": 0.0}
    spec = CacheSpec(path=str(cfg.teacher.cache), expect=identity, threads=1)
    return TeacherGroup(spec, worker=CacheWorker, **layout)
