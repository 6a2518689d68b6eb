"""The cross-tokenizer path end to end on tiny real models (no trained weights needed), and its config checks."""

import pytest
import torch

from distill.config import compose
from distill.data import build_task_dataset, encode_example, pad_batch
from distill.data.batching import pack_rows
from distill.errors import ConfigError
from distill.models.resolve import pair_facts
from distill.models.tiny import build_model, tiny_config
from distill.models.tokenizer import task_corpus, train_tokenizer
from distill.run.validate import validate_run
from distill.teacher.engine import TeacherEngine
from distill.training.objective import Objective, TermSpec
from distill.xtok import CrossTokenizerTeacher, build_token_map, encode_pair
from distill.xtok.teacher import project_features


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(task_corpus(0, 40), 320)


def _model(tok, arch, seed):
    cfg = tiny_config(arch, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return build_model(cfg, seed=seed)


def test_identical_tokenizers_cross_path_equals_same_tokenizer_path(tok):
    """Same tokenizer on both sides: the cross-tokenizer data path, projection and loss give the plain loss."""
    examples = list(build_task_dataset(["shopping", "travel"], [1], 6, 0, seed=0)["train"])
    examples += [{"text": "héllo 日本 12  +  3\n\n= 15"}]
    engine = TeacherEngine(_model(tok, "tiny_qwen2", 1), topk=8)
    student = _model(tok, "tiny_qwen2", 2)
    plain_rows = [encode_example(tok, ex, 96) for ex in examples]
    cross_rows = [encode_pair(tok, tok, ex, 96) for ex in examples]
    plain, cross = pad_batch(plain_rows, tok.pad_token_id), pad_batch(cross_rows, tok.pad_token_id)
    assert torch.equal(plain["input_ids"], cross["input_ids"]) and torch.equal(
        plain["loss_mask"], cross["loss_mask"]
    )

    same_tb = engine.score((0, 0), plain["input_ids"], plain["attention_mask"], plain["loss_mask"]).to_torch()
    table = build_token_map(tok, tok).ids  # CrossTokenizerTeacher pads it to the engine's vocabulary
    cross_tb = CrossTokenizerTeacher(engine, table).score((0, 0), cross).to_torch()

    kd = [TermSpec("forward_kl", "forward_kl", 1.0), TermSpec("ce", "ce", 0.5)]
    out = student(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"].long())
    same = Objective(kd, temperature=2.0, chunk_size=0)(out, same_tb)
    xtok = Objective([*kd, TermSpec("uld", "uld", 1.0)], temperature=2.0, chunk_size=0, cross_tokenizer=True)
    got = xtok(out, cross_tb)
    assert float(same["forward_kl"]) > 0
    for label in ("forward_kl", "ce"):
        assert abs(float(got[label]) - float(same[label])) < 1e-6 * max(1.0, abs(float(same[label])))
    assert float(got["uld"]) == 0.0


def test_different_tokenizers_train_through_the_cross_path(tok):
    """A teacher on another tokenizer: every trained position gets a finite loss and a gradient."""
    teacher_tok = train_tokenizer(task_corpus(1, 40), 400)
    examples = list(build_task_dataset(["garden"], [1, 2], 4, 0, seed=1)["train"])
    rows = [encode_pair(tok, teacher_tok, ex, 96) for ex in examples]
    batch = pad_batch(rows, tok.pad_token_id)
    engine = TeacherEngine(_model(teacher_tok, "tiny_deepseek_v3", 1), topk=8)
    table = build_token_map(teacher_tok, tok).ids  # CrossTokenizerTeacher pads it to the engine's vocabulary
    tb = CrossTokenizerTeacher(engine, table).score((0, 1), batch)
    assert tb.topk_ids.shape[:2] == batch["input_ids"].shape and tb.topk_ids.min() >= -1
    aligned = (batch["align"] >= 0) & batch["loss_mask"]
    assert (
        aligned.sum() > 0.5 * batch["loss_mask"].sum()
        and (tb.topk_ids[aligned.numpy()] >= 0).any(axis=-1).all()
    )
    student = _model(tok, "tiny_qwen2", 2)
    objective = Objective(
        [TermSpec("forward_kl", "forward_kl", 1.0), TermSpec("uld", "uld", 1.0)],
        temperature=1.0,
        chunk_size=0,
        cross_tokenizer=True,
    )
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    sums = objective(out, tb.to_torch())
    total = objective.weighted_total(sums)
    total.backward()
    assert torch.isfinite(total) and float(sums["forward_kl"]) > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("student", ["qwen2_5_3b", "phi3_mini"])
def test_production_pairs_validate_with_a_token_map(student):
    base = ["teacher=deepseek_r1", f"student={student}", "cluster.teacher_tp=8", "loss=kd_xtok"]
    cfg = compose([*base, "teacher.token_map.enabled=true"])
    validate_run(cfg, pair_facts(cfg))
    cfg = compose(base)
    with pytest.raises(ConfigError, match=r"teacher\.token_map\.enabled=true"):
        validate_run(cfg, pair_facts(cfg))


@pytest.mark.parametrize("student", ["qwen2_5_3b", "phi3_mini"])
@pytest.mark.parametrize("extra", [[], ["loss=kd_features"], ["data.packing=true"]])
def test_every_feature_validates_across_tokenizers(student, extra):
    """The production pairs with the default loss, with hidden-state and attention transfer (aligned positions),
    and with packing: nothing a token map turns off."""
    base = [
        "teacher=deepseek_r1",
        f"student={student}",
        "cluster.teacher_tp=8",
        "teacher.token_map.enabled=true",
    ]
    cfg = compose([*base, *extra])
    validate_run(cfg, pair_facts(cfg))


def test_features_move_to_the_aligned_student_positions():
    """project_features against a plain loop: student position s reads teacher position align[s]; attention keeps
    the weights between aligned positions only; unaligned rows and columns are zero."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 3, 4, generator=g)
    attention = torch.rand(2, 3, 5, 5, generator=g)
    align = torch.tensor([[0, -1, 2, 4], [1, 3, -1, -1]])
    got_h, got_a = project_features(hidden, attention, align)
    assert got_h.shape == (2, 4, 3, 4) and got_a.shape == (2, 3, 4, 4)
    for b in range(2):
        for s in range(4):
            want = hidden[b, align[b, s]] if align[b, s] >= 0 else torch.zeros(3, 4)
            assert torch.equal(got_h[b, s], want)
            for c in range(4):
                both = align[b, s] >= 0 and align[b, c] >= 0
                want = attention[b, :, align[b, s], align[b, c]] if both else torch.zeros(3)
                assert torch.equal(got_a[b, :, s, c], want)


def test_identical_tokenizers_cross_path_gives_the_plain_feature_terms(tok):
    """Hidden-state and attention transfer through the cross-tokenizer path, with one tokenizer on both sides:
    the plain path's feature terms (every trained position is aligned to itself)."""
    examples = list(build_task_dataset(["baking"], [1], 4, 0, seed=2)["train"])
    teacher_model = _model(tok, "tiny_qwen2", 1)
    teacher_model.config._attn_implementation = "eager"
    engine = TeacherEngine(teacher_model, topk=8, hidden_layers=[2], attention_layers=[1])
    student = _model(tok, "tiny_qwen2", 2)
    student.config._attn_implementation = "eager"
    plain = pad_batch([encode_example(tok, ex, 96) for ex in examples], tok.pad_token_id)
    cross = pad_batch([encode_pair(tok, tok, ex, 96) for ex in examples], tok.pad_token_id)
    same_tb = engine.score((0, 0), plain["input_ids"], plain["attention_mask"], plain["loss_mask"]).to_torch()
    cross_tb = CrossTokenizerTeacher(engine, build_token_map(tok, tok).ids).score((0, 0), cross).to_torch()
    assert cross_tb["aligned"] is not None and same_tb["aligned"] is None
    terms = [
        TermSpec("feat", "hidden_mse", 1.0, layer_map=[(3, 2)]),
        TermSpec("attn", "attention_transfer", 1.0, layer_map=[(1, 1)]),
    ]
    out = student(
        input_ids=plain["input_ids"],
        attention_mask=plain["attention_mask"].long(),
        output_hidden_states=True,
        output_attentions=True,
    )
    torch.manual_seed(0)
    same = Objective(terms, temperature=1.0, chunk_size=0, student_hidden_size=96, teacher_hidden_size=96)
    torch.manual_seed(0)
    xtok = Objective(
        terms,
        temperature=1.0,
        chunk_size=0,
        student_hidden_size=96,
        teacher_hidden_size=96,
        cross_tokenizer=True,
    )
    want, got = same(out, same_tb), xtok(out, cross_tb)
    # Aligned trained positions are a subset of the trained ones (positions inside a merged group have none),
    # and with one tokenizer every trained position is its own group.
    assert torch.equal(cross_tb["aligned"] & cross_tb["loss_mask"].bool(), plain["loss_mask"])
    for label in ("feat", "attn"):
        assert float(want[label]) > 0
        assert float(got[label]) == pytest.approx(float(want[label]), rel=1e-5), label


def test_tiny_student_on_its_own_tokenizer_needs_the_map(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "student_tok"))
    other = train_tokenizer(task_corpus(5, 20), 300)
    cfg = compose([f"student.tokenizer={tmp_path / 'student_tok'}"])
    facts = pair_facts(cfg, other)
    assert facts.student_vocab == len(tok) and not facts.same_tokenizer
    with pytest.raises(ConfigError, match=r"teacher\.token_map\.enabled=true"):
        validate_run(cfg, facts)
    cfg = compose(
        [
            f"student.tokenizer={tmp_path / 'student_tok'}",
            "experiment=xtok_demo",
            f"student.tokenizer={tmp_path / 'student_tok'}",
        ]
    )
    validate_run(cfg, pair_facts(cfg, other))
    assert pair_facts(cfg, tok).same_tokenizer  # same hash: a shared tokenizer after all


def test_uld_without_a_token_map_is_refused():
    cfg = compose(["loss=kd_xtok"])
    with pytest.raises(ConfigError, match=r"uld.*teacher\.token_map\.enabled=true"):
        validate_run(cfg, pair_facts(cfg))


def test_packed_cross_tokenizer_rows_score_every_document_as_if_alone(tok):
    """Packing with a token map: documents concatenated on both sides, each document's alignment moved by the
    teacher tokens before it, teacher positions restarting per document. The projected top-k at a document's
    positions in the packed row equals the top-k of that document scored on its own."""
    teacher_tok = train_tokenizer(task_corpus(1, 40), 400)
    examples = list(build_task_dataset(["travel"], [1], 3, 0, seed=3)["train"])
    rows = [encode_pair(tok, teacher_tok, ex, 96) for ex in examples]
    width = sum(len(r["input_ids"]) for r in rows) + 5  # room for all three and a filler tail
    (packed,) = pack_rows(rows, width, eos_id=tok.pad_token_id)
    batch = pad_batch([packed], tok.pad_token_id)
    assert batch["teacher_position_ids"].shape == batch["teacher_input_ids"].shape
    engine = TeacherEngine(_model(teacher_tok, "tiny_deepseek_v3", 1), topk=8)
    teacher = CrossTokenizerTeacher(engine, build_token_map(teacher_tok, tok).ids)
    together = teacher.score((0, 0), batch)
    assert torch.equal(torch.as_tensor(together.position_ids).long(), batch["position_ids"])
    start = 0
    for i, row in enumerate(rows):
        alone = teacher.score((0, i + 1), pad_batch([row], tok.pad_token_id))
        n = len(row["input_ids"])
        part = slice(start, start + n)
        aligned = torch.as_tensor(row["align"]) >= 0
        assert aligned.any()
        got_ids, want_ids = together.topk_ids[0, part], alone.topk_ids[0, :n]
        assert (got_ids[aligned.numpy()] == want_ids[aligned.numpy()]).all()
        got = torch.as_tensor(together.topk_logits[0, part])[aligned]
        want = torch.as_tensor(alone.topk_logits[0, :n])[aligned]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        start += n
    assert (batch["align"][0, start:] == -1).all()  # the filler aligns to nothing
