"""`distill eval eval.model=<HF folder>`: held-out CE, perplexity, KL to the teacher, agreement, exact-match.

The model is evaluated with its own tokenizer (the folder's, as a run exports it with student/; else the
config's student tokenizer) on the held-out split encoded by it, so a Qwen-tokenizer student is measured on Qwen
tokens. The teacher's side (agreement, KL) needs the same tokenizer; it comes from where the teacher lives:
`teacher.cache` (its held-out batches), the Ray teacher actors (`cluster.mode=ray`), or, on the single-process
path (`cluster.mode=local`), an engine in this process. Prints a table and writes `eval.json` into the run folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from distill.data.build import build_data
from distill.errors import CheckpointError
from distill.eval.runs import evaluate as evaluate_run
from distill.eval.runs import run_heldout_batches, scored_outputs
from distill.io import atomic_write_json
from distill.models.fingerprint import model_fingerprint
from distill.models.loading import load_causal_lm, load_tokenizer
from distill.models.resolve import require_teacher, student_tokenizer
from distill.models.tokenizer import tokenizer_hash
from distill.run.cache import CachedTeacher
from distill.teacher.build import build_teacher_engine
from distill.teacher.teacher_set import require_one_teacher
from distill.xtok.build import row_encoder
from launch.app import hydra_app
from launch.demo import print_table

log = logging.getLogger("distill")


def evaluate(cfg: DictConfig) -> dict:
    require_one_teacher(cfg, "eval")
    teacher_path = require_teacher(cfg)
    teacher_tokenizer = load_tokenizer(teacher_path)
    model_path = Path(cfg.eval.model) if cfg.eval.model else teacher_path
    tokenizer = model_tokenizer(cfg, model_path, teacher_tokenizer)
    data = build_data(cfg, row_encoder(cfg, tokenizer, teacher_tokenizer))
    model = load_causal_lm(model_path)
    result = evaluate_run(
        cfg, model, tokenizer, data, heldout_teacher(cfg, teacher_path, teacher_tokenizer, tokenizer, data)
    )
    result["model"] = str(model_path)
    out = Path(cfg.run_dir) / "eval.json"
    atomic_write_json(out, result)
    print_table({str(model_path): result})
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


def model_tokenizer(cfg: DictConfig, model_path: Path, teacher_tokenizer):
    """The evaluated model's own tokenizer: its folder's (a run's student/ carries it), else the config's."""
    try:
        return load_tokenizer(model_path)
    except CheckpointError:  # no tokenizer files in the folder: the one the config trains this student with
        return student_tokenizer(cfg, teacher_tokenizer)


def heldout_teacher(cfg: DictConfig, teacher_path: Path, teacher_tokenizer, tokenizer, data):
    """The teacher's outputs for the held-out batches, or None when it speaks another vocabulary."""
    if tokenizer_hash(tokenizer) != tokenizer_hash(teacher_tokenizer):
        log.info("the model's tokenizer is not the teacher's: no agreement or KL to the teacher")
        return None
    heldout = run_heldout_batches(cfg, tokenizer, data)
    if cfg.teacher.cache:
        cached = CachedTeacher(
            cfg.teacher.cache,
            {"teacher_hash": model_fingerprint(teacher_path), "k": int(cfg.teacher.topk)},
        )
        if not all(cached.reader.has(batch_id) for batch_id, _ in heldout):
            raise CheckpointError(
                f"teacher cache {cfg.teacher.cache} holds no held-out batches for these eval.* settings (batch "
                "size, max batches); rebuild it with `distill teacher-cache` at these settings, or unset "
                "teacher.cache to score them with the teacher."
            )
        return cached  # reads each held-out batch, checked against the batch's tokens and positions
    if cfg.cluster.mode == "ray":
        from distill.cluster.runtime import connect, fetched_outputs, teacher_group_from_config

        connect(cfg.cluster)
        group = teacher_group_from_config(cfg, teacher_path, (), ())
        try:
            arrays = ((batch_id, {k: v.numpy() for k, v in b.items()}) for batch_id, b in heldout)
            return scored_outputs(list(fetched_outputs(group, arrays)))
        finally:
            group.shutdown()
    engine = build_teacher_engine(cfg, teacher_path)  # the single-process path: the teacher lives here
    return lambda batch_id, batch: engine.score_batch(batch_id, batch).to_torch()


@hydra_app
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
