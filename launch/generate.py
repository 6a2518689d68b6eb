"""`distill generate`: sample teacher answers to the prompt set, keep those a filter accepts, save a chat dataset.

    distill generate generate.samples_per_prompt=4 generate.temperature=0.8 generate.filter=answer_correct
    distill data.path=<run>/generated loss=ce_only            # fine-tune a student on the kept answers

Output folder (`generate.output`): a `save_to_disk` DatasetDict whose `train` split holds one row per kept
answer (`messages` = prompt turns + the teacher's reply, the prompt row's other columns, `prompt_index`,
`sample_index`, `num_tokens`) and whose `eval` split is the prompt set's own held-out split, so a student
trained on it is evaluated exactly like one trained on the original data. `summary.json` holds the counts and
the generation throughput.

Resumable: prompts are sampled in chunks of `generate.chunk_prompts`; each chunk's candidates (every sample,
kept or not) are committed as one shard under progress/ and listed in progress/progress.json. A rerun samples
only the chunks without a committed shard. Filters run when the final dataset is assembled, so changing
`generate.filter` (or require_finished / dedupe) reuses the samples instead of drawing new ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import datasets
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from distill.data import encode_prompt
from distill.data.build import raw_dataset
from distill.data.filters import Candidate, Predicate, build_filter
from distill.errors import ConfigError
from distill.eval.runs import generation_stop_id
from distill.io import atomic_dir, atomic_write_json
from distill.models.fingerprint import model_fingerprint
from distill.models.loading import load_tokenizer
from distill.models.resolve import pair_facts, require_teacher
from distill.run.validate import validate_run
from distill.teacher.build import build_teacher_engine
from distill.teacher.sampling import (
    Completions,
    PromptBatch,
    SamplingParams,
    count_tokens,
    local_sample_stream,
)
from distill.teacher.teacher_set import require_one_teacher
from launch.app import hydra_app

log = logging.getLogger("distill")

MESSAGES = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
# Columns of a shard row besides the prompt row's own; `completion` and `finished` stay in the shards only.
CANDIDATE_FEATURES = {
    "messages": MESSAGES,
    "prompt_index": datasets.Value("int64"),
    "sample_index": datasets.Value("int64"),
    "completion": datasets.Value("string"),
    "num_tokens": datasets.Value("int64"),
    "finished": datasets.Value("bool"),
}
SHARD_ONLY_COLUMNS = ("completion", "finished")

Sampler = Callable[[Iterable[PromptBatch]], Iterator[Completions]]


# ---- the prompt set -------------------------------------------------------------------------------------------
def prompt_set(cfg) -> datasets.DatasetDict:
    """The rows whose user turns are prompted: the embedded task, or `data.path` (train and eval splits)."""
    d = cfg.data
    ds = raw_dataset(cfg)
    if "messages" not in ds["train"].column_names:
        raise ConfigError(
            f"distill generate needs chat prompts (a `messages` field), but {d.path} has "
            f"{ds['train'].column_names}; set data.messages_field to its chat column"
        )
    if ds["train"].num_rows == 0:
        raise ConfigError("the prompt set is empty: raise data.num_train or check data.path")
    return ds


def prompt_turns(messages: list[dict]) -> list[dict]:
    """The conversation before its last assistant reply (all of it if there is none), as {role, content}."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return [{"role": m["role"], "content": m["content"]} for m in messages[:last]]


# ---- progress: committed shards -------------------------------------------------------------------------------
class Progress:
    """progress/progress.json (identity + committed chunks with their stats) and progress/shard-NNNNNN folders."""

    def __init__(self, folder: Path, identity: dict) -> None:
        self.folder, self.identity = folder, identity
        self.file = folder / "progress.json"
        state = json.loads(self.file.read_text()) if self.file.is_file() else None
        if state is not None and state["identity"] != identity:
            changed = sorted(k for k in identity if state["identity"].get(k) != identity[k])
            raise ConfigError(
                f"{folder} holds samples of a different generation (changed: {changed}); delete "
                f"{folder.parent} or set generate.output to a new folder"
            )
        done = {int(c): stats for c, stats in (state or {}).get("chunks", {}).items()}
        # A chunk counts only while its shard exists: deleting a shard makes the next run redo that chunk.
        self.chunks = {c: s for c, s in done.items() if (self.shard_dir(c) / "dataset_info.json").is_file()}

    def shard_dir(self, chunk: int) -> Path:
        return self.folder / f"shard-{chunk:06d}"

    def commit(self, chunk: int, rows: datasets.Dataset, stats: dict) -> None:
        """Shard first (atomic folder rename), then the listing: a crash between the two only redoes the chunk."""
        atomic_dir(self.shard_dir(chunk), lambda tmp: rows.save_to_disk(str(tmp)))
        self.chunks[chunk] = stats
        chunks = {str(c): s for c, s in sorted(self.chunks.items())}
        atomic_write_json(self.file, {"identity": self.identity, "chunks": chunks})

    def load(self, chunk: int) -> datasets.Dataset:
        return datasets.load_from_disk(str(self.shard_dir(chunk)))


def identity(cfg, teacher_path: Path, prompts: list[list[int]], params: SamplingParams) -> dict:
    """What decides the samples (not the filter: it runs at assembly, on the stored samples)."""
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()[:16]
    sampling = {
        k: getattr(params, k) for k in ("n", "temperature", "top_p", "max_new_tokens", "stop_id", "seed")
    }
    return {
        "teacher": model_fingerprint(teacher_path),
        "prompts": digest,
        "num_prompts": len(prompts),
        "sampling": sampling,
        "chunk_prompts": int(cfg.generate.chunk_prompts),
    }


# ---- sampling ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def open_sampler(cfg, teacher_path: Path, params: SamplingParams) -> Iterator[Sampler]:
    """The Ray TeacherGroup for cluster.mode=ray, else one local engine; the same sampling code runs in both."""
    if cfg.cluster.mode == "ray":
        from distill.cluster.generation import ray_sample_stream
        from distill.cluster.runtime import connect, teacher_group_from_config

        connect(cfg.cluster)
        group = teacher_group_from_config(cfg, teacher_path, (), ())
        try:
            yield lambda batches: ray_sample_stream(group, batches, params)
        finally:
            group.shutdown()
        return
    engine = build_teacher_engine(cfg, teacher_path)
    yield lambda batches: local_sample_stream(engine, batches, params)


def chunk_batches(
    prompts: list[list[int]], chunks: list[int], chunk_prompts: int, batch_prompts: int
) -> list[tuple[int, PromptBatch]]:
    """(chunk, batch) for every batch of the given chunks, in order; a batch never spans two chunks."""
    out = []
    for c in chunks:
        end = min((c + 1) * chunk_prompts, len(prompts))
        for start in range(c * chunk_prompts, end, batch_prompts):
            stop = min(start + batch_prompts, end)
            out.append((c, PromptBatch(start, prompts[start:stop])))
    return out


def sample_chunks(
    sampler: Sampler, items: list[tuple[int, PromptBatch]]
) -> Iterator[tuple[int, int, Completions, float]]:
    """(chunk, first prompt index, completions, seconds since the previous chunk) as each chunk completes."""
    current, first, gathered = None, 0, []
    last = time.perf_counter()
    ends = {c: i for i, (c, _) in enumerate(items)}  # index of each chunk's last batch
    for i, ((chunk, batch), completions) in enumerate(zip(items, sampler(b for _, b in items), strict=True)):
        if chunk != current:
            current, first, gathered = chunk, batch.first_index, []
        gathered += completions
        if i == ends[chunk]:
            now = time.perf_counter()
            yield chunk, first, gathered, now - last
            last = now


def candidate_rows(
    tokenizer, train: datasets.Dataset, first: int, completions: Completions, stop_id: int
) -> list[dict]:
    """One row per sample: the prompt row's columns, the conversation with the reply, and sample facts."""
    rows = []
    for offset, samples in enumerate(completions):
        index = first + offset
        example = train[index]
        turns = prompt_turns(example["messages"])
        meta = {k: v for k, v in example.items() if k not in ("messages", "text")}
        for j, ids in enumerate(samples):
            finished = bool(ids) and ids[-1] == stop_id
            text = tokenizer.decode(ids[:-1] if finished else ids, skip_special_tokens=True)
            rows.append(
                {
                    **meta,
                    "messages": [*turns, {"role": "assistant", "content": text}],
                    "prompt_index": index,
                    "sample_index": j,
                    "completion": text,
                    "num_tokens": len(ids),
                    "finished": finished,
                }
            )
    return rows


# ---- filtering and the final dataset --------------------------------------------------------------------------
def verdicts(rows: Iterable[dict], keep: Predicate, *, require_finished: bool, dedupe: bool) -> list[str]:
    """Per candidate: `kept`, `unfinished` (cut at max_new_tokens), `rejected` (filter) or `duplicate`."""
    out, seen = [], set()
    for row in rows:
        cand = Candidate(row, row["completion"], row["num_tokens"], row["finished"])
        key = (row["prompt_index"], row["completion"])
        if require_finished and not cand.finished:
            out.append("unfinished")
        elif not keep(cand):
            out.append("rejected")
        elif dedupe and key in seen:
            out.append("duplicate")
        else:
            seen.add(key)
            out.append("kept")
    return out


def write_dataset_dict(dd: datasets.DatasetDict, out: Path) -> None:
    """Save `dd` into `out` (which also holds progress/): splits swapped in, dataset_dict.json written last.

    Readers detect a saved DatasetDict by dataset_dict.json, so it is removed first and restored last: a crash
    in between leaves no half-new dataset that looks complete.
    """
    (out / "dataset_dict.json").unlink(missing_ok=True)
    tmp = out / f".final-{uuid.uuid4().hex[:8]}"
    try:
        dd.save_to_disk(str(tmp))
        for split in dd:
            old = out / split
            if old.exists():
                shutil.rmtree(old)
            os.replace(tmp / split, old)
        os.replace(tmp / "dataset_dict.json", out / "dataset_dict.json")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the command ---------------------------------------------------------------------------------------------
def sample_pending(
    cfg, teacher_path: Path, tokenizer, train, prompts, params: SamplingParams, progress: Progress, todo, keep
) -> tuple[int, float]:
    """Sample the chunks in `todo` and commit one shard each; returns (generated tokens, seconds)."""
    g = cfg.generate
    features = datasets.Features(
        {**{k: v for k, v in train.features.items() if k not in ("messages", "text")}, **CANDIDATE_FEATURES}
    )
    done_prompts = sum(s["prompts"] for s in progress.chunks.values())
    bar = tqdm(
        total=len(prompts),
        initial=done_prompts,
        desc="generate",
        unit="prompt",
        disable=not cfg.tracking.progress,
        dynamic_ncols=True,
    )
    # A batch holds ~batch_size sequences: batch_size // n prompts, each sampled n times.
    items = chunk_batches(prompts, todo, g.chunk_prompts, max(1, g.batch_size // params.n))
    total_tokens, total_seconds = 0, 0.0
    with open_sampler(cfg, teacher_path, params) as sampler:
        for chunk, first, completions, seconds in sample_chunks(sampler, items):
            rows = candidate_rows(tokenizer, train, first, completions, params.stop_id)
            tokens = count_tokens(completions)
            stats = {
                "prompts": len(completions),
                "candidates": len(rows),
                "tokens": tokens,
                "seconds": seconds,
            }
            progress.commit(chunk, datasets.Dataset.from_list(rows, features=features), stats)
            total_tokens, total_seconds = total_tokens + tokens, total_seconds + seconds
            kept = verdicts(rows, keep, require_finished=g.require_finished, dedupe=g.dedupe).count("kept")
            rate = tokens / max(seconds, 1e-9)
            bar.update(len(completions))
            bar.set_postfix(tok_s=f"{rate:.0f}", kept=f"{kept}/{len(rows)}")
            log.info(
                "chunk %d: %d candidates, %d kept, %d tokens, %.0f tokens/s",
                chunk,
                len(rows),
                kept,
                tokens,
                rate,
            )
    bar.close()
    return total_tokens, total_seconds


def sampling_params(g, tokenizer) -> SamplingParams:
    """`generate.*` as the sampler's parameters; replies stop at the chat end token (or EOS)."""
    stop_id = generation_stop_id(tokenizer)
    return SamplingParams(
        n=g.samples_per_prompt,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        stop_id=stop_id,
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_id,
        seed=g.seed,
        batch_size=g.batch_size,
    )


def generate(cfg: DictConfig) -> dict:
    """Sample, filter and write the dataset (see the module docstring). Returns the summary."""
    require_one_teacher(cfg, "generate")
    g = cfg.generate
    teacher_path = require_teacher(cfg)
    tokenizer = load_tokenizer(teacher_path)
    validate_run(cfg, pair_facts(cfg, tokenizer))
    if g.chunk_prompts < 1:
        raise ConfigError(f"generate.chunk_prompts={g.chunk_prompts} must be >= 1")
    source = prompt_set(cfg)
    train = source["train"]
    # The filter is built (and its arguments and needed columns checked) before any sampling starts.
    keep = build_filter(g.filter, OmegaConf.to_container(g.filter_args), train.column_names)
    params = sampling_params(g, tokenizer)
    prompts = [encode_prompt(tokenizer, ex) for ex in train]
    out = Path(g.output)
    progress = Progress(out / "progress", identity(cfg, teacher_path, prompts, params))
    num_chunks = -(-len(prompts) // g.chunk_prompts)
    todo = [c for c in range(num_chunks) if c not in progress.chunks]
    log.info(
        "generate: %d prompts x %d samples, %d of %d chunks to sample",
        len(prompts),
        params.n,
        len(todo),
        num_chunks,
    )

    run_tokens, run_seconds = 0, 0.0
    if todo:
        run_tokens, run_seconds = sample_pending(
            cfg, teacher_path, tokenizer, train, prompts, params, progress, todo, keep
        )

    summary = assemble(progress, num_chunks, source, keep, cfg)
    total_tokens = sum(s["tokens"] for s in progress.chunks.values())
    total_seconds = sum(s["seconds"] for s in progress.chunks.values())
    summary.update(
        teacher=str(teacher_path),
        mode=cfg.cluster.mode,
        samples_per_prompt=params.n,
        generated_tokens=total_tokens,
        generate_seconds=total_seconds,
        tokens_per_s=total_tokens / max(total_seconds, 1e-9),
        this_run={
            "chunks_sampled": len(todo),
            "chunks_reused": num_chunks - len(todo),
            "tokens": run_tokens,
            "seconds": run_seconds,
            "tokens_per_s": run_tokens / max(run_seconds, 1e-9),
        },
        output=str(out),
    )
    atomic_write_json(out / "summary.json", summary)
    log.info("generate %s", json.dumps(summary, sort_keys=True))
    if summary["kept"] == 0:
        log.warning("no generated answer passed generate.filter=%s: the train split is empty", g.filter)
    return summary


def assemble(progress: Progress, num_chunks: int, source: datasets.DatasetDict, keep: Predicate, cfg) -> dict:
    """Filter every shard, concatenate the kept rows and write the final DatasetDict; returns the counts."""
    g = cfg.generate
    missing = [c for c in range(num_chunks) if c not in progress.chunks]
    assert not missing, f"chunks {missing} were not sampled"
    kept_parts, counts = [], {"kept": 0, "rejected": 0, "unfinished": 0, "duplicate": 0}
    for c in range(num_chunks):
        shard = progress.load(c)
        marks = verdicts(shard, keep, require_finished=g.require_finished, dedupe=g.dedupe)
        for mark in marks:
            counts[mark] += 1
        kept_parts.append(shard.select([i for i, m in enumerate(marks) if m == "kept"]))
    kept = datasets.concatenate_datasets(kept_parts).remove_columns(list(SHARD_ONLY_COLUMNS))
    out = progress.folder.parent
    write_dataset_dict(datasets.DatasetDict({"train": kept, "eval": source["eval"]}), out)
    candidates = sum(counts.values())
    return {
        "prompts": sum(s["prompts"] for s in progress.chunks.values()),
        "candidates": candidates,
        **counts,
        "kept_fraction": counts["kept"] / max(candidates, 1),
        "prompts_with_kept": len(set(kept["prompt_index"])),
        "filter": g.filter,
    }


@hydra_app
def main(cfg: DictConfig) -> None:
    datasets.disable_progress_bars()  # one bar per shard save would drown the generation bar
    summary = generate(cfg)
    print(json.dumps(summary, indent=2, sort_keys=True))
