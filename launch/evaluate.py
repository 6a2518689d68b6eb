"""`distill eval eval.model=<HF folder>`: held-out CE, perplexity, KL to the teacher, agreement, exact-match.

Prints a table and writes `eval.json` into the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from distill.data.build import build_data
from distill.eval.runs import evaluate as evaluate_run
from distill.io import atomic_write_json
from distill.models.loading import load_causal_lm, load_tokenizer
from distill.models.resolve import require_teacher
from distill.teacher.build import build_teacher_engine
from distill.xtok.build import row_encoder
from launch.app import hydra_app
from launch.demo import print_table


def evaluate(cfg: DictConfig) -> dict:
    teacher_path = require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    data = build_data(cfg, row_encoder(cfg, tokenizer))
    engine = build_teacher_engine(cfg, teacher_path)
    model_path = Path(cfg.eval.model) if cfg.eval.model else teacher_path
    model = engine.model if model_path == teacher_path else load_causal_lm(model_path)
    result = evaluate_run(
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
