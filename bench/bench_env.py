"""What the Ray benches share: the offline CPU environment every process they start inherits, and the tests' tiny
teacher recipe (tests/conftest.py TEST_OVERRIDES, so a bench reuses the teacher a test session trained)."""

from __future__ import annotations

import os

TINY = [
    "experiment=ci_tiny",
    "prepare.teacher_steps=150",
    "prepare.teacher_batch_size=16",
    "prepare.teacher_train_size=2000",
    "prepare.teacher_levels=[1]",
    "prepare.vocab_size=384",
    "prepare.eval_examples=16",
    "tracking.progress=false",
]


def offline_cpu_environment(**extra: str) -> None:
    """Set (unless already set) what the Makefile exports for tests, plus `extra`: before Ray, DeepSpeed or
    transformers are imported, so the actors and DeepSpeed's op builds see it too."""
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "DS_ACCELERATOR": "cpu",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_WAIT_POLICY": "PASSIVE",
        "TORCH_EXTENSIONS_DIR": os.path.expanduser("~/.cache/distill/torch_extensions"),
    }
    for name, value in {**defaults, **extra}.items():
        os.environ.setdefault(name, value)


def gkd_config(out: str, cfg, *, batch: int, max_steps: int, lmbda: float, **extra):
    """TRL's GKDConfig as the TRL side of bench/vs_trl.py and bench/onpolicy_throughput.py runs it: forward KL
    (beta 0) at T 1 on the CPU, one micro-batch of `batch` rows a step, no logging, checkpoints or loader workers."""
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(
        output_dir=out,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_steps=max_steps,
        learning_rate=cfg.optim.lr,
        lmbda=lmbda,
        beta=0.0,  # forward KL(teacher || student), like loss=kd
        seq_kd=False,
        temperature=1.0,
        bf16=False,  # its defaults are GPU ones (see STACK_NOTES)
        gradient_checkpointing=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10_000,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=cfg.data.max_length,
        **extra,
    )


def step_clock():
    """A transformers TrainerCallback that notes the time at the end of every optimizer step (`.marks`)."""
    import time

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.marks.append(time.perf_counter())

    return StepClock()
