"""Cross-tokenizer distillation quality on the tiny demo pair, at equal student steps over several seeds.

The teacher keeps the demo tokenizer (384 tokens); the student trains on a second tokenizer (320 tokens, trained
on another corpus sample: other merges), `experiment=xtok_demo`. Recipes, single-process reference path (the
online path gives the same numbers, tests/test_xtok_online.py):

  KD xtok, one stage   : loss=kd_xtok (forward KL on the mapped top-k, uld on unmapped mass, CE 1.0), one stage
                         at T 1: what `distill experiment=xtok_demo` runs
  KD xtok, three-stage : the same loss with the same-tokenizer default curriculum (hard-label warm-up, KD at
                         T 3 -> 2, KD fine-tune)
  CE-only              : loss=ce_only, the same student and tokenizer, no teacher

Figure: held-out cross-entropy in bits per character (tokenizer-independent). Target: KD beats CE-only.

    python bench/xtok_quality.py --steps 300 --seeds 0,1     # ~1 min per run on two CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from distill.config import compose
from distill.run import run
from launch.prepare_demo import prepare_demo

RECIPES = {
    "KD xtok, one stage": ["loss=kd_xtok", "curriculum=single_stage"],
    "KD xtok, three-stage": ["loss=kd_xtok", "curriculum=three_stage"],
    "CE-only": ["loss=ce_only", "curriculum=single_stage"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--out", default=f"runs/xtok_quality/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [
        "experiment=xtok_demo",
        "eval.generate_examples=0",
        "tracking.progress=false",
        f"train.steps={args.steps}",
        *args.overrides,
    ]
    prepare_demo(compose(common))  # the demo teacher and the student's tokenizer (cached after the first run)
    results: dict[str, list[float]] = {name: [] for name in RECIPES}
    for seed in seeds:
        for name, extra in RECIPES.items():
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            folder = Path(args.out) / slug / f"seed{seed}"
            seeded = [f"train.seed={seed}", f"student.init_seed={seed}"]
            summary = run(compose([*common, *extra, *seeded], run_dir=str(folder)))
            results[name].append(summary["bits_per_char"])
            print(
                f"{name} seed {seed}: {json.dumps({k: summary[k] for k in ('bits_per_char', 'ce')})}",
                flush=True,
            )
    print(f"\nheld-out bits per character after {args.steps} steps (mean ± sd over seeds {seeds}):")
    for name, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:22s} {statistics.mean(values):.4f} ± {sd:.4f}")
    ce = statistics.mean(results["CE-only"])
    for name, values in results.items():
        if name == "CE-only":
            continue
        kd = statistics.mean(values)
        wins = sum(a < b for a, b in zip(values, results["CE-only"], strict=True))
        print(
            f"{name} vs CE-only: {100 * (ce - kd) / ce:.1f}% fewer bits per character, better in {wins}/"
            f"{len(seeds)} seeds; target KD < CE-only: {'holds' if kd < ce else 'MISSED'}"
        )


if __name__ == "__main__":
    main()
