"""Offline teacher cache: encodings (bit packing, logits codes, KL error), shards + manifest, resume, checksums."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from distill.cache import (
    LOGITS_ENCODINGS,
    CacheReader,
    CacheWriter,
    bytes_per_token,
    decode,
    decode_meta,
    encode,
    encoding_kl,
    pack_bits,
    packed_ids_name,
    topk_kl,
    unpack_bits,
)
from distill.errors import CheckpointError, ConfigError
from distill.teacher import TeacherBatch

VOCAB, B, T, K = 129_280, 4, 16, 8
L_SEL, HIDDEN = 2, 32
COMPACT = ("gap8", "gap7")


def _logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


def make_batch(
    index: int, *, spread: float = 3.0, logits_dtype: torch.dtype = torch.float32, epoch: int = 0
) -> TeacherBatch:
    """A synthetic TeacherBatch shaped like the engine's output: B=4, T=16, k=8, vocab 129,280.

    Top-k logits are sorted, sit around an LLM-like offset (~15), and the tail mass outside the top-k ranges
    over 1e-5 .. 0.5 (log-uniform); hidden states and attention maps are bf16. Deterministic in `index`.
    """
    g = torch.Generator().manual_seed(1000 * epoch + index)
    logits = torch.randn(B, T, K, generator=g, dtype=torch.float64) * spread
    logits = logits.sort(dim=-1, descending=True).values + 15 + 5 * torch.randn(B, T, 1, generator=g)
    log_tail = torch.empty(B, T, dtype=torch.float64).uniform_(math.log(1e-5), math.log(0.5), generator=g)
    log_normalizer = torch.logsumexp(logits, -1) - torch.log1p(-log_tail.exp())
    topk_ids = torch.randint(0, VOCAB, (B, T, K), generator=g, dtype=torch.int32)
    topk_ids[0, 0, 0] = VOCAB - 1  # the largest id must survive packing
    attention_mask = torch.ones(B, T, dtype=torch.bool)
    attention_mask[-1, 10:] = False  # a right-padded row
    loss_mask = attention_mask.clone()
    loss_mask[:, :3] = False  # the prompt
    return TeacherBatch.from_torch(
        (epoch, index),
        input_ids=torch.randint(0, VOCAB, (B, T), generator=g, dtype=torch.int32),
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        topk_ids=topk_ids,
        topk_logits=logits.to(logits_dtype),
        log_normalizer=log_normalizer.float(),
        hidden=torch.randn(B, T, L_SEL, HIDDEN, generator=g).bfloat16(),
        attention=torch.rand(B, L_SEL, T, T, generator=g).bfloat16(),
    )


def round_trip(batch: TeacherBatch, ids: str, logits: str) -> TeacherBatch:
    return decode(encode(batch, ids, logits), decode_meta(batch, ids, logits))


def meta(**changes) -> dict:
    base = {
        "teacher_hash": "t-abc",
        "tokenizer_hash": "tok-123",
        "k": K,
        "vocab_size": VOCAB,
        "ids_encoding": "packed17",
        "logits_encoding": "fp32",
        "dataset": "synthetic",
    }
    return {**base, **changes}


def write_cache(root, batches, *, shard_batches=4, **meta_changes) -> None:
    with CacheWriter(root, manifest_meta=meta(**meta_changes), shard_batches=shard_batches) as writer:
        for batch in batches:
            writer.write(batch)


def assert_batches_equal(a: TeacherBatch, b: TeacherBatch) -> None:
    """Exact equality of every array and of the float dtype tags of the float fields."""
    assert a.batch_id == b.batch_id
    assert a.arrays().keys() == b.arrays().keys()
    for name, array in a.arrays().items():
        assert array.dtype == getattr(b, name).dtype, name
        assert np.array_equal(array, getattr(b, name)), name
    for name in ("topk_logits", "hidden", "attention"):
        assert a.float_dtypes[name] == b.float_dtypes[name], name


# ---------------------------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("n", [1, 3, 5, 7, 8, 64])
def test_pack17_round_trip_is_exact_for_odd_counts_and_the_max_id(n):
    rng = np.random.default_rng(n)
    ids = rng.integers(0, VOCAB, size=(3, 5, n))
    ids[0, 0, -1], ids[2, 4, 0] = VOCAB - 1, 0
    packed = pack_bits(ids, 17)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, math.ceil(17 * n / 8))
    assert np.array_equal(unpack_bits(packed, 17, n), ids)


@pytest.mark.parametrize("bits", [1, 7, 13, 32])
def test_pack_bits_round_trip_other_widths(bits):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=(4, 11), dtype=np.uint64)
    values[0, 0] = 2**bits - 1
    out = unpack_bits(pack_bits(values, bits), bits, 11)
    assert np.array_equal(out.view(np.uint32) if bits == 32 else out, values)


def test_pack_bits_rejects_values_that_do_not_fit():
    with pytest.raises(ConfigError, match="17 bits"):
        pack_bits(np.array([2**17]), 17)
    assert packed_ids_name(VOCAB) == "packed17" and packed_ids_name(2**17) == "packed17"
    assert packed_ids_name(2**17 + 1) == "packed18" and packed_ids_name(1) == "packed1"


@pytest.mark.parametrize("ids", ["int32", "packed17"])
@pytest.mark.parametrize("logits", LOGITS_ENCODINGS)
def test_encode_decode_round_trip(ids, logits):
    batch = make_batch(1)
    out = round_trip(batch, ids, logits)
    assert out.topk_ids.dtype == np.int32 and np.array_equal(out.topk_ids, batch.topk_ids)
    for name in ("input_ids", "attention_mask", "loss_mask", "log_normalizer", "hidden", "attention"):
        assert np.array_equal(getattr(out, name), getattr(batch, name)), name
    assert out.float_dtypes["hidden"] == "bfloat16"

    z, z_out = batch.tensor("topk_logits").double(), out.tensor("topk_logits").double()
    if logits == "fp32":
        assert torch.equal(z, z_out)
    elif logits in ("fp16", "bf16"):
        rel = 2.0**-11 if logits == "fp16" else 2.0**-8  # half a unit in the last place
        assert torch.all((z - z_out).abs() <= rel * z.abs())
    else:  # gap codes: gaps to the row's top within half a step, top-k mass kept to fp16 precision
        step = {"gap8": 1 / 16, "gap7": 1 / 8}[logits]
        gaps, gaps_out = z.amax(-1, keepdim=True) - z, z_out.amax(-1, keepdim=True) - z_out
        assert torch.all((gaps - gaps_out).abs() <= step / 2 + 1e-5)
        lse = torch.from_numpy(batch.log_normalizer).double()
        log_mass, log_mass_out = torch.logsumexp(z, -1) - lse, torch.logsumexp(z_out, -1) - lse
        assert torch.allclose(log_mass_out, log_mass, rtol=1e-3, atol=1e-5)


def test_bf16_logits_from_a_bf16_teacher_are_stored_bit_exact():
    batch = make_batch(2, logits_dtype=torch.bfloat16)
    out = round_trip(batch, "packed17", "bf16")
    assert out.float_dtypes["topk_logits"] == "bfloat16"
    assert np.array_equal(out.topk_logits, batch.topk_logits)


def test_bytes_per_token_at_k64():
    expected = {
        ("int32", "fp32"): 256 + 256 + 4,
        ("int32", "fp16"): 256 + 128 + 4,
        ("packed17", "fp32"): 136 + 256 + 4,
        ("packed17", "fp16"): 136 + 128 + 4,
        ("packed17", "bf16"): 136 + 128 + 4,
        ("packed17", "gap8"): 136 + 64 + 2 + 4,  # + fp16 log top-k mass
        ("packed17", "gap7"): 136 + 56 + 2 + 4,
    }
    assert {key: bytes_per_token(64, *key) for key in expected} == expected
    assert bytes_per_token(64, "packed17", "gap7") <= 200  # the target


def test_encoded_arrays_have_the_advertised_size():
    batch = make_batch(3)
    for logits in LOGITS_ENCODINGS:
        arrays = encode(batch, "packed17", logits)
        topk_part = sum(arrays[n].nbytes for n in ("topk_ids", "topk_logits", "log_normalizer"))
        topk_part += arrays["log_topk_mass"].nbytes if "log_topk_mass" in arrays else 0
        assert topk_part == B * T * bytes_per_token(K, "packed17", logits)


@pytest.mark.parametrize("spread", [0.3, 1.0, 3.0, 8.0])  # flat .. very peaked rows
@pytest.mark.parametrize("logits", COMPACT)
def test_kl_error_of_compact_encodings_is_below_1e3(logits, spread):
    batch = make_batch(4, spread=spread)
    assert encoding_kl(batch, "packed17", logits) < 1e-3
    assert encoding_kl(batch, "packed17", "fp32") == 0.0


def test_gap_codes_keep_even_a_tiny_tail():
    """Rounding the logits must not move mass in or out of the tail bucket, however small it is."""
    batch = make_batch(5, spread=0.5)
    z = batch.topk_logits.astype(np.float64)
    batch.log_normalizer = (_logsumexp(z) - math.log1p(-1e-4)).astype(np.float32)  # tail 1e-4 everywhere
    out = round_trip(batch, "packed17", "gap7")
    tail = -np.expm1(_logsumexp(z) - batch.log_normalizer)
    tail_out = -np.expm1(_logsumexp(out.topk_logits.astype(np.float64)) - out.log_normalizer)
    assert np.allclose(tail_out, tail, rtol=2e-2)
    assert encoding_kl(batch, "packed17", "gap7") < 1e-3


def test_unknown_encoding_names_list_the_valid_ones():
    with pytest.raises(ConfigError, match="gap7"):
        encode(make_batch(0), "packed17", "int4")
    with pytest.raises(ConfigError, match="packed<bits>"):
        encode(make_batch(0), "packed", "fp16")


# ------------------------------------------------------------------------------------------ writer, reader


def test_write_across_shards_and_read_back(tmp_path):
    batches = [make_batch(i) for i in range(10)]
    write_cache(tmp_path, batches, shard_batches=4)

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == [f"shard-0000{i}.safetensors" for i in range(3)]
    assert [len(s["batch_ids"]) for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["complete"] and manifest["encoding"]["id_bits"] == 17
    assert manifest["num_tokens"] == sum(b.num_tokens for b in batches)
    assert manifest["dtypes"]["hidden"] == "bfloat16" and manifest["dtypes"]["topk_logits"] == "float32"

    reader = CacheReader(tmp_path, expect={"teacher_hash": "t-abc", "k": K})
    assert len(reader) == 10 and reader.batch_ids() == [(0, i) for i in range(10)]
    for original, stored in zip(batches, reader.iter_batches(), strict=True):
        assert_batches_equal(original, stored)  # ids exact, fp32 logits exact
    assert_batches_equal(reader.read((0, 6)), batches[6])
    assert_batches_equal(reader.read((0, 1)), batches[1])
    with pytest.raises(KeyError, match="not in teacher cache"):
        reader.read((0, 10))


def with_packed_positions(batch: TeacherBatch) -> TeacherBatch:
    """`batch` as a packed run's: position_ids [B, T] int32 restarting at 0 per document (documents of 5, 7, 4)."""
    positions = np.concatenate([np.arange(5), np.arange(7), np.arange(4)]).astype(np.int32)
    batch.position_ids = np.ascontiguousarray(np.broadcast_to(positions, batch.input_ids.shape))
    return batch


@pytest.mark.parametrize("logits", ["fp32", "gap7"])
def test_packed_batches_keep_their_position_ids_through_the_cache(tmp_path, logits):
    """A run reading the cache gets the packed rows' position_ids back exactly (the student needs the mask the
    teacher scored with); an unpacked cache has none."""
    batches = [with_packed_positions(make_batch(i)) for i in range(5)]
    write_cache(tmp_path / "packed", batches, shard_batches=2, logits_encoding=logits)
    manifest = json.loads((tmp_path / "packed" / "manifest.json").read_text())
    assert manifest["dtypes"]["position_ids"] == "int32"
    reader = CacheReader(tmp_path / "packed")
    for original, stored in zip(batches, reader.iter_batches(), strict=True):
        assert stored.position_ids.dtype == np.int32
        assert np.array_equal(stored.position_ids, original.position_ids)
        assert torch.equal(stored.to_torch()["position_ids"], torch.from_numpy(original.position_ids).long())
    assert np.array_equal(reader.read((0, 3)).position_ids, batches[3].position_ids)

    write_cache(tmp_path / "plain", [make_batch(0)])
    plain = CacheReader(tmp_path / "plain").read((0, 0))
    assert plain.position_ids is None and plain.to_torch()["position_ids"] is None
    # A cache keeps one set of fields: a packed batch cannot join an unpacked cache.
    with pytest.raises(ConfigError, match="same fields"):
        write_cache(tmp_path / "mixed", [make_batch(0), with_packed_positions(make_batch(1))])


def test_compact_cache_reads_back_within_the_encoding(tmp_path):
    batches = [make_batch(i) for i in range(3)]
    write_cache(tmp_path, batches, logits_encoding="gap7")
    for original, stored in zip(batches, CacheReader(tmp_path).iter_batches(), strict=True):
        assert np.array_equal(stored.topk_ids, original.topk_ids)
        assert stored.topk_logits.dtype == np.float32
        assert topk_kl(original, stored) < 1e-3


def test_killed_writer_resumes_to_the_uninterrupted_cache(tmp_path):
    batches = [make_batch(i) for i in range(10)]
    write_cache(tmp_path / "full", batches, shard_batches=3)

    root = tmp_path / "killed"
    writer = CacheWriter(root, manifest_meta=meta(), shard_batches=3)
    for batch in batches[:7]:  # two full shards + one batch still buffered
        writer.write(batch)
    del writer  # killed: no close(), no flush
    (root / ".shard-00002.safetensors.x1y2z3").write_bytes(b"half a shard")  # a write cut short
    (root / "shard-00002.safetensors").write_bytes(b"renamed, but the manifest never listed it")

    writer = CacheWriter(root, manifest_meta=meta(), shard_batches=3)
    assert writer.done_batches() == [(0, i) for i in range(6)] and writer.next_batch_index == 6
    assert not (root / ".shard-00002.safetensors.x1y2z3").exists()
    assert not (root / "shard-00002.safetensors").exists()
    with pytest.warns(UserWarning, match="incomplete"):
        assert len(CacheReader(root)) == 6  # a reader sees only the finished shards meanwhile
    done = set(writer.done_batches())
    with writer:
        for batch in batches:
            if batch.batch_id not in done:
                writer.write(batch)

    resumed, full = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("killed", "full"))
    assert resumed == full  # same shards, same sha256: byte-identical
    for a, b in zip(CacheReader(root).iter_batches(), batches, strict=True):
        assert_batches_equal(a, b)


def test_writer_rejects_out_of_order_and_foreign_batches(tmp_path):
    with CacheWriter(tmp_path, manifest_meta=meta(), shard_batches=2) as writer:
        writer.write(make_batch(3))
        with pytest.raises(ConfigError, match="increasing batch-id order"):
            writer.write(make_batch(3))
        with pytest.raises(ConfigError, match="k=4"):
            small = make_batch(4)
            small.topk_ids, small.topk_logits = small.topk_ids[..., :4], small.topk_logits[..., :4]
            writer.write(small)
        hidden_free = make_batch(5)
        hidden_free.hidden = None
        with pytest.raises(ConfigError, match="same fields"):
            writer.write(hidden_free)


def test_corrupt_shard_names_the_file_and_both_checksums(tmp_path):
    write_cache(tmp_path, [make_batch(i) for i in range(6)], shard_batches=3)
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    expected = json.loads((tmp_path / "manifest.json").read_text())["shards"][1]["sha256"]

    reader = CacheReader(tmp_path)
    reader.read((0, 0))  # the intact shard still reads
    with pytest.raises(CheckpointError, match=r"shard-00001\.safetensors") as info:
        reader.read((0, 4))
    assert expected in str(info.value) and "found" in str(info.value)
    with pytest.raises(CheckpointError, match="corrupt"):
        list(reader.iter_batches())


def test_writer_meta_mismatch_names_the_field_and_the_fix(tmp_path):
    write_cache(tmp_path, [make_batch(0)])
    with pytest.raises(CheckpointError, match="teacher_hash: cached 't-abc', requested 't-new'") as info:
        CacheWriter(tmp_path, manifest_meta=meta(teacher_hash="t-new"), shard_batches=4)
    assert "overwrite=True" in str(info.value) and "new folder" in str(info.value)
    with pytest.raises(CheckpointError, match="logits_encoding: cached 'fp32', requested 'gap7'"):
        CacheWriter(tmp_path, manifest_meta=meta(logits_encoding="gap7"), shard_batches=4)

    writer = CacheWriter(tmp_path, manifest_meta=meta(teacher_hash="t-new"), shard_batches=4, overwrite=True)
    assert writer.done_batches() == [] and not (tmp_path / "shard-00000.safetensors").exists()


def test_reader_meta_mismatch_and_missing_cache(tmp_path):
    write_cache(tmp_path / "c", [make_batch(0)])
    with pytest.raises(CheckpointError, match="tokenizer_hash: cached 'tok-123', expected 'tok-999'"):
        CacheReader(tmp_path / "c", expect={"tokenizer_hash": "tok-999"})
    with pytest.raises(CheckpointError, match="k: cached 8, expected 64"):
        CacheReader(tmp_path / "c", expect={"k": 64})
    with pytest.raises(ConfigError, match="teacher_hsh"):
        CacheReader(tmp_path / "c", expect={"teacher_hsh": "t-abc"})
    with pytest.raises(CheckpointError, match=r"does not exist.*distill teacher-cache"):
        CacheReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty has no manifest\.json.*distill teacher-cache"):
        CacheReader(tmp_path / "empty")


def test_manifest_meta_needs_the_identity_keys(tmp_path):
    partial = meta()
    del partial["tokenizer_hash"]
    with pytest.raises(ConfigError, match="tokenizer_hash"):
        CacheWriter(tmp_path, manifest_meta=partial, shard_batches=2)
    with pytest.raises(ConfigError, match="packed18"):
        CacheWriter(tmp_path, manifest_meta=meta(vocab_size=2**17 + 1), shard_batches=2)


def test_a_changed_encoding_definition_is_refused(tmp_path):
    write_cache(tmp_path, [make_batch(0)], logits_encoding="gap7")
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["encoding"]["logit_step"] = 0.1  # as if written by a version with another gap7 grid
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="logit_step"):
        CacheReader(tmp_path)
    with pytest.raises(CheckpointError, match="rebuild"):
        CacheWriter(tmp_path, manifest_meta=meta(logits_encoding="gap7"), shard_batches=4)
