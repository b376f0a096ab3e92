"""Distillation losses as pure functions of tensors (no model, no I/O).

Shapes: N = scored tokens, V = vocabulary, k = stored teacher top-k. Teacher inputs come straight
from the shards (`topk_ids`, `topk_logprobs`, `rest_mass`, `*_logprob_sum`); student inputs are
logits already aligned so that row n predicts the token the shard's row n describes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits lose the tail), float64 kept as is."""
    return x if x.dtype == torch.float64 else x.float()


def sparse_kl(
    student_logits: torch.Tensor,  # [N, V]
    topk_ids: torch.Tensor,  # [N, k] long
    topk_logprobs: torch.Tensor,  # [N, k] teacher log-probs at temperature 1
    tail: str = "renorm",
    temperature: float = 1.0,
    rest_mass: torch.Tensor | None = None,  # [N] the teacher's stored mass outside the top-k (tail="rest")
) -> torch.Tensor:
    """Per-token KL(teacher || student) from a sparse teacher; returns [N].

    tail="renorm": the teacher's top-k renormalised (optionally at temperature T) against the
    student renormalised over the same k ids; scaled by T^2 as in Hinton et al.
    tail="rest": k + 1 buckets, the teacher's top-k and one bucket holding its remaining mass,
    against the student's probabilities of the same k ids and of everything else. The student's
    rest is a logsumexp over the other logits (no 1 - sum(p) cancellation), and a teacher rest of 0
    contributes 0 (xlogy), so gradients stay finite at rest masses of 0 or 1. `rest_mass`, when
    given, is the teacher's remaining mass as stored (see `fold_outside_vocab`).
    """
    # Teacher entries of log-prob -inf (ids outside the shared vocabulary, masked by the caller)
    # carry no mass: products are written so that 0 * log 0 = 0.
    if tail == "renorm":
        t_lp = F.log_softmax(_wide(topk_logprobs) / temperature, dim=-1)
        s_sel = (_wide(student_logits).gather(-1, topk_ids) / temperature).masked_fill(t_lp.isneginf(), float("-inf"))
        s_lp = F.log_softmax(s_sel, dim=-1)
        t_p = t_lp.exp()
        return (torch.xlogy(t_p, t_p) - t_p * s_lp.masked_fill(t_p == 0, 0.0)).sum(-1) * temperature**2
    if tail == "rest":
        if temperature != 1.0:
            raise ValueError("tail='rest' needs temperature 1: the stored rest mass is at temperature 1")
        s_all = F.log_softmax(_wide(student_logits), dim=-1)
        s_top = s_all.gather(-1, topk_ids)
        masked = s_all.scatter(-1, topk_ids, float("-inf"))
        s_rest = torch.logsumexp(masked, dim=-1)  # log of the student's mass outside the top-k
        t_top = _wide(topk_logprobs)
        # The stored rest was computed in float64 by the teacher; 1 - sum(exp) of float32 values
        # here loses small rests to cancellation. Recomputed only when the caller has none.
        t_rest_mass = (_wide(rest_mass) if rest_mass is not None else 1.0 - t_top.exp().sum(-1)).clamp(min=0.0)
        t_p = t_top.exp()
        top_term = (torch.xlogy(t_p, t_p) - t_p * s_top).sum(-1)
        rest_term = torch.xlogy(t_rest_mass, t_rest_mass) - t_rest_mass * s_rest.clamp(min=-1e4)
        return top_term + rest_term
    raise ValueError(f"unknown tail {tail!r}; use 'renorm' or 'rest'")


def preference_loss(
    policy_chosen: torch.Tensor,  # [B] summed log-probs of the chosen response under the student
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,  # [B] the teacher's (reference) summed log-probs, from the shards
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, chosen reward, rejected reward (rewards are beta * log-ratio, detached).

    dpo: -log sigmoid(beta * h) (conservative DPO with label smoothing eps:
         -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)), h = chosen - rejected log-ratio.
    ipo: (h - 1/(2 beta))^2.
    kto_pair: [1 - sigmoid(beta (chosen_ratio - KL_rejected)), 1 - sigmoid(beta (KL_chosen -
         rejected_ratio))], the KL terms being batch-mean log-ratios clamped at 0, exactly as TRL's
         kto_pair (which LLaVA-MoD's released scripts use); returns 2B values.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "dpo":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        chosen_kl = chosen_ratio.mean().clamp(min=0)
        rejected_kl = rejected_ratio.mean().clamp(min=0)
        loss = torch.cat([
            1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)),
            1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)),
        ])
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; use dpo, ipo or kto_pair")
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss for one layer's router logits [T, E]:
    E * sum_e f_e * P_e, with f_e the fraction of routed slots sent to expert e and P_e the mean
    router probability of e. Equals 1 for perfectly uniform routing, its minimum."""
    n_experts = router_logits.shape[-1]
    probs = router_logits.float().softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices
    fraction = F.one_hot(chosen, n_experts).float().sum(1).mean(0) / top_k
    return n_experts * (fraction * probs.mean(0)).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared logsumexp of the router logits."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def fold_outside_vocab(
    topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, rest_mass: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher with padded embedding rows may put (tiny) mass on ids no tokenizer produces: that
    mass joins the rest bucket instead of a student logit. Such entries get log-prob -inf and point
    at the row's first id (a duplicate of zero weight changes nothing)."""
    outside = topk_ids >= vocab
    if not bool(outside.any()):
        return topk_ids, topk_logprobs, rest_mass
    first = topk_ids[:, :1].masked_fill(outside[:, :1], 0)
    moved = topk_logprobs.double().exp().masked_fill(~outside, 0.0).sum(-1).to(rest_mass.dtype)
    return (torch.where(outside, first, topk_ids), topk_logprobs.masked_fill(outside, float("-inf")),
            rest_mass + moved)


class _RowChunks(torch.autograd.Function):
    """y = fn(x, *args) for a row-wise fn, computed `chunk` rows at a time, the gradient of each chunk
    taken right away into one buffer the size of x: no [N, V] float32 intermediates of the whole
    batch are kept for backward (the approach of Liger's and torchtune's chunked losses). fn returns
    [C] or [C, m]; with m columns only column 0 carries a gradient (the others are metrics)."""

    @staticmethod
    def forward(ctx, fn, chunk, x, *row_args):
        want_grad = ctx.needs_input_grad[2]
        grad = torch.empty_like(x) if want_grad else None
        out = []
        for s in range(0, x.shape[0], chunk):
            xs, args = x[s : s + chunk], [a[s : s + chunk] for a in row_args]
            if grad is None:
                out.append(fn(xs, *args))
                continue
            with torch.enable_grad():
                leaf = xs.detach().requires_grad_()
                value = fn(leaf, *args)
                objective = value if value.dim() == 1 else value[:, 0]
                (g,) = torch.autograd.grad(objective.sum(), leaf)
            grad[s : s + chunk] = g
            out.append(value.detach())
        ctx.save_for_backward(grad if grad is not None else x.new_empty(0))
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        weight = grad_out if grad_out.dim() == 1 else grad_out[:, 0]
        return (None, None, grad.mul_(weight[:, None].to(grad.dtype)), *([None] * (len(ctx.needs_input_grad) - 3)))


def chunked_rows(fn, x: torch.Tensor, *row_args: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """`fn(x, *row_args)` for a row-wise `fn`, with the memory of `chunk` rows. Values and gradients
    equal the unchunked call (each row is computed by the same operations). x must have rows."""
    return _RowChunks.apply(fn, chunk, x, *row_args)


def _selective_logprobs(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = _wide(x)
    return x.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """log softmax(logits)[n, targets[n]] for logits [N, V], without a [N, V] log-softmax (TRL's
    selective log-softmax, chunked)."""
    return chunked_rows(_selective_logprobs, logits, targets, chunk=chunk)


def chunked_sparse_kl(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      rest_mass: torch.Tensor | None = None, tail: str = "renorm", temperature: float = 1.0,
                      chunk: int = 1024) -> torch.Tensor:
    """`sparse_kl`, `chunk` tokens at a time (equal values and gradients, bounded memory)."""
    rest = rest_mass if rest_mass is not None else topk_logprobs.new_full(topk_logprobs.shape[:1], float("nan"))
    return chunked_rows(lambda x, i, lp, r: sparse_kl(x, i, lp, tail, temperature, None if rest_mass is None else r),
                        student_logits, topk_ids, topk_logprobs, rest, chunk=chunk)


def mimic_token_losses(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       rest_mass: torch.Tensor | None, targets: torch.Tensor, kd_weight: float, ce_weight: float,
                       tail: str = "rest", temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """Per token [N, 3]: kd_weight * KL + ce_weight * CE (differentiable), KL, CE (metrics), in one
    chunked pass (one gradient buffer for both terms)."""

    def rows(x, i, lp, r, t):
        kl = sparse_kl(x, i, lp, tail, temperature, None if rest_mass is None else r)
        ce = -_selective_logprobs(x, t)
        return torch.stack([kd_weight * kl + ce_weight * ce, kl, ce], dim=-1)

    rest = rest_mass if rest_mass is not None else topk_logprobs.new_full(topk_logprobs.shape[:1], float("nan"))
    return chunked_rows(rows, student_logits, topk_ids, topk_logprobs, rest, targets, chunk=chunk)


def sampled_kd(student_logits: torch.Tensor, sampled_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Random-sampling KD (RS-KD, Anshumann et al., ACL 2025), per token [N]: -sum_j w_j log s(id_j)
    over the unique ids of N draws from the teacher at temperature 1, w_j = count_j / N (padding:
    w = 0). The proposal is the teacher itself, so the importance weights p/q are 1 and the
    estimate's expectation is the cross-entropy H(p, s) = KL(p || s) + H(p): its gradient is the
    full-distribution KL gradient, unbiased (top-k's is not)."""
    x = _wide(student_logits)
    log_s = x.gather(-1, sampled_ids) - torch.logsumexp(x, dim=-1, keepdim=True)
    return -(weights.to(log_s.dtype) * log_s).sum(-1)


def sampled_token_losses(student_logits: torch.Tensor, sampled_ids: torch.Tensor, weights: torch.Tensor,
                         targets: torch.Tensor, kd_weight: float, ce_weight: float, chunk: int = 1024) -> torch.Tensor:
    """Per token [N, 3]: kd_weight * sampled KD + ce_weight * CE (differentiable), sampled KD, CE."""

    def rows(x, i, w, t):
        kd = sampled_kd(x, i, w)
        ce = -_selective_logprobs(x, t)
        return torch.stack([kd_weight * kd + ce_weight * ce, kd, ce], dim=-1)

    return chunked_rows(rows, student_logits, sampled_ids, weights, targets, chunk=chunk)
