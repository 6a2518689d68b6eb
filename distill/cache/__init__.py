"""Offline teacher-output cache: TeacherBatches in safetensors shards plus a JSON manifest.

    with CacheWriter(root, manifest_meta={...}, shard_batches=8) as writer:
        done = set(writer.done_batches())          # resume: skip what a previous run stored
        for batch_id, batch in batches:               # stream micro-batches (packed: with position_ids)
            if batch_id not in done:
                writer.write(engine.score_batch(batch_id, batch))
    for batch in CacheReader(root, expect={"teacher_hash": ...}).iter_batches(): ...

Encodings of the top-k part are chosen by name (see encoding.py): ids "int32" | "packed<bits>" (packed17 for
a 129,280-token vocab), logits "fp32" | "fp16" | "bf16" | "gap8" | "gap7".
"""

from distill.cache.encoding import (
    IDS_ENCODINGS,
    LOGITS_ENCODINGS,
    Encoding,
    bytes_per_token,
    decode,
    decode_meta,
    encode,
    encoding_kl,
    pack_bits,
    packed_ids_name,
    per_token_kl,
    topk_kl,
    unpack_bits,
)
from distill.cache.reader import CacheReader
from distill.cache.writer import CacheWriter

__all__ = [
    "IDS_ENCODINGS",
    "LOGITS_ENCODINGS",
    "CacheReader",
    "CacheWriter",
    "Encoding",
    "bytes_per_token",
    "decode",
    "decode_meta",
    "encode",
    "encoding_kl",
    "pack_bits",
    "packed_ids_name",
    "per_token_kl",
    "topk_kl",
    "unpack_bits",
]
