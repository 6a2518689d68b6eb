"""The distillation objective: a weighted sum of registry loss terms over one micro-batch.

The objective never branches on which algorithm is configured: every term is looked up by name and called
with the inputs its `kind` asks for. Terms return (loss_sum, num_tokens); the trainer divides by the global
number of trained tokens of the whole optimizer step once, so gradient accumulation and data parallelism
give the same loss as one big batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from distill import losses
from distill.batch import next_token_labels
from distill.curriculum.stages import FEATURES, HARD, SOFT, StepPlan
from distill.losses.projection import HiddenProjector
from distill.models.head import HeadlessOutput

# Auto chunk size: a working set of ~1M logits (4 MiB fp32 per working array, which stays in cache) for any
# vocabulary, at least 16 rows (fewer would pay per-chunk overhead). CE + top-k KL fwd+bwd over 768 rows, CPU, 1
# thread: V=151936 1.5 s at 16 rows against 3.3 s at 64 (the old 37 MiB rule); V=32064 0.33 s at 16-32 rows
# against 0.44 s at 303. A tiny test vocabulary (384) still takes a whole micro-batch in one chunk.
CHUNK_ELEMENTS = 2**20
ON_POLICY = "on_policy"
"""Key of a micro-batch whose tokens the student sampled (distill.training.onpolicy): its hard terms are off."""
MIN_CHUNK_ROWS = 16


def chunk_rows(chunk_size: int, vocab_size: int) -> int:
    return chunk_size if chunk_size > 0 else max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab_size)


def term_params(term_cfg) -> dict:
    """The LossTermConfig fields that the named term declares as parameters (beta, alpha, select_*, metric)."""
    declared = losses.get(term_cfg.name).params
    return {name: term_cfg[name] for name in declared if name in term_cfg}


def term_group(name: str) -> str:
    """The curriculum group that scales a term: `hard` (CE), `soft` (logit terms) or `features`."""
    if name == "ce":
        return HARD
    return SOFT if losses.get(name).kind == "logits" else FEATURES


@dataclass
class TermSpec:
    """One configured term: registry name, weight and its keyword parameters."""

    label: str
    name: str
    weight: float
    params: dict = field(default_factory=dict)
    layer_map: list[tuple[int, int]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return losses.get(self.name).kind

    @property
    def group(self) -> str:
        """The curriculum group that scales it: `hard` (CE), `soft` (logit terms) or `features`."""
        return term_group(self.name)


def term_specs_from_config(terms_cfg: Mapping) -> list[TermSpec]:
    """Turn `loss.terms` (label -> LossTermConfig) into TermSpecs with the parameters each term declares."""
    specs = []
    for label, t in terms_cfg.items():
        layer_map = [(int(s), int(tl)) for s, tl in t.layer_map]
        specs.append(TermSpec(str(label), t.name, float(t.weight), term_params(t), layer_map))
    return specs


class Objective(nn.Module):
    """Weighted loss terms. Holds the learned hidden-state projections (trained with the student, not exported)."""

    def __init__(
        self,
        terms: list[TermSpec],
        *,
        temperature: float,
        chunk_size: int,
        student_hidden_size: int = 0,
        teacher_hidden_size: int = 0,
        cross_tokenizer: bool = False,
        fused_head: bool = False,
    ) -> None:
        """fused_head: the student forward stops before its output head (distill.models.head) and every logit
        term is computed from the last hidden states through the head, chunk by chunk, with one gradient
        (distill.losses.fused): no [N, V] logits or gradients. False: the reference path over materialised
        logits, which the fused one is tested against."""
        super().__init__()
        self.fused_head = fused_head
        self.terms = [t for t in terms if t.weight != 0.0]
        # Cross-tokenizer TeacherBatches carry student ids with -1 for unmapped teacher tokens (distill.xtok).
        self.cross_tokenizer = cross_tokenizer
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.projectors = nn.ModuleDict()
        for t in self.terms:
            if t.kind == "hidden":
                self.projectors[t.label] = HiddenProjector(
                    student_hidden_size, teacher_hidden_size, len(t.layer_map)
                )

    # ---- what the teacher and the student forward must provide ---------------------------------------------
    @property
    def needs_teacher(self) -> bool:
        return self.needs_teacher_for(None)

    @property
    def teacher_hidden_layers(self) -> list[int]:
        """Teacher hidden_states indices to ship, sorted; hidden terms index into this list."""
        return teacher_layers(self.terms, "hidden")

    @property
    def teacher_attention_layers(self) -> list[int]:
        return teacher_layers(self.terms, "attention")

    @property
    def needs_student_hidden(self) -> bool:
        return self.wants("hidden", None)

    def needs_teacher_for(self, plan: StepPlan | None) -> bool:
        """Whether a step's active terms read teacher outputs (a hard-label warm-up stage does not)."""
        return any(t.group != HARD for t in self.active_terms(plan))

    def active_terms(self, plan: StepPlan | None) -> list[TermSpec]:
        """The terms a step computes: every term, or those the curriculum's plan gives a nonzero weight."""
        if plan is None:
            return self.terms
        return [t for t in self.terms if plan.weights.get(t.label, 0.0) != 0.0]

    def wants(self, kind: str, plan: StepPlan | None) -> bool:
        """Whether this step's terms read the student's `hidden` states or `attention` maps."""
        return any(t.kind == kind for t in self.active_terms(plan))

    # ---- the computation ---------------------------------------------------------------------------
    def forward(
        self, student_out, batch: Mapping[str, torch.Tensor | None], plan: StepPlan | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-term loss sums for one micro-batch.

        student_out: HF CausalLMOutput with `logits` [B, T, V] (+ `hidden_states`, `attentions` if asked), or
            with the fused head a `HeadlessOutput` (last hidden states and the head instead of logits).
        batch: `TeacherBatch.to_torch()` tensors, or just input_ids/attention_mask/loss_mask without a teacher.
        plan: the curriculum's step plan (temperature, weights, threshold); None: the configured ones.
        Returns {label: loss_sum} of the step's active terms (unweighted sums; the caller weights and normalises).
        """
        mask = batch["loss_mask"].reshape(-1).bool()
        labels = next_token_labels(batch["input_ids"]).reshape(-1)
        teacher = self._teacher(batch)
        temperature = plan.temperature if plan is not None else self.temperature
        active = self.active_terms(plan)
        masks = {spec.label: mask for spec in active}
        if batch.get(ON_POLICY) is not None and bool(batch[ON_POLICY]):
            # The tokens are the student's own samples: its hard-label terms would imitate itself. They still run,
            # on no token (loss 0, gradient 0), so every batch calls the same modules: ZeRO-3 traces that order
            # and its ranks must agree on it.
            off = torch.zeros_like(mask)
            masks |= {spec.label: off for spec in active if spec.group == HARD}
        logit_args = {"temperature": temperature, "labels": labels}
        sums: dict[str, torch.Tensor] = {}
        if isinstance(student_out, HeadlessOutput):
            sums |= self._fused_logit_sums(student_out, active, teacher, masks, logit_args, plan)
        for spec in active:
            fn = losses.get(spec.name)
            params = self._params(spec, plan)
            if spec.kind == "logits":
                if spec.label in sums:
                    continue
                logits = student_out.logits
                v = logits.shape[-1]
                loss_sum, _ = fn(
                    logits.reshape(-1, v),
                    teacher,
                    masks[spec.label],
                    chunk_size=chunk_rows(self.chunk_size, v),
                    **logit_args,
                    **params,
                )
            elif spec.kind == "hidden":
                s_feats, t_feats = self._hidden_pairs(spec, student_out, batch)
                loss_sum, _ = fn(s_feats, t_feats, self._feature_mask(batch).reshape(-1), **params)
            else:
                s_attn, t_attn = self._attention_pairs(spec, student_out, batch)
                loss_sum, _ = fn(s_attn, t_attn, self._feature_mask(batch), **params)
            sums[spec.label] = loss_sum
        sums = {spec.label: sums[spec.label] for spec in active}  # the configured order, whichever path
        if sums:
            first = next(iter(sums))
            sums[first] = sums[first] + self._idle_projectors(sums, sums[first])
        return sums

    @staticmethod
    def _feature_mask(batch: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """[B, T] positions where hidden states / attention maps are compared: the trained positions, and across
        tokenizers only those with a teacher counterpart (TeacherBatch.aligned)."""
        mask = batch["loss_mask"].bool()
        aligned = batch.get("aligned")
        return mask if aligned is None else mask & aligned.bool()

    @staticmethod
    def _params(spec: TermSpec, plan: StepPlan | None) -> dict:
        """The term's parameters, with the curriculum's selection threshold where the plan sets one."""
        params = dict(spec.params)
        if plan is not None and plan.select_threshold is not None and params.get("select_by"):
            params["select_threshold"] = plan.select_threshold
        return params

    def _fused_logit_sums(
        self,
        out: HeadlessOutput,
        active: list[TermSpec],
        teacher,
        masks: Mapping[str, torch.Tensor],
        logit_args: dict,
        plan: StepPlan | None,
    ) -> dict[str, torch.Tensor]:
        """Every logit term's loss sum through the fused head, differentiable for this step's weighted sum
        (masks: each term's trained positions)."""
        specs = [s for s in active if s.kind == "logits"]
        if not specs:
            return {}
        hidden = out.last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1])
        vocab = out.head.weight.shape[0]
        row_terms = [
            losses.get(s.name).row_term(
                teacher, masks[s.label], vocab_size=vocab, **logit_args, **self._params(s, plan)
            )[0]
            for s in specs
        ]
        sums = losses.fused_head_loss_sums(
            hidden,
            out.head.weight,
            out.head.bias,
            row_terms,
            [self.weight(s.label, plan) for s in specs],
            chunk_size=chunk_rows(self.chunk_size, vocab),
            softcap=out.head.softcap,
        )
        return {s.label: sums[i] for i, s in enumerate(specs)}

    def _idle_projectors(self, sums: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """0 x the output of every projector whose term is off this step: an exact zero gradient instead of none,
        so every optimizer (torch AdamW, ZeRO 1-3, which would otherwise skip or keep stale gradients) takes the
        same step. Called through the modules, inside the forward, so ZeRO-3 gathers their parameters."""
        zero = like.new_zeros((), dtype=torch.float32)
        for label, projector in self.projectors.items():
            if label not in sums:
                weight = next(projector.parameters())
                probe = weight.new_zeros(1, projector.num_layers, projector.proj[0].in_features)
                zero = zero + 0.0 * projector(probe).float().sum()
        return zero

    def weight(self, label: str, plan: StepPlan | None) -> float:
        if plan is not None:
            return plan.weights.get(label, 0.0)
        return next(t.weight for t in self.terms if t.label == label)

    def weighted_terms(
        self, sums: Mapping[str, torch.Tensor], plan: StepPlan | None = None
    ) -> dict[str, torch.Tensor]:
        return {label: self.weight(label, plan) * s for label, s in sums.items()}

    def weighted_total(self, sums: Mapping[str, torch.Tensor], plan: StepPlan | None = None) -> torch.Tensor:
        return sum(self.weighted_terms(sums, plan).values())  # type: ignore[return-value]

    def _teacher(self, batch):
        if batch.get("topk_ids") is None:
            return None
        kind = losses.MappedTopKTeacher if self.cross_tokenizer else losses.TopKTeacher
        return kind(
            ids=batch["topk_ids"].reshape(-1, batch["topk_ids"].shape[-1]),
            logits=batch["topk_logits"].reshape(-1, batch["topk_logits"].shape[-1]),
            log_normalizer=batch["log_normalizer"].reshape(-1),
        )

    def _hidden_pairs(self, spec: TermSpec, student_out, batch):
        shipped = self.teacher_hidden_layers
        student = torch.stack([student_out.hidden_states[s] for s, _ in spec.layer_map], dim=2)  # [B,T,L,Hs]
        teacher = batch["hidden"][:, :, [shipped.index(tl) for _, tl in spec.layer_map]]  # [B,T,L,Ht]
        n = student.shape[0] * student.shape[1]
        projector = self.projectors[spec.label]
        # The projector may live in bf16 (a DeepSpeed bf16 engine casts every module); the loss stays fp32.
        dtype = next(projector.parameters()).dtype
        projected = projector(student.reshape(n, *student.shape[2:]).to(dtype)).float()
        return projected, teacher.reshape(n, *teacher.shape[2:]).float()

    def _attention_pairs(self, spec: TermSpec, student_out, batch):
        shipped = self.teacher_attention_layers
        student = torch.stack([student_out.attentions[s].mean(dim=1) for s, _ in spec.layer_map], dim=1)
        teacher = batch["attention"][:, [shipped.index(tl) for _, tl in spec.layer_map]]
        return student.float(), teacher.float()


def teacher_layers(terms: list[TermSpec], kind: str) -> list[int]:
    """The teacher layers the `kind` terms ("hidden" / "attention") read, sorted: what the teacher ships."""
    return sorted({tl for t in terms if t.weight != 0.0 and t.kind == kind for _, tl in t.layer_map})
