"""GGUF files for llama.cpp, written with the `gguf` package (llama.cpp's own gguf-py: its writer, tensor-name map
and quantizers), laid out as llama.cpp's convert_hf_to_gguf.py lays out the same architecture.

Read back by transformers' GGUF loader (`from_pretrained(folder, gguf_file=...)`), which parses the metadata and
de-quantizes every tensor with gguf-py back into a torch model: the evaluation then runs the GGUF's own weights
(quantization error included) in torch. llama-cpp-python is not used: PyPI ships it as source only, a llama.cpp
build this machine's two shared cores cannot afford per install.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from distill.errors import ConfigError

# Hugging Face model_type -> llama.cpp architecture, for the architectures whose tensors map one to one (no q/k
# permutation, no fused projections) and whose GGUF transformers can read back. Phi-3 and DeepSeek-V3 would need
# llama.cpp's fused / MLA layouts: export those to ONNX.
ARCHS = {"qwen2": "qwen2"}
QUANT_TYPES = ("f32", "f16", "q8_0", "q4_0")
_BLOCK = 32  # q8_0 and q4_0 quantize rows in blocks of 32 values


def gguf_file(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def check_supported(config, qtype: str) -> None:
    if config.model_type not in ARCHS:
        raise ConfigError(
            f"GGUF export supports model_type {', '.join(ARCHS)} (llama.cpp architectures that map one to one); "
            f"this model is {config.model_type!r}: export it with the onnx-* formats instead."
        )
    if qtype not in QUANT_TYPES:
        raise ConfigError(f"unknown GGUF type {qtype!r}; valid: {', '.join(QUANT_TYPES)}")


def write_gguf(model: nn.Module, source: Path, path: Path, qtype: str) -> None:
    """`model` (an HF causal LM from `source`, which holds its tokenizer.json) as a GGUF of type `qtype`."""
    import gguf

    config = model.config
    check_supported(config, qtype)
    arch = ARCHS[config.model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, config, qtype)
    _write_tokenizer(writer, source / "tokenizer.json", config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd when the file has no output.weight
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: no llama.cpp tensor name for {name} ({config.model_type})")
        _add_tensor(writer, gguf_name, tensor.detach().float().numpy(), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_hparams(writer, config, qtype: str) -> None:
    import gguf

    file_type = "ALL_F32" if qtype == "f32" else f"MOSTLY_{qtype.upper()}"
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _write_tokenizer(writer, tokenizer_json: Path, config) -> None:
    """A byte-level BPE as llama.cpp's `gpt2` tokenizer model: tokens by id (rows past the tokenizer's last id
    padded as unused, as convert_hf_to_gguf does), merges, special ids. The pre-tokenizer is named `qwen2`
    (digits split one by one, as the demo tokenizer's Digits step does)."""
    import gguf

    tok = json.loads(tokenizer_json.read_text())
    if tok["model"]["type"] != "BPE":
        raise ConfigError(f"GGUF export writes BPE tokenizers; {tokenizer_json} is {tok['model']['type']}")
    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {
        a["id"]: a["content"] for a in tok["added_tokens"]
    }
    special = {a["id"] for a in tok["added_tokens"] if a.get("special", True)}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
    types = [
        gguf.TokenType.CONTROL
        if i in special
        else gguf.TokenType.NORMAL
        if i in by_id
        else gguf.TokenType.UNUSED
        for i in range(config.vocab_size)
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("eos_token_id", writer.add_eos_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(config, key, None) is not None:
            add(int(getattr(config, key)))


def _add_tensor(writer, name: str, array: np.ndarray, qtype: str) -> None:
    """Norms and biases (1-D) stay f32 in every type, as llama.cpp's converter keeps them."""
    import gguf

    if qtype == "f32" or array.ndim == 1:
        writer.add_tensor(name, array.astype(np.float32))
    elif qtype == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        kind = getattr(gguf.GGMLQuantizationType, qtype.upper())
        if array.shape[-1] % _BLOCK:
            raise ConfigError(
                f"GGUF {qtype}: {name} has rows of {array.shape[-1]} values, not a multiple of {_BLOCK}; "
                "use gguf-f16"
            )
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)


def load_gguf(path: Path) -> nn.Module:
    """The GGUF de-quantized into a transformers model (fp32), in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()
