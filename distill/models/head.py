"""The student's forward without its output head: the last hidden states and the head, for the fused loss.

The unfused forward ends in `lm_head(hidden)`, logits [B, T, V]: at V = 151,936 and 8k tokens, 2.5 GB of bf16
before any loss. `headless_forward` runs the decoder only and hands back the head as (weight, bias, softcap),
which `distill.losses.fused` applies chunk by chunk. That is only the same model when its causal-LM forward is
exactly `lm_head(hidden)` (+ Gemma's final soft-capping): the architectures below were read for that, and
tests/test_fused_head.py checks each against the model's own logits. Any other one is refused with the switch
to the unfused path, rather than trained on logits the model would not produce.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from distill.errors import ConfigError

# model_type -> whether its causal-LM forward applies config.final_logit_softcapping after the head.
FUSABLE_MODEL_TYPES = {
    "qwen2": False,
    "qwen3": False,
    "qwen2_moe": False,
    "qwen3_moe": False,
    "llama": False,
    "mistral": False,
    "phi3": False,
    "gemma": False,
    "gemma2": True,
    "gemma3_text": True,
    "deepseek_v3": False,
}
_UNFUSED_HINT = "set loss.fused_head=false to train it with materialised logits"


@dataclass(frozen=True)
class OutputHead:
    """logits = softcap * tanh((hidden @ weight^T + bias) / softcap), the last two only where set."""

    weight: Tensor  # [V, H], possibly tied to the input embedding
    bias: Tensor | None
    softcap: float | None


@dataclass
class HeadlessOutput:
    """What the fused objective reads from the student forward (the unfused one reads CausalLMOutput)."""

    last_hidden_state: Tensor  # [B, T, H], after the final norm: the head's input
    head: OutputHead
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_fusable_type(model_type: str | None) -> None:
    """ConfigError unless models of this `model_type` (config.json) end in a head the fused loss reproduces."""
    if model_type not in FUSABLE_MODEL_TYPES:
        raise ConfigError(
            f"loss.fused_head: the {model_type!r} architecture is not known to end in a plain linear head "
            f"(known: {', '.join(sorted(FUSABLE_MODEL_TYPES))}); {_UNFUSED_HINT}."
        )


def check_fusable(model: nn.Module) -> None:
    """ConfigError unless the fused head computes exactly this model's logits."""
    lm = causal_lm(model)
    check_fusable_type(getattr(lm.config, "model_type", None))
    head = lm.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise ConfigError(
            f"loss.fused_head: the student's output head is a {type(head).__name__}, not a plain nn.Linear "
            f"(a LoRA adapter on lm_head?); leave lm_head out of lora.target_modules or {_UNFUSED_HINT}."
        )


def output_head(model: nn.Module) -> OutputHead:
    """The head of a fusable model. Read it inside the forward that uses it: under ZeRO-3 the access is what
    gathers the partitioned weight (DeepSpeed registers it as an external parameter of the running module)."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    softcap = lm.config.final_logit_softcapping if FUSABLE_MODEL_TYPES[lm.config.model_type] else None
    return OutputHead(head.weight, head.bias, softcap)


def headless_forward(
    model: nn.Module,
    *,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> HeadlessOutput:
    """The decoder's forward (LoRA layers, activation checkpointing and ZeRO-3 hooks included), no head."""
    out = causal_lm(model).get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=output_hidden_states,
        output_attentions=output_attentions,
        use_cache=False,
    )
    return HeadlessOutput(
        last_hidden_state=out.last_hidden_state,
        head=output_head(model),
        hidden_states=out.hidden_states if output_hidden_states else None,
        attentions=out.attentions if output_attentions else None,
    )
