"""One run: validate once, build the parts once, hand them to the backend `cluster.mode` names, evaluate and
report once (see pipeline.py). Backends: `local` (the in-process reference trainer, local.py) and `ray`
(teacher actors, buffer and DeepSpeed student ranks, distill/cluster/backend.py)."""

from distill.run.pipeline import prepare, run

__all__ = ["prepare", "run"]
