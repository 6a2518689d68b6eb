"""Cross-tokenizer distillation: align two tokenizations, map teacher ids to student ids, project the
teacher's top-k into the student's token space (see alignment.py, vocab_map.py, teacher.py)."""

from distill.xtok.alignment import Group, SideTokens, align, prediction_pairs, teacher_index
from distill.xtok.encode import encode_pair, encode_pairs
from distill.xtok.metrics import bits_per_char
from distill.xtok.teacher import CrossTokenizerTeacher, project_topk
from distill.xtok.vocab_map import TokenMap, build_token_map, load_or_build_token_map

__all__ = [
    "CrossTokenizerTeacher",
    "Group",
    "SideTokens",
    "TokenMap",
    "align",
    "bits_per_char",
    "build_token_map",
    "encode_pair",
    "encode_pairs",
    "load_or_build_token_map",
    "prediction_pairs",
    "project_topk",
    "teacher_index",
]
