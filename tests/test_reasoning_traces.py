"""Reasoning traces in R1's format: final-answer extraction (`<think>`, `\\boxed{}`, `#### N`), the `<think>` chat
templates of both families and their loss masks, and the embedded `gsm_synth_reasoning` task."""

from __future__ import annotations

import re
from itertools import islice

import pytest
import torch
from torch import nn

from distill.config import compose
from distill.data import (
    DOMAINS,
    LEVELS,
    answer_matches,
    encode_example,
    encode_prompt,
    extract_answer,
    iter_problems,
    iter_reasoning_problems,
)
from distill.data.build import raw_dataset
from distill.data.chat_templates import (
    QWEN_TEMPLATE,
    R1_ASSISTANT,
    R1_BOS,
    R1_EOS,
    R1_TEMPLATE,
    R1_USER,
    render,
    think_template,
)
from distill.data.filters import Candidate, build_filter
from distill.data.task import ESTIMATE_MARGIN, check_trace_tokens, estimate_tokens
from distill.errors import ConfigError
from distill.eval.metrics import exact_match
from distill.models.tokenizer import CHAT_TEMPLATE, IM_END, render_chat, task_corpus, train_tokenizer

FACT_RE = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")
OPS = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
TRACE_TOKENS = [1024, 4096]


@pytest.fixture(scope="module")
def demo_tokenizer():
    """The demo tokenizer as `distill prepare-demo` trains it by default (task_corpus(seed), 512 tokens)."""
    return train_tokenizer(task_corpus(seed=0), vocab_size=512)


def templated_tokenizer(template: str, special: list[str] = ()):
    """A fresh local tokenizer with `template`; `special`: markers made single tokens, as the model's own
    tokenizer has them (R1's `<｜Assistant｜>` ...). The demo tokenizer itself is left as it is."""
    tokenizer = train_tokenizer(task_corpus(seed=0, per_stream=50), vocab_size=512)
    tokenizer.add_tokens(list(special), special_tokens=True)
    tokenizer.chat_template = template
    return tokenizer


def trained_text(tokenizer, encoded: dict) -> str:
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    return tokenizer.decode([ids[t + 1] for t in range(len(ids) - 1) if mask[t]])


def think_section(reply: str) -> str:
    return reply[: reply.index("</think>") + len("</think>")]


# --- final-answer extraction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>\nso 3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}.", 7),
        ("<think>maybe \\boxed{3}</think>\n\nIt is \\boxed{4}.", 4),  # a box inside <think> does not count
        ("<think>maybe \\boxed{3}</think>\n\nno box here", None),
        ("<think>maybe \\boxed{3}</think>\n\n#### 5", 5),
        ("<think>3 + 4 = 7, \\boxed{7} #### 7", None),  # thinking never finished: no answer
        ("<think>a</think> \\boxed{4} <think>again", None),  # reopened and never closed
        ("the prompt opened <think>, so only the close is here: \\boxed{9}</think>\n\n\\boxed{4}", 4),
        ("first \\boxed{3}, then finally \\boxed{4}", 4),  # the last box
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\frac {1}{ 2 }}", "\\frac{1}{2}"),  # LaTeX compares without whitespace
        ("\\boxed{5} then a cut-off \\boxed{\\frac{1}{", 5),  # an unbalanced box is skipped
        ("#### 3\nsummary: \\boxed{4}", 4),  # a box wins over ####
        ("#### 7 then #### 9", 7),  # the first #### (unchanged)
        ("so 2 + 2 = 4.\n#### 4<|im_end|>", 4),
        ("#### 1,234", 1234),
        ("####", None),
        ("\\boxed{}", None),
        ("no marker 42", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("written", "reference"),
    [
        ("\\boxed{1,234}", 1234),
        ("\\boxed{1234}", "1,234"),
        ("\\boxed{3.0}", 3),
        ("#### 3.0", "3"),
        ("\\boxed{\\$5}", 5),
        ("\\boxed{$5}", "5"),
        ("#### $5", 5),
        ("\\boxed{0.50}", "0.5"),
        ("\\boxed{-7}", -7),
        ("\\boxed{ 12. }", 12),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ],
)
def test_answers_compare_by_value(written, reference):
    assert answer_matches(written, reference)
    assert not answer_matches(written, 999)


def test_no_reference_never_matches():
    assert not answer_matches("\\boxed{7}", None)


def test_generate_filter_reads_the_final_answer_after_think():
    keep = build_filter("answer_correct", columns=["messages", "answer"])

    def cand(text: str) -> Candidate:
        return Candidate({"answer": 7}, text, num_tokens=10, finished=True)

    assert keep(cand("<think>\n3 + 4 = 7\n</think>\n\nThe answer is \\boxed{7}."))
    assert not keep(cand("<think>\n\\boxed{7}\n</think>\n\nThe answer is \\boxed{8}."))
    assert not keep(cand("<think>\n3 + 4 = 7 so \\boxed{7}"))  # never closed
    assert keep(cand("3 + 4 = 7.\n#### 7"))  # the plain task keeps working
    assert keep(Candidate({"answer": "7"}, "#### 7", 3, True))  # a string reference from a user dataset


class ScriptedModel(nn.Module):
    """Generates fixed replies, one character per token id (decode: chr), so exact_match is checked end to end."""

    def __init__(self, replies: list[str]):
        super().__init__()
        self.replies = replies

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id, **_):
        width = max(len(r) for r in self.replies) + 1
        out = torch.full((len(self.replies), width), eos_token_id, dtype=torch.long)
        for row, reply in enumerate(self.replies):
            out[row, : len(reply)] = torch.tensor([ord(ch) for ch in reply])
        return torch.cat([input_ids, out], dim=1)


def test_exact_match_reads_boxed_answers_after_think():
    replies = [
        "<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}",  # right
        "<think>\n\\boxed{7}\n</think>\n\n\\boxed{6}",  # right only inside <think>
        "<think>\n3 + 4 = 7",  # cut off while thinking
        "3 + 4 = 7\n#### 7",  # the plain task's format
    ]
    result = exact_match(
        ScriptedModel(replies),
        [[1]] * 4,
        [7, 7, 7, 7],
        decode=lambda ids: "".join(map(chr, ids)),
        pad_id=0,
        eos_id=0,
        max_new_tokens=64,
    )
    assert result["exact_match"] == 0.5


# --- chat templates ------------------------------------------------------------------------------------------

INLINE = [
    {"role": "user", "content": "Tom has 3 apples. He buys 4 more. How many?"},
    {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}"},
]
AS_FIELD = [INLINE[0], {"role": "assistant", "content": "\\boxed{7}", "reasoning_content": "3 + 4 = 7\n"}]
MULTI_TURN = [
    {"role": "system", "content": "Think first."},
    *INLINE,
    {"role": "user", "content": "And 2 more?"},
    {"role": "assistant", "content": "\\boxed{9}", "reasoning_content": "7 + 2 = 9"},
]
R1_MARKERS = [R1_BOS, R1_EOS, R1_USER, R1_ASSISTANT]


@pytest.mark.parametrize("messages", [INLINE, AS_FIELD], ids=["inline", "reasoning_content"])
def test_templates_render_both_formats_exactly(messages):
    assert render(R1_TEMPLATE, messages) == (
        "<｜begin▁of▁sentence｜><｜User｜>Tom has 3 apples. He buys 4 more. How many?"
        "<｜Assistant｜><think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}<｜end▁of▁sentence｜>"
    )
    assert render(QWEN_TEMPLATE, messages) == (
        "<|im_start|>user\nTom has 3 apples. He buys 4 more. How many?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}<|im_end|>\n"
    )
    assert render(R1_TEMPLATE, messages[:1], add_generation_prompt=True).endswith("many?<｜Assistant｜>")
    assert render(QWEN_TEMPLATE, messages[:1], add_generation_prompt=True).endswith(
        "many?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_and_system_render():
    assert render(R1_TEMPLATE, MULTI_TURN) == (
        "<｜begin▁of▁sentence｜>Think first.<｜User｜>Tom has 3 apples. He buys 4 more. How many?"
        "<｜Assistant｜><think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}<｜end▁of▁sentence｜>"
        "<｜User｜>And 2 more?<｜Assistant｜><think>\n7 + 2 = 9\n</think>\n\n\\boxed{9}<｜end▁of▁sentence｜>"
    )


def test_qwen_template_is_the_local_chatml_for_plain_replies():
    problem = next(iter_problems("baking", 2, seed=0))
    plain = [
        {"role": "user", "content": problem["question"]},
        {"role": "assistant", "content": problem["reasoning"]},
    ]
    for messages in (plain, INLINE, [{"role": "system", "content": "Be brief."}, *plain]):
        assert render(QWEN_TEMPLATE, messages) == render_chat(messages)
        assert render(QWEN_TEMPLATE, messages[:-1], True) == render_chat(messages[:-1], True)


@pytest.mark.parametrize("template", [R1_TEMPLATE, QWEN_TEMPLATE], ids=["r1", "qwen"])
def test_transformers_renders_the_templates_the_same(template):
    tokenizer = templated_tokenizer(template)
    for messages in (AS_FIELD, MULTI_TURN):
        assert tokenizer.apply_chat_template(messages, tokenize=False) == render(template, messages)
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt == render(template, messages[:-1], add_generation_prompt=True)


def test_unknown_roles_and_families_are_refused():
    with pytest.raises(ConfigError, match="tool"):
        render(R1_TEMPLATE, [{"role": "tool", "content": "x"}])
    with pytest.raises(ConfigError, match="tool"):
        render(QWEN_TEMPLATE, [{"role": "tool", "content": "x"}])
    assert think_template("qwen2_5") is QWEN_TEMPLATE
    with pytest.raises(ConfigError, match="deepseek_r1"):
        think_template("phi3")


# --- loss masks ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "special", "end"),
    [(R1_TEMPLATE, R1_MARKERS, R1_EOS), (QWEN_TEMPLATE, (), IM_END)],
    ids=["r1", "qwen"],
)
@pytest.mark.parametrize("messages", [INLINE, AS_FIELD], ids=["inline", "reasoning_content"])
def test_loss_mask_covers_trace_and_answer_never_the_prompt(template, special, end, messages):
    tokenizer = templated_tokenizer(template, special)
    encoded = encode_example(tokenizer, {"messages": messages}, max_length=512)
    assert trained_text(tokenizer, encoded) == "<think>\n3 + 4 = 7\n</think>\n\n\\boxed{7}" + end
    prompt = encode_prompt(tokenizer, {"messages": messages})
    assert encoded["input_ids"][: len(prompt)] == prompt
    assert not any(encoded["loss_mask"][: len(prompt) - 1]) and encoded["loss_mask"][len(prompt) - 1]
    assert encoded["loss_mask"][-1] is False


@pytest.mark.parametrize(
    ("template", "special", "end"),
    [(R1_TEMPLATE, R1_MARKERS, R1_EOS), (QWEN_TEMPLATE, (), IM_END)],
    ids=["r1", "qwen"],
)
def test_loss_mask_trains_every_reply_of_a_conversation(template, special, end):
    tokenizer = templated_tokenizer(template, special)
    encoded = encode_example(tokenizer, {"messages": MULTI_TURN}, max_length=512)
    assert trained_text(tokenizer, encoded) == (
        f"<think>\n3 + 4 = 7\n</think>\n\n\\boxed{{7}}{end}<think>\n7 + 2 = 9\n</think>\n\n\\boxed{{9}}{end}"
    )


# R1's hub template, in the two ways that matter here: it deletes the trace of an assistant turn, and it ends the
# generation prompt with `<think>\n`. Either would leave (part of) the trace untrained without a word.
DROPS_TRACE = CHAT_TEMPLATE.replace("message['content']", "message['content'].split('</think>')[-1]")
THINKS_IN_PROMPT = CHAT_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>assistant\\n<think>\\n'")


@pytest.mark.parametrize("template", [DROPS_TRACE, THINKS_IN_PROMPT], ids=["drops_trace", "thinks_in_prompt"])
def test_templates_that_lose_the_trace_are_refused(template):
    assert template != CHAT_TEMPLATE
    tokenizer = templated_tokenizer(template)
    with pytest.raises(ConfigError, match="without part of its content"):
        encode_example(tokenizer, {"messages": INLINE}, max_length=512)
    if template is THINKS_IN_PROMPT:  # and a plain reply cannot follow a prompt that opened <think>
        with pytest.raises(ConfigError, match="generation prompt"):
            encode_example(tokenizer, {"messages": [INLINE[0], {"role": "assistant", "content": "7"}]}, 512)


# --- the gsm_synth_reasoning task ------------------------------------------------------------------------------


def reasoning_sample(trace_tokens, seed=0, per_stream=4) -> list[dict]:
    return [
        problem
        for domain in DOMAINS
        for level in LEVELS
        for problem in islice(iter_reasoning_problems(domain, level, seed, trace_tokens), per_stream)
    ]


@pytest.mark.parametrize("trace_tokens", [TRACE_TOKENS, [512, 640]])
def test_traces_fall_in_the_configured_token_range(demo_tokenizer, trace_tokens):
    low, high = trace_tokens
    lengths = []
    for problem in reasoning_sample(trace_tokens):
        section = think_section(problem["reasoning"])
        assert section.startswith("<think>\n") and problem["reasoning"].count("</think>") == 1
        n = len(demo_tokenizer(section, add_special_tokens=False)["input_ids"])
        assert low <= n <= high, (n, problem["id"])
        assert abs(estimate_tokens(section) / n - 1) <= ESTIMATE_MARGIN
        lengths.append(n)
    # Lengths are drawn across the range (less the estimate's margins), not bunched at one end.
    first, last = check_trace_tokens(trace_tokens)
    assert low < first <= last < high and max(lengths) - min(lengths) > (last - first) / 2


def test_reasoning_answers_are_recovered_and_every_fact_is_true():
    for problem in reasoning_sample(TRACE_TOKENS, per_stream=3):
        reply = problem["reasoning"]
        assert extract_answer(reply) == problem["answer"] == extract_answer(problem["text"])
        assert reply.endswith(f"\\boxed{{{problem['answer']}}}.") and "####" not in reply
        facts = FACT_RE.findall(reply)
        assert len(facts) > 20, problem["id"]  # the trace is made of checked arithmetic
        for a, op, b, result in facts:
            assert OPS[op](int(a), int(b)) == int(result), (a, op, b, result, problem["id"])
        # Without its trace, the reply still ends in the answer; inside the trace nothing is boxed.
        assert "\\boxed" not in think_section(reply)


def test_reasoning_problems_are_the_plain_problems_and_deterministic():
    first = list(islice(iter_reasoning_problems("garden", 2, 5, [512, 1024]), 6))
    assert first == list(islice(iter_reasoning_problems("garden", 2, 5, [512, 1024]), 6))
    plain = list(islice(iter_problems("garden", 2, 5), 6))
    assert [(p["question"], p["answer"], p["id"]) for p in first] == [
        (p["question"], p["answer"], p["id"]) for p in plain
    ]
    other_seed = list(islice(iter_reasoning_problems("garden", 2, 6, [512, 1024]), 6))
    assert [p["reasoning"] for p in first] != [p["reasoning"] for p in other_seed]


@pytest.mark.parametrize(
    ("trace_tokens", "match"),
    [([100, 4096], "512 <= low"), ([4096, 1024], "low <= high"), ([1024, 1100], "high >= "), ([1024], "low")],
)
def test_bad_trace_ranges_are_config_errors(trace_tokens, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        check_trace_tokens(trace_tokens)


def test_the_data_config_builds_the_reasoning_task(demo_tokenizer):
    cfg = compose(["data=gsm_synth_reasoning", "data.num_train=8", "data.num_eval=4", "data.levels=[1]"])
    assert cfg.data.name == "gsm_synth_reasoning" and list(cfg.data.trace_tokens) == TRACE_TOKENS
    ds = raw_dataset(cfg)
    plain = raw_dataset(compose(["data.num_train=8", "data.num_eval=4", "data.levels=[1]"]))
    for split in ("train", "eval"):
        assert ds[split]["id"] == plain[split]["id"] and ds[split]["answer"] == plain[split]["answer"]
        for row in ds[split]:
            reply = row["messages"][1]["content"]
            assert reply.startswith("<think>\n") and extract_answer(reply) == row["answer"]
            encoded = encode_example(demo_tokenizer, row, max_length=cfg.data.max_length)
            # Nothing cut at the config's max_length: the whole trace, answer and end marker are trained.
            assert trained_text(demo_tokenizer, encoded) == reply + IM_END


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.name=gsm_synth_reasonin"], "gsm_synth_reasoning"),
        (["data.trace_tokens=[1024,4096]"], "only shapes"),
        (["data=gsm_synth_reasoning", "data.trace_tokens=null"], "needs data.trace_tokens"),
        (["data=gsm_synth_reasoning", "data.trace_tokens=[64,128]"], "512 <= low"),
    ],
)
def test_data_config_mistakes_are_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        raw_dataset(compose(overrides))


@pytest.mark.slow
def test_reasoning_traces_train_end_to_end_on_the_long_sequence_path(tiny_teacher, base_overrides, tmp_path):
    """data=gsm_synth_reasoning through the product path: rows of 1k-4k tokens in R1's format (`<think>` trace,
    `\\boxed{}` answer), the teacher's top-k on every position, the fused head on the student, exact-match
    reading the boxed answer after `</think>`."""
    from distill.run import run
    from distill.tracking.metrics_log import read_metrics

    cfg = compose(
        [
            *base_overrides,
            "data=gsm_synth_reasoning",
            "data.num_train=8",
            "data.num_eval=2",
            "data.levels=[1]",
            "cluster.micro_batch_size=1",
            "cluster.grad_accum_steps=2",
            "cluster.global_batch_size=2",
            "train.steps=2",
            "train.log_every=1",
            "eval.max_batches=1",
            "eval.batch_size=2",
            "eval.generate_examples=1",
            "eval.max_new_tokens=16",
            "tracking.grad_shares=false",
        ],
        run_dir=str(tmp_path / "run"),
    )
    summary = run(cfg)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    assert all(r["tokens"] > 1000 for r in records)  # every step trains on long traces
    assert all(torch.isfinite(torch.tensor(r["loss/forward_kl"])) for r in records)
    assert summary["tokens"] > 1000 and "exact_match" in summary  # the boxed-answer path ran (16 tokens: 0)
