"""The export formats by name: how each is written from a student folder and loaded back into its runtime."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from torch import nn

from distill.errors import ConfigError
from distill.export import gguf_format, onnx_format
from distill.export.manifest import verify_export, write_export
from distill.models.loading import load_causal_lm


@dataclass
class Source:
    """The student folder being exported, its fp32 model loaded once, and a scratch folder holding the fp32 ONNX
    graph that the fp16 and int8 formats are converted from (exported once, whichever formats ask for it)."""

    folder: Path
    scratch: Path
    _model: nn.Module | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            self._model = load_causal_lm(self.folder)
        return self._model

    def onnx_fp32(self) -> Path:
        path = self.scratch / "onnx-fp32" / onnx_format.ONNX_FILE
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx_format.export_fp32(self.model, path)
        return path


@dataclass(frozen=True)
class ExportFormat:
    name: str
    runtime: str
    """Where it is loaded back: `onnxruntime`, or `transformers (gguf de-quantized)`."""
    exact_greedy: bool
    """True where greedy tokens must equal the fp32 student's (fp32 and fp16); quantized ones report agreement."""
    fill: Callable[[Source, Path], None]
    weights: tuple[str, ...]
    """Suffixes of the weight files (for the size on disk)."""
    load: Callable[[Path], object]

    def write(self, source: Source, dest: Path) -> Path:
        """The format's folder at `dest`, written atomically, its manifest last."""
        return write_export(dest, self.name, source.folder, lambda tmp: self.fill(source, tmp))

    def open(self, folder: Path, threads: int | None = None):
        """The export loaded in its runtime, after its manifest check (CheckpointError naming a damaged file)."""
        verify_export(folder, self.name)
        return self.load(folder, threads)


def _onnx_fill(kind: str, source: Source, tmp: Path) -> None:
    dst = tmp / onnx_format.ONNX_FILE
    if kind == "fp32":
        onnx_format.export_fp32(source.model, dst)
    else:
        convert = {"fp16": onnx_format.to_fp16, "int8": onnx_format.to_int8, "int4": onnx_format.to_int4}[
            kind
        ]
        convert(source.onnx_fp32(), dst)
    onnx_format.copy_side_files(source.folder, tmp)


def _onnx_load(folder: Path, threads: int | None = None):
    return onnx_format.OnnxCausalLM(folder / onnx_format.ONNX_FILE, threads)


def _gguf_fill(qtype: str, source: Source, tmp: Path) -> None:
    gguf_format.write_gguf(source.model, source.folder, tmp / gguf_format.gguf_file(qtype), qtype)


def _gguf_load(qtype: str, folder: Path, threads: int | None = None):
    return gguf_format.load_gguf(folder / gguf_format.gguf_file(qtype))


def _formats() -> dict[str, ExportFormat]:
    onnx_weights = (".onnx", ".onnx.data", ".data")
    found = {
        f"onnx-{kind}": ExportFormat(
            f"onnx-{kind}",
            "onnxruntime",
            kind in ("fp32", "fp16"),
            partial(_onnx_fill, kind),
            onnx_weights,
            _onnx_load,
        )
        for kind in ("fp32", "fp16", "int8", "int4")
    }
    for qtype in gguf_format.QUANT_TYPES:
        found[f"gguf-{qtype}"] = ExportFormat(
            f"gguf-{qtype}",
            "transformers (gguf de-quantized)",
            qtype in ("f32", "f16"),
            partial(_gguf_fill, qtype),
            (".gguf",),
            partial(_gguf_load, qtype),
        )
    return found


FORMATS = _formats()


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r} in export.formats; valid: {', '.join(FORMATS)}")
    return FORMATS[name]


def check_source(formats: list[ExportFormat], folder: Path) -> None:
    """Before any work: ConfigError if a requested format cannot hold this model's architecture."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    for fmt in formats:
        if fmt.name.startswith("gguf-"):
            gguf_format.check_supported(config, fmt.name.removeprefix("gguf-"))


def scratch_source(folder: Path) -> tuple[Source, tempfile.TemporaryDirectory]:
    """A Source whose scratch folder lives until the returned TemporaryDirectory is cleaned up."""
    tmp = tempfile.TemporaryDirectory(prefix="distill-export-")
    return Source(Path(folder), Path(tmp.name)), tmp
