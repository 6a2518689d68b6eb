"""`distill export export.model=<student folder> export.formats=[onnx-fp32,gguf-q8_0,...]`: deployment exports,
each loaded back in its runtime and evaluated by `distill eval`'s own code against the fp32 student.

Writes <export.out_dir> (default <run_dir>/exports): one folder per format (its files + manifest.json),
export.json (every figure) and report.md (the table, also printed). Takes the same overrides as `distill eval`:
the held-out split and the teacher's side (agreement, KL) come from the config exactly as there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from distill.config.schema import RunConfig
from distill.data.build import build_data
from distill.errors import ConfigError
from distill.eval.runs import evaluate as evaluate_run
from distill.eval.runs import generation_stop_id
from distill.export import ExportConfig, get_format
from distill.export.formats import ExportFormat
from distill.export.pipeline import evaluate_exports, size_rows, write_exports, write_report
from distill.models.loading import check_model_folder, load_tokenizer
from distill.models.resolve import require_teacher
from distill.xtok.build import row_encoder
from launch.app import hydra_app
from launch.evaluate import heldout_teacher, model_tokenizer
from launch.extras import require_extra


@dataclass
class ExportRunConfig(RunConfig):
    """The root schema of `distill export`: a run's config plus `export.*` (until ExportConfig joins RunConfig)."""

    export: ExportConfig = field(default_factory=ExportConfig)


def export(cfg: DictConfig) -> dict:
    require_extra("export", "distill export")
    if not cfg.export.model:
        raise ConfigError(
            "export.model is not set: pass the student folder, e.g. export.model=runs/<date>/<time>/student"
        )
    model_path = check_model_folder(cfg.export.model, hint="export.model must be a Hugging Face model folder")
    formats = [get_format(name) for name in cfg.export.formats]  # every name checked before any work
    out = Path(cfg.export.out_dir or Path(cfg.run_dir) / "exports")
    write_exports(model_path, formats, out)
    rows = evaluated_rows(cfg, model_path, formats, out) if cfg.export.evaluate else size_rows(formats, out)
    print(write_report(model_path, rows, out))
    return {"out_dir": str(out), "rows": rows}


def evaluated_rows(cfg: DictConfig, model_path: Path, formats: list[ExportFormat], out: Path) -> list[dict]:
    """`distill eval`'s evaluation bound to this config's held-out data and teacher outputs (scored once)."""
    teacher_path = require_teacher(cfg)
    teacher_tokenizer = load_tokenizer(teacher_path)
    tokenizer = model_tokenizer(cfg, model_path, teacher_tokenizer)
    data = build_data(cfg, row_encoder(cfg, tokenizer, teacher_tokenizer))
    teacher = _memo(heldout_teacher(cfg, teacher_path, teacher_tokenizer, tokenizer, data))
    return evaluate_exports(
        model_path,
        formats,
        out,
        lambda model: evaluate_run(cfg, model, tokenizer, data, teacher),
        generation_stop_id(tokenizer),
    )


def _memo(teacher):
    """The teacher's held-out outputs, scored once and reused by every format's evaluation."""
    if teacher is None:
        return None
    seen: dict = {}

    def outputs(batch_id, batch):
        key = tuple(batch_id)
        if key not in seen:
            seen[key] = teacher(batch_id, batch)
        return seen[key]

    return outputs


@hydra_app
def main(cfg: DictConfig) -> None:
    export(cfg)


# After hydra_app registered the run schema: this command's root schema also holds `export.*`.
ConfigStore.instance().store(name="run_schema", node=ExportRunConfig)
