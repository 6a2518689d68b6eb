"""Tensor-parallel teacher: process group from the environment, sharded loading, vocab-parallel top-k.

Layout: one torch.distributed world per teacher replica, WORLD_SIZE = TP size (the Ray layer sets RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK per replica, as torchrun does, and calls `init_from_env`).
transformers' TP loader builds its device mesh over the whole default process group, which is why the TP
group is the world and not a sub-group.

Every rank loads only its shards (transformers reads each rank's slice of the safetensors), runs the same
forward on the same token ids, and keeps logits for its vocabulary slice [B, T, V / tp]. The top-k and the
log-normaliser are then combined with one all-gather of k candidates (+ one logsumexp) per rank, so no rank
ever holds the full [B, T, V] logits of a batch. Every rank returns the same TeacherBatch.

Device and backend come from the caller: `cpu` + `gloo` here, `cuda` + `nccl` on a cluster; nothing else
differs. Everything here is inference-only (the teacher is frozen).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.distributed import DistributedConfig

from distill.errors import ConfigError, TopologyError
from distill.models.loading import check_model_folder, load_causal_lm, resolve_dtype
from distill.teacher.topk import LSE_CHUNK_ROWS, topk_with_normalizer
from distill.teacher.tp_plan import (
    check_tp_size,
    kv_heads_for_rank,
    kv_heads_sharded,
    layer_glob,
    num_kv_heads,
    num_routed_experts,
    sharding_mismatches,
    teacher_tp_plan,
)

_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

# Candidate ids travel inside the fp32 all-gather buffer with the logits; fp32 holds integers exactly up to 2^24.
_MAX_PACKED_VOCAB = 2**24


# ------------------------------------------------------------------------------------------ process group
def init_from_env(backend: str, *, timeout_s: float = 1800.0) -> dist.ProcessGroup:
    """Initialise torch.distributed from torchrun-style env vars and return the TP group (the world).

    Reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (and LOCAL_RANK for nccl). Idempotent: a second call with
    the same backend and world size returns the existing group.
    """
    missing = [name for name in _ENV_VARS if name not in os.environ]
    if missing:
        raise TopologyError(
            f"cannot initialise the teacher TP group: environment variables {missing} are not set "
            f"(need {', '.join(_ENV_VARS)}, as torchrun or the Ray teacher actor sets them)"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if dist.is_initialized():
        _check_existing_group(backend, world)
        return dist.group.WORLD
    device_id = None
    if backend == "nccl":
        # Bind the GPU before the group exists so NCCL builds its communicator on the right device.
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device_id)
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        device_id=device_id,
    )
    return dist.group.WORLD


def _check_existing_group(backend: str, world: int) -> None:
    found_backend, found_world = dist.get_backend(), dist.get_world_size()
    if found_backend != backend or found_world != world:
        raise TopologyError(
            f"torch.distributed is already initialised with backend={found_backend!r}, world size {found_world}; "
            f"asked for backend={backend!r}, WORLD_SIZE={world}"
        )


def teardown() -> None:
    """Destroy the default process group (and every sub-group); a no-op when none exists."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _tp_size(group: dist.ProcessGroup | DeviceMesh | None) -> int:
    """The TP size implied by `group`; it must span the whole world (see the module docstring)."""
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise TopologyError(f"the teacher TP mesh must be 1-D, got a {group.ndim}-D mesh {group}")
        group = group.get_group()
    if not dist.is_initialized():
        if group is not None:
            raise TopologyError("a TP group was passed but torch.distributed is not initialised")
        return 1  # a single process: plain loading
    world = dist.get_world_size()
    size = world if group is None else dist.get_world_size(group)
    if size != world:
        raise TopologyError(
            f"TP group of {size} ranks inside a world of {world}: transformers' TP loader shards over the whole "
            "default process group, so start one torch.distributed world per teacher replica (WORLD_SIZE = TP size)"
        )
    return size


# ----------------------------------------------------------------------------------------------- loading
def load_tp_model(
    path: str | Path,
    *,
    group: dist.ProcessGroup | DeviceMesh | None = None,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str | None = None,
    experts: str = "expert_parallel",
    device: torch.device | str | None = None,
    hint: str | None = None,
) -> PreTrainedModel:
    """Load any HF causal LM folder sharded tensor-parallel over `group` (None: the default world), in eval mode.

    Collective: every rank of the group calls it with the same arguments. The TP size is checked against the
    config (heads, experts) before any weight is read, and raises the same TopologyError on every rank.
    experts  "expert_parallel" (each rank holds n_experts / tp whole experts) or "tensor_parallel" (each rank
             holds a slice of every expert); ignored for dense models.
    device   optional check: transformers places each rank on the machine's accelerator (cuda:LOCAL_RANK) or
             the CPU; a different request is a ConfigError rather than a silent move.
    Outside torch.distributed (or with a 1-rank world) this is plain `load_causal_lm`.
    """
    folder = check_model_folder(path, hint=hint)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    text_config = config.get_text_config()
    tp_size = _tp_size(group)
    check_tp_size(text_config, tp_size, experts)
    if tp_size == 1:
        model = load_causal_lm(folder, dtype=dtype, attn_implementation=attn_implementation)
        return model if device is None else model.to(device)
    _check_device(device)
    full_shapes, names, model_plans = _architecture(config)
    plan, expected = teacher_tp_plan(
        text_config,
        tp_size,
        experts=experts,
        prefix=_base_model_prefix(config),
        model_plans=model_plans,
        names=names,
    )
    expert_parallel = experts == "expert_parallel" and num_routed_experts(text_config) > 0
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=resolve_dtype(dtype),
        attn_implementation=attn_implementation,
        distributed_config=DistributedConfig(
            tp_size=tp_size, tp_plan=_loader_plan(plan), ep_size=tp_size if expert_parallel else 1
        ),
        local_files_only=True,
    )
    check_sharding(model, full_shapes, expected, tp_size)
    if num_routed_experts(text_config) and not expert_parallel:
        _sum_sliced_expert_outputs(model, expected)
    if "layers.*.self_attn.k_proj" in (text_config.base_model_tp_plan or {}) and not kv_heads_sharded(
        text_config, tp_size
    ):
        _trim_replicated_kv_heads(model, text_config, tp_size)
    return model.eval()


def _loader_plan(plan: dict[str, str]) -> dict[str, str]:
    """The plan as handed to transformers (a seam: the tests drop a rule here to prove `check_sharding` fires)."""
    return plan


def _architecture(
    config: PretrainedConfig,
) -> tuple[dict[str, tuple[int, ...]], set[str], tuple[dict[str, str], dict[str, str]]]:
    """What the model `config` builds: parameter name -> full shape, module and parameter names as layer globs,
    and the model's own resolved (TP plan, EP plan).

    Built on the meta device: no memory, whatever the model's size (DeepSeek-R1's 671B parameters included).
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    names = {layer_glob(name) for name, _ in model.named_modules()} | {layer_glob(name) for name in shapes}
    return shapes, names, (dict(model._tp_plan or {}), dict(model._ep_plan or {}))


def local_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of this rank's shard (the full shape for a replicated parameter)."""
    return {
        name: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
        for name, p in model.named_parameters(remove_duplicate=False)
    }


def tied_parameters(model: torch.nn.Module) -> list[set[str]]:
    """Groups of names that share one parameter (tied input and output embeddings)."""
    groups: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), set()).add(name)
    return [names for names in groups.values() if len(names) > 1]


def check_sharding(
    model: PreTrainedModel, full_shapes: dict[str, tuple[int, ...]], expected: dict[str, str], tp_size: int
) -> None:
    """Raise TopologyError unless every parameter of this rank has the local shape the expected layout gives it.

    A rule the loader did not apply (a renamed module, a style a transformers release dropped) would otherwise
    replicate that weight on every rank, found only when a 671B teacher runs out of memory.
    """
    problems = sharding_mismatches(
        local_shapes(model), full_shapes, expected, tp_size, dist.get_rank(), tied_parameters(model)
    )
    if problems:
        shown = "\n  ".join(problems[:12]) + (
            f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else ""
        )
        raise TopologyError(
            f"the teacher was not sharded as planned on rank {dist.get_rank()} of TP {tp_size} "
            f"(transformers {transformers.__version__}):\n  {shown}\n"
            "Install the locked transformers version (requirements.lock), or report the mismatch with this message."
        )


def _sum_sliced_expert_outputs(model: PreTrainedModel, expected: dict[str, str]) -> None:
    """experts='tensor_parallel': each rank ran its slice of every expert's intermediate dim; sum the partial outputs.

    The experts run on local tensors (`local_params`), so the sum is one all-reduce of each experts module's output
    (what transformers' deprecated `moe_tp_experts` style did), installed here so no deprecated style is needed.
    """
    expert_globs = {name.rsplit(".", 1)[0] for name, style in expected.items() if style == "packed_colwise"}
    for name, module in model.named_modules():
        if layer_glob(name) in expert_globs:
            module.register_forward_hook(_all_reduce_output)


def _all_reduce_output(_module: torch.nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(output)
    return output


def _base_model_prefix(config: PretrainedConfig) -> str:
    """Where the decoder lives inside the causal LM ("model" for DeepSeek, Qwen2, Llama)."""
    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise ConfigError(
            f"{type(config).__name__} ({config.model_type}) is not a causal-LM config transformers knows"
        )
    return mapping[type(config)].base_model_prefix


def _check_device(device: torch.device | str | None) -> None:
    """transformers' TP loader uses the current accelerator, or the CPU when there is none."""
    if device is None:
        return
    accelerator = torch.accelerator.current_accelerator() or torch.device("cpu")
    if torch.device(device).type != accelerator.type:
        raise ConfigError(
            f"teacher device {device!r} does not match this machine's {accelerator.type!r}: the tensor-parallel "
            f"loader places every rank on the {accelerator.type} device (cuda:LOCAL_RANK on GPUs)"
        )


def _trim_replicated_kv_heads(model: PreTrainedModel, config: PretrainedConfig, tp_size: int) -> None:
    """Replicated K/V projections -> only the KV heads this rank's query heads read (see `kv_heads_for_rank`).

    The attention code reads the head count from the tensors (`view(..., -1, head_dim)`) and the query-per-KV
    ratio from `num_key_value_groups`, so trimming the weights and setting that ratio is all it needs.
    """
    for layer in model.get_decoder().layers:
        attn = layer.self_attn
        rank = attn.q_proj.weight.device_mesh.get_local_rank()  # the rank's slot in its query-head shard
        kv, groups = kv_heads_for_rank(config.num_attention_heads, num_kv_heads(config), tp_size, rank)
        rows = torch.cat([torch.arange(h * attn.head_dim, (h + 1) * attn.head_dim) for h in kv])
        for proj in (attn.k_proj, attn.v_proj):
            _keep_output_rows(proj, rows)
        attn.num_key_value_groups = groups


def _keep_output_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> None:
    for name in ("weight", "bias"):
        param = getattr(linear, name)
        if param is not None:
            setattr(linear, name, torch.nn.Parameter(param.detach()[rows].clone(), requires_grad=False))
    linear.out_features = len(rows)


# ---------------------------------------------------------------------------------- vocab-parallel top-k
def vocab_shard(model: PreTrainedModel) -> tuple[int, int]:
    """(first global token id of this rank's lm_head slice, full vocabulary size).

    The slice follows torch's Shard(0) chunking: ceil(V / tp) rows per rank, the last rank(s) shorter.
    """
    weight = model.get_output_embeddings().weight
    vocab = weight.shape[0]
    if not isinstance(weight, DTensor):
        return 0, vocab
    assert weight.placements == (Shard(0),), f"lm_head should be vocab-sharded, got {weight.placements}"
    mesh = weight.device_mesh
    chunk = math.ceil(vocab / mesh.size())
    offset = min(mesh.get_local_rank() * chunk, vocab)
    assert weight.to_local().shape[0] == min(chunk, vocab - offset), "unexpected lm_head shard size"
    return offset, vocab


def vocab_parallel_topk_with_normalizer(
    local_logits: torch.Tensor,
    k: int,
    group: dist.ProcessGroup | None,
    vocab_offset: int,
    *,
    chunk_rows: int = LSE_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`topk_with_normalizer` over a vocabulary sharded across `group`.

    local_logits [B, T, V_r]: this rank's logits for global token ids [vocab_offset, vocab_offset + V_r)
    -> ids [B, T, k] int32 (global ids), values [B, T, k] (local_logits' dtype, sorted descending),
       log_normalizer [B, T] fp32 = logsumexp over the full vocabulary.
    Collective: every rank calls it with the same k and [B, T], and all get the same result. The global top-k is
    among the ranks' local top-k, so one all-gather of k candidates per rank suffices; the logsumexp of the
    local logsumexps is the global one.
    """
    assert vocab_offset + local_logits.shape[-1] <= _MAX_PACKED_VOCAB, (
        "token ids would not survive fp32 packing"
    )
    local_k = min(k, local_logits.shape[-1])
    ids, values, lse = topk_with_normalizer(local_logits, local_k, chunk_rows=chunk_rows)
    gathered = _all_gather(_pack_candidates(ids.long() + vocab_offset, values, lse, k), group)
    cand_ids, cand_values, lses = _unpack_candidates(gathered, k)  # [B, T, tp*k] x2, [tp, B, T]
    top_values, pos = torch.topk(cand_values, k, dim=-1)
    top_ids = cand_ids.gather(-1, pos)
    return top_ids.to(torch.int32), top_values.to(local_logits.dtype), torch.logsumexp(lses, dim=0)


def _pack_candidates(ids: torch.Tensor, values: torch.Tensor, lse: torch.Tensor, k: int) -> torch.Tensor:
    """ids, values [B, T, k_r], lse [B, T] -> one fp32 buffer [B, T, 2k + 1], so a single collective moves all.

    A rank with fewer than k tokens pads with -inf logits (never chosen: the full vocabulary has >= k tokens).
    fp32 holds bf16/fp16 logits and ids < 2^24 exactly.
    """
    pad = k - ids.shape[-1]
    values = torch.nn.functional.pad(values.float(), (0, pad), value=-math.inf)
    ids = torch.nn.functional.pad(ids.float(), (0, pad), value=-1.0)
    return torch.cat([ids, values, lse.unsqueeze(-1)], dim=-1)


def _unpack_candidates(gathered: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[tp, B, T, 2k + 1] -> candidate ids [B, T, tp*k] int64, values [B, T, tp*k] fp32, lse [tp, B, T]."""
    merged = gathered.movedim(0, -2)  # [B, T, tp, 2k + 1]
    ids = merged[..., :k].flatten(-2).long()
    values = merged[..., k : 2 * k].flatten(-2)
    return ids, values, gathered[..., 2 * k]


def _all_gather(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[...] on every rank -> [world, ...] in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def gather_vocab(
    local_logits: torch.Tensor, group: dist.ProcessGroup | None, vocab_size: int
) -> torch.Tensor:
    """[..., V_r] vocab shards -> [..., V] full logits on every rank (evaluation and generation only)."""
    chunk = math.ceil(vocab_size / dist.get_world_size(group))
    padded = torch.nn.functional.pad(local_logits, (0, chunk - local_logits.shape[-1]))
    return torch.cat(list(_all_gather(padded, group).unbind(0)), dim=-1)[..., :vocab_size]


@contextmanager
def full_vocab_logits(
    model: PreTrainedModel, group: dist.ProcessGroup | None, vocab_size: int
) -> Iterator[None]:
    """Within the block the model returns full-vocabulary logits (its lm_head output is all-gathered).

    For `generate` (greedy argmax over the whole vocabulary) and evaluation; scoring keeps the shards.
    """
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _module, _inputs, out: gather_vocab(out, group, vocab_size)
    )
    try:
        yield
    finally:
        hook.remove()


def tp_mean_over_heads(attention: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[B, heads_r, T, T] local heads -> [B, T, T] fp32 mean over all heads (every rank holds as many heads)."""
    mean = attention.float().mean(dim=1)
    dist.all_reduce(mean, group=group)  # SUM: gloo has no AVG
    return mean / dist.get_world_size(group)


def engine_hooks(model: PreTrainedModel) -> dict[str, Any]:
    """TeacherEngine keyword arguments that make a TP-sharded `model` score exactly like the unsharded one."""
    weight = model.get_output_embeddings().weight
    if not isinstance(weight, DTensor):
        return {"device": weight.device}
    group = weight.device_mesh.get_group()
    offset, vocab = vocab_shard(model)
    if vocab > _MAX_PACKED_VOCAB:
        raise ConfigError(
            f"vocabulary of {vocab} tokens exceeds the vocab-parallel top-k limit {_MAX_PACKED_VOCAB}"
        )
    return {
        "device": weight.device,
        "topk_fn": partial(vocab_parallel_topk_with_normalizer, group=group, vocab_offset=offset),
        "head_mean_fn": partial(tp_mean_over_heads, group=group),
        "full_vocab_logits": partial(full_vocab_logits, model, group, vocab),
    }
