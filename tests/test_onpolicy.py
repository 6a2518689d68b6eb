"""On-policy stages (distill/training/onpolicy.py): prompts cut where the trained tokens start, the student's
seeded samples in place of the dataset's text with the loss on them only, GKD's lambda per batch, the checks that
refuse a run that cannot roll out, and a single-process run through all three stages of three_stage_onpolicy."""

from __future__ import annotations

import json

import pytest
import torch

from distill.batch import left_pad
from distill.config import compose
from distill.curriculum.stages import OnPolicy
from distill.data import encode_example, encode_prompt, pad_batch
from distill.data.dataset import build_task_dataset
from distill.errors import ConfigError
from distill.models.loading import load_tokenizer
from distill.models.resolve import build_student
from distill.tracking.metrics_log import read_metrics
from distill.training.build import build_objective, run_curriculum
from distill.training.objective import ON_POLICY
from distill.training.onpolicy import Rollouts, is_on_policy, prompt_lengths, rollout
from distill.training.reference import student_forward
from launch.distill import run


@pytest.fixture(scope="module")
def student_and_rows(tiny_teacher, base_overrides):
    cfg = compose(base_overrides)
    tokenizer = load_tokenizer(tiny_teacher)
    examples = list(build_task_dataset(["shopping", "baking"], [1], 0, 6, seed=0)["eval"])
    rows = [encode_example(tokenizer, ex, 128) for ex in examples]
    torch.manual_seed(0)
    return build_student(cfg, tokenizer), tokenizer, examples, rows


def test_prompts_end_where_the_trained_tokens_start(student_and_rows):
    _, tokenizer, examples, rows = student_and_rows
    batch = pad_batch(rows, tokenizer.pad_token_id)
    lengths = prompt_lengths(batch["loss_mask"], batch["attention_mask"])
    # The same boundary as evaluation's prompts (the conversation up to the assistant's reply).
    assert lengths == [len(encode_prompt(tokenizer, ex)) for ex in examples]
    everything = torch.zeros_like(batch["loss_mask"])
    assert prompt_lengths(everything, batch["attention_mask"]) == [len(r["input_ids"]) for r in rows]


def test_rollout_trains_only_the_students_seeded_completion(student_and_rows):
    model, tokenizer, examples, rows = student_and_rows
    batch = pad_batch(rows, tokenizer.pad_token_id)
    spec = OnPolicy(max_new_tokens=12, temperature=1.0)
    ids = dict(eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    model.train()
    out, lengths, ended = rollout(model, batch, spec, seed=7, **ids)
    again, _, _ = rollout(model, batch, spec, seed=7, **ids)
    other, _, _ = rollout(model, batch, spec, seed=8, **ids)
    assert torch.equal(out["input_ids"], again["input_ids"])  # seeded: the same samples on every process
    assert not torch.equal(out["input_ids"], other["input_ids"])
    assert model.training  # rollouts put the student back into training mode
    for i, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, ex)
        row = out["input_ids"][i].tolist()
        n = len(prompt) + lengths[i]
        assert row[: len(prompt)] == prompt
        assert 1 <= lengths[i] <= 12
        completion = row[len(prompt) : n]
        # Cut at the first eos (kept: the student learns to stop), nothing after it trained.
        assert (tokenizer.eos_token_id in completion) == ended[i]
        if ended[i]:
            assert completion.index(tokenizer.eos_token_id) == len(completion) - 1
        trained = torch.nonzero(out["loss_mask"][i]).flatten().tolist()
        assert trained == list(range(len(prompt) - 1, n - 1))  # predictions of the completion's tokens only
        assert out["attention_mask"][i].sum() == n
    # The same samples as the model's own sampling from the same seed (no other randomness consumed).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        prompts, attend = left_pad([encode_prompt(tokenizer, ex) for ex in examples], tokenizer.pad_token_id)
        model.eval()
        direct = model.generate(
            input_ids=prompts,
            attention_mask=attend,
            do_sample=True,
            top_k=0,
            max_new_tokens=12,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.train()
    first = direct[0, prompts.shape[1] :].tolist()
    assert (
        out["input_ids"][0, len(encode_prompt(tokenizer, examples[0])) :][: lengths[0]].tolist()
        == (first[: lengths[0]])
    )


def test_lambda_decides_per_batch_and_reproducibly():
    half = OnPolicy(lmbda=0.5)
    draws = [is_on_policy(half, 0, (0, i)) for i in range(2000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert draws == [is_on_policy(half, 0, (0, i)) for i in range(2000)]
    assert draws != [is_on_policy(half, 1, (0, i)) for i in range(2000)]
    assert all(is_on_policy(OnPolicy(lmbda=1.0), 3, (0, i)) for i in range(100))


def test_off_policy_plans_and_other_batches_pass_through(student_and_rows):
    model, tokenizer, _, rows = student_and_rows
    batch = pad_batch(rows, tokenizer.pad_token_id)
    rollouts = Rollouts(model, seed=0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    assert rollouts((0, 0), batch, None) is batch
    cfg = compose(
        ["curriculum=three_stage_onpolicy", "train.steps=10", "curriculum.stages.2.on_policy.lmbda=1.0"]
    )
    plans = run_curriculum(cfg)
    assert rollouts((0, 0), batch, plans.plan(0)) is batch  # the warm-up stage is off-policy
    assert rollouts.stats.take() == {}
    assert rollouts((0, 0), batch, plans.plan(9)) is not batch
    stats = rollouts.stats.take()
    assert stats["onpolicy/share"] == 1.0 and 0 < stats["onpolicy/completion_tokens"] <= 96


@pytest.mark.parametrize(
    ("override", "names"),
    [
        (["curriculum.stages.2.on_policy.max_staleness=1"], "on the Ray path only"),
        (["curriculum.stages.2.on_policy.max_staleness=-1", "cluster=local_ray"], "max_staleness=-1"),
        (["teacher.cache=/tmp/nowhere"], "unset teacher.cache"),
        (["data.packing=true"], "data.packing=false"),
        (["curriculum.stages.2.on_policy.lmbda=1.5"], "on_policy.lmbda=1.5"),
        (["curriculum.stages.2.on_policy.max_new_tokens=0"], "max_new_tokens=0"),
    ],
)
def test_runs_that_cannot_roll_out_are_refused_before_loading(override, names):
    cfg = compose(["curriculum=three_stage_onpolicy", "train.steps=10", *override])
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        run_curriculum(cfg)


def test_the_cross_tokenizer_recipe_is_three_stage_onpolicy_with_fewer_onpolicy_batches():
    """curriculum=three_stage_onpolicy_xtok: the same stages, a tenth of the last stage's batches on-policy (across
    tokenizers each costs reference-text bits: bench/xtok_quality.py)."""
    same, xtok = (
        compose([f"curriculum={name}"]).curriculum
        for name in ("three_stage_onpolicy", "three_stage_onpolicy_xtok")
    )
    assert same.stages[2].on_policy.lmbda == 0.25 and xtok.stages[2].on_policy.lmbda == 0.1
    xtok.stages[2].on_policy.lmbda = same.stages[2].on_policy.lmbda
    assert xtok.stages == same.stages


def test_hard_labels_are_off_on_the_students_own_samples(student_and_rows):
    """An on-policy batch's labels are the student's own tokens: CE on them would imitate itself."""
    model, tokenizer, _, rows = student_and_rows
    cfg = compose(["loss=ce_only"])
    objective = build_objective(cfg, model, model.config.hidden_size)
    batch = pad_batch(rows, tokenizer.pad_token_id)
    out = student_forward(model, objective, batch)
    assert set(objective(out, batch)) == {"ce"}
    # Still computed (ZeRO-3 ranks must run the same modules on every batch), on no token: 0 and no gradient.
    own = objective(out, {**batch, ON_POLICY: torch.ones((), dtype=torch.bool)})
    assert set(own) == {"ce"} and float(own["ce"]) == 0.0
    own["ce"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    with pytest.raises(ConfigError, match="only hard-label terms"):
        run_curriculum(
            compose(
                [
                    "loss=ce_only",
                    "curriculum=three_stage_onpolicy",
                    "train.steps=10",
                    "~curriculum.stages.2.terms.soft",
                    "curriculum.stages.2.on_policy.lmbda=1.0",
                ]
            )
        )


def test_sampled_token_terms_are_refused_in_off_policy_stages():
    cfg = compose(
        [
            "curriculum=three_stage_onpolicy",
            "train.steps=10",
            "loss=kd_onpolicy",
            "~curriculum.stages.2.terms.soft",
            "+curriculum.stages.2.terms.k1=1.0",
        ]
    )
    with pytest.raises(ConfigError, match=r"\['k1'\] estimate the reverse KL .* stage 'warmup'"):
        run_curriculum(cfg)


@pytest.mark.slow
def test_three_stage_onpolicy_runs_and_reports_its_rollouts(tiny_teacher, base_overrides, tmp_path):
    # The on-policy stage trains with the k1 estimator on the student's samples (through the fused head).
    overrides = [
        *base_overrides,
        "curriculum=three_stage_onpolicy",
        "curriculum.stages.2.on_policy.max_new_tokens=24",
        "loss=kd_onpolicy",
        "~curriculum.stages.0.terms.soft",
        "+curriculum.stages.0.terms.forward_kl=1.0",
        "~curriculum.stages.1.terms.soft",
        "+curriculum.stages.1.terms.forward_kl=1.0",
        "~curriculum.stages.2.terms.soft",
        "~curriculum.stages.2.terms.hard",
        "+curriculum.stages.2.terms.k1=1.0",
        "curriculum.stages.2.on_policy.lmbda=1.0",
        "train.steps=10",
        "train.log_every=1",
    ]
    run(compose(overrides, run_dir=str(tmp_path / "a")))
    records = read_metrics(tmp_path / "a" / "metrics.jsonl")
    stages = {r["step"]: r["stage"] for r in records if "stage" in r}
    on = [r for r in records if r.get("stage") == "onpolicy"]
    assert stages[0] == "warmup" and on and all(r["onpolicy/share"] == 1.0 for r in on)
    assert all(0 < r["onpolicy/completion_tokens"] <= 24 and 0 <= r["onpolicy/eos_rate"] <= 1 for r in on)
    assert all(r["loss"] == r["loss/k1"] and "loss/forward_kl" not in r for r in on)
    assert all("onpolicy/share" not in r for r in records if r.get("stage") != "onpolicy")
    # Trained on the completions: at most 24 tokens a row, far fewer than the dataset's replies.
    assert all(r["tokens"] <= 24 * 16 for r in on)
    summary = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert {"completion_tokens", "eos_rate", "exact_match"} <= summary.keys()
    # Reproducible: the same seed writes the same samples and trains the same student.
    run(compose(overrides, run_dir=str(tmp_path / "b")))
    again = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["loss"] for r in records if "loss" in r] == [r["loss"] for r in again if "loss" in r]


XTOK = ["experiment=xtok_demo", "prepare.student_vocab_size=320"]


def test_cross_tokenizer_rollouts_reencode_the_students_reply_for_both_tokenizers(
    tiny_teacher, base_overrides
):
    """The reply put back into its example and encoded as any cross-tokenizer row: the dataset's own reply (cut
    after its stop token) gives back exactly the dataset's row, alignment and teacher tokens included."""
    from distill.eval.runs import generation_stop_id
    from distill.models.loading import load_tokenizer_folder
    from distill.xtok.encode import encode_pair
    from distill.xtok.rollout import written_pairs
    from launch.prepare_demo import prepare_student_tokenizer

    cfg = compose([*base_overrides, *XTOK])
    student = load_tokenizer_folder(prepare_student_tokenizer(cfg))
    teacher = load_tokenizer(tiny_teacher)
    stop = generation_stop_id(student)
    examples = list(build_task_dataset(["shopping", "garden"], [1], 0, 3, seed=1)["eval"])
    rows = [encode_pair(student, teacher, ex, 128) for ex in examples]
    replies = []
    for row in rows:
        start = row["loss_mask"].index(True) + 1
        reply = row["input_ids"][start:]
        replies.append(reply[: reply.index(stop) + 1])
    again = written_pairs(student, teacher, examples, replies, stop_id=stop, max_length=128)
    for want, got in zip(rows, again, strict=True):
        for key in ("input_ids", "loss_mask", "teacher_input_ids", "align", "target_chars"):
            assert got[key] == want[key], key
    text_rows = [{"text": "plain text"}]
    with pytest.raises(ConfigError, match="need chat examples"):
        written_pairs(student, teacher, text_rows, [[stop]], stop_id=stop, max_length=128)


def test_a_cross_tokenizer_on_policy_run_trains_on_the_students_text(tiny_teacher, base_overrides, tmp_path):
    overrides = [
        *base_overrides,
        *XTOK,
        "curriculum=three_stage_onpolicy_xtok",
        "curriculum.stages.2.on_policy.max_new_tokens=16",
        "curriculum.stages.2.on_policy.lmbda=0.5",  # some of the 4 on-policy steps' batches the student's
        "train.steps=10",
        "train.log_every=1",
        "eval.generate_examples=0",
    ]
    run(compose(overrides, run_dir=str(tmp_path)))
    on = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r.get("stage") == "onpolicy"]
    assert on and sum(r["onpolicy/share"] for r in on) > 0
    assert all(r["loss/forward_kl"] > 0 for r in on)  # the teacher graded the student's text
    assert "bits_per_char" in json.loads((tmp_path / "eval.json").read_text())
