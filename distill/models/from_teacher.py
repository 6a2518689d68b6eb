"""A student initialised from its teacher's layers (`student.init_from_teacher`), as DistilBERT was.

The student is the teacher's own architecture with fewer decoder layers: the embeddings, the final norm, the
output head and the picked layers are copied, so it starts as a pretrained model that already speaks the
teacher's tokens instead of from noise. Only for pairs of one architecture (a shallower Qwen2.5 from a Qwen2.5,
a shallower Gemma 3 from a Gemma 3); R1 -> Qwen2.5 has two architectures and starts from the student's own
pretrained checkpoint (`student.path`) instead.
"""

from __future__ import annotations

import copy
import re

from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from distill.errors import ConfigError

_LAYER_KEY = re.compile(r"^(.*\.layers\.)(\d+)(\..*)$")


def evenly_spaced_layers(teacher_depth: int, count: int) -> list[int]:
    """`count` teacher layer indices spread over its depth, first and last included (count 1: the first)."""
    if not 1 <= count <= teacher_depth:
        raise ConfigError(
            f"student.num_layers={count}: a student initialised from the teacher takes between 1 and the "
            f"teacher's {teacher_depth} layers."
        )
    if count == 1:
        return [0]
    return [round(i * (teacher_depth - 1) / (count - 1)) for i in range(count)]


def student_config(teacher_config: PretrainedConfig, layers: list[int]) -> PretrainedConfig:
    """The teacher's config with only `layers` (per-layer lists such as Gemma 3's layer_types follow them)."""
    depth = teacher_config.num_hidden_layers
    bad = [i for i in layers if not 0 <= i < depth]
    if bad or not layers:
        raise ConfigError(
            f"student.teacher_layers={layers}: every entry must be a teacher layer index in [0, {depth}) and the "
            "list must not be empty."
        )
    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers = len(layers)
    # Per-layer lists (Gemma 3's layer_types, DeepSeek's mlp_layer_types, ...) follow the picked layers.
    for name, values in list(vars(config).items()):
        if "layer" in name and isinstance(values, list) and len(values) == depth:
            setattr(config, name, [values[i] for i in layers])
    return config


def copy_of_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A new model of the teacher's class with the teacher's weights for everything but the dropped layers."""
    config = student_config(teacher.config, layers)
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    new_index = {old: new for new, old in enumerate(layers)}
    weights = {}
    for key, value in teacher.state_dict().items():
        match = _LAYER_KEY.match(key)
        if match is None:
            weights[key] = value
        elif int(match.group(2)) in new_index:
            weights[f"{match.group(1)}{new_index[int(match.group(2))]}{match.group(3)}"] = value
    missing, unexpected = student.load_state_dict(weights, strict=False)
    # A tied output head is not a separate state-dict entry of the student; anything else must line up.
    missing = [k for k in missing if k not in _tied_keys(student)]
    if missing or unexpected:
        raise ConfigError(
            f"cannot initialise the student from teacher layers {layers}: the weights do not line up "
            f"(missing {missing[:4]}, unexpected {unexpected[:4]}). The teacher's layers differ in kind (e.g. "
            "DeepSeek's dense first layers and MoE layers); pick layers of one kind in student.teacher_layers."
        )
    return student.train()


def _tied_keys(model: PreTrainedModel) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied) if not isinstance(tied, dict) else set(tied.keys())
