"""ONNX exports run by onnxruntime: fp32 by torch.onnx (the dynamo exporter; optimum's ONNX exporter,
optimum-onnx 0.1.0, requires transformers < 4.58 and cannot be installed beside transformers 5), fp16 by
onnxruntime's own float16 converter, int8 by onnxruntime's dynamic quantization, int4 by its weight-only
MatMulNBits quantizer.

The graph is the model's forward without a KV cache: (input_ids, attention_mask, position_ids) [B, T] int64 ->
logits [B, T, V] fp32. Decoding re-runs the whole prefix each step, which is exact but slower than a cached
decoder; position_ids are an input so left-padded prompts get the positions Hugging Face's generate gives them.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

log = logging.getLogger("distill")

ONNX_FILE = "model.onnx"
INPUTS = ("input_ids", "attention_mask", "position_ids")
_EXTERNAL_DATA_BYTES = 1 << 30
# Kept in fp32 by the fp16 conversion (their weights, if any, still fp16): RMSNorm's mean of squares and the
# attention softmax, where fp16's 11-bit mantissa loses what the fp32 student's greedy choices depend on.
FP32_OPS = (
    "Pow",
    "ReduceMean",
    "Sqrt",
    "Reciprocal",
    "Softmax",
)  # protobuf cannot hold a file over 2 GiB: keep big weights beside the graph


class _LogitsOnly(nn.Module):
    """The exported signature: tensors in, logits out (no cache, no ModelOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.logits


def export_fp32(model: nn.Module, path: Path) -> None:
    """torch.onnx.export (dynamo) of `model` with batch and sequence as dynamic axes."""
    ids = torch.zeros((2, 8), dtype=torch.long)
    mask = torch.ones_like(ids)
    positions = torch.arange(8).expand(2, 8)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dims = {name: {0: batch, 1: seq} for name in INPUTS}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and torchvision notices
        program = torch.onnx.export(
            _LogitsOnly(model.eval()),
            (ids, mask, positions),
            input_names=list(INPUTS),
            output_names=["logits"],
            dynamic_shapes=dims,
            dynamo=True,
            verbose=False,
        )
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    program.save(str(path), external_data=big)


def to_fp16(src: Path, dst: Path) -> None:
    """Weights and activations in fp16, inputs and logits kept as they are (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    )
    onnx.save(model, str(dst), save_as_external_data=src.stat().st_size > _EXTERNAL_DATA_BYTES)


def to_int8(src: Path, dst: Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights per output channel, activations quantized at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_root_logger():  # the quantizer logs every tensor it skips at INFO on the root logger
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=src.stat().st_size > _EXTERNAL_DATA_BYTES,
        )


def to_int4(src: Path, dst: Path) -> None:
    """onnxruntime's weight-only 4-bit quantization: every MatMul with a constant weight becomes MatMulNBits
    (symmetric round-to-nearest in blocks of 32 along the input dimension; activations stay fp32). MatMulNBits is an
    onnxruntime contrib op: this graph runs in onnxruntime, not in other ONNX runtimes."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True)
    with _quiet_root_logger():
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
        quantizer.process()
    quantizer.model.save_model_to_file(
        str(dst), use_external_data_format=src.stat().st_size > _EXTERNAL_DATA_BYTES
    )


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def copy_side_files(source: Path, dest: Path) -> None:
    """config.json, generation_config.json and the tokenizer files beside the graph, as optimum lays a folder out."""
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith((".safetensors", ".safetensors.index.json", ".bin")):
            shutil.copy2(path, dest / path.name)


class OnnxCausalLM:
    """An onnxruntime session behind the interface the evaluation calls: `model(input_ids=, attention_mask=)
    .logits` and a greedy `generate` with Hugging Face's left-padding semantics."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # As OMP_WAIT_POLICY=PASSIVE for torch (launch/cli.py): threads that spin while waiting stall shared cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def eval(self) -> OnnxCausalLM:
        return self

    def __call__(self, input_ids, attention_mask=None, position_ids=None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        if position_ids is None:
            position_ids = hf_positions(attention_mask)
        feed = {
            "input_ids": input_ids.long().numpy(),
            "attention_mask": attention_mask.numpy(),
            "position_ids": position_ids.long().numpy(),
        }
        (logits,) = self.session.run(["logits"], feed)
        return SimpleNamespace(logits=torch.from_numpy(np.ascontiguousarray(logits)))

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask, *, max_new_tokens, pad_token_id, eos_token_id, **_):
        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id)


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as transformers' generate derives them: count of real tokens before each, 1 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def greedy_generate(model, input_ids, attention_mask, max_new_tokens: int, pad_id: int, eos_id: int):
    """Greedy decoding as Hugging Face's generate does it (do_sample=False): argmax of the last position, rows
    that emitted eos continue with pad, stop when every row has finished. Returns prompt + new tokens [B, T+n]."""
    ids, mask = input_ids.long(), attention_mask.long()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        nxt = logits[:, -1, :].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    return ids
