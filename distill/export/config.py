"""`export.*`: what `distill export` writes. Standard library only, like every schema dataclass (it belongs beside
them in distill/config/schema.py once the run itself exports at its end)."""

from __future__ import annotations

from dataclasses import dataclass, field

ALL_FORMATS = [
    "onnx-fp32",
    "onnx-fp16",
    "onnx-int8",
    "onnx-int4",
    "gguf-f32",
    "gguf-f16",
    "gguf-q8_0",
    "gguf-q4_0",
]


@dataclass
class ExportConfig:
    model: str | None = None
    """The Hugging Face student folder to export (a run's student/)."""
    formats: list[str] = field(default_factory=lambda: list(ALL_FORMATS))
    """Any of ALL_FORMATS: ONNX (torch.onnx; fp16, int8 and int4 by onnxruntime's converters) and GGUF (gguf-py)."""
    out_dir: str | None = None
    """Where each format's folder, export.json and report.md go; None: <run_dir>/exports."""
    evaluate: bool = True
    """Load every export back in its runtime and evaluate it on the held-out split against the fp32 student."""
