"""Losses against their published formulas and against independent full-vocabulary computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_train.losses import (
    chunked_sparse_kl,
    fold_outside_vocab,
    load_balancing_loss,
    mimic_token_losses,
    preference_loss,
    router_z_loss,
    sampled_kd,
    sparse_kl,
    token_logprobs,
)

N, V = 12, 50  # every test is seeded by tests/conftest.py:_seeded


def _teacher(k: int, sharp: float = 1.0):
    logits = torch.randn(N, V, dtype=torch.float64) * 3 * sharp
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(k, dim=-1)
    return logp, top.indices, top.values


def test_kl_equals_full_vocab_kl_when_k_is_vocab():
    t_logp, ids, lps = _teacher(V)
    s_logits = torch.randn(N, V, dtype=torch.float64)
    full = (t_logp.exp() * (t_logp - torch.log_softmax(s_logits, -1))).sum(-1)
    for tail in ("renorm", "rest"):
        got = sparse_kl(s_logits, ids, lps, tail=tail)
        torch.testing.assert_close(got.double(), full, atol=1e-5, rtol=1e-5)


def test_rest_tail_equals_kl_of_coarse_grained_distributions():
    k = 7
    t_logp, ids, lps = _teacher(k)
    s_logits = torch.randn(N, V, dtype=torch.float64)
    s_p = torch.softmax(s_logits, -1)
    t_coarse = torch.cat([lps.exp(), 1 - lps.exp().sum(-1, keepdim=True)], -1)
    s_top = s_p.gather(-1, ids)
    s_coarse = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
    direct = (t_coarse * (t_coarse.log() - s_coarse.log())).sum(-1)
    torch.testing.assert_close(sparse_kl(s_logits, ids, lps, tail="rest").double(), direct, atol=1e-5, rtol=1e-5)


def test_renorm_tail_matches_distillkit_style_formula_with_temperature():
    k, temp = 5, 2.0
    _, ids, lps = _teacher(k)
    s_logits = torch.randn(N, V, dtype=torch.float64)
    p = torch.softmax(lps / temp, -1)
    q = torch.softmax(s_logits.gather(-1, ids) / temp, -1)
    direct = (p * (p / q).log()).sum(-1) * temp**2
    torch.testing.assert_close(sparse_kl(s_logits, ids, lps, temperature=temp).double(), direct, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tail", ["renorm", "rest"])
def test_gradients_match_autograd_of_direct_formula(tail):
    k = 6
    t_logp, ids, lps = _teacher(k)
    s1 = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    s2 = s1.detach().clone().requires_grad_(True)
    sparse_kl(s1, ids, lps, tail=tail).sum().backward()
    if tail == "rest":
        s_p = torch.softmax(s2, -1)
        s_top = s_p.gather(-1, ids)
        s_coarse = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
        t_coarse = torch.cat([lps.exp(), 1 - lps.exp().sum(-1, keepdim=True)], -1)
        direct = (t_coarse * (t_coarse.log() - s_coarse.log())).sum()
    else:
        p = torch.softmax(lps, -1)
        direct = (p * (p.log() - torch.log_softmax(s2.gather(-1, ids), -1))).sum()
    direct.backward()
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["teacher_rest_0", "teacher_rest_1", "student_rest_0", "student_rest_1"])
def test_rest_tail_gradients_finite_at_extreme_masses(case):
    """DistillKit's rest bucket gives NaN gradients here (its issue #45)."""
    k = 4
    ids = torch.arange(k).repeat(N, 1)
    s_logits = torch.randn(N, V)
    lps = torch.log_softmax(torch.randn(N, k), -1)  # teacher top-k holds all the mass: rest 0
    if case == "teacher_rest_1":
        lps = torch.full((N, k), -60.0)  # teacher top-k holds no mass: rest 1
    if case == "student_rest_0":
        s_logits[:, k:] = -1e4
    if case == "student_rest_1":
        s_logits[:, :k] = -1e4
    s_logits.requires_grad_(True)
    loss = sparse_kl(s_logits, ids, lps, tail="rest").float()
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s_logits.grad).all()


def test_student_equal_to_teacher_gives_zero_kl():
    t_logp, ids, lps = _teacher(V)
    for tail in ("renorm", "rest"):
        assert sparse_kl(t_logp, ids, lps, tail=tail).abs().max() < 1e-6


def _trl_dpo(pc, pr, rc, rr, beta, eps=0.0):
    logits = (pc - pr) - (rc - rr)
    return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps


def test_dpo_matches_published_formula_with_teacher_as_reference():
    B = 16
    pc, pr, tc, tr = (torch.randn(B, dtype=torch.float64) * 5 - 20 for _ in range(4))
    for beta in (0.1, 0.5):
        for eps in (0.0, 0.1):
            loss, rc, rr = preference_loss(pc, pr, tc, tr, beta=beta, label_smoothing=eps)
            torch.testing.assert_close(loss, _trl_dpo(pc, pr, tc, tr, beta, eps))
            torch.testing.assert_close(rc, beta * (pc - tc))
            torch.testing.assert_close(rr, beta * (pr - tr))
            # LLaVA-MoD's formula written out: -log sigma(beta [(log ps(yw) - log pt(yw)) - (...)])
            direct = -torch.log(1 / (1 + torch.exp(-beta * ((pc - tc) - (pr - tr)))))
            if eps == 0.0:
                torch.testing.assert_close(loss, direct)


def test_beta_scales_the_sigmoid_argument():
    pc, pr, tc, tr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    h = 2.0  # (-3 + 4) - (-5 + 4)
    for beta in (0.05, 0.1, 1.0):
        loss, _, _ = preference_loss(pc, pr, tc, tr, beta=beta)
        assert loss.item() == pytest.approx(math.log1p(math.exp(-beta * h)), rel=1e-6)
    # policy == reference: zero margin, loss log 2 whatever beta is
    loss, rc, rr = preference_loss(tc, tr, tc, tr, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2)) and rc.item() == rr.item() == 0


def test_ipo_and_kto_pair_match_trl_formulas():
    B, beta = 8, 0.2
    pc, pr, tc, tr = (torch.randn(B, dtype=torch.float64) * 3 - 10 for _ in range(4))
    ipo, _, _ = preference_loss(pc, pr, tc, tr, beta=beta, loss_type="ipo")
    torch.testing.assert_close(ipo, (((pc - pr) - (tc - tr)) - 1 / (2 * beta)) ** 2)
    kto, _, _ = preference_loss(pc, pr, tc, tr, beta=beta, loss_type="kto_pair")
    chosen_kl = (pc - tc).mean().clamp(min=0)
    rejected_kl = (pr - tr).mean().clamp(min=0)
    want = torch.cat([1 - torch.sigmoid(beta * ((pc - tc) - rejected_kl)),
                      1 - torch.sigmoid(beta * (chosen_kl - (pr - tr)))])
    torch.testing.assert_close(kto, want)


def test_load_balancing_equals_switch_formula_and_is_one_when_balanced():
    E, T, k = 4, 64, 2
    logits = torch.randn(T, E, dtype=torch.float64) * 2
    probs = torch.softmax(logits, -1)
    chosen = [set(torch.topk(probs[t], k).indices.tolist()) for t in range(T)]
    fraction = [sum(e in c for c in chosen) / (T * k) for e in range(E)]  # share of routed slots
    mean_prob = [probs[:, e].mean().item() for e in range(E)]
    want = E * sum(f * p for f, p in zip(fraction, mean_prob))
    assert load_balancing_loss(logits, top_k=k).item() == pytest.approx(want, rel=1e-6)
    # Token t prefers experts t mod E and t+1 mod E equally: every expert gets the same share of
    # slots and the same mean probability, the loss's minimum 1.
    balanced = torch.zeros(T, E)
    for t in range(T):
        balanced[t, [t % E, (t + 1) % E]] = 3.0
    assert load_balancing_loss(balanced, top_k=k).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.zeros(T, E)
    skewed[:, 0] = 5.0
    assert load_balancing_loss(skewed, top_k=k).item() > 1.3
    assert router_z_loss(torch.zeros(T, E)).item() == pytest.approx(math.log(E) ** 2)


@pytest.mark.parametrize("tail", ["renorm", "rest"])
def test_masked_teacher_entries_carry_no_mass(tail):
    """Entries of log-prob -inf pointing at a duplicate id (what training does with teacher ids
    outside the shared vocabulary) equal dropping them; gradients stay finite."""
    k = 6
    _, ids, lps = _teacher(k)
    s_logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    masked_ids = ids.clone()
    masked_ids[:, -1] = ids[:, 0]
    masked_lps = lps.clone()
    masked_lps[:, -1] = float("-inf")
    got = sparse_kl(s_logits, masked_ids, masked_lps, tail=tail)
    want = sparse_kl(s_logits, ids[:, :-1], lps[:, :-1], tail=tail)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    got.sum().backward()
    assert torch.isfinite(s_logits.grad).all()


@pytest.mark.parametrize("tail", ["renorm", "rest"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_kl_equals_the_unchunked_loss_and_its_gradient(tail, dtype):
    t_logp, ids, lps = _teacher(8)
    rest = (1 - lps.exp().sum(-1)).clamp(min=0)
    base = torch.randn(N, V, dtype=torch.float64).to(dtype)
    weights = torch.rand(N, dtype=torch.float64)  # a per-token upstream gradient, not just ones
    a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
    want = sparse_kl(a, ids, lps, tail=tail, rest_mass=rest if tail == "rest" else None)
    got = chunked_sparse_kl(b, ids, lps, rest if tail == "rest" else None, tail=tail, chunk=5)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    (want * weights.to(want.dtype)).sum().backward()
    (got * weights.to(got.dtype)).sum().backward()
    torch.testing.assert_close(b.grad, a.grad)  # equal up to the order of one multiplication
    with torch.no_grad():
        torch.testing.assert_close(chunked_sparse_kl(base, ids, lps, rest, tail=tail, chunk=5)
                                   if tail == "rest" else chunked_sparse_kl(base, ids, lps, tail=tail, chunk=5), want)


def test_token_logprobs_equal_a_full_log_softmax_and_its_gradient():
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    want = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    (g_want,) = torch.autograd.grad((want * torch.arange(N)).sum(), logits)
    got = token_logprobs(logits, targets, chunk=5)
    (g_got,) = torch.autograd.grad((got * torch.arange(N)).sum(), logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(g_got, g_want, atol=1e-12, rtol=1e-12)


def test_the_stored_rest_mass_is_used_and_agrees_with_the_recomputed_one():
    t_logp, ids, lps = _teacher(6)
    s_logits = torch.randn(N, V, dtype=torch.float64)
    stored = (1 - lps.exp().sum(-1)).clamp(min=0)
    torch.testing.assert_close(sparse_kl(s_logits, ids, lps, tail="rest", rest_mass=stored),
                               sparse_kl(s_logits, ids, lps, tail="rest"), atol=1e-12, rtol=1e-12)
    changed = sparse_kl(s_logits, ids, lps, tail="rest", rest_mass=stored * 0.5)
    assert not torch.allclose(changed, sparse_kl(s_logits, ids, lps, tail="rest"))


def test_teacher_ids_outside_the_shared_vocabulary_join_the_rest():
    """A padded teacher's top-k may hold ids >= the tokenizer's length: their mass moves to the rest
    bucket, which equals a teacher that had put that mass anywhere outside the top-k."""
    _, ids, lps = _teacher(6)
    vocab = V  # the teacher's embedding has a few more rows
    ids = ids.clone()
    ids[:, 2] = vocab + 3  # an id no tokenizer produces
    rest = (1 - lps.exp().sum(-1)).clamp(min=0)
    f_ids, f_lps, f_rest = fold_outside_vocab(ids, lps, rest, vocab)
    assert (f_ids < vocab).all() and f_lps[:, 2].isneginf().all()
    torch.testing.assert_close(f_rest, rest + lps[:, 2].exp())
    s_logits = torch.randn(N, vocab, dtype=torch.float64)
    keep = [0, 1, 3, 4, 5]
    want = sparse_kl(s_logits, ids[:, keep], lps[:, keep], tail="rest")  # rest recomputed: includes the dropped mass
    torch.testing.assert_close(sparse_kl(s_logits, f_ids, f_lps, tail="rest", rest_mass=f_rest), want)


def test_the_one_pass_mimic_loss_equals_kl_plus_cross_entropy():
    _, ids, lps = _teacher(8)
    rest = (1 - lps.exp().sum(-1)).clamp(min=0)
    targets = ids[:, 0].clone()
    a = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    kl = sparse_kl(a, ids, lps, tail="rest", rest_mass=rest)
    ce = F.cross_entropy(a, targets, reduction="none")
    (0.7 * kl + 0.3 * ce).sum().backward()
    got = mimic_token_losses(b, ids, lps, rest, targets, 0.7, 0.3, tail="rest", chunk=5)
    got[:, 0].sum().backward()
    torch.testing.assert_close(got[:, 1], kl)
    torch.testing.assert_close(got[:, 2], ce)
    torch.testing.assert_close(got[:, 0], 0.7 * kl + 0.3 * ce)
    torch.testing.assert_close(b.grad, a.grad)


def test_sampled_kd_gradient_is_unbiased_and_top_k_is_biased():
    """RS-KD: the mean over many draws of the sampled estimate's gradient equals the full KL
    gradient (within 5 standard errors from the draws' own variance); the renormalised top-k
    gradient on the same teacher misses it by far more."""
    from teacher_dump.backends import sample_counts

    v, n, m = 30, 50, 4000
    t_logp = torch.log_softmax(torch.randn(v, dtype=torch.float64) * 2, -1)
    s = torch.randn(1, v, dtype=torch.float64, requires_grad=True)
    full = (t_logp.exp() * (t_logp - torch.log_softmax(s, -1))).sum()
    (g_full,) = torch.autograd.grad(full, s)
    ids, counts = sample_counts(t_logp.expand(m, v), n, seed=0)
    width = max(len(i) for i in ids)
    id_t = torch.zeros((m, width), dtype=torch.long)
    w_t = torch.zeros((m, width), dtype=torch.float64)
    for r, (i, c) in enumerate(zip(ids, counts)):
        id_t[r, : len(i)] = torch.from_numpy(i.astype(np.int64))
        w_t[r, : len(c)] = torch.from_numpy(c.astype(np.float64)) / n
    assert all(int(c.sum()) == n for c in counts)
    (g_sampled,) = torch.autograd.grad(sampled_kd(s.expand(m, v), id_t, w_t).mean(), s)
    p = t_logp.exp()
    stderr = (p * (1 - p) / (n * m)).sqrt()
    assert ((g_sampled - g_full).abs()[0] <= 5 * stderr + 1e-12).all()
    top = t_logp.topk(5)
    (g_topk,) = torch.autograd.grad(sparse_kl(s, top.indices[None], top.values[None], tail="renorm").sum(), s)
    assert (g_topk - g_full).abs().max() > 20 * stderr.max()
    # the same seed draws the same; another seed does not
    again = sample_counts(t_logp.expand(m, v), n, seed=0)[1]
    assert all(np.array_equal(a, b) for a, b in zip(again, counts))
    other = sample_counts(t_logp.expand(m, v), n, seed=1)[1]
    assert not all(np.array_equal(a, b) for a, b in zip(other, counts))


# ----------------------------------------------------------------------------------------------
# The output projection fused with the losses (no [N, V] logits), and two edge cases


def _head_case(dtype, vocab_rows=V + 3, hidden=16, bias=False, seed=1):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab_rows, hidden, generator=gen, dtype=torch.float64) / 2).to(dtype)
    b = torch.randn(vocab_rows, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    return h, w, b


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("loss", ["mimic", "logprobs", "sampled"])
def test_fused_head_equals_projecting_every_row_then_the_loss(loss, bias):
    """Values and gradients (hidden, weight, bias) equal logits = h @ W[:V].T + b followed by the
    unchunked loss, under a per-row upstream gradient; padded rows of W get a zero gradient."""
    from student_train.losses import OutputHead, sampled_token_losses

    h0, w0, b0 = _head_case(torch.float64, bias=bias)
    _, ids, lps = _teacher(8)
    rest = (1 - lps.exp().sum(-1)).clamp(min=0)
    targets = ids[:, 1].clone()
    weights = torch.rand(N, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def run(fused: bool):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = None if b0 is None else b0.clone().requires_grad_()
        head = OutputHead(w, b, vocab=V)
        x = h if fused else F.linear(h, w[:V], None if b is None else b[:V])
        kw = {"head": head} if fused else {}
        if loss == "mimic":
            out = mimic_token_losses(x, ids, lps, rest, targets, 0.7, 0.3, tail="rest", chunk=5, **kw)
        elif loss == "logprobs":
            out = token_logprobs(x, targets, chunk=5, **kw)
        else:
            out = sampled_token_losses(x, ids, lps.exp(), targets, 1.0, 0.5, chunk=5, **kw)
        value = out if out.dim() == 1 else out[:, 0]
        (value * weights).sum().backward()
        return out.detach(), h.grad, w.grad, None if b is None else b.grad

    fused, direct = run(True), run(False)
    for got, want in zip(fused, direct):
        if want is not None:
            torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    assert fused[2][V:].abs().max() == 0


def test_fused_head_in_bfloat16_autocast_is_within_bf16_rounding_and_accumulates_in_float32():
    """Under bf16 autocast the chunks' logits are bf16 matmuls (as the model's head would be); the
    weight gradient summed over many chunks stays float32-accurate (a bf16 running sum would not)."""
    from student_train.losses import OutputHead

    h0, w0, _ = _head_case(torch.float32, hidden=32)
    _, ids, lps = _teacher(8)
    rest = (1 - lps.exp().sum(-1)).clamp(min=0)
    targets = ids[:, 0].clone()

    def run(chunk, autocast):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = mimic_token_losses(h, ids, lps, rest, targets, 1.0, 1.0, head=OutputHead(w, vocab=V), chunk=chunk)
        out[:, 0].sum().backward()
        return out[:, 0].detach(), h.grad, w.grad

    exact = run(N, False)
    one_chunk, per_row = run(N, True), run(1, True)
    assert per_row[2].dtype == torch.float32
    for got in (one_chunk, per_row):
        torch.testing.assert_close(got[0], exact[0], atol=0.05, rtol=0.02)
        torch.testing.assert_close(got[2], exact[2], atol=0.02, rtol=0.05)
    # Chunking changes only the order of float32 sums of the same bf16 products.
    torch.testing.assert_close(per_row[2], one_chunk[2], atol=1e-5, rtol=1e-4)


def test_fused_head_with_a_tied_embedding_sums_both_gradients():
    from student_train.losses import OutputHead

    emb = torch.nn.Embedding(V, 16).double()
    tokens = torch.randint(0, V, (N,))
    targets = torch.randint(0, V, (N,))
    out = token_logprobs(emb(tokens), targets, head=OutputHead(emb.weight), chunk=4)
    out.sum().backward()
    g_fused = emb.weight.grad.clone()
    emb.weight.grad = None
    x = emb(tokens)
    torch.log_softmax(x @ emb.weight.T, -1).gather(-1, targets[:, None]).sum().backward()
    torch.testing.assert_close(g_fused, emb.weight.grad)


def test_rest_tail_at_k_equal_vocab_adds_nothing_for_a_float32_residue():
    """k = V: the student's rest is empty; the teacher's stored rest is a float32 rounding residue
    (here made 1e-3, above what a real residue reaches) and must not add r * (log r + 1e4)."""
    t_logp, ids, lps = _teacher(V)
    s_logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    full = (t_logp.exp() * (t_logp - torch.log_softmax(s_logits, -1))).sum(-1)
    residue = torch.full((N,), 1e-3, dtype=torch.float64)
    got = sparse_kl(s_logits, ids, lps, tail="rest", rest_mass=residue)
    torch.testing.assert_close(got, full, atol=1e-10, rtol=1e-10)
    got.sum().backward()
    assert torch.isfinite(s_logits.grad).all()


def test_folded_outside_vocab_entries_leave_their_id_in_the_student_rest():
    """A teacher top-1 outside the student's vocabulary: the folded entry points at id 0, which is
    not in the teacher's real top-k; the student's rest must still hold id 0's probability."""
    gen = torch.Generator().manual_seed(5)
    s_logits = torch.randn(N, V, generator=gen, dtype=torch.float64)
    s_logits[:, 0] += 4.0  # id 0 holds a visible share of the student's mass
    probs = torch.softmax(torch.randn(N, 6, generator=gen, dtype=torch.float64), -1) * 0.9
    ids = torch.stack([torch.randperm(V - 1, generator=gen)[:6] + 1 for _ in range(N)])  # never id 0
    ids[:, 0] = V + 2  # the top-1 lies outside the shared vocabulary
    lps = probs.log()
    rest = 1 - probs.sum(-1)
    f_ids, f_lps, f_rest = fold_outside_vocab(ids, lps, rest, V)
    assert (f_ids[:, 0] == 0).all()
    got = sparse_kl(s_logits, f_ids, f_lps, tail="rest", rest_mass=f_rest)
    want = sparse_kl(s_logits, ids[:, 1:], lps[:, 1:], tail="rest", rest_mass=rest + probs[:, 0])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_kto_pair_over_two_ranks_equals_one_process():
    """kto_pair's KL baselines were per-rank means, so two data-parallel halves computed another loss
    and gradient than the whole batch. With the baselines summed over ranks (constants to the
    gradient), the halves' losses and gradients are the whole batch's."""
    from student_train.losses import kto_means

    B, beta = 8, 0.5
    torch.manual_seed(0)
    pc, pr = (torch.randn(B, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tc, tr = torch.randn(B, dtype=torch.float64) - 1, torch.randn(B, dtype=torch.float64) - 2
    whole, _, _ = preference_loss(pc, pr, tc, tr, beta=beta, loss_type="kto_pair")
    want_grad = torch.autograd.grad(whole.sum(), [pc, pr])
    halves = [slice(0, 3), slice(3, B)]  # uneven, as the last micro-batch of an epoch can be

    def sums(h):
        return torch.stack([(pc[h] - tc[h]).detach().sum(), (pr[h] - tr[h]).detach().sum(),
                            torch.tensor(float(len(range(B)[h])), dtype=torch.float64)])

    parts = []
    for mine, other in (halves, halves[::-1]):
        baselines = kto_means(pc[mine] - tc[mine], pr[mine] - tr[mine], all_sum=lambda t, o=other: t + sums(o))
        loss, _, _ = preference_loss(pc[mine], pr[mine], tc[mine], tr[mine], beta=beta, loss_type="kto_pair",
                                     kl_baselines=baselines)
        parts.append(loss.view(2, -1))
    joined = torch.cat(parts, dim=1).reshape(-1)
    torch.testing.assert_close(joined, whole)
    got_grad = torch.autograd.grad(joined.sum(), [pc, pr])
    for g, w in zip(got_grad, want_grad, strict=True):
        torch.testing.assert_close(g, w)
    # a per-rank mean (what ranks computed before) is another loss
    alone, _, _ = preference_loss(pc[halves[0]], pr[halves[0]], tc[halves[0]], tr[halves[0]], beta=beta,
                                  loss_type="kto_pair")
    assert not torch.allclose(alone.view(2, -1), whole.view(2, -1)[:, halves[0]])


def test_rs_kd_draws_chunk_by_chunk_are_the_draws_of_the_whole_request():
    """The teacher drew from a [positions, V] float64 copy of the request (~7 GB at 2,000 positions
    and V=151,936); it now draws a chunk of positions at a time, with the same draws."""
    from teacher_dump.backends import ScoreRequest, sample_counts, score_positions

    torch.manual_seed(0)
    P, H, V = 11, 16, 300
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(P, H) * 3
    req = ScoreRequest(ids=list(range(P + 1)), prompt_ids=[], positions=list(range(1, P + 1)), images=[],
                       features=[], top_k=4, sample=32, sample_seed=7)
    with torch.no_grad():  # as the backends call it
        got = score_positions(hidden, head, req, chunk=3)
        want_ids, want_counts = sample_counts(head(hidden).float().log_softmax(-1), 32, seed=7)
    assert len(got.sampled_ids) == P
    for a, b, c, d in zip(got.sampled_ids, want_ids, got.sampled_counts, want_counts, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(c, d)
        assert c.sum() == 32


def _coarse(t_logp: torch.Tensor, ids: torch.Tensor, s_logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Teacher and student as k + 1 bucket distributions, in numpy from the full softmaxes."""
    t_p, s_p = t_logp.exp().numpy(), torch.softmax(s_logits, -1).numpy()
    idx = ids.numpy()
    t_top, s_top = np.take_along_axis(t_p, idx, -1), np.take_along_axis(s_p, idx, -1)
    return (np.concatenate([t_top, 1 - t_top.sum(-1, keepdims=True)], -1),
            np.concatenate([s_top, 1 - s_top.sum(-1, keepdims=True)], -1))


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0).sum(-1)


def test_reverse_kl_and_jsd_are_those_of_the_bucket_distributions_and_bound_the_full_vocabulary_values():
    k = 6
    t_logp, ids, lps = _teacher(k)
    s_logits = torch.randn(N, V, dtype=torch.float64) * 2
    t_c, s_c = _coarse(t_logp, ids, s_logits)
    m_c = (t_c + s_c) / 2
    reverse = sparse_kl(s_logits, ids, lps, tail="rest", divergence="reverse").double().numpy()
    jsd = sparse_kl(s_logits, ids, lps, tail="rest", divergence="jsd").double().numpy()
    np.testing.assert_allclose(reverse, _kl(s_c, t_c), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jsd, 0.5 * _kl(t_c, m_c) + 0.5 * _kl(s_c, m_c), atol=1e-5, rtol=1e-5)
    t_full, s_full = t_logp.exp().numpy(), torch.softmax(s_logits, -1).numpy()
    m_full = (t_full + s_full) / 2
    assert (reverse <= _kl(s_full, t_full) + 1e-9).all()  # data-processing inequality
    assert (jsd <= 0.5 * _kl(t_full, m_full) + 0.5 * _kl(s_full, m_full) + 1e-9).all()
    assert (jsd >= -1e-9).all() and (jsd <= math.log(2) + 1e-9).all()
    same = sparse_kl(t_logp.clone(), ids, lps, tail="rest", divergence="reverse")  # the student is the teacher
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", ["reverse", "jsd"])
def test_bucket_divergence_gradients_match_autograd_of_the_direct_formula_and_stay_finite(divergence):
    k = 5
    t_logp, ids, lps = _teacher(k)
    s_logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    got = sparse_kl(s_logits, ids, lps, tail="rest", divergence=divergence).sum()
    (grad,) = torch.autograd.grad(got, s_logits)
    s_p = torch.softmax(s_logits, -1)
    s_top = s_p.gather(-1, ids)
    s_c = torch.cat([s_top, 1 - s_top.sum(-1, keepdim=True)], -1)
    t_c = torch.cat([lps.exp(), 1 - lps.exp().sum(-1, keepdim=True)], -1)
    if divergence == "reverse":
        direct = (s_c * (s_c.log() - t_c.log())).sum()
    else:
        m = (s_c + t_c) / 2
        direct = 0.5 * (t_c * (t_c / m).log()).sum() + 0.5 * (s_c * (s_c / m).log()).sum()
    (want,) = torch.autograd.grad(direct, s_logits)
    torch.testing.assert_close(grad, want, atol=1e-6, rtol=1e-5)
    # a teacher whose top-k holds all its mass (rest 0): finite values and gradients
    full = torch.log_softmax(torch.full((1, 3), 0.0, dtype=torch.float64), -1)
    s = torch.randn(1, 10, dtype=torch.float64, requires_grad=True)
    value = sparse_kl(s, torch.tensor([[0, 1, 2]]), full, tail="rest", rest_mass=torch.zeros(1, dtype=torch.float64),
                      divergence=divergence)
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(s.grad).all()
    # bf16 logits of a wide range, a folded duplicate (-inf), rows whose top-k covers the vocabulary
    torch.manual_seed(0)
    s = (torch.randn(3, 4) * 30).to(torch.bfloat16).requires_grad_()
    lps = torch.log_softmax(torch.randn(3, 4), -1)
    lps[0, 2] = float("-inf")
    value = sparse_kl(s, torch.tensor([[0, 1, 1, 2], [0, 1, 2, 3], [3, 2, 1, 0]]), lps, tail="rest",
                      rest_mass=torch.tensor([0.1, 0.0, 1e-7]), divergence=divergence)
    value.sum().backward()
    assert torch.isfinite(value).all() and (value > 0).all() and torch.isfinite(s.grad.float()).all()


def test_reverse_and_jsd_need_the_rest_bucket():
    from student_train.config import TrainConfig

    assert TrainConfig(kd_divergence="reverse").kd_divergence == "reverse"
    for bad in ({"kd_tail": "renorm"}, {"kd": "sampled"}):
        with pytest.raises(ValueError, match="kd_divergence: jsd is computed over the top-k and the rest bucket"):
            TrainConfig(kd_divergence="jsd", **bad)


@pytest.mark.parametrize("tail,divergence", [("renorm", "forward"), ("rest", "forward"), ("rest", "reverse"),
                                             ("rest", "jsd")])
def test_top_k_padded_with_massless_entries_changes_no_loss(tail, divergence):
    """Dumps of other --top-k trained together: narrower rows are padded with id 0 at log-prob -inf."""
    _, ids, lps = _teacher(5)
    s_logits = torch.randn(N, V)
    rest = 1 - lps.double().exp().sum(-1)
    pad_ids = torch.cat([ids, torch.zeros(N, 3, dtype=torch.long)], -1)
    pad_lps = torch.cat([lps, torch.full((N, 3), float("-inf"))], -1)
    want = sparse_kl(s_logits, ids, lps, tail=tail, rest_mass=rest if tail == "rest" else None, divergence=divergence)
    got = sparse_kl(s_logits, pad_ids, pad_lps, tail=tail, rest_mass=rest if tail == "rest" else None,
                    divergence=divergence)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
