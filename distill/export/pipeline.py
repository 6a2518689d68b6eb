"""Write the requested formats of a student folder, then evaluate the student and each export with the caller's
evaluation (`distill eval`'s, bound to a run's held-out data and teacher outputs), and report what each costs.

Independent of where the evaluation's inputs come from: `distill export` builds them from the config
(launch/export.py); a run that exports at its end would hand in its own held-out data and `Trained.teacher`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from distill.export.compare import RecordingGenerate, greedy_agreement, report_table
from distill.export.formats import ExportFormat, check_source, scratch_source
from distill.export.manifest import weight_bytes
from distill.io import atomic_write_json, atomic_write_text
from distill.models.loading import load_causal_lm
from distill.tracking.memory import RssGrowth

log = logging.getLogger("distill")
MIB = 2**20
Evaluate = Callable[[object], dict]
"""model (anything with `model(input_ids=, attention_mask=).logits` and a greedy `generate`) -> metrics."""

REPORT_NOTES = """Every row is `distill eval`'s evaluation (held-out CE, KL and agreement to the teacher, greedy exact-match)
run on the export loaded back in its runtime. ONNX runs in onnxruntime (a graph without KV cache: decoding re-runs
the prefix). GGUF is read by transformers' GGUF loader, which de-quantizes its tensors with gguf-py into a torch
model: the file's own weights, llama.cpp's kernels not run. `greedy = fp32`: share of the held-out prompts whose
greedy output equals the fp32 student's; `greedy tokens`: share of its tokens reproduced before a first difference.
`peak memory`: the most this process's resident memory grew while the format was loaded and evaluated (sampled
every 5 ms): the runtime's weights, buffers and activations at the evaluation's batch size.
"""


def write_exports(model_path: Path, formats: list[ExportFormat], out: Path) -> None:
    """Each format's folder under `out` (atomic, manifest last); every format checked against the model first."""
    check_source(formats, model_path)
    source, scratch = scratch_source(model_path)
    with scratch:
        for fmt in formats:
            log.info("export %s -> %s", fmt.name, out / fmt.name)
            fmt.write(source, out / fmt.name)


def size_rows(formats: list[ExportFormat], out: Path) -> list[dict]:
    return [
        {"format": f.name, "runtime": f.runtime, "size_mib": weight_bytes(out / f.name, f.weights) / MIB}
        for f in formats
    ]


def evaluate_exports(
    model_path: Path, formats: list[ExportFormat], out: Path, evaluate: Evaluate, stop_id: int
) -> list[dict]:
    """The fp32 student's row, then each export's, with its greedy outputs compared with the student's (the
    evaluation's own decoding, recorded; stop_id ends an output as exact-match reads it)."""

    def run(name: str, runtime: str, load: Callable[[], object], size: int) -> tuple[dict, list[list[int]]]:
        with RssGrowth() as growth:  # loading the format into its runtime and evaluating it
            recorder = RecordingGenerate(load(), stop_id)
            result = evaluate(recorder)
        log.info("evaluated %s: ce %.5f", name, result["ce"])
        row = {
            "format": name,
            "runtime": runtime,
            "size_mib": size / MIB,
            "peak_rss_growth_mib": growth.peak / MIB,
        }
        return row | result, recorder.outputs

    weights = sum(p.stat().st_size for p in model_path.glob("*.safetensors"))
    reference, ref_outputs = run(
        "fp32 student (safetensors)", "transformers", lambda: load_causal_lm(model_path), weights
    )
    rows = [reference]
    for fmt in formats:
        folder = out / fmt.name
        row, outputs = run(
            fmt.name, fmt.runtime, lambda f=fmt, d=folder: f.open(d), weight_bytes(folder, fmt.weights)
        )
        rows.append(
            row | greedy_agreement(ref_outputs, outputs) | {"exact_greedy_expected": fmt.exact_greedy}
        )
    return rows


def export_student(
    model_path: Path, formats: list[ExportFormat], out: Path, evaluate: Evaluate | None, stop_id: int
) -> tuple[str, list[dict]]:
    """Write `formats` of the student folder under `out`, evaluate each (unless `evaluate` is None: sizes only),
    write export.json and report.md; returns the report's table and its rows."""
    write_exports(model_path, formats, out)
    if evaluate is None:
        rows = size_rows(formats, out)
    else:
        rows = evaluate_exports(model_path, formats, out, evaluate, stop_id)
    return write_report(model_path, rows, out), rows


def scored_once(teacher):
    """The teacher's held-out outputs (batch_id, batch) -> outputs, scored once and reused by every format's
    evaluation; None stays None."""
    if teacher is None:
        return None
    seen: dict = {}

    def outputs(batch_id, batch):
        key = tuple(batch_id)
        if key not in seen:
            seen[key] = teacher(batch_id, batch)
        return seen[key]

    return outputs


def write_report(model_path: Path, rows: list[dict], out: Path) -> str:
    """export.json (every figure) and report.md (the table and how to read it) in `out`; returns the table."""
    table = report_table(rows)
    atomic_write_json(out / "export.json", {"model": str(model_path), "rows": rows})
    atomic_write_text(out / "report.md", f"# Exports of {model_path}\n\n{table}\n{REPORT_NOTES}")
    return table
