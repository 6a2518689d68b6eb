"""Continual distillation with a real pretrained teacher: does replay still remove forgetting?

The README's continual claim (replay at ratio 0.25 turns forgetting negative) was measured on the embedded task
with a teacher this project trained. This bench re-measures it with the real teacher of
bench/real_teacher_quality.py (Gemma 3 270M base, built offline by bench/real_teacher_assets.py) and its texts
as the increments, one increment per text source, in this order by default:

  docs     real technical English (installed packages' long descriptions)
  teacher  text the teacher wrote itself at T 1, from prompts cut from `docs`
  stdlib   standard-library docstrings (a different register: the increment that should make the student forget)

Each increment is a `data.subsets` entry with its own `path` (that text's train / held-out dataset folder).
Every run is the product path (`distill.run.run`, mode=continual, teacher=hf, one-stage KD: the default recipe),
once with replay (continual.replay.ratio, 0.25 by default) and once without (ratio 0), per seed. From each run's
`continual.json`: the matrices of the run's own after-increment evaluation (token accuracy and CE on every
increment's held-out slice, rows after increment i) and the average forgetting (best earlier score - final; a
gain is negative). After all runs, the independent evaluator of real_teacher_quality.py (plain transformers on
the held-out split) scores each final student on every increment's text: CE, top-1 agreement and KL to the
teacher.

Verdict: mean over seeds of the average forgetting (token accuracy): the runs without replay must forget
(> 0) and the runs with replay must forget less.

    python bench/real_teacher_continual.py --steps 50 --seeds 0,1 --batch 4            # ~30 min on 2 cores
    python bench/real_teacher_continual.py --students scratch --increments docs,stdlib  # other cases
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from omegaconf import open_dict
from real_teacher_assets import build_assets, cache_root
from real_teacher_quality import Evaluator, run_overrides

from distill.config import compose
from distill.config.schema import SubsetConfig
from distill.run import run


def continual_config(assets: dict, args, student: str, seed: int, ratio: float, folder: Path):
    """The composed run config: increments as data.subsets with their own paths (set on the composed config:
    Hydra cannot add a new key of a Dict[str, SubsetConfig] from an override string)."""
    increments = args.increments.split(",")
    overrides = run_overrides(
        assets,
        increments[0],
        student,
        args.steps * len(increments),
        seed,
        args.batch,
        [
            "mode=continual",
            "curriculum=single_stage",
            f"continual.increments=[{','.join(increments)}]",
            f"continual.steps_per_increment={args.steps}",
            f"continual.replay.ratio={ratio}",
        ],
    )
    cfg = compose([*overrides, *args.overrides], run_dir=str(folder))
    with open_dict(cfg):
        for name in increments:
            cfg.data.subsets[name] = SubsetConfig(path=assets["texts"][name])
    return cfg


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}"


def matrix_lines(matrix: dict) -> list[str]:
    names = matrix["increments"]
    lines = [
        f"{matrix['metric']} (row: after increment; column: held-out slice of increment)",
        "| after \\ on | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for name, row in zip(names, matrix["values"], strict=False):
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in row) + " |")
    forgetting = ["-" if f is None else f"{f:+.4f}" for f in matrix["forgetting"]]
    lines.append("| forgetting | " + " | ".join(forgetting) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--increments", default="docs,teacher,stdlib", help="text sources, in training order")
    p.add_argument("--steps", type=int, default=50, help="steps per increment")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--students", default="pretrained", help="pretrained, scratch")
    p.add_argument("--batch", type=int, default=4, help="sequences (of 128 tokens) per step")
    p.add_argument("--replay-ratio", type=float, default=0.25)
    p.add_argument("--no-independent", action="store_true", help="skip the independent evaluator")
    p.add_argument("--out", default=f"runs/real_teacher_continual/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("--assets", default=None, help="assets folder (default: $DISTILL_CACHE/real_teacher/v<N>)")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    assets = build_assets(Path(args.assets) if args.assets else cache_root())
    increments = args.increments.split(",")
    unknown = [name for name in increments if name not in assets["texts"]]
    if unknown:
        p.error(f"unknown increments {unknown}; the texts are {sorted(assets['texts'])}")
    runs = {"with replay": args.replay_ratio, "without replay": 0.0}
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    report: list[str] = []
    results: dict[tuple[str, str], list[dict]] = {}  # (student, run) -> one dict per seed
    for student in args.students.split(","):
        for seed in seeds:
            for name, ratio in runs.items():
                folder = out / student / name.replace(" ", "_") / f"seed{seed}"
                t0 = time.time()
                run(continual_config(assets, args, student, seed, ratio, folder))
                result = json.loads((folder / "continual.json").read_text())
                matrices = {m["metric"]: m for m in result["matrices"]}
                entry = {
                    "seed": seed,
                    "folder": str(folder),
                    "forgetting": result["average_forgetting"],
                    "matrices": matrices,
                    "seconds": time.time() - t0,
                }
                results.setdefault((student, name), []).append(entry)
                title = (
                    f"### {student} student, {name} (ratio {ratio}), seed {seed}: {entry['seconds']:.0f} s"
                )
                lines = [title]
                for metric in ("accuracy", "ce"):
                    if metric in matrices:
                        lines += ["", *matrix_lines(matrices[metric])]
                report.append("\n".join(lines))
                print(report[-1], flush=True)
                print(
                    f"{student} {name} seed {seed}: average forgetting "
                    f"{json.dumps(result['average_forgetting'])}",
                    flush=True,
                )

    # The independent evaluator: each final student on every increment's held-out text.
    if not args.no_independent:
        for text in increments:
            evaluate = Evaluator(assets["teacher"], assets["texts"][text])
            for entries in results.values():
                for entry in entries:
                    entry.setdefault("independent", {})[text] = evaluate(
                        str(Path(entry["folder"]) / "student")
                    )
            print(f"independent evaluator on {text}: teacher CE {evaluate.teacher_ce:.3f}", flush=True)
            del evaluate

    summary = [
        f"## Continual with the real teacher: {len(increments)} increments ({' -> '.join(increments)}) x "
        f"{args.steps} steps of {args.batch} sequences, mean ± sd over seeds {args.seeds}",
        "",
        "| student, run | avg forgetting (token accuracy) | avg forgetting (CE, nats) | final CE per increment "
        "(run's eval) |",
        "|---|---|---|---|",
    ]
    for (student, name), entries in results.items():
        acc = [e["forgetting"].get("accuracy") for e in entries]
        ce = [e["forgetting"].get("ce") for e in entries]
        finals = []
        for j, text in enumerate(increments):
            values = [e["matrices"]["ce"]["values"][-1][j] for e in entries if "ce" in e["matrices"]]
            finals.append(f"{text} {mean_sd(values)}")
        summary.append(
            f"| {student}, {name} | {mean_sd([a for a in acc if a is not None])} | "
            f"{mean_sd([c for c in ce if c is not None])} | {'; '.join(finals)} |"
        )
    if not args.no_independent:
        summary += [
            "",
            "Final students, independent evaluator (held-out CE nats/token / top-1 agreement / KL to teacher):",
            "",
            "| student, run | " + " | ".join(increments) + " |",
            "|---" * (len(increments) + 1) + "|",
        ]
        for (student, name), entries in results.items():
            cells = []
            for text in increments:
                scores = [e["independent"][text] for e in entries]
                ce = statistics.fmean(s["ce"] for s in scores)
                agree = statistics.fmean(s["agreement"] for s in scores)
                kl = statistics.fmean(s["kl"] for s in scores)
                cells.append(f"{ce:.3f} / {agree:.1%} / {kl:.3f}")
            summary.append(f"| {student}, {name} | " + " | ".join(cells) + " |")
    report.insert(0, "\n".join(summary))
    print("\n".join(summary), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n\n".join(report) + "\n", encoding="utf-8")
    (out / "results.json").write_text(
        json.dumps({f"{s}/{n}": e for (s, n), e in results.items()}, indent=1), encoding="utf-8"
    )

    verdicts = []
    for student in args.students.split(","):
        with_replay = statistics.fmean(e["forgetting"]["accuracy"] for e in results[(student, "with replay")])
        without = statistics.fmean(e["forgetting"]["accuracy"] for e in results[(student, "without replay")])
        verdicts.append((student, with_replay, without, without > 0 and with_replay < without))
    figure = "; ".join(
        f"{s} student: average forgetting (token accuracy) with replay {w:.4f} vs without {wo:.4f}"
        for s, w, wo, _ in verdicts
    )
    verdict = "met" if all(ok for *_, ok in verdicts) else "missed"
    target = f"with replay < without > 0, mean over {len(seeds)} seeds"
    print(f"real_teacher_continual: {figure} (target {target}): {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
