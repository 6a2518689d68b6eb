"""LoRA on the student (peft): wrap for training, merge back for export.

The run folder's student/ must stay a plain Hugging Face folder (AutoModelForCausalLM, no adapter files), so
the adapters are merged into the base weights at export (`merge_for_export`).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from distill.errors import ConfigError

try:  # peft is an optional extra: only LoRA runs import this module
    import peft
    from peft import PeftModel
except ImportError as err:
    raise ConfigError(
        "student.lora.enabled=true needs peft, which is not installed: pip install -e '.[peft]' (the project's "
        "`peft` extra), or train the whole student with student.lora.enabled=false"
    ) from err

ALL_LINEAR = "all-linear"
"""peft's shorthand for every nn.Linear except the output layer: the attention and MLP projections."""


def apply_lora(model: PreTrainedModel, cfg) -> PeftModel:
    """Freeze `model` and add rank-`cfg.r` adapters to `cfg.target_modules`; only the adapters train.

    cfg: the `student.lora` section (or a `distill.config.schema.LoraConfig`): r, alpha, dropout,
    target_modules (module-name suffixes such as ["q_proj", "v_proj"], or ["all-linear"]). The adapters start
    as a zero update (peft initialises B = 0), so the wrapped model computes exactly what `model` did.
    """
    r, alpha, dropout, targets = cfg.r, cfg.alpha, cfg.dropout, list(cfg.target_modules)
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ConfigError(
            f"student.lora needs r >= 1, alpha > 0, 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}"
        )
    if not targets:
        raise ConfigError(f"student.lora.target_modules is empty; use [{ALL_LINEAR!r}] or module names")
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
        raise ConfigError(
            f"student.lora.target_modules={targets}: {err}. Module names here: {names}"
        ) from err


def merge_for_export(model: PreTrainedModel | PeftModel) -> PreTrainedModel:
    """The plain model to save: adapters folded into the base weights (W + alpha/r * B @ A); others as is.

    In place: after this the PeftModel wrapper must not be used; use the returned model (same outputs).
    """
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
