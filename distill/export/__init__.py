"""Deployment exports of a student folder (ONNX for onnxruntime, GGUF for llama.cpp), each written with a manifest
and loaded back into a runtime whose forward the held-out evaluation runs (`distill export`, launch/export.py)."""

from distill.export.config import ALL_FORMATS
from distill.export.formats import FORMATS, ExportFormat, get_format
from distill.export.manifest import read_manifest, verify_export

__all__ = ["ALL_FORMATS", "FORMATS", "ExportFormat", "get_format", "read_manifest", "verify_export"]
