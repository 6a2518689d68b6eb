"""A run's evaluation and report, built beside `eval.*`: every entry point evaluates alike."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from distill.batch import ENSEMBLE_NAME
from distill.eval.evaluate import evaluate_model, heldout_batches
from distill.eval.metrics import HELDOUT_EPOCH, TeacherOutputs
from distill.eval.report import write_report
from distill.io import atomic_write_json
from distill.tracking.memory import final_peaks
from distill.tracking.metrics_log import read_metrics
from distill.xtok.metrics import bits_per_char


def generation_stop_id(tokenizer) -> int:
    """Chat replies end with <|im_end|>; plain-text models end with EOS."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return im_end if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else tokenizer.eos_token_id


def run_heldout_batches(cfg, tokenizer, data) -> list[tuple[tuple[int, int], dict]]:
    """(batch id, batch) of the run's held-out batches under `eval.*`: what `evaluate` scores, for a teacher
    side computed elsewhere (the teacher actors before they stop, `distill teacher-cache`)."""
    e = cfg.eval
    batches = heldout_batches(data.eval_rows, tokenizer.pad_token_id, e.batch_size, e.max_batches)
    return [((HELDOUT_EPOCH, i), b) for i, b in enumerate(batches)]


def scored_outputs(scored: Iterable) -> TeacherOutputs:
    """TeacherOutputs from TeacherBatches scored beforehand (by batch id), e.g. by the teacher actors."""
    by_id = {tuple(tb.batch_id): tb for tb in scored}
    return lambda batch_id, _batch: by_id[tuple(batch_id)].to_torch()


def evaluate(
    cfg,
    model,
    tokenizer,
    data,
    teacher: TeacherOutputs | None = None,
    *,
    generate_examples: int | None = None,
) -> dict:
    """`distill.eval.evaluate_model` with the run's `eval.*` settings on `data` (a DataSlice); adds bits per
    character when the rows carry their text's length (cross-tokenizer runs). teacher: its outputs for the
    held-out batches (`run_heldout_batches`), or None for no agreement / KL."""
    e = cfg.eval
    summary = evaluate_model(
        model,
        tokenizer,
        data.eval_rows,
        data.eval_examples,
        teacher=teacher,
        stop_id=generation_stop_id(tokenizer),
        batch_size=e.batch_size,
        max_batches=e.max_batches,
        generate_examples=e.generate_examples if generate_examples is None else generate_examples,
        max_new_tokens=e.max_new_tokens,
    )
    if data.eval_rows and "target_chars" in data.eval_rows[0]:
        rows = data.eval_rows[: e.max_batches * e.batch_size] if e.max_batches else data.eval_rows
        summary["bits_per_char"] = bits_per_char(model, rows, tokenizer.pad_token_id, e.batch_size)
    return _named_routes(cfg, summary)


def _named_routes(cfg, summary: dict) -> dict:
    """Several teachers: `by_route/<index>/...` -> `teachers/<name>/...` (`ensemble` for the mixed rows)."""
    names = list(cfg.get("teachers") or {})
    out = {}
    for key, value in summary.items():
        if key.startswith("by_route/"):
            _, index, metric = key.split("/", 2)
            key = f"teachers/{names[int(index)] if int(index) >= 0 else ENSEMBLE_NAME}/{metric}"
        out[key] = value
    return out


def evaluate_increments(cfg, model, tokenizer, data, increments) -> dict[str, dict]:
    """The model on every increment's held-out slice (CE, token accuracy, exact-match if configured)."""
    return {
        name: evaluate(
            cfg,
            model,
            tokenizer,
            data.slices[name],
            None,
            generate_examples=cfg.continual.eval_generate_examples,
        )
        for name in increments
    }


def run_memory_peaks(run_dir: str | Path) -> dict[str, float]:
    """Each role's peak memory over the run (`mem/<role>/<figure>_mib` from metrics.jsonl), for eval.json."""
    path = Path(run_dir) / "metrics.jsonl"
    return final_peaks(read_metrics(path)) if path.is_file() else {}


def write_run_report(cfg, summary: dict, continual_matrices=None) -> Path:
    """report.md + PNG plots in the run folder: loss terms per stage, schedules, held-out eval, each role's peak
    memory, and for continual runs the accuracy matrices with forgetting."""
    run_dir = Path(cfg.run_dir)
    title = f"Distillation report: {cfg.teacher.name} -> {cfg.student.name}, {cfg.curriculum.name}, mode={cfg.mode}"
    return write_report(
        run_dir,
        metrics=[*read_metrics(run_dir / "metrics.jsonl"), *stage_events(run_dir)],
        eval_summary=summary,
        continual=continual_matrices,
        title=title,
    )


def stage_events(run_dir: Path) -> list[dict]:
    """Stage transitions from stages.json as report events (metrics rows are only logged every N steps)."""
    path = Path(run_dir) / "stages.json"
    if not path.is_file():
        return []
    stages = json.loads(path.read_text())["stages"]
    return [
        {"event": "stage_transition", "step": b["first_step"], "from": a["name"], "to": b["name"]}
        for a, b in itertools.pairwise(stages)
    ]


def write_stages(run_dir: Path, curriculum) -> None:
    """stages.json: each stage's name, step span and data mix (for the report and for people)."""
    spans = [
        {"name": st.name, "first_step": a, "last_step": b - 1, "steps": b - a, "data": dict(st.data)}
        for a, b, st in curriculum.spans()
    ]
    atomic_write_json(run_dir / "stages.json", {"stages": spans, "total_steps": curriculum.total_steps})
