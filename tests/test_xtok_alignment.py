"""Alignment of two tokenizations on hard strings, and the teacher -> student vocabulary map."""

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from distill.models.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, task_corpus, train_tokenizer
from distill.xtok import SideTokens, align, build_token_map, load_or_build_token_map, prediction_pairs
from distill.xtok.encode import _tokenize, encode_pair
from distill.xtok.vocab_map import EXACT, EXPANSION, SPECIAL, special_strings

HARD = [
    "héllo wörld: naïve café, 日本語のテキスト 🙂👍🏽 and ümlauts",
    "12345 + 678 = 13023; 3.14159 * 2 = 6.28318 (1,000,000)",
    "a   b\n\n\n  c\t\td    \n \n end  ",
    "<|im_start|>user\nTom has 12 apples.<|im_end|>\n<|im_start|>assistant\n12 + 3 = 15\n#### 15<|im_end|>\n",
    "x",
]
EXTRA_CORPUS = [*HARD, "naïve café ümlauts wörld", "3.14159 6.28318 1,000,000 13023"]


def _wrap(backend: Tokenizer, specials: tuple[str, ...]) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=specials[0],
        pad_token=specials[0],
        extra_special_tokens=list(specials[1:]),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _bytelevel_whole_numbers(vocab: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE that does NOT split digits: numbers come out in other pieces than the demo tokenizer's."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*task_corpus(2, 40), *EXTRA_CORPUS], trainer=trainer)
    return _wrap(backend, SPECIAL_TOKENS)


def _metaspace(vocab: int, specials: tuple[str, ...] = ("</s>",)) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE ('▁' space marker, no byte fallback) that lacks the ChatML specials."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", *specials], show_progress=False)
    backend.train_from_iterator([*task_corpus(3, 40), *EXTRA_CORPUS], trainer=trainer)
    return _wrap(backend, specials)


@pytest.fixture(scope="module")
def toks() -> dict:
    corpus = [*task_corpus(0, 40), *EXTRA_CORPUS]
    return {
        "demo384": train_tokenizer(corpus, 384),
        "demo300": train_tokenizer([*task_corpus(1, 40), *EXTRA_CORPUS], 300),
        "whole": _bytelevel_whole_numbers(420),
        "meta": _metaspace(400),
    }


PAIRS = [("demo300", "demo384"), ("whole", "demo384"), ("demo384", "meta"), ("meta", "whole")]


def _sides(s_tok, t_tok, text):
    s_ids, s_off = _tokenize(s_tok, text, add_special=False)
    t_ids, t_off = _tokenize(t_tok, text, add_special=False)
    ss, ts = special_strings(s_tok), special_strings(t_tok)
    return (
        s_ids,
        s_off,
        t_ids,
        t_off,
        SideTokens.plain(s_off, [ss.get(i) for i in s_ids]),
        SideTokens.plain(t_off, [ts.get(i) for i in t_ids]),
    )


@pytest.mark.parametrize("text", HARD, ids=["unicode", "digits", "spaces", "chat", "one-char"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "-".join(p))
def test_every_valid_group_covers_the_same_characters_on_both_sides(toks, pair, text):
    s_tok, t_tok = toks[pair[0]], toks[pair[1]]
    s_ids, s_off, t_ids, t_off, s_side, t_side = _sides(s_tok, t_tok, text)
    groups = align(s_side, t_side)
    assert groups, "no common boundary at all"
    prev_end = 0
    for g in groups:
        assert g.start >= prev_end and g.end > g.start  # in order, never overlapping
        prev_end = g.end
        if not g.valid:
            continue
        s_span = (min(s_off[i][0] for i in g.student), max(s_off[i][1] for i in g.student))
        t_span = (min(t_off[i][0] for i in g.teacher), max(t_off[i][1] for i in g.teacher))
        assert s_span == t_span == (g.start, g.end)
        # The tokens decode to the same text on both sides (byte pieces of one character included).
        want = text[g.start : g.end]
        assert s_tok.decode([s_ids[i] for i in g.student]).replace("\u2581", " ").strip() == want.strip()
        assert t_tok.decode([t_ids[i] for i in g.teacher]).replace("\u2581", " ").strip() == want.strip()
    # The groups reach the end of the text: the last character is a boundary on both sides.
    assert groups[-1].end == len(text) or not text.strip()
    valid = [g for g in groups if g.valid]
    # Most of the text trains; what one side lacks as a special token does not.
    assert sum(g.end - g.start for g in valid) > 0.5 * len(re.sub(r"<\|im_\w+\|>", "", text).strip())


def test_multibyte_pieces_never_end_a_group(toks):
    text = "日本 🙂"
    s_ids, _s_off, _t_ids, _t_off, s_side, t_side = _sides(toks["demo300"], toks["demo384"], text)
    assert len(s_ids) > len(text)  # the characters really are split into byte pieces
    boundaries = {g.end for g in align(s_side, t_side)}
    assert boundaries <= {0, 1, 2, 3, 4} and 1 in boundaries and 4 in boundaries


def test_digits_split_differently_form_merged_groups(toks):
    text = "Tom has 12 apples and 15 pens, 14 left"
    _s_ids, _, _t_ids, _, s_side, t_side = _sides(toks["whole"], toks["demo384"], text)
    groups = align(s_side, t_side)
    numbers = [
        g
        for g in groups
        if text[g.start : g.end].strip().isdigit() and len(text[g.start : g.end].strip()) > 1
    ]
    assert numbers and all(g.valid for g in numbers)
    assert any(len(g.teacher) > len(g.student) for g in numbers)  # one digit per teacher token


def test_identical_tokenizers_align_every_token_one_to_one(toks):
    tok = toks["demo384"]
    for text in HARD:
        _ids, _, _, _, s_side, t_side = _sides(tok, tok, text)
        pairs = prediction_pairs(align(s_side, t_side))
        groups = align(s_side, t_side)
        assert all(g.valid for g in groups)
        # Every position that predicts the start of a whole character is a pair (i, i).
        assert all(s == t for s, t in pairs) and len(pairs) >= len({g.end for g in groups}) - 1


def test_chat_specials_one_side_lacks_are_masked(toks):
    text = HARD[3]
    _, _s_off, _, _t_off, s_side, t_side = _sides(toks["demo384"], toks["meta"], text)
    groups = align(s_side, t_side)
    specials = [g for g in groups if "<|im_" in text[g.start : g.end]]
    assert specials and not any(g.valid for g in specials)
    # Both sides have them: the special tokens align one to one and are trained.
    _, _, _, _, s_side, t_side = _sides(toks["demo384"], toks["demo300"], text)
    both = [g for g in align(s_side, t_side) if text[g.start : g.end] in ("<|im_start|>", "<|im_end|>")]
    assert len(both) == 4 and all(g.valid and g.one_to_one for g in both)


def test_pure_alignment_on_hand_made_spans():
    # "abcd": student [ab][c][d], teacher [a][bcd]; student's 'c' is two byte pieces of one character.
    student = SideTokens.plain([(0, 2), (2, 3), (2, 3), (3, 4)])
    teacher = SideTokens.plain([(0, 1), (1, 4)])
    groups = align(student, teacher)
    assert [(g.student, g.teacher, g.start, g.end) for g in groups] == [(range(0, 4), range(0, 2), 0, 4)]
    # A teacher BOS (empty span) shifts teacher positions but never forms a group.
    teacher = SideTokens.plain([(0, 0), (0, 2), (2, 3), (3, 4)])
    student = SideTokens.plain([(0, 2), (2, 4)])
    groups = align(student, teacher)
    assert [(g.student, g.teacher) for g in groups] == [
        (range(0, 1), range(1, 2)),
        (range(1, 2), range(2, 4)),
    ]
    assert prediction_pairs(groups) == [(0, 1)]


def test_chat_with_different_templates_masks_template_tokens(toks):
    """The student renders ChatML, the teacher its own template: only message contents align."""
    teacher = _bytelevel_whole_numbers(420)
    teacher.chat_template = (
        "{%- for m in messages %}{{- '### ' + m['role'] + ':\\n' + m['content'] + '\\n\\n' }}{%- endfor %}"
    )
    ex = {
        "messages": [
            {"role": "user", "content": "Tom has 12 apples. How many?"},
            {"role": "assistant", "content": "He buys 3 more, so 12 + 3 = 15.\n#### 15"},
        ]
    }
    student = toks["demo384"]
    row = encode_pair(student, teacher, ex, 128)
    s_tokens = student.convert_ids_to_tokens(row["input_ids"])
    t_all, _ = _tokenize(
        teacher, teacher.apply_chat_template(ex["messages"], tokenize=False), add_special=False
    )
    assert (
        t_all[: len(row["teacher_input_ids"])] == row["teacher_input_ids"]
    )  # cut after the last aligned one
    t_tokens = teacher.convert_ids_to_tokens(t_all)
    aligned = [(s, t) for s, t in enumerate(row["align"]) if t >= 0]
    assert len(aligned) > 10
    for s, t in aligned:
        # The next tokens start the same text; no position predicts a template token.
        nxt_s, nxt_t = s_tokens[s + 1], t_tokens[t + 1]
        assert "<|im_" not in nxt_s and "<|im_" not in nxt_t
        a, b = student.convert_tokens_to_string([nxt_s]), teacher.convert_tokens_to_string([nxt_t])
        assert a.startswith(b) or b.startswith(a)
    assert (
        row["input_ids"]
        == __import__("distill.data", fromlist=["x"]).encode_example(student, ex, 128)["input_ids"]
    )


def test_vocab_map_exact_expansion_special_and_identity(toks, tmp_path):
    teacher, student = toks["whole"], toks["demo384"]
    m = build_token_map(teacher, student)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    inv_s = {i: t for t, i in s_vocab.items()}
    assert m.ids[t_vocab["<|im_end|>"]] == s_vocab["<|im_end|>"] and m.kinds[t_vocab["<|im_end|>"]] == SPECIAL
    multi_digit = [t for t in t_vocab if t.lstrip("Ġ").isdigit() and len(t.lstrip("Ġ")) > 1]
    assert multi_digit  # the whole-number tokenizer merged digits ('Ġ12'); the demo one cannot
    for t in multi_digit:
        text = teacher.convert_tokens_to_string([t])
        first = student.convert_ids_to_tokens(student(text, add_special_tokens=False)["input_ids"])[0]
        assert m.kinds[t_vocab[t]] == EXPANSION and inv_s[int(m.ids[t_vocab[t]])] == first
    shared = [t for t in t_vocab if t in s_vocab and t not in SPECIAL_TOKENS]
    assert all(m.ids[t_vocab[t]] == s_vocab[t] and m.kinds[t_vocab[t]] == EXACT for t in shared)
    # byte-level 'Ġthe' and SentencePiece '▁the' are the same text
    meta = toks["meta"]
    mm = build_token_map(meta, student)
    spaced = [t for t in meta.get_vocab() if t.startswith("\u2581") and len(t) > 2 and "Ġ" + t[1:] in s_vocab]
    assert spaced
    for t in spaced:
        assert mm.ids[meta.get_vocab()[t]] == s_vocab["Ġ" + t[1:]]
    # identity
    ident = build_token_map(student, student)
    assert (ident.ids == range(len(student))).all()
    # cache: built once, then read back from the file named by both hashes
    first = load_or_build_token_map(teacher, student, tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    again = load_or_build_token_map(teacher, student, tmp_path)
    assert (again.ids == first.ids).all() and (again.kinds == first.kinds).all()
    load_or_build_token_map(meta, student, tmp_path)
    assert len(list(tmp_path.iterdir())) == 2
