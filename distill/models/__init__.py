"""Models: tiny real-architecture configs, production facts and tokenizers, local HF loading and saving."""

from distill.models.facts import ARCH_CONFIGS, ModelFacts, arch_config_path, load_config
from distill.models.loading import check_model_folder, load_causal_lm, load_tokenizer, save_model
from distill.models.real_tokenizers import REAL_TOKENIZERS, load_real_tokenizer
from distill.models.tiny import REAL_VOCAB_ARCHS, TINY_ARCHS, build_model, describe_model, tiny_config

__all__ = [
    "ARCH_CONFIGS",
    "REAL_TOKENIZERS",
    "REAL_VOCAB_ARCHS",
    "TINY_ARCHS",
    "ModelFacts",
    "arch_config_path",
    "build_model",
    "check_model_folder",
    "describe_model",
    "load_causal_lm",
    "load_config",
    "load_real_tokenizer",
    "load_tokenizer",
    "save_model",
    "tiny_config",
]
