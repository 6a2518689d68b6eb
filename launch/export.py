"""`distill export export.model=<student folder> export.formats=[onnx-fp32,gguf-q8_0,...]`: deployment exports,
each loaded back in its runtime and evaluated by `distill eval`'s own code against the fp32 student.

Writes <export.out_dir> (default <run_dir>/exports): one folder per format (its files + manifest.json),
export.json (every figure) and report.md (the table, also printed). Takes the same overrides as `distill eval`:
the held-out split and the teacher's side (agreement, KL) come from the config exactly as there.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from distill.data.build import build_data
from distill.errors import ConfigError
from distill.eval.runs import evaluate as evaluate_run
from distill.eval.runs import generation_stop_id
from distill.export import ALL_FORMATS, get_format
from distill.export.pipeline import export_student, scored_once
from distill.models.loading import check_model_folder, load_tokenizer
from distill.models.resolve import require_teacher
from distill.xtok.build import row_encoder
from launch.app import hydra_app
from launch.evaluate import heldout_teacher, model_tokenizer
from launch.extras import require_extra


def export(cfg: DictConfig) -> dict:
    """Returns {"out_dir", "rows"}: every figure of the report (its table is printed)."""
    require_extra("export", "distill export")
    if not cfg.export.model:
        raise ConfigError(
            "export.model is not set: pass the student folder, e.g. export.model=runs/<date>/<time>/student"
        )
    model_path = check_model_folder(cfg.export.model, hint="export.model must be a Hugging Face model folder")
    formats = [get_format(name) for name in cfg.export.formats or ALL_FORMATS]  # every name checked first
    out = Path(cfg.export.out_dir or Path(cfg.run_dir) / "exports")
    evaluate, stop_id = bound_evaluation(cfg, model_path) if cfg.export.evaluate else (None, 0)
    table, rows = export_student(model_path, formats, out, evaluate, stop_id)
    print(table)
    return {"out_dir": str(out), "rows": rows}


def bound_evaluation(cfg: DictConfig, model_path: Path):
    """`distill eval`'s evaluation bound to this config's held-out data and teacher outputs (scored once), and the
    token that ends a greedy output."""
    teacher_path = require_teacher(cfg)
    teacher_tokenizer = load_tokenizer(teacher_path)
    tokenizer = model_tokenizer(cfg, model_path, teacher_tokenizer)
    data = build_data(cfg, row_encoder(cfg, tokenizer, teacher_tokenizer))
    teacher = scored_once(heldout_teacher(cfg, teacher_path, teacher_tokenizer, tokenizer, data))
    return (lambda model: evaluate_run(cfg, model, tokenizer, data, teacher)), generation_stop_id(tokenizer)


@hydra_app
def main(cfg: DictConfig) -> None:
    export(cfg)
