"""Two domain-expert teachers against either one alone, at equal student steps over several seeds (issue 22).

The embedded task has four domains. Two tiny DeepSeek-V3 teachers are trained by prepare-demo on two domains each
(`prepare.teacher_domains`, otherwise the same recipe and the same tokenizer):

  ab : shopping + travel          cd : baking + garden

The same tiny student (the default loss=kd: forward KL to the teacher's top-16 + CE 0.5, single-process path) is then
distilled on the run's data (all four domains) by:

  ab only  : teacher.path=<ab>: the cd half of the data is graded by a teacher that never saw it
  cd only  : teacher.path=<cd>
  routed   : teachers {ab, cd}; data.subsets ab (shopping, travel) -> teacher ab, cd (baking, garden) -> teacher cd
  ensemble : teachers {ab, cd}, every example scored by both and distilled towards their equal-weight mixture
  CE-only  : loss=ce_only, no teacher (the floor; ab's folder only lends the shared tokenizer)

Figures: held-out CE (nats/token) on the default held-out split (all four domains), top-1 agreement with the run's
teacher (routed: each row's own teacher; ensemble: the mixture; CE-only: ab), greedy exact-match on held-out problems;
mean ± sd over seeds. Before the students,
each expert's held-out CE on its own two domains and on the other two (it should be clearly worse there, or the
comparison says nothing). Target: the routed student's CE is below each single teacher's student (mean over seeds);
the last line is the verdict.

    python bench/multi_teacher_quality.py --steps 300 --seeds 0,1
    python bench/multi_teacher_quality.py --recipes ab,cd,ce       # the single-teacher recipes only

A finished run (its eval.json) in --out is reused: a second call with the same --out adds seeds or recipes. A
diagnostic recipe, `ensemble_conf` (each teacher weighted by its top-1 probability at each token), is not in the
default list.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench_env import TINY

from distill.config import compose
from distill.data import encode_example
from distill.data.build import DataSlice, raw_dataset
from distill.eval.runs import evaluate
from distill.models.loading import load_causal_lm, load_tokenizer
from distill.models.resolve import demo_teacher_dir
from distill.models.tokenizer import tokenizer_hash
from distill.run import run
from launch.prepare_demo import prepare_demo

EXPERTS = {"ab": ["shopping", "travel"], "cd": ["baking", "garden"]}

# The teachers' prepare recipe. `tiny` is the tests' teacher recipe (bench/bench_env.py TINY, tests/conftest.py)
# with level-1 problems only, so the students' data is level 1 too; `default` is the schema's prepare recipe.
TEACHER_RECIPES = {
    "tiny": [*(o for o in TINY if o.startswith("prepare.")), "data.levels=[1]"],
    "default": [],
}

# key -> (printed name, overrides given the experts' folders)
RECIPES = {
    "ab": ("ab only", lambda f: [f"teacher.path={f['ab']}"]),
    "cd": ("cd only", lambda f: [f"teacher.path={f['cd']}"]),
    "routed": (
        "routed",
        lambda f: [
            *_both(f),
            "+data.subsets={"
            + ",".join(f"{n}:{{domains:[{','.join(d)}]}}" for n, d in EXPERTS.items())
            + "}",
            "+routing.subsets={" + ",".join(f"{n}:{n}" for n in EXPERTS) + "}",
        ],
    ),
    "ensemble": ("ensemble", lambda f: [*_both(f), "routing.default=ensemble"]),
    "ensemble_conf": (
        "ensemble, confidence",
        lambda f: [*_both(f), "routing.default=ensemble", "ensemble.weighting=confidence"],
    ),
    # No teacher is consulted; ab's folder only lends the tokenizer both experts share.
    "ce": ("CE-only", lambda f: ["loss=ce_only", f"teacher.path={f['ab']}"]),
}
DEFAULT_RECIPES = "ab,cd,routed,ensemble,ce"
METRICS = ("ce", "agreement", "exact_match")


def _both(folders: dict[str, Path]) -> list[str]:
    """Both experts as the run's named teachers (the first, ab, is the primary: tokenizer and evaluation)."""
    out = []
    for name, folder in folders.items():
        out += [f"+teacher@teachers.{name}=tiny_deepseek_v3", f"teachers.{name}.path={folder}"]
    return out


def prepare_experts(common: list[str]) -> dict[str, Path]:
    """Train (or find cached) each expert; check that they share one tokenizer (the student trains on it)."""
    folders = {}
    for name, domains in EXPERTS.items():
        cfg = compose([*common, f"prepare.teacher_domains=[{','.join(domains)}]"])
        start = time.perf_counter()
        prepare_demo(cfg)
        folders[name] = demo_teacher_dir(cfg)
        print(f"expert {name} ({'+'.join(domains)}): {folders[name]} ({time.perf_counter() - start:.0f} s)")
    hashes = {tokenizer_hash(load_tokenizer(f)) for f in folders.values()}
    if len(hashes) != 1:
        raise SystemExit(f"the experts' tokenizers differ ({hashes}): a student cannot learn from both")
    return folders


def expert_table(common: list[str], folders: dict[str, Path], generate: int) -> None:
    """Each expert on the students' held-out split, by domain pair: its own and the other's."""
    cfg = compose(common)
    held = raw_dataset(cfg)["eval"]
    print(f"\nexperts on the students' held-out split ({len(held)} problems), by domain pair:")
    print(f"  {'expert':8s} {'domains':24s} {'CE':>8s} {'exact-match':>12s}")
    for name, folder in folders.items():
        model, tokenizer = load_causal_lm(folder), load_tokenizer(folder)
        for pair, domains in EXPERTS.items():
            examples = [ex for ex in held if ex["domain"] in domains]
            rows = [encode_example(tokenizer, ex, cfg.data.max_length) for ex in examples]
            s = evaluate(cfg, model, tokenizer, DataSlice([], rows, examples), generate_examples=generate)
            own = "own" if pair == name else "other"
            em = s.get("exact_match")
            em_text = f"{em:12.3f}" if em is not None else f"{'-':>12s}"
            print(f"  {name:8s} {'+'.join(domains) + f' ({own})':24s} {s['ce']:8.4f} {em_text}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--generate", type=int, default=100, help="held-out prompts decoded for exact-match")
    p.add_argument(
        "--teachers", choices=list(TEACHER_RECIPES), default="default", help="the experts' prepare recipe"
    )
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated keys of {list(RECIPES)}")
    p.add_argument(
        "--expert-generate", type=int, default=40, help="held-out prompts per expert and pair (0: CE only)"
    )
    p.add_argument("--out", default=f"runs/multi_teacher_quality/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    keys = args.recipes.split(",")
    if unknown := [k for k in keys if k not in RECIPES]:
        p.error(f"unknown recipes {unknown}; valid: {list(RECIPES)}")
    common = [
        "tracking.progress=false",
        f"train.steps={args.steps}",
        f"eval.generate_examples={args.generate}",
        *TEACHER_RECIPES[args.teachers],
        *args.overrides,
    ]
    folders = prepare_experts(common)
    expert_table(common, folders, args.expert_generate)

    results: dict[str, list[dict]] = {RECIPES[k][0]: [] for k in keys}
    for seed in seeds:
        for key in keys:
            name, extra = RECIPES[key]
            folder = Path(args.out) / key / f"seed{seed}"
            seeded = [f"train.seed={seed}", f"student.init_seed={seed}"]
            start = time.perf_counter()
            done = folder / "eval.json"  # a finished run of an earlier call with the same --out
            if done.is_file():
                summary, took = json.loads(done.read_text()), "reused"
            else:
                summary = run(compose([*common, *extra(folders), *seeded], run_dir=str(folder)))
                took = f"{time.perf_counter() - start:.0f} s"
            results[name].append(summary)
            shown = {m: summary.get(m) for m in METRICS}
            print(f"{name} seed {seed} ({took}): {json.dumps(shown)}", flush=True)

    print(
        f"\nstudents on the held-out split of all four domains after {args.steps} steps (mean ± sd, seeds {seeds}):"
    )
    print(f"  {'recipe':20s} " + " ".join(f"{m:>18s}" for m in METRICS))
    for name, rows in results.items():
        print(f"  {name:20s} " + " ".join(f"{_cell([r.get(m) for r in rows]):>18s}" for m in METRICS))
    singles = [RECIPES[k][0] for k in ("ab", "cd") if RECIPES[k][0] in results]
    routed = RECIPES["routed"][0]
    if routed not in results or len(singles) < 2:
        print(
            "multi_teacher_quality: no verdict (the routed recipe and both single-teacher recipes are needed)"
        )
        return
    print(verdict(results, routed, singles, seeds))


def _cell(values: list) -> str:
    if any(v is None for v in values):
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):9.4f} ± {sd:6.4f}"


def verdict(results: dict[str, list[dict]], routed: str, singles: list[str], seeds: list[int]) -> str:
    """The acceptance line: the routed student's mean held-out CE is below each single teacher's student's."""
    mean = {name: statistics.mean(r["ce"] for r in rows) for name, rows in results.items()}
    for name in singles:
        wins = sum(a["ce"] < b["ce"] for a, b in zip(results[routed], results[name], strict=True))
        print(f"routed better than {name} in {wins}/{len(seeds)} seeds")
    best = min(singles, key=mean.__getitem__)
    others = ", ".join(f"{n} {mean[n]:.4f}" for n in mean if n not in (routed, best))
    met = all(mean[routed] < mean[n] for n in singles)
    return (
        f"multi_teacher_quality: routed {mean[routed]:.4f} vs best single {mean[best]:.4f} ({best}) held-out CE "
        f"nats/token, {others}, mean of {len(seeds)} seeds "
        f"(target routed < each single teacher's student): {'met' if met else 'missed'}"
    )


if __name__ == "__main__":
    main()
