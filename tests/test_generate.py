"""`distill generate`: seeded sampling, filters, the resumable dataset writer, Ray sampling, SFT and LoRA on it."""

from __future__ import annotations

import json
import shutil

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from distill.config import compose
from distill.config.schema import LoraConfig
from distill.data import build_task_dataset, encode_prompt, extract_answer, load_user_dataset
from distill.data.filters import Candidate, build_filter, filter_names
from distill.errors import ConfigError
from distill.eval.runs import generation_stop_id
from distill.models.loading import load_tokenizer, save_model
from distill.models.lora import apply_lora, merge_for_export
from distill.models.resolve import build_student
from distill.models.tiny import build_model, tiny_config
from distill.teacher.engine import TeacherEngine
from distill.teacher.sampling import PromptBatch, SamplingParams, local_sample_stream, sample
from launch import generate as gen

# Small enough for seconds per call: 24 prompts x 4 samples in chunks of 8 prompts (3 shards).
GEN = [
    "data.num_train=24",
    "data.num_eval=8",
    "generate.samples_per_prompt=4",
    "generate.max_new_tokens=48",
    "generate.chunk_prompts=8",
    "generate.batch_size=32",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two intra-op threads on two shared, busy cores run generate 10-40x slower (threads wait for each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    tokenizer = load_tokenizer(tiny_teacher)
    engine = TeacherEngine.from_pretrained(tiny_teacher, 4)
    rows = build_task_dataset(["shopping", "travel"], [1], 6, 0, seed=3)["train"]
    prompts = [encode_prompt(tokenizer, ex) for ex in rows]
    return engine, tokenizer, prompts


def draw(engine, tokenizer, prompts, **kw):
    args = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=40, seed=5)
    args.update(kw)
    stop = generation_stop_id(tokenizer)
    return sample(engine.model, prompts, stop_id=stop, pad_id=tokenizer.pad_token_id, **args)


# ---- sampling ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sampling_is_seeded_and_independent_of_batching(teacher):
    engine, tokenizer, prompts = teacher
    a = draw(engine, tokenizer, prompts)
    assert a == draw(engine, tokenizer, prompts)
    assert a != draw(engine, tokenizer, prompts, seed=6)
    # Completion j of prompt i depends on (seed, i, j) only: pieces with their first_index, any batch size.
    pieces = draw(engine, tokenizer, prompts[:2], batch_size=4) + draw(
        engine, tokenizer, prompts[2:], first_index=2, batch_size=5
    )
    assert pieces == a
    assert [len(per_prompt) for per_prompt in a] == [3] * len(prompts)
    assert len({tuple(c) for per_prompt in a for c in per_prompt}) > len(prompts)  # samples differ


@pytest.mark.slow
def test_sampling_respects_max_new_tokens_and_stop(teacher):
    engine, tokenizer, prompts = teacher
    stop = generation_stop_id(tokenizer)
    for cap in (6, 48):
        out = draw(engine, tokenizer, prompts, max_new_tokens=cap)
        for c in (c for per_prompt in out for c in per_prompt):
            assert 1 <= len(c) <= cap
            assert stop not in c[:-1] and tokenizer.pad_token_id not in c
    finished = [c[-1] == stop for per_prompt in out for c in per_prompt]
    assert any(finished)  # with room to finish, the teacher ends its answers


@pytest.mark.slow
def test_greedy_sampling_equals_engine_generate(teacher):
    engine, tokenizer, prompts = teacher
    stop = generation_stop_id(tokenizer)
    ids = torch.full((len(prompts), max(map(len, prompts))), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, ids.shape[1] - len(p) :] = torch.tensor(p)
        mask[row, ids.shape[1] - len(p) :] = 1
    out = engine.generate(
        ids, 40, attention_mask=mask, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id
    )
    want = []
    for row in out[:, ids.shape[1] :].tolist():
        want.append(row[: row.index(stop) + 1] if stop in row else row)
    for temperature in (0.0, 1e-4):  # 0 is greedy by definition; a tiny temperature samples the argmax
        got = draw(engine, tokenizer, prompts, n=2, temperature=temperature, top_p=1.0)
        assert [per_prompt[0] for per_prompt in got] == want
        assert all(per_prompt[0] == per_prompt[1] for per_prompt in got)


def test_sampling_params_are_checked():
    with pytest.raises(ConfigError, match=r"top_p=1\.5"):
        SamplingParams(n=1, temperature=1.0, top_p=1.5, max_new_tokens=4, stop_id=2, pad_id=0, seed=0)


# ---- filters -------------------------------------------------------------------------------------------------
def test_unknown_filter_is_a_config_error_listing_the_names():
    with pytest.raises(ConfigError) as err:
        build_filter("answer_right")
    for name in ("answer_correct", "none", "min_length"):
        assert name in str(err.value)
    assert set(filter_names()) >= {"answer_correct", "none", "min_length"}


def test_filters_accept_what_they_should():
    ex = {"answer": 7}
    good = Candidate(ex, "3 + 4 = 7.\n#### 7", num_tokens=9, finished=True)
    bad = Candidate(ex, "3 + 4 = 8.\n#### 8", num_tokens=3, finished=True)
    assert build_filter("answer_correct", columns=["messages", "answer"])(good)
    assert not build_filter("answer_correct")(bad)
    assert build_filter("none")(bad)
    short = build_filter("min_length", {"min_tokens": 5})
    assert short(good) and not short(bad)
    with pytest.raises(ConfigError, match="min_tokens"):
        build_filter("min_length", {"min_token": 5})  # a misspelt argument fails loudly
    with pytest.raises(ConfigError, match="answer"):
        build_filter("answer_correct", columns=["messages"])  # a user dataset without answers


@pytest.mark.slow
def test_generate_rejects_an_unknown_filter_before_sampling(tiny_teacher, base_overrides, tmp_path):
    cfg = compose([*base_overrides, *GEN, "generate.filter=bogus"], run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="answer_correct"):
        gen.generate(cfg)
    assert not (tmp_path / "generated").exists()


# ---- distill generate ----------------------------------------------------------------------------------------
def shard_rows(out, chunk):
    return datasets.load_from_disk(str(out / "progress" / f"shard-{chunk:06d}")).to_list()


@pytest.mark.slow
def test_generate_keeps_only_correct_answers_and_resumes(tiny_teacher, base_overrides, tmp_path, monkeypatch):
    out = tmp_path / "generated"
    cfg = compose([*base_overrides, *GEN], run_dir=str(tmp_path))

    # A run killed after its first chunk: that chunk is committed, the rest is not.
    real_stream = gen.local_sample_stream

    def dies_after_one_chunk(engine, batches, params):
        for i, completions in enumerate(real_stream(engine, batches, params)):
            yield completions
            if i == 0:  # one batch of 8 prompts x 4 = 32 sequences is exactly one chunk
                raise KeyboardInterrupt

    monkeypatch.setattr(gen, "local_sample_stream", dies_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(cfg)
    assert json.loads((out / "progress" / "progress.json").read_text())["chunks"].keys() == {"0"}
    assert not (out / "dataset_dict.json").exists()
    monkeypatch.setattr(gen, "local_sample_stream", real_stream)

    summary = gen.generate(cfg)
    assert summary["this_run"]["chunks_sampled"] == 2 and summary["this_run"]["chunks_reused"] == 1
    assert summary["prompts"] == 24 and summary["candidates"] == 24 * 4
    parts = ("kept", "rejected", "unfinished", "duplicate")
    assert sum(summary[k] for k in parts) == summary["candidates"]
    assert 0 < summary["prompts_with_kept"] <= min(summary["kept"], 24)
    assert summary["generated_tokens"] > 0 and summary["tokens_per_s"] > 0
    assert json.loads((out / "summary.json").read_text())["kept"] == summary["kept"]

    ds = datasets.load_from_disk(str(out))
    assert set(ds) == {"train", "eval"} and ds["train"].num_rows == summary["kept"] > 0
    for row in ds["train"]:
        user, reply = row["messages"]
        assert user["role"] == "user" and reply["role"] == "assistant"
        assert extract_answer(reply["content"]) == row["answer"]
    assert ds["eval"].num_rows == 8  # the task's own held-out split, for a comparable evaluation

    # A deleted shard is sampled again, alone, and comes back identical (seeds per prompt and sample).
    before = shard_rows(out, 1)
    shutil.rmtree(out / "progress" / "shard-000001")
    again = gen.generate(cfg)
    assert again["this_run"]["chunks_sampled"] == 1 and again["this_run"]["chunks_reused"] == 2
    assert shard_rows(out, 1) == before
    assert again["kept"] == summary["kept"]

    # The filter runs on stored samples: changing it resamples nothing.
    keep_all = gen.generate(compose([*base_overrides, *GEN, "generate.filter=none"], run_dir=str(tmp_path)))
    assert keep_all["this_run"]["chunks_sampled"] == 0
    assert keep_all["kept"] == 96 - keep_all["unfinished"] - keep_all["duplicate"] > summary["kept"]

    # Different sampling settings must not be mixed into the same folder.
    with pytest.raises(ConfigError, match="sampling"):
        gen.generate(compose([*base_overrides, *GEN, "generate.temperature=0.5"], run_dir=str(tmp_path)))


@pytest.fixture(scope="module")
def generated(tiny_teacher, base_overrides, tmp_path_factory):
    """A dataset of correct teacher answers, shared by the fine-tuning tests."""
    run_dir = tmp_path_factory.mktemp("gen")
    summary = gen.generate(compose([*base_overrides, *GEN, "data.num_train=48"], run_dir=str(run_dir)))
    assert summary["kept"] >= 4, summary
    return run_dir / "generated"


def finetune(base_overrides, data_dir, run_dir, *extra):
    from launch.distill import run

    cfg = compose(
        [
            *base_overrides,
            f"data.path={data_dir}",
            "loss=ce_only",
            # A weak test teacher keeps few answers: a batch of 4 needs only the fixture's guaranteed 4 rows,
            # and one stage reads all of them (the three-stage default's target-domain stage reads the kept
            # answers of one domain only, as few as 2 with a teacher trained to other rounding).
            "curriculum=single_stage",
            "cluster.micro_batch_size=4",
            "cluster.global_batch_size=4",
            "train.steps=3",
            "train.log_every=1",
            "eval.generate_examples=2",
            "eval.max_batches=1",
            *extra,
        ],
        run_dir=str(run_dir),
    )
    return cfg, run(cfg)


def assert_plain_hf_folder(folder):
    from transformers import AutoModelForCausalLM

    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and not {n for n in names if n.startswith("adapter")}
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


@pytest.mark.slow
def test_student_fine_tunes_on_generated_answers(generated, base_overrides, tmp_path):
    assert load_user_dataset(generated)["train"].num_rows > 0
    _, summary = finetune(base_overrides, generated, tmp_path)
    assert summary["tokens"] > 0 and "exact_match" in summary  # the eval split kept its reference answers
    assert_plain_hf_folder(tmp_path / "student")


@pytest.mark.slow
def test_lora_student_trains_adapters_only_and_exports_merged(generated, base_overrides, tmp_path):
    cfg, _ = finetune(base_overrides, generated, tmp_path, "student.lora.enabled=true", "student.lora.r=4")
    student = assert_plain_hf_folder(tmp_path / "student")
    plain = OmegaConf.merge(cfg, {"student": {"lora": {"enabled": False}}})  # same init_seed, no LoRA
    fresh = build_student(plain, load_tokenizer(tmp_path / "student"))
    got, init = student.state_dict(), fresh.state_dict()
    assert torch.equal(got["model.embed_tokens.weight"], init["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], init["model.layers.0.self_attn.q_proj.weight"]
    )


def test_merged_lora_export_has_the_adapted_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(tiny_config("tiny_phi3", 96, pad_token_id=0, eos_token_id=1), seed=0)
    peft_model = apply_lora(model, LoraConfig(r=4, alpha=8.0))
    ids = torch.randint(2, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = peft_model(ids).logits
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at 0 (a no-op adapter); make the update visible
        adapted = peft_model(ids).logits
        assert not torch.allclose(adapted, base)
        merged = merge_for_export(peft_model)
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    save_model(merged, None, tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", local_files_only=True)
    assert not list((tmp_path / "student").glob("adapter*"))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, adapted, atol=1e-5)


def test_lora_target_modules_are_checked():
    model = build_model(tiny_config("tiny_qwen2", 96, pad_token_id=0, eos_token_id=1), seed=0)
    with pytest.raises(ConfigError, match="q_proj"):  # the error lists the module names that exist
        apply_lora(model, LoraConfig(target_modules=["query"]))


# ---- Ray -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2])
def test_ray_replica_samples_what_the_local_engine_samples(ray_cluster, teacher, tiny_teacher, tp):
    from distill.cluster.generation import ray_sample_stream
    from distill.cluster.teacher_group import TeacherGroup, TeacherSpec

    engine, tokenizer, prompts = teacher
    params = SamplingParams(
        n=2,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=40,
        stop_id=generation_stop_id(tokenizer),
        pad_id=tokenizer.pad_token_id,
        seed=1,
    )
    batches = [PromptBatch(i, prompts[i : i + 4]) for i in range(0, len(prompts), 4)]
    want = list(local_sample_stream(engine, batches, params))
    # TP 2: both ranks sample with the same seeds over gathered full-vocabulary logits, in lockstep.
    group = TeacherGroup(TeacherSpec(path=str(tiny_teacher), topk=4), replicas=1, tp=tp)
    try:
        assert list(ray_sample_stream(group, batches, params)) == want
    finally:
        group.shutdown()


@pytest.mark.slow
@pytest.mark.distributed
def test_generate_in_ray_mode_writes_the_local_dataset(ray_cluster, tiny_teacher, base_overrides, tmp_path):
    small = [*base_overrides, *GEN, "data.num_train=8"]
    local = gen.generate(compose(small, run_dir=str(tmp_path / "local")))
    remote = gen.generate(compose([*small, "cluster.mode=ray"], run_dir=str(tmp_path / "ray")))
    assert remote["mode"] == "ray" and remote["kept"] == local["kept"]
    rows = [
        datasets.load_from_disk(str(tmp_path / d / "generated"))["train"].to_list() for d in ("local", "ray")
    ]
    assert rows[0] == rows[1]
