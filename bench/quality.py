"""Quality of the recipes on the embedded task, at equal student steps over several seeds (single-process
reference path; the distributed path gives the same numbers, see tests/test_online_distributed.py):

  standard : KD three-stage (curriculum=three_stage)  vs  KD single-stage (the same loss terms, one stage)
             vs  CE-only (hard labels, one stage). Held-out CE, token accuracy, agreement, exact-match.
  continual: the four task domains as increments, KD with replay (continual.replay.ratio) vs without (ratio 0).
             Accuracy matrix after each increment; forgetting = best earlier token accuracy - final.

Targets: KD (both) beats CE-only on held-out CE and exact-match; replay cuts average forgetting by >= 50%.
Writes report.md (+ PNGs) with the tables into --out and prints them.

    python bench/quality.py --steps 300 --seeds 0,1,2      # ~1 min per run on two CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from distill.config import compose
from distill.eval.continual import ContinualMatrix, relative_reduction
from distill.eval.report import write_report
from distill.eval.runs import stage_events
from distill.io import atomic_write_text
from distill.run import run
from distill.tracking.metrics_log import read_metrics
from launch.prepare_demo import prepare_demo

STANDARD = {
    "KD three-stage": ["curriculum=three_stage"],
    "KD single-stage": ["curriculum=single_stage"],
    "CE-only": ["curriculum=single_stage", "loss=ce_only"],
}
CONTINUAL = {
    "continual + replay": [],
    "continual, no replay": ["continual.replay.ratio=0"],
}
METRICS = ("ce", "accuracy", "agreement", "exact_match")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--continual-steps", type=int, default=0, help="0: --steps")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--replay-ratio", type=float, default=0.25)
    p.add_argument("--generate", type=int, default=100, help="held-out prompts decoded for exact-match")
    p.add_argument("--out", default=f"runs/quality/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    common = [*args.overrides, "tracking.progress=false", f"eval.generate_examples={args.generate}"]
    prepare_demo(compose(common))

    standard: dict[str, list[dict]] = {name: [] for name in STANDARD}
    for seed in seeds:
        for name, extra in STANDARD.items():
            cfg = _cfg(common, extra, seed, args.steps, out / _slug(name) / f"seed{seed}")
            standard[name].append(run(cfg))
            print(
                f"{name} seed {seed}: {json.dumps({k: standard[name][-1].get(k) for k in METRICS})}",
                flush=True,
            )

    cont_steps = args.continual_steps or args.steps
    forgetting: dict[str, list[float]] = {name: [] for name in CONTINUAL}
    matrices: dict[str, ContinualMatrix] = {}
    for seed in seeds:
        for name, extra in CONTINUAL.items():
            folder = out / _slug(name) / f"seed{seed}"
            extra = [
                "mode=continual",
                "curriculum=single_stage",
                "loss=kd",
                f"continual.replay.ratio={args.replay_ratio}",
                *extra,
            ]
            run(_cfg(common, extra, seed, cont_steps, folder))
            result = json.loads((folder / "continual.json").read_text())
            matrix = next(
                ContinualMatrix.from_dict(m) for m in result["matrices"] if m["metric"] == "accuracy"
            )
            forgetting[name].append(matrix.average_forgetting())
            # Named after the run: the report titles each matrix (and its PNG) by its metric.
            matrices.setdefault(
                name, ContinualMatrix(matrix.increments, f"accuracy, {name}", True, matrix.values)
            )
            print(f"{name} seed {seed}: average forgetting {matrix.average_forgetting():.4f}", flush=True)

    standard_table = [
        {"run": name, "seeds": len(rows), **{m: _mean_sd([r.get(m) for r in rows]) for m in METRICS}}
        for name, rows in standard.items()
    ]
    with_replay, without = (statistics.mean(forgetting[n]) for n in CONTINUAL)
    continual_table = [
        {"run": name, "seeds": len(v), "average forgetting (token accuracy)": _mean_sd(v)}
        for name, v in forgetting.items()
    ]
    continual_table.append(
        {
            "run": "forgetting reduced by replay",
            "seeds": len(seeds),
            "average forgetting (token accuracy)": f"{100 * relative_reduction(without, with_replay):.0f}%",
        }
    )
    verdict = [
        {
            "target": f"{name} beats CE-only on held-out CE and exact-match",
            "holds": _mean(standard[name], "ce") < _mean(standard["CE-only"], "ce")
            and _mean(standard[name], "exact_match") > _mean(standard["CE-only"], "exact_match"),
        }
        for name in ("KD three-stage", "KD single-stage")
    ]
    verdict.append(
        {
            "target": "replay reduces forgetting by >= 50%",
            "holds": relative_reduction(without, with_replay) >= 0.5,
        }
    )
    first = out / _slug("KD three-stage") / f"seed{seeds[0]}"
    report = write_report(
        out,
        metrics=[*read_metrics(first / "metrics.jsonl"), *stage_events(first)],
        continual=list(matrices.values()),
        title=f"Quality: {args.steps} steps, seeds {seeds}",
        extra_tables={
            "Standard runs (mean ± sd over seeds)": standard_table,
            "Continual runs": continual_table,
            "Targets": verdict,
        },
    )
    chart = plot_heldout(out, standard)
    atomic_write_text(
        report, report.read_text() + f"\n![Held-out CE, agreement and exact-match per run]({chart})\n"
    )
    for title, table in (("standard", standard_table), ("continual", continual_table), ("targets", verdict)):
        print(f"\n{title}")
        for row in table:
            print("  " + " | ".join(f"{k}: {v}" for k, v in row.items()))
    print(f"\nreport: {report} (loss-curve plots from {first}; continual matrices of seed {seeds[0]})")
    return 0


def plot_heldout(out: Path, standard: dict[str, list[dict]]) -> str:
    """quality_heldout.png: held-out CE, agreement and exact-match per run (mean over seeds, sd as error bars)."""
    from matplotlib.figure import Figure

    from distill.eval.report import _save

    fig = Figure(figsize=(10, 3.2))
    names = list(standard)
    for k, metric in enumerate(("ce", "agreement", "exact_match")):
        ax = fig.add_subplot(1, 3, k + 1)
        values = [[r[metric] for r in standard[n] if r.get(metric) is not None] for n in names]
        means = [statistics.mean(v) if v else 0.0 for v in values]
        sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        ax.bar(range(len(names)), means, yerr=sds, color=[f"C{i}" for i in range(len(names))], capsize=4)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=7)
        ax.set_title(f"held-out {metric}")
    return _save(fig, out / "quality_heldout.png")


def _cfg(common: list[str], extra: list[str], seed: int, steps: int, run_dir: Path):
    seeded = [f"train.seed={seed}", f"student.init_seed={seed}", f"train.steps={steps}"]
    return compose([*common, *extra, *seeded], run_dir=str(run_dir))


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace(",", "").replace("+", "with").replace("-", "_")


def _mean(rows: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


if __name__ == "__main__":
    sys.exit(main())
