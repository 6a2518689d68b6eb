"""The student's DeepSpeed seam: the only module of the project that imports deepspeed.

One `StudentEngine` per rank wraps `deepspeed.initialize` around the student AND the objective (whose hidden-state
projectors are trained with it), with a torch AdamW client optimizer and the project's LambdaLR schedule. The
trainer outside this folder talks to it through `train_step`, `save_checkpoint` / `load_checkpoint`, `logits`
and `export_hf`, and starts the process group with `init_distributed_from_env`.

Loss scaling (why one step here equals the reference trainer's step on the whole global batch):
  the reference accumulates  g = sum over all micro-batches m of grad(L_m) / N,  with L_m the weighted sum of
  term sums of m and N the trained tokens of the whole optimizer step (all ranks, all micro-batches).
  DeepSpeed averages gradients over the W data-parallel ranks, so rank r's micro-batch m is backpropagated
  as  L_m * W / N:  mean over ranks of sum over r's micro-batches of grad(L_m) * W / N  =  g.
  `engine.backward(..., scale_wrt_gas=False)` turns off DeepSpeed's own 1/gradient_accumulation_steps: it is
  meant for per-micro-batch MEAN losses (which weight micro-batches equally whatever their token counts); our
  loss is already over the global count, so it would only shrink the gradient gradient_accumulation_steps-fold.
  Undoing DeepSpeed's rank average with W (rather than all-reducing a token count per micro-batch) is exact
  because N is known before the first forward: the caller counts loss_mask tokens of the whole step.
Clipping, the accumulation boundary and ZeRO partitioning stay DeepSpeed's (`engine.backward` / `engine.step`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.config.schema import OptimizerConfig
from distill.curriculum.stages import StepPlan
from distill.errors import CheckpointError, ConfigError, TopologyError
from distill.io import atomic_write_text, fsync_path
from distill.models.loading import save_model
from distill.training.grad_shares import measure_shares_on_aliases, measures_shares
from distill.training.objective import Objective
from distill.training.reference import MicroBatch, build_optimizer, student_forward
from distill.training.schedule import optim_lr

# deepspeed.initialize reads LOCAL_RANK itself (device choice), so it is required even on CPU.
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# DeepSpeed returns its own bookkeeping (param_shapes, ds_config, ...) mixed into the client state on load; the
# caller's state travels under one key so it comes back exactly as given.
_CLIENT_KEY = "distill_client_state"


def use_interpreters_ninja() -> None:
    """Put this interpreter's bin folder first on PATH when it holds `ninja` (the lock installs one).

    DeepSpeed JIT-builds its ops (the CPU comm op at process-group start) with whichever `ninja` PATH finds first,
    into TORCH_EXTENSIONS_DIR, which every process of a user shares (often a home folder on NFS). A process that
    finds the system's ninja (1.11: build log v5) and one that finds the environment's (1.13: v7) each discard
    the other's build log and rebuild from scratch, 25-60 s a time: a test session here rebuilt it 3-4 times,
    because pytest and its subprocesses found the system's and the Ray actors the environment's.
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bin_dir] and os.path.exists(os.path.join(bin_dir, "ninja")):
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])


def init_distributed_from_env(backend: str, *, timeout_s: float = 1800.0) -> tuple[int, int]:
    """Join the student's process group from torchrun-style env vars; returns (rank, world_size).

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torchrun and the Ray student actors set them).
    backend: `gloo` on CPU, `nccl` on GPUs. Idempotent: an existing process group is reused.
    """
    missing = [name for name in _ENV_VARS if name not in os.environ]
    if missing:
        raise TopologyError(
            f"cannot initialise the student process group: environment variables {missing} are not set "
            f"(need {', '.join(_ENV_VARS)}, as torchrun or the Ray student actor sets them)"
        )
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    use_interpreters_ninja()
    # auto_mpi_discovery=False: the env above is the contract; never probe for mpi4py.
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=False
    )
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    """Leave the process group (end of a run or of a test worker)."""
    if dist.is_initialized():
        dist.destroy_process_group()


class _StudentWithObjective(nn.Module):
    """What DeepSpeed wraps: student + objective as one module, so the projectors are trained, sharded and
    checkpointed with the student, and ZeRO-3's fetch hooks cover every parameter the loss touches.

    Parameter order (student first, then objective) is the reference trainer's.
    """

    def __init__(self, student: PreTrainedModel, objective: Objective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(
        self, batch: Mapping[str, torch.Tensor | None], plan: StepPlan | None = None
    ) -> dict[str, torch.Tensor]:
        """One micro-batch -> {term label: loss sum} (unweighted, unnormalised, as the objective returns)."""
        return self.objective(student_forward(self.student, self.objective, batch, plan), batch, plan)


class StudentEngine:
    """One data-parallel rank of the DeepSpeed student. Call `init_distributed_from_env` first.

    model: the student causal LM (fp32; DeepSpeed casts it to bf16 if the config says so).
    objective: the weighted loss terms; its parameters (hidden-state projectors) are trained too.
    optim: an `OptimizerConfig` (lr, weight_decay, betas, eps, schedule, warmup_steps, min_lr_ratio); the
        clipping norm comes from ds_config (`build_ds_config(grad_clip=optim.grad_clip, ...)`).
    total_steps: optimizer steps of the schedule (as the reference trainer's LambdaLR).
    lr_schedule: step -> multiplier of optim.lr (a curriculum's restarting schedule); None: optim's schedule
        over total_steps.
    ds_config: from `distill.student.build_ds_config`.
    gradient_checkpointing: recompute decoder layers in backward (HF activation checkpointing).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        objective: Objective,
        *,
        optim: OptimizerConfig,
        total_steps: int,
        ds_config: dict[str, Any],
        gradient_checkpointing: bool = False,
        lr_schedule: Callable[[int], float] | None = None,
        share_every: int = 0,
    ) -> None:
        if not dist.is_initialized():
            raise TopologyError(
                "StudentEngine needs a process group: call init_distributed_from_env(backend) first"
            )
        if gradient_checkpointing:
            enable_activation_checkpointing(model)
        module = _StudentWithObjective(model, objective)
        optimizer = build_optimizer(
            module.parameters(),
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            betas=optim.betas,
            eps=optim.eps,
        )

        multiplier = lr_schedule or optim_lr(optim, total_steps)

        # DeepSpeed steps the scheduler after each applied optimizer step and saves/loads its state with the
        # checkpoint (a closure is not pickled: LambdaLR stores only its counter for plain functions).
        self.engine, *_ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, multiplier),
            config=ds_config,
        )
        _load_weights_only(self.engine)
        self.objective = objective
        self.zero_stage = self.engine.zero_optimization_stage()
        # ZeRO-3 partitions the parameters, so a per-term autograd.grad has no full gradient to measure.
        self.share_every = share_every if self.zero_stage < 3 else 0
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        # ZeRO and the bf16 optimizer report the pre-clip global norm; plain fp32 data parallel does not.
        self._own_grad_norm = not (self.engine.zero_optimization() or self.engine.bfloat16_enabled())

    @property
    def student(self) -> PreTrainedModel:
        return self.engine.module.student

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def grad_accum_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    # ---- training ------------------------------------------------------------------------------------------
    def train_step(
        self,
        step: int,
        micro_batches: Sequence[MicroBatch],
        global_tokens: int,
        plan: StepPlan | None = None,
    ) -> dict[str, Any]:
        """One optimizer step over this rank's share of the global batch.

        micro_batches: exactly `grad_accum_steps` dicts (TeacherBatch.to_torch() or input_ids / attention_mask /
            loss_mask [B, T]) for this rank.
        global_tokens: trained tokens (loss_mask.sum()) of the whole step, over ALL ranks and micro-batches.
        plan: the curriculum's plan of this step (temperature, term weights); None: the configured objective.
        Returns {"step", "terms": {label: this rank's loss sum}, "loss_sum": weighted sum of those, "tokens":
        this rank's trained tokens, "grad_norm" (global, before clipping), "lr" (used by this step)}.
        Summed over ranks and divided by global_tokens, terms and loss_sum give the reference trainer's numbers.
        """
        tokens = self._rank_tokens(micro_batches, global_tokens)
        scale = self.world_size / max(global_tokens, 1)  # see the module docstring
        self.engine.train()
        lr = float(self.engine.get_lr()[0])
        steps_before = self.engine.global_steps
        grad_norm = None
        term_sums: dict[str, torch.Tensor] = {}
        shares: dict[str, float] = {}
        measure = self.rank == 0 and measures_shares(step, self.share_every)
        for i, mb in enumerate(micro_batches):
            mb = {k: (v.to(self.device) if v is not None else None) for k, v in mb.items()}
            sums = self.engine(mb, plan)
            if i == 0 and measure:
                shares = measure_shares_on_aliases(self.engine.module, partial(self._weighted, mb, plan))
            self.engine.backward(self.objective.weighted_total(sums, plan) * scale, scale_wrt_gas=False)
            if self._own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                grad_norm = _global_norm(self.engine.module.parameters())  # grads already all-reduced
            self.engine.step()  # applies the update only at the accumulation boundary (the last micro-batch)
            for label, s in sums.items():
                term_sums[label] = term_sums.get(label, 0.0) + s.detach()
        assert self.engine.global_steps == steps_before + 1, (
            "micro-batches out of step with DeepSpeed's counter"
        )
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        terms = {label: float(s) for label, s in term_sums.items()}  # one sync point per step
        return {
            "step": step,
            "terms": terms,
            "loss_sum": sum(self.objective.weight(label, plan) * v for label, v in terms.items()),
            "tokens": tokens,
            "grad_norm": float(grad_norm),
            "lr": lr,
            "grad_shares": shares,
        }

    def _weighted(self, mb: MicroBatch, plan: StepPlan | None, module: nn.Module, params: dict) -> dict:
        """The micro-batch's weighted terms through `module` with `params` in place of its own."""
        return self.objective.weighted_terms(torch.func.functional_call(module, params, (mb, plan)), plan)

    def _rank_tokens(self, micro_batches: Sequence[MicroBatch], global_tokens: int) -> int:
        """This rank's trained tokens, after checking the step's micro-batch count and global token count."""
        accum = self.grad_accum_steps
        if len(micro_batches) != accum:
            raise ConfigError(
                f"train_step got {len(micro_batches)} micro-batches but the engine accumulates "
                f"gradient_accumulation_steps={accum} per optimizer step; pass exactly {accum}"
            )
        tokens = sum(int(mb["loss_mask"].sum()) for mb in micro_batches)
        if global_tokens < tokens:
            raise ValueError(
                f"global_tokens={global_tokens} is less than this rank's own {tokens} trained tokens"
            )
        return tokens

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Student logits [B, T, V] (eval mode). Under ZeRO-3 every rank must call it (parameters are gathered)."""
        was_training = self.engine.training
        self.engine.eval()
        try:
            out = self.student(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device).long(),
                use_cache=False,
            )
            return out.logits
        finally:
            self.engine.train(was_training)

    # ---- checkpoints and export ----------------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path, client_state: Mapping[str, Any]) -> Path:
        """Write a DeepSpeed checkpoint (module, optimizer partitions, LR schedule, step counters) plus
        `client_state` (the caller's data cursor, RNG states, ...). Every rank must call it; returns the tag folder.

        As torch.distributed.checkpoint's `sync_files`: each rank fsyncs the files it wrote, and once all have,
        rank 0 switches DeepSpeed's `latest` file atomically (temp file + rename, fsynced; DeepSpeed's own is a
        plain overwrite), so a save that fails part-way leaves the previous tag loadable. The run's checkpoints
        are atomic one level up too: `CheckpointStore.write` hands the ranks a temporary folder.
        """
        directory = Path(directory)
        tag = f"global_step{self.engine.global_steps}"
        with _fsync_each_save(self.engine.checkpoint_engine):
            self.engine.save_checkpoint(
                str(directory), tag=tag, client_state={_CLIENT_KEY: dict(client_state)}, save_latest=False
            )
        dist.barrier()  # DeepSpeed's save ends with one too; repeated here because `latest` relies on it
        if self.rank == 0:
            atomic_write_text(directory / "latest", tag, durable=True)
        dist.barrier()  # no rank returns (and no caller commits the folder) before `latest` names the tag
        return directory / tag

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore the latest checkpoint in `directory` exactly; returns the saved client_state.

        Every rank must call it, with the same world size and ZeRO stage as when it was saved. A file torch cannot
        read is a CheckpointError naming it (a file damaged in a way torch does not notice, e.g. flipped bits in
        a tensor, is caught only by the manifest of `CheckpointStore`, which the driver checks first).
        """
        directory = Path(directory)
        if not (directory / "latest").is_file():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "no such folder"
            raise CheckpointError(
                f"{directory} holds no DeepSpeed checkpoint (no 'latest' file; found: {found}); "
                "point it at a folder written by StudentEngine.save_checkpoint"
            )
        tag = (directory / "latest").read_text().strip()
        if not (directory / tag).is_dir():
            raise CheckpointError(
                f"{directory / 'latest'} names {tag!r}, which is not a folder in {directory}; write the name of "
                "a global_step* folder there"
            )
        with _naming_unreadable_files(self.engine.checkpoint_engine):
            path, states = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None or _CLIENT_KEY not in states:
            raise CheckpointError(
                f"{directory} holds a DeepSpeed checkpoint that StudentEngine.save_checkpoint did not write "
                f"(no {_CLIENT_KEY!r} entry)"
            )
        return states[_CLIENT_KEY]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's full weights (CPU copies, training dtype) on rank 0, None on the others: what a rollout
        actor loads (on-policy stages). Every rank must call it; under ZeRO-3 the parameters are gathered."""
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None):
                return self._state_copy() if self.rank == 0 else None
        return self._state_copy() if self.rank == 0 else None

    def _state_copy(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().to("cpu", copy=True) for name, t in self.student.state_dict().items()}

    def export_hf(self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None) -> Path:
        """Write the student (without the objective's projectors) as a Hugging Face folder (safetensors).

        Every rank must call it; rank 0 writes. Under ZeRO-3 the full parameters are gathered on every rank for
        the write (fine up to what one rank can hold; larger models: `zero_to_fp32` on a saved checkpoint).
        Weights keep the training dtype (bf16 with precision="bf16").
        """
        out_dir = Path(out_dir)
        if self.zero_stage == 3:
            with deepspeed.zero.GatheredParameters(list(self.student.parameters()), modifier_rank=None):
                if self.rank == 0:
                    save_model(self.student, tokenizer, out_dir)
        elif self.rank == 0:
            save_model(self.student, tokenizer, out_dir)
        dist.barrier()  # nobody reads the folder before rank 0 has renamed it into place
        return out_dir


def _load_weights_only(engine) -> None:
    """Every checkpoint file DeepSpeed reads goes through torch.load(weights_only=True): its TorchCheckpointEngine
    passes weights_only=False, which unpickles arbitrary objects from a file someone else may have written. Our
    checkpoints hold tensors, containers and numbers only (the client state is plain data)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # DeepSpeed's own plain-data classes in its optimizer state (a loss scaler even without fp16, the ZeRO stage,
    # the flat-buffer addresses of parameter fragments).
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    checkpoint_engine = engine.checkpoint_engine

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    checkpoint_engine.load = load


@contextmanager
def _fsync_each_save(checkpoint_engine) -> Iterator[None]:
    """fsync every file this rank's DeepSpeed checkpoint engine saves, right after it is written."""
    save = checkpoint_engine.save

    def save_durably(state_dict, path: str) -> None:
        save(state_dict, path)
        fsync_path(path)

    checkpoint_engine.save = save_durably
    try:
        yield
    finally:
        checkpoint_engine.save = save


@contextmanager
def _naming_unreadable_files(checkpoint_engine) -> Iterator[None]:
    """Turn torch's errors for a file it cannot load (a truncated or damaged file: RuntimeError / EOFError, which
    name no path) into a CheckpointError naming the file. Refused objects (UnpicklingError) pass as they are."""
    load = checkpoint_engine.load

    def load_or_name(path: str, map_location=None):
        try:
            return load(path, map_location=map_location)
        except (RuntimeError, EOFError) as err:
            raise CheckpointError(
                f"{path} cannot be loaded ({err}); if the file is damaged (truncated, overwritten), resume from "
                "an older checkpoint"
            ) from err

    checkpoint_engine.load = load_or_name
    try:
        yield
    finally:
        checkpoint_engine.load = load


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """HF activation (gradient) checkpointing, non-reentrant (works with ZeRO-3's parameter hooks)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _global_norm(params: Iterable[nn.Parameter]) -> float:
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
