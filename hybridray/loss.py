"""InfoNCE over in-batch negatives gathered from every worker, with translation masking."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from hybridray.data.sampler import NO_GROUP
from hybridray.distributed import all_gather_no_grad, all_gather_with_grad, rank, world_size


class InfoNCELoss(nn.Module):
    """Contrastive loss of a query against its positive passage and every other passage of the
    global batch (all workers), plus optional hard negatives.

    For local query ``i`` on rank ``r`` (global index ``g = r * B + i``, ``B`` local pairs)::

        loss_i = -log softmax(q_i . [P_all ; H_all] / tau)[g]

    where ``P_all`` are the positives of all ranks (gathered with gradients, so the negatives
    scored here also train the worker that encoded them) and ``H_all`` the hard negatives of
    all ranks. Each rank scores only its own ``B`` queries (a ``B x (N + N*k)`` matrix, ``N``
    the global batch), never the full global matrix.

    **Masking** (false negatives). With ``mask_same_group``, a column is removed from query
    ``i``'s softmax when its group id equals the query's: another pair's positive that is a
    translation of the query's own pair, or another query's hard negative that is (a
    translation of) this query's answer. Never removed: the query's own positive, and the
    query's own hard negatives (the data chose them as negatives for this very query). A hard
    negative's group id is the group of the pair it answers, or ``NO_GROUP`` (0) when it
    answers none in the data; a ``NO_GROUP`` hard negative is never masked.

    **Symmetric.** With ``symmetric``, the passage -> query term (local passages against the
    gathered queries, same labels and masking) is added and the two are averaged.

    **Reduction, and why it needs no world-size factor.** The single-process objective is the
    mean over the global batch, ``L = (1/N) sum_j loss_j``. Each rank returns its *local mean*
    ``L_r = (1/B) sum_{i in r} loss_i``. The all-gather's backward hands every rank the sum over
    all ranks of the gradients reaching its embeddings, so the per-rank parameter gradients add
    up to ``grad sum_r L_r = grad (N/B) L = W grad L``; DDP and DeepSpeed *average* gradients
    over the ``W`` ranks, which gives exactly ``grad L``. This is the only place where the
    reduction is chosen; ``tests/test_distributed_equivalence.py`` proves it against a single
    process. The global loss for logging is the mean of the local losses over ranks
    (``hybridray.distributed.all_reduce_mean``), since every rank has the same ``B``. One
    global batch is one optimizer step (``optim.grad_accum`` > 1 is refused by the config; a
    batch larger than memory is trained with gradient caching, ``hybridray.grad_cache``, which
    hands this loss the same embeddings and so changes nothing here).

    **Distillation** (``distill_weight`` > 0, ``teacher`` given: the frozen starting model's
    embeddings of the same texts). Each row's softmax over its columns -- the very scores,
    masks and temperature of the contrastive term -- is matched to the teacher's:
    ``distill_weight * KL(p_teacher || p_student)``, averaged over rows (both directions with
    ``symmetric``) and reduced as above; the teacher's columns are gathered without gradient
    and its scores use the temperature's value (no gradient to a learned temperature through
    the teacher side). Why the in-batch distribution rather than keeping embeddings close: it
    constrains only what retrieval uses -- how the base model ranks these candidates, which is
    where its monolingual quality lives -- and leaves the embedding space free to rotate and
    pull translations together, which an L2 anchor on the embeddings would resist. Without
    dropout, at the start (student = teacher) the term and its gradient are exactly 0; in
    training the student drops out and the teacher does not, so the term acts from the first
    step and also pulls the dropped-out student toward the clean teacher (R-Drop-like).

    Inputs (embeddings L2-normalised by the encoder, so dot products are cosines):

    ===========================  ==========  =============================================
    argument                     shape       meaning
    ===========================  ==========  =============================================
    ``query``                    [B, D]      local queries
    ``passage``                  [B, D]      their positives, row ``i`` answers query ``i``
    ``hard_negatives``           [B*k, D]    optional, query-major (or [B, k, D])
    ``group_ids``                [B] int     optional, one id per pair (its translations
                                             share it)
    ``hard_negative_group_ids``  [B*k] int   optional, the group each hard negative
                                             answers (``NO_GROUP`` = none); without it
                                             hard negatives are never masked
    ``teacher``                  3 tensors   optional, the teacher's (query, passage,
                                             hard negatives or None), shapes as above
    ===========================  ==========  =============================================

    Returns the scalar local loss (see the reduction above).

    Temperature: fixed ``temperature``, or learned (``learn_temperature``) as ``log tau``, kept
    in ``[min(0.01, tau0), max(1.0, tau0)]`` by ``clamp_temperature_()`` after every optimizer
    step, as CLIP clamps its logit scale (the trainer does it through
    ``hybridray.engine.clamp_temperature``). Clamping the forward value instead would leave
    the parameter free to drift past the bound, where its gradient is zero.
    Scores are computed in at least float32 whatever the encoder's precision.

    Paper: van den Oord et al., "Representation Learning with Contrastive Predictive Coding"
    (InfoNCE); in-batch + hard negatives as in DPR (Karpukhin et al., 2020); hybrid batches of
    translated QA pairs as in arXiv 2408.10536.

    Example::

        loss_fn = InfoNCELoss(temperature=0.05)
        q = F.normalize(torch.randn(4, 8), dim=-1)
        p = F.normalize(torch.randn(4, 8), dim=-1)
        loss = loss_fn(q, p, group_ids=torch.tensor([0, 1, 2, 3]))
    """

    def __init__(
        self,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        symmetric: bool = False,
        mask_same_group: bool = True,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        self.symmetric = symmetric
        self.distill_weight = distill_weight
        self.mask_same_group = mask_same_group
        self.temperature_bounds = (min(0.01, temperature), max(1.0, temperature))
        # Shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views,
        # which 0-dim tensors do not support.
        log_t = torch.tensor([math.log(temperature)], dtype=torch.float32)
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)

    @classmethod
    def from_config(cls, loss_config) -> "InfoNCELoss":
        """From ``Config.loss`` (``hybridray.config.LossConfig``)."""
        return cls(
            temperature=loss_config.temperature,
            learn_temperature=loss_config.learn_temperature,
            symmetric=loss_config.symmetric,
            mask_same_group=loss_config.mask_same_group,
            distill_weight=loss_config.distill_weight,
        )

    @property
    def temperature(self) -> torch.Tensor:
        # at least float32, even when DeepSpeed casts the module to bf16
        log_t = self.log_temperature
        return log_t.to(torch.promote_types(log_t.dtype, torch.float32)).exp()

    @property
    def log_temperature_bounds(self) -> tuple[float, float]:
        lo, hi = self.temperature_bounds
        return math.log(lo), math.log(hi)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Put a learned temperature back inside its bounds (after each optimizer step)."""
        self.log_temperature.clamp_(*self.log_temperature_bounds)

    def forward(
        self,
        query: torch.Tensor,
        passage: torch.Tensor,
        hard_negatives: Optional[torch.Tensor] = None,
        group_ids: Optional[torch.Tensor] = None,
        hard_negative_group_ids: Optional[torch.Tensor] = None,
        teacher: Optional[tuple] = None,
    ) -> torch.Tensor:
        if query.shape != passage.shape:
            raise ValueError(f"query {tuple(query.shape)} != passage {tuple(passage.shape)}")
        distill = self.distill_weight > 0
        if distill and teacher is None:
            raise ValueError("distill_weight > 0 needs the teacher's embeddings")
        local = query.shape[0]
        labels = rank() * local + torch.arange(local, device=query.device)
        local_groups = groups = None
        if self.mask_same_group and group_ids is not None:
            local_groups = group_ids.reshape(-1)
            groups = all_gather_no_grad(local_groups)

        columns = [all_gather_with_grad(passage)]
        teacher_columns = [all_gather_no_grad(teacher[1])] if distill else None
        column_groups = [groups]
        spared = labels[:, None]  # per row, the columns never masked: its positive ...
        if hard_negatives is not None:
            negatives = hard_negatives.reshape(-1, query.shape[-1])
            k = negatives.shape[0] // local
            columns.append(all_gather_with_grad(negatives))
            if distill:
                teacher_columns.append(all_gather_no_grad(teacher[2].reshape(-1, query.shape[-1])))
            column_groups.append(
                all_gather_no_grad(hard_negative_group_ids.reshape(-1))
                if groups is not None and hard_negative_group_ids is not None
                else None
            )
            # ... and its own k hard negatives, which follow the N gathered positives
            own = columns[0].shape[0] + labels[:, None] * k + torch.arange(k, device=query.device)
            spared = torch.cat([spared, own], dim=1)
        if columns[0].shape[0] != world_size() * local:
            raise ValueError("every rank must pass the same number of pairs")
        mask = self._mask(query, columns, column_groups, local_groups, spared)
        scores = self._scores(query, columns, mask)
        loss = F.cross_entropy(scores, labels)
        if distill:
            teacher_scores = self._scores(teacher[0], teacher_columns, mask, self.temperature.detach())
            distillation = _kl(teacher_scores, scores, mask)

        if self.symmetric:
            queries = all_gather_with_grad(query)
            mask = self._mask(passage, [queries], [groups], local_groups, labels[:, None])
            scores = self._scores(passage, [queries], mask)
            loss = (loss + F.cross_entropy(scores, labels)) / 2
            if distill:
                teacher_scores = self._scores(teacher[1], [all_gather_no_grad(teacher[0])], mask,
                                              self.temperature.detach())
                distillation = (distillation + _kl(teacher_scores, scores, mask)) / 2
        # the distillation term alone (unweighted, detached): what the trainer logs as distill_kl
        self.last_distillation = distillation.detach() if distill else None
        if distill:
            loss = loss + self.distill_weight * distillation
        return loss

    def _scores(self, rows, columns, mask, temperature=None) -> torch.Tensor:
        """``rows . columns / tau`` in at least float32, ``-inf`` where ``mask`` is set."""
        dtype = torch.promote_types(rows.dtype, torch.float32)  # never score in bf16/fp16
        tau = self.temperature if temperature is None else temperature
        scores = rows.to(dtype) @ torch.cat(columns).to(dtype).T / tau
        return scores if mask is None else scores.masked_fill(mask, float("-inf"))

    @staticmethod
    def _mask(rows, columns, column_groups, row_groups, spared) -> Optional[torch.Tensor]:
        """The columns that share the row's group (true where masked), except the row's
        ``spared`` columns; None when there are no group ids."""
        if row_groups is None:
            return None
        blocks = []
        for b, (block, block_groups) in enumerate(zip(columns, column_groups)):
            if block_groups is None:  # no group ids: never masked
                blocks.append(torch.zeros(len(rows), len(block), dtype=torch.bool, device=rows.device))
                continue
            same = row_groups.reshape(-1, 1) == block_groups.reshape(1, -1)
            if b > 0:  # hard negatives: NO_GROUP answers no pair
                same &= block_groups.reshape(1, -1) != NO_GROUP
            blocks.append(same)
        mask = torch.cat(blocks, dim=1)
        mask[torch.arange(len(rows), device=rows.device)[:, None], spared] = False
        return mask


def _kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(teacher) || softmax(student))``; masked columns (``-inf``
    on both sides, probability 0) add nothing."""
    log_student = F.log_softmax(student_scores, dim=-1)
    log_teacher = F.log_softmax(teacher_scores, dim=-1)
    terms = log_teacher.exp() * (log_teacher - log_student)
    if mask is not None:
        terms = torch.where(mask, torch.zeros_like(terms), terms)
    return terms.sum(dim=-1).mean()
