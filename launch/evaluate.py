"""`distill eval eval.model=<HF folder>`: held-out CE, perplexity, KL to the teacher, agreement, exact-match.

Prints a table and writes `eval.json` into the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from distill.io import atomic_write_json
from distill.models.loading import load_causal_lm, load_tokenizer
from launch import builders
from launch.app import hydra_app
from launch.demo import print_table


def evaluate(cfg: DictConfig) -> dict:
    teacher_path = builders.require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    data = builders.build_data(cfg, tokenizer)
    engine = builders.build_teacher_engine(cfg, teacher_path, objective=None)
    model_path = Path(cfg.eval.model) if cfg.eval.model else teacher_path
    model = engine.model if model_path == teacher_path else load_causal_lm(model_path)
    result = builders.evaluate(
        cfg, model, tokenizer, data, lambda b: engine.logits(b["input_ids"], b["attention_mask"])
    )
    result["model"] = str(model_path)
    out = Path(cfg.run_dir) / "eval.json"
    atomic_write_json(out, result)
    print_table({str(model_path): result})
    print(json.dumps(result, indent=2, sort_keys=True))
    return result


@hydra_app
def main(cfg: DictConfig) -> None:
    evaluate(cfg)
