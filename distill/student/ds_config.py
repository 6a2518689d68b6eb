"""The DeepSpeed JSON of the student, built by one pure, validated function (no deepspeed import here).

Choices that matter on these machines:
- The optimizer is NOT declared here: the engine passes a torch AdamW as the client optimizer, so DeepSpeed
  never JIT-builds FusedAdam / DeepSpeedCPUAdam (~75 s each on a CPU) and the update is the reference
  trainer's AdamW bit for bit in math. torch AdamW is on DeepSpeed's list of ZeRO-supported optimizers.
- CPU optimizer offload (ZeRO-Offload) normally insists on DeepSpeedCPUAdam; `zero_force_ds_cpu_optimizer:
  false` lets the same torch AdamW run on the offloaded fp32 partition instead (correct everywhere; on a GPU
  cluster DeepSpeedCPUAdam would be faster, at the cost of that build).
- No optimizer or scheduler section: the LR schedule is the project's own LambdaLR (see engine.py).
"""

from __future__ import annotations

from typing import Any

from distill.errors import ConfigError

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
# DeepSpeed prints a progress line every `steps_per_print` steps; the trainer logs its own metrics.
_NEVER_PRINT = 2**31 - 1


def build_ds_config(
    *,
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float,
    precision: str = "fp32",
    offload_optimizer: bool = False,
    overlap_comm: bool = False,
    global_batch_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict for one student data-parallel group.

    zero_stage: 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters).
    micro_batch_size: sequences per rank per micro-step; grad_accum_steps: micro-steps per optimizer step;
        world_size: data-parallel ranks. train_batch_size = their product (DeepSpeed re-checks it).
    grad_clip: max global gradient norm; 0 disables clipping.
    precision: "fp32", or "bf16" (bf16 parameters and activations, fp32 master weights in the optimizer).
    offload_optimizer: keep optimizer states and the fp32 master partition in CPU memory (needs stage >= 1).
    overlap_comm: overlap gradient reduction with backward; only useful with CUDA streams, so off on CPU.
    global_batch_size: if given, must equal micro_batch_size * grad_accum_steps * world_size.
    """
    _check_args(
        zero_stage, micro_batch_size, grad_accum_steps, world_size, grad_clip, precision, global_batch_size
    )
    _check_flags(zero_stage, offload_optimizer=offload_optimizer, overlap_comm=overlap_comm)
    train_batch_size = micro_batch_size * grad_accum_steps * world_size
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage >= 1:
        zero["overlap_comm"] = overlap_comm
    if zero_stage == 3:
        # Lets engine.save_16bit_model / consolidated state dicts gather full weights on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        # pin_memory needs CUDA; on a CPU-only host the "offload" is a no-op copy anyway.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}

    config: dict[str, Any] = {
        "train_batch_size": train_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }
    if offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on the offloaded partition (see above)
    return config


def _check_args(
    zero_stage: int,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    grad_clip: float,
    precision: str,
    global_batch_size: int | None,
) -> None:
    _check_int("zero_stage", zero_stage, minimum=0)
    if zero_stage not in ZERO_STAGES:
        raise ConfigError(f"zero_stage={zero_stage} is not a ZeRO stage; valid: {ZERO_STAGES}")
    _check_int("micro_batch_size", micro_batch_size, minimum=1)
    _check_int("grad_accum_steps", grad_accum_steps, minimum=1)
    _check_int("world_size", world_size, minimum=1)
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or grad_clip < 0:
        raise ConfigError(f"grad_clip={grad_clip!r} must be a number >= 0 (0 disables clipping)")
    train_batch_size = micro_batch_size * grad_accum_steps * world_size
    if global_batch_size is not None and global_batch_size != train_batch_size:
        raise ConfigError(
            f"global_batch_size={global_batch_size} != micro_batch_size={micro_batch_size} x "
            f"grad_accum_steps={grad_accum_steps} x world_size={world_size} = {train_batch_size}"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not supported; valid: {PRECISIONS}")


def _check_flags(zero_stage: int, *, offload_optimizer: bool, overlap_comm: bool) -> None:
    for name, value in (("offload_optimizer", offload_optimizer), ("overlap_comm", overlap_comm)):
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false")
    if offload_optimizer and zero_stage == 0:
        raise ConfigError(
            "offload_optimizer=true needs ZeRO stage 1, 2 or 3 (ZeRO-Offload moves the sharded optimizer "
            f"partition to CPU); got zero_stage={zero_stage}. Set zero_stage>=1 or offload_optimizer=false."
        )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
