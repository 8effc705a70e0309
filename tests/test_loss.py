"""InfoNCELoss against a brute-force reference written as explicit loops (one process)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridray.distributed import all_gather_no_grad, all_gather_with_grad, world_size
from hybridray.loss import NO_GROUP, InfoNCELoss

N, D, K = 6, 5, 2
GROUPS = [1, 1, 2, 3, 2, 4]  # pairs 0/1 and 2/4 are translations of each other
# Hard negatives, query-major (K per query): q0's first answers its own group 1 (spared for
# q0, a false negative for q1), q2's first its own group 2 (a false negative for q4), q4's
# answer q3's group 3 and q2's group 2; 0 = NO_GROUP answers nothing.
NEG_GROUPS = [1, 9, 4, 5, 2, NO_GROUP, 7, 8, 3, 2, 10, NO_GROUP]


def reference(q, p, h, groups, neg_groups, tau, symmetric, mask):
    """-log p(positive) averaged over rows, by loops over every (row, column) pair."""

    def row_loss(row, pos, candidates):
        # candidates: (vector, group, is_positive, owner); masked columns are simply skipped.
        # A column is a false negative of row ``pos`` when it answers the row's group, unless
        # it is the row's positive or one of the row's own hard negatives (owner == pos).
        logits = []
        for vec, group, is_pos, owner in candidates:
            same_group = groups is not None and group is not None and group == groups[pos] and group != NO_GROUP
            if mask and not is_pos and owner != pos and same_group:
                continue
            logits.append((torch.dot(row, vec) / tau, is_pos))
        denom = sum(torch.exp(s) for s, _ in logits)
        positive = next(s for s, is_pos in logits if is_pos)
        return -(positive - torch.log(denom))

    def group(seq, j):
        return None if seq is None else seq[j]

    forward = []
    for i in range(len(q)):
        cands = [(p[j], group(groups, j), j == i, None) for j in range(len(p))]
        if h is not None:
            cands += [(h[m], group(neg_groups, m), False, m // K) for m in range(len(h))]
        forward.append(row_loss(q[i], i, cands))
    loss = sum(forward) / len(forward)
    if symmetric:
        backward = [
            row_loss(p[i], i, [(q[j], group(groups, j), j == i, None) for j in range(len(q))])
            for i in range(len(p))
        ]
        loss = (loss + sum(backward) / len(backward)) / 2
    return loss


def embeddings(seed, rows):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, D, generator=gen, dtype=torch.float64)
    return F.normalize(x, dim=-1).requires_grad_()


CASES = {
    "plain": dict(hard=False, mask=False, symmetric=False),
    "masked": dict(hard=False, mask=True, symmetric=False),
    "hard_negatives": dict(hard=True, mask=False, symmetric=False),
    "hard_negatives_masked": dict(hard=True, mask=True, symmetric=False),
    "symmetric_masked": dict(hard=False, mask=True, symmetric=True),
    "everything": dict(hard=True, mask=True, symmetric=True),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_brute_force(case):
    opts = CASES[case]
    q, p, h = embeddings(0, N), embeddings(1, N), embeddings(2, N * K) if opts["hard"] else None
    groups, neg_groups = torch.tensor(GROUPS), torch.tensor(NEG_GROUPS[: N * K])
    loss_fn = InfoNCELoss(0.1, symmetric=opts["symmetric"], mask_same_group=opts["mask"])
    got = loss_fn(q, p, h, groups, neg_groups if opts["hard"] else None)
    got.backward()
    grads = [t.grad.clone() for t in (q, p, h) if t is not None]

    for t in (q, p, h):
        if t is not None:
            t.grad = None
    want = reference(q, p, h, GROUPS, NEG_GROUPS, 0.1, opts["symmetric"], opts["mask"])
    want.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for g, t in zip(grads, [t for t in (q, p, h) if t is not None]):
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-7)


def test_masking_changes_the_loss_and_spares_the_positive():
    q, p = embeddings(0, N), embeddings(1, N)
    groups = torch.tensor(GROUPS)
    masked = InfoNCELoss(0.1, mask_same_group=True)(q, p, group_ids=groups)
    unmasked = InfoNCELoss(0.1, mask_same_group=False)(q, p, group_ids=groups)
    assert masked < unmasked  # removing negatives can only lower the loss
    # every pair in its own group: masking removes nothing
    unique = torch.arange(N)
    same = InfoNCELoss(0.1)(q, p, group_ids=unique)
    assert same.item() == pytest.approx(unmasked.item(), rel=1e-12)
    # all pairs in one group: only the positive is left, the loss is exactly 0
    assert InfoNCELoss(0.1)(q, p, group_ids=torch.ones(N, dtype=torch.long)).item() == 0.0


def test_hard_negative_masking_spares_the_querys_own_negatives():
    """The decided meaning, column by column: a hard negative answering query i's group is
    masked for i unless it is i's own; NO_GROUP negatives are never masked."""
    q, p, h = embeddings(0, N), embeddings(1, N), embeddings(2, N * K)
    groups = torch.tensor(GROUPS)

    def loss_without(row, masked_columns):
        """Row ``row``'s loss computed by hand with exactly ``masked_columns`` removed."""
        scores = torch.cat([q[row] @ p.T, q[row] @ h.T]) / loss_fn.temperature.double()
        keep = torch.ones(len(scores), dtype=torch.bool)
        keep[list(masked_columns)] = False
        return -(scores[row] - torch.logsumexp(scores[keep], 0))

    loss_fn = InfoNCELoss(0.1, mask_same_group=True)
    want = [
        loss_without(0, {1}),            # q0 (group 1): q1's positive; its own negative h0 is spared
        loss_without(1, {0, N + 0}),     # q1 (group 1): q0's positive and q0's negative h0
        loss_without(2, {4, N + 9}),     # q2 (group 2): q4's positive and q4's h9; its own h4 spared
        loss_without(3, {N + 8}),        # q3 (group 3): q4's negative h8 answers group 3
        loss_without(4, {2, N + 4}),     # q4 (group 2): q2's positive, q2's negative h4; own h9 spared
        loss_without(5, {N + 2}),        # q5 (group 4): q1's h2; NO_GROUP negatives never masked
    ]
    neg_groups = torch.tensor(NEG_GROUPS)
    got = loss_fn(q, p, h, groups, neg_groups)
    assert got.item() == pytest.approx(torch.stack(want).mean().item(), rel=1e-12)


def test_hard_negatives_accept_query_major_3d_shape():
    q, p, h = embeddings(0, N), embeddings(1, N), embeddings(2, N * K)
    loss_fn = InfoNCELoss(0.1)
    flat = loss_fn(q, p, h, torch.tensor(GROUPS), torch.tensor(NEG_GROUPS))
    shaped = loss_fn(q, p, h.reshape(N, K, D), torch.tensor(GROUPS),
                     torch.tensor(NEG_GROUPS).reshape(N, K))
    assert flat.item() == shaped.item()


def test_learned_temperature_gets_the_reference_gradient():
    q, p, h = embeddings(0, N), embeddings(1, N), embeddings(2, N * K)
    loss_fn = InfoNCELoss(0.1, learn_temperature=True, symmetric=True).double()
    assert [n for n, _ in loss_fn.named_parameters()] == ["log_temperature"]
    loss_fn(q, p, h, torch.tensor(GROUPS), torch.tensor(NEG_GROUPS)).backward()
    got = loss_fn.log_temperature.grad
    assert got is not None and got.abs().item() > 0

    log_tau = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)
    reference(q, p, h, GROUPS, NEG_GROUPS, log_tau.exp(), True, True).backward()
    assert got.item() == pytest.approx(log_tau.grad.item(), rel=1e-6)


def test_fixed_temperature_is_not_a_parameter_and_learned_one_is_clamped():
    assert list(InfoNCELoss(0.05).parameters()) == []
    loss_fn = InfoNCELoss(0.05, learn_temperature=True)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(1e-5))
    loss_fn.clamp_temperature_()  # the parameter itself moves back, not only the value used
    assert loss_fn.log_temperature.item() == pytest.approx(math.log(0.01))
    assert loss_fn.temperature.item() == pytest.approx(0.01)
    with torch.no_grad():
        loss_fn.log_temperature.fill_(math.log(50.0))
    loss_fn.clamp_temperature_()
    assert loss_fn.temperature.item() == pytest.approx(1.0)


def test_from_config():
    from hybridray.config import build_config

    cfg = build_config({"loss": {"temperature": 0.02, "learn_temperature": True, "symmetric": True,
                                 "mask_same_group": False}})
    loss_fn = InfoNCELoss.from_config(cfg.loss)
    assert loss_fn.symmetric and not loss_fn.mask_same_group
    assert loss_fn.temperature.item() == pytest.approx(0.02)
    assert loss_fn.temperature_bounds == (0.01, 1.0)


def test_gathers_are_the_identity_without_a_process_group():
    t = torch.randn(3, 2, requires_grad=True)
    assert world_size() == 1
    assert all_gather_with_grad(t) is t
    assert not all_gather_no_grad(t).requires_grad


# ----------------------------------------------------------------------------- distillation
def reference_distillation(student, teacher, groups, neg_groups, tau, teacher_tau, symmetric, mask):
    """KL(teacher || student) of each row's softmax over its unmasked columns, by loops; rows
    averaged, the two directions averaged with ``symmetric``. ``student`` / ``teacher`` are
    (queries, passages, hard negatives or None)."""

    def kept(pos, candidates):
        # the reference above's masking rule, column by column
        out = []
        for c, (group, is_pos, owner) in enumerate(candidates):
            same_group = groups is not None and group is not None and group == groups[pos] and group != NO_GROUP
            if not (mask and not is_pos and owner != pos and same_group):
                out.append(c)
        return out

    def direction(rows_s, cols_s, rows_t, cols_t, candidates_of):
        terms = []
        for i in range(len(rows_s)):
            cols = kept(i, candidates_of(i))
            log_s = torch.log_softmax(torch.stack([rows_s[i] @ cols_s[c] for c in cols]) / tau, 0)
            log_t = torch.log_softmax(torch.stack([rows_t[i] @ cols_t[c] for c in cols]) / teacher_tau, 0)
            terms.append((log_t.exp() * (log_t - log_s)).sum())
        return sum(terms) / len(terms)

    (qs, ps, hs), (qt, pt, ht) = student, teacher
    n = len(qs)

    def forward_candidates(i):
        cands = [(groups[j], j == i, None) for j in range(n)]
        if hs is not None:
            cands += [(neg_groups[m], False, m // K) for m in range(len(hs))]
        return cands

    cols_s = list(ps) + (list(hs) if hs is not None else [])
    cols_t = list(pt) + (list(ht) if ht is not None else [])
    total = direction(qs, cols_s, qt, cols_t, forward_candidates)
    if symmetric:
        backward = direction(ps, list(qs), pt, list(qt), lambda i: [(groups[j], j == i, None) for j in range(n)])
        total = (total + backward) / 2
    return total


@pytest.mark.parametrize("case", ["masked", "hard_negatives_masked", "everything"])
def test_distillation_matches_brute_force(case):
    """Loss with the term = contrastive loss + weight * the looped KL; gradients against
    autograd through that reference, for the student's embeddings and a learned temperature."""
    opts = CASES[case]
    q, p, h = embeddings(0, N), embeddings(1, N), embeddings(2, N * K) if opts["hard"] else None
    teacher = tuple(t.detach() + 0.3 * embeddings(seed, len(t)).detach() if t is not None else None
                    for seed, t in zip((3, 4, 5), (q, p, h)))
    teacher = tuple(F.normalize(t, dim=-1) if t is not None else None for t in teacher)
    groups, neg_groups = torch.tensor(GROUPS), torch.tensor(NEG_GROUPS[: N * K])
    weight = 0.7
    loss_fn = InfoNCELoss(0.1, learn_temperature=True, symmetric=opts["symmetric"], mask_same_group=opts["mask"],
                          distill_weight=weight).double()
    got = loss_fn(q, p, h, groups, neg_groups if opts["hard"] else None, teacher)
    got.backward()
    students = [t for t in (q, p, h) if t is not None]
    grads = [t.grad.clone() for t in students] + [loss_fn.log_temperature.grad.clone()]
    for t in students:
        t.grad = None

    log_tau = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)
    contrastive = reference(q, p, h, GROUPS, NEG_GROUPS, log_tau.exp(), opts["symmetric"], opts["mask"])
    # the teacher side sees the temperature's value only (no gradient through it)
    distillation = reference_distillation((q, p, h), teacher, GROUPS, NEG_GROUPS, log_tau.exp(),
                                          log_tau.detach().exp(), opts["symmetric"], opts["mask"])
    want = contrastive + weight * distillation
    want.backward()
    assert distillation.item() > 1e-3  # the teacher differs: the term is there
    # what the trainer logs as distill_kl: this term alone, before its weight
    assert loss_fn.last_distillation.item() == pytest.approx(distillation.item(), rel=1e-6)
    assert not loss_fn.last_distillation.requires_grad
    # the loss keeps log(tau) in float32 (then cast): agreement to float32 rounding of tau
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for g, t in zip(grads, students + [log_tau]):
        torch.testing.assert_close(g.reshape(t.grad.shape), t.grad, rtol=1e-5, atol=1e-7)


def test_distillation_is_zero_when_the_student_is_the_teacher():
    """At the start (student = teacher) the term and its gradient vanish: the loss and its
    gradient are the contrastive loss's, bit for bit."""
    q, p, h = embeddings(0, N), embeddings(1, N), embeddings(2, N * K)
    groups, neg_groups = torch.tensor(GROUPS), torch.tensor(NEG_GROUPS)
    teacher = (q.detach().clone(), p.detach().clone(), h.detach().clone())
    results = []
    for weight in (0.0, 2.0):
        loss_fn = InfoNCELoss(0.1, symmetric=True, distill_weight=weight)
        loss = loss_fn(q, p, h, groups, neg_groups, teacher if weight else None)
        loss.backward()
        results.append((loss.item(), [t.grad.clone() for t in (q, p, h)]))
        for t in (q, p, h):
            t.grad = None
        assert (loss_fn.last_distillation is None) if weight == 0 else (loss_fn.last_distillation.item() == 0)
    (plain, plain_grads), (distilled, distilled_grads) = results
    assert distilled == plain
    for a, b in zip(plain_grads, distilled_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_distillation_needs_the_teacher():
    q, p = embeddings(0, N), embeddings(1, N)
    with pytest.raises(ValueError, match="teacher"):
        InfoNCELoss(0.1, distill_weight=1.0)(q, p)
