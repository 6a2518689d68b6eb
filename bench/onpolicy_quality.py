"""On-policy against off-policy distillation on the embedded task, at equal student steps over several seeds.

  three_stage           : hard-label warm-up -> KD on the dataset's text (curriculum=three_stage)
  three_stage_onpolicy  : hard-label warm-up -> KD on the dataset's text -> KD on the student's own samples, the
                          teacher grading every token it wrote (curriculum=three_stage_onpolicy)

Both with loss=kd (forward KL to the teacher's top-16 + CE) on the single-process path. Figures: held-out CE,
teacher agreement, greedy exact-match on held-out problems, and the greedy completions' length and end-of-sequence
rate (a student that learns to stop early, or never to stop, shows there). Target: on-policy beats off-policy on
held-out exact-match (mean over seeds).

    python bench/onpolicy_quality.py --steps 300 --seeds 0,1,2
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
    "three_stage": ["loss=kd", "curriculum=three_stage"],
    "three_stage_onpolicy": ["loss=kd", "curriculum=three_stage_onpolicy"],
}
METRICS = ("exact_match", "ce", "agreement", "completion_tokens", "eos_rate")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--generate", type=int, default=100, help="held-out prompts decoded for exact-match")
    p.add_argument("--out", default=f"runs/onpolicy_quality/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [
        "tracking.progress=false",
        f"train.steps={args.steps}",
        f"eval.generate_examples={args.generate}",
        *args.overrides,
    ]
    prepare_demo(compose(common))
    results: dict[str, list[dict]] = {name: [] for name in RECIPES}
    for seed in seeds:
        for name, extra in RECIPES.items():
            folder = Path(args.out) / name / f"seed{seed}"
            start = time.perf_counter()
            seeded = [f"train.seed={seed}", f"student.init_seed={seed}"]
            summary = run(compose([*common, *extra, *seeded], run_dir=str(folder)))
            results[name].append(summary)
            shown = {k: summary.get(k) for k in METRICS}
            print(
                f"{name} seed {seed} ({time.perf_counter() - start:.0f} s): {json.dumps(shown)}", flush=True
            )
    print(f"\nheld-out figures after {args.steps} steps (mean ± sd over seeds {seeds}):")
    print(f"  {'recipe':22s} " + " ".join(f"{m:>18s}" for m in METRICS))
    for name, rows in results.items():
        cells = []
        for m in METRICS:
            values = [r[m] for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):9.4f} ± {sd:6.4f}")
        print(f"  {name:22s} " + " ".join(f"{c:>18s}" for c in cells))
    on = statistics.mean(r["exact_match"] for r in results["three_stage_onpolicy"])
    off = statistics.mean(r["exact_match"] for r in results["three_stage"])
    wins = sum(
        a["exact_match"] > b["exact_match"]
        for a, b in zip(results["three_stage_onpolicy"], results["three_stage"], strict=True)
    )
    print(f"on-policy better in {wins}/{len(seeds)} seeds")
    print(
        f"onpolicy_quality: exact-match on-policy {on:.3f} vs off-policy {off:.3f} "
        f"(target on-policy > off-policy, mean of {len(seeds)} seeds): {'met' if on > off else 'missed'}"
    )


if __name__ == "__main__":
    main()
