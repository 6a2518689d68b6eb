"""`distill export`: every format is written with its manifest, loads back in its runtime (onnxruntime; GGUF through
transformers' gguf de-quantization) and is evaluated by `distill eval`'s code against the fp32 student; fp32 and
fp16 exports reproduce its greedy tokens; a damaged export is refused by name; a missing extra names the extra."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.config import compose
from distill.errors import CheckpointError, ConfigError
from distill.export import FORMATS, get_format, verify_export
from distill.export.compare import greedy_agreement, report_table
from distill.export.config import ALL_FORMATS
from distill.export.formats import scratch_source
from distill.export.gguf_format import check_supported
from distill.export.manifest import MANIFEST
from distill.models.loading import load_causal_lm, load_tokenizer, save_model
from distill.models.resolve import build_student
from tests.test_optional_extras import HIDDEN, HIDE_EXTRAS, RUN_CLI, _python

pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")

EVAL = ["eval.max_batches=1", "eval.batch_size=8", "eval.generate_examples=4", "eval.max_new_tokens=12"]
# Logits against the fp32 student on held-out-shaped input: exact formats to float noise, f16 to its rounding.
# Held-out CE relative to the fp32 student's: equal for fp32, within rounding for f16, close for 8 and 4 bits.
CE_TOLERANCE = {
    "onnx-fp32": 1e-5,
    "gguf-f32": 1e-5,
    "onnx-fp16": 2e-3,
    "gguf-f16": 2e-3,
    "onnx-int8": 2e-2,
    "onnx-int4": 0.1,
    "gguf-q8_0": 2e-2,
    "gguf-q4_0": 0.1,
}
LOGIT_TOLERANCE = {"onnx-fp32": 1e-4, "gguf-f32": 1e-5, "onnx-fp16": 5e-2, "gguf-f16": 5e-2}


@pytest.fixture(scope="module")
def student(tiny_teacher, base_overrides, tmp_path_factory) -> Path:
    """The run's own tiny Qwen2 student (untrained: built as a run builds it, on the test teacher's tokenizer)."""
    cfg = compose(base_overrides)
    tokenizer = load_tokenizer(tiny_teacher)
    return save_model(build_student(cfg, tokenizer), tokenizer, tmp_path_factory.mktemp("export") / "student")


def export_config(base_overrides, tmp: Path, **export) -> object:
    cfg = compose([*base_overrides, *EVAL], run_dir=str(tmp))
    cfg.export = OmegaConf.merge(cfg.export, export)
    return cfg


@pytest.fixture(scope="module")
def exported(student, base_overrides, tmp_path_factory) -> dict:
    from launch.export import export

    out = tmp_path_factory.mktemp("exports")
    cfg = export_config(base_overrides, out, model=str(student), formats=list(FORMATS), out_dir=str(out))
    return export(cfg)


@pytest.mark.slow
def test_every_format_round_trips_through_the_evaluation(exported):
    rows = {r["format"]: r for r in exported["rows"]}
    reference = rows.pop("fp32 student (safetensors)")
    assert set(rows) == set(FORMATS)
    out = Path(exported["out_dir"])
    for name, row in rows.items():
        manifest = verify_export(out / name, name)
        assert manifest["format"] == name and manifest["files"]
        assert row["tokens"] == reference["tokens"] and row["exact_match_n"] == reference["exact_match_n"]
        assert row["size_mib"] > 0 and 0 <= row["greedy_token_match"] <= 1
        assert row["peak_rss_growth_mib"] >= 0
        assert row["ce"] == pytest.approx(reference["ce"], rel=CE_TOLERANCE[name]), name
        assert "agreement" in row and "kl_to_teacher" in row  # the teacher's side, as `distill eval` has it
    sizes = {name: row["size_mib"] for name, row in rows.items()}
    assert sizes["gguf-q4_0"] < sizes["gguf-q8_0"] < sizes["gguf-f16"] < sizes["gguf-f32"]
    assert sizes["onnx-int8"] < sizes["onnx-fp16"] < sizes["onnx-fp32"]
    assert sizes["onnx-int4"] < sizes["onnx-fp16"]
    report = (out / "report.md").read_text()
    assert all(f"| {name} |" in report for name in FORMATS) and "held-out CE" in report
    assert (
        "peak memory (MiB)" in report and reference["peak_rss_growth_mib"] > 0
    )  # the fp32 model is loaded in it


@pytest.mark.slow
def test_fp32_and_fp16_exports_reproduce_the_greedy_tokens(exported):
    rows = {r["format"]: r for r in exported["rows"]}
    for name in ("onnx-fp32", "onnx-fp16", "gguf-f32", "gguf-f16"):
        assert rows[name]["exact_greedy_expected"]
        assert rows[name]["greedy_identical"] == 1.0, (name, rows[name])
        assert rows[name]["greedy_prompts"] == 4
        assert (
            rows[name]["greedy_reference_tokens"] >= 4 * 6
        )  # the student says something: equality is not vacuous
    assert not any(
        rows[name]["exact_greedy_expected"] for name in ("onnx-int8", "onnx-int4", "gguf-q8_0", "gguf-q4_0")
    )


@pytest.mark.slow
def test_the_runtimes_logits_match_the_student(exported, student):
    model = load_causal_lm(student)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generation batches it
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for name, tolerance in LOGIT_TOLERANCE.items():
            runtime = get_format(name).open(Path(exported["out_dir"]) / name)
            got = runtime(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            diff = (got.float() - want)[mask.bool()].abs().max()
            assert diff < tolerance, (name, float(diff))


@pytest.mark.slow
def test_the_gguf_tokenizer_tokenizes_as_the_student(exported, student):
    """The tokenizer written into the GGUF (llama.cpp's `gpt2` BPE layout), rebuilt by transformers' GGUF reader."""
    from transformers import AutoTokenizer

    own = load_tokenizer(student)
    rebuilt = AutoTokenizer.from_pretrained(
        Path(exported["out_dir"]) / "gguf-q8_0", gguf_file="model-q8_0.gguf"
    )
    messages = [{"role": "user", "content": "Tom buys 12 apples at $3 each. How much does he pay?"}]
    for text in [messages[0]["content"], own.apply_chat_template(messages, tokenize=False), "#### 36"]:
        assert rebuilt(text)["input_ids"] == own(text)["input_ids"], text


def test_export_without_evaluation_writes_the_folders_and_sizes(student, base_overrides, tmp_path):
    from launch.export import export

    formats = ["gguf-f16", "gguf-q8_0"]
    cfg = export_config(base_overrides, tmp_path, model=str(student), formats=formats, evaluate=False)
    result = export(cfg)
    out = tmp_path / "exports"  # the default: <run_dir>/exports
    assert result["out_dir"] == str(out)
    sizes = {r["format"]: r["size_mib"] for r in result["rows"]}
    for name in formats:
        files = verify_export(out / name, name)["files"]
        assert sizes[name] * 2**20 == files[f"model-{name[5:]}.gguf"]["bytes"]
    assert sizes["gguf-q8_0"] < sizes["gguf-f16"]
    assert json.loads((out / "export.json").read_text())["rows"] == result["rows"]
    assert "| gguf-q8_0 |" in (out / "report.md").read_text()


def test_a_damaged_export_is_refused_naming_the_file(student, tmp_path):
    fmt = get_format("gguf-f16")
    source, scratch = scratch_source(student)
    with scratch:
        folder = fmt.write(source, tmp_path / "gguf-f16")
    fmt.open(folder)  # intact: loads
    gguf = folder / "model-f16.gguf"
    data = gguf.read_bytes()
    gguf.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=rf"{gguf} is \d+ bytes, the manifest says {len(data)} \(truncated"
    ):
        fmt.open(folder)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    gguf.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=rf"{gguf} has sha256 .* \(its bytes changed"):
        fmt.open(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=rf"{folder / MANIFEST} is missing"):
        fmt.open(folder)
    shutil.rmtree(folder)


def test_bad_names_and_unsupported_architectures_are_config_errors():
    from transformers import Phi3Config

    assert list(FORMATS) == ALL_FORMATS  # the config's default is every format there is
    with pytest.raises(ConfigError, match=r"unknown export format 'onnx-int2'.*valid: onnx-fp32, onnx-fp16"):
        get_format("onnx-int2")
    with pytest.raises(ConfigError, match=r"this model is 'phi3': export it with the onnx-\* formats"):
        check_supported(Phi3Config(), "f16")


def test_an_architecture_gguf_cannot_hold_is_refused_before_any_export(
    tiny_teacher, base_overrides, tmp_path
):
    from distill.models.tiny import build_model, tiny_config
    from launch.export import export

    tokenizer = load_tokenizer(tiny_teacher)
    phi3 = save_model(
        build_model(tiny_config("tiny_phi3", len(tokenizer)), seed=0), tokenizer, tmp_path / "phi3"
    )
    cfg = export_config(base_overrides, tmp_path, model=str(phi3), formats=["onnx-fp32", "gguf-f16"])
    with pytest.raises(ConfigError, match=r"GGUF export supports model_type qwen2 .* this model is 'phi3'"):
        export(cfg)
    assert not (tmp_path / "exports").exists()  # refused before the ONNX export started


def test_greedy_agreement_and_the_table():
    ref = [[1, 2, 3, 4], [5, 6]]
    same = {
        "greedy_identical": 1.0,
        "greedy_token_match": 1.0,
        "greedy_prompts": 2,
        "greedy_reference_tokens": 6,
    }
    assert greedy_agreement(ref, ref) == same
    got = greedy_agreement(ref, [[1, 2, 9, 4], [5, 6]])  # a divergence ends the match: 2 + 2 of 6 tokens
    assert got["greedy_identical"] == 0.5 and got["greedy_token_match"] == pytest.approx(4 / 6)
    table = report_table([{"format": "gguf-q8_0", "size_mib": 0.68, "ce": 0.29065, "greedy_identical": 0.97}])
    assert table.splitlines()[0] == "| format | size (MiB) | held-out CE | greedy = fp32 |"
    assert table.splitlines()[2] == "| gguf-q8_0 | 0.680 | 0.29065 | 97.0% |"


def test_export_without_its_extra_names_the_extra(tmp_path):
    hide = HIDE_EXTRAS.replace(repr(HIDDEN), repr(("onnxruntime",)), 1)
    proc = _python(hide + RUN_CLI, "export", "export.model=nowhere", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("distill: ")]
    assert line == (
        "distill: ConfigError: distill export needs onnxruntime, which is not installed: "
        "pip install -e '.[export]' (the project's `export` extra)"
    )


@pytest.mark.slow
def test_a_run_exports_its_student_at_the_end(tiny_teacher, base_overrides, tmp_path):
    """`export.formats` in a run's config: the trained student's exports, evaluated on the run's own held-out
    batches and teacher outputs, and their table in the run's report."""
    from launch.distill import run

    formats = ["onnx-fp32", "gguf-q8_0"]
    overrides = [*base_overrides, *EVAL, "train.steps=2", f"export.formats=[{','.join(formats)}]"]
    summary = run(compose(overrides, run_dir=str(tmp_path)))
    result = json.loads((tmp_path / "exports" / "export.json").read_text())
    rows = {r["format"]: r for r in result["rows"]}
    assert result["model"] == str(tmp_path / "student")
    # The fp32 row is the run's own evaluation of its student; onnx-fp32 reproduces it.
    assert rows["fp32 student (safetensors)"]["ce"] == pytest.approx(summary["ce"], rel=1e-6)
    assert rows["onnx-fp32"]["ce"] == pytest.approx(summary["ce"], rel=1e-5)
    assert rows["onnx-fp32"]["agreement"] == pytest.approx(summary["agreement"], abs=1e-6)
    for name in formats:
        verify_export(tmp_path / "exports" / name, name)
    assert "## Deployment exports" in (tmp_path / "report.md").read_text()


def test_a_misspelt_run_export_format_fails_before_training(base_overrides, tmp_path):
    from launch.distill import run

    with pytest.raises(ConfigError, match="onnx-fp64"):
        run(compose([*base_overrides, "export.formats=[onnx-fp64]"], run_dir=str(tmp_path)))
    assert not (tmp_path / "metrics.jsonl").exists()
