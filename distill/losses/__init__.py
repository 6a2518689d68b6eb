"""Knowledge-distillation losses: pure tensor math, fp32 inside, chunked over tokens.

    import distill.losses as L
    term = L.get("forward_kl")
    loss_sum, num_tokens = term(student_logits, L.TopKTeacher(ids, logits, log_normalizer), mask,
                                temperature=2.0)

Terms return the SUM over selected tokens and the token count; the trainer divides once by the global
count. See terms.py for the table of terms, teachers.py for the top-k-with-tail semantics.
"""

from distill.losses import divergences
from distill.losses.chunked import RowTerm, chunked_loss_sum
from distill.losses.fused import fused_head_loss_sums
from distill.losses.projection import HiddenProjector
from distill.losses.registry import LossTerm, get, names, register
from distill.losses.selection import select_tokens, teacher_statistic
from distill.losses.teachers import DenseTeacher, MappedTopKTeacher, Teacher, TopKTeacher
from distill.losses.terms import attention_transfer, ce, hidden_cosine, hidden_mse
from distill.losses.validation import check_k, check_temperature, validate_layer_map, validate_term

__all__ = [
    "DenseTeacher",
    "HiddenProjector",
    "LossTerm",
    "MappedTopKTeacher",
    "RowTerm",
    "Teacher",
    "TopKTeacher",
    "attention_transfer",
    "ce",
    "check_k",
    "check_temperature",
    "chunked_loss_sum",
    "divergences",
    "fused_head_loss_sums",
    "get",
    "hidden_cosine",
    "hidden_mse",
    "names",
    "register",
    "select_tokens",
    "teacher_statistic",
    "validate_layer_map",
    "validate_term",
]
