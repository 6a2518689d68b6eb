"""The export formats' names (the config, `export.*`, is `ExportConfig` in distill/config/schema.py)."""

from __future__ import annotations

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
"""What `distill export` writes when export.formats is empty."""
