"""Distillation losses as pure functions of tensors (no model, no I/O).

Shapes: N = scored tokens, V = vocabulary, k = stored teacher top-k. Teacher inputs come straight
from the shards (`topk_ids`, `topk_logprobs`, `rest_mass`, `*_logprob_sum`); student inputs are
logits already aligned so that row n predicts the token the shard's row n describes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    divergence: str = "forward",
) -> torch.Tensor:
    """Per-token KL(teacher || student) from a sparse teacher; returns [N].

    divergence (tail="rest" only): "forward" is KL(teacher || student); "reverse" KL(student ||
    teacher) and "jsd" the Jensen-Shannon divergence (mixture 1/2), both over the same k + 1
    buckets: by the data-processing inequality each is a lower bound of its full-vocabulary value
    (merging ids into a bucket never raises an f-divergence), which needs no more than the stored
    top-k and rest. Reverse KL is infinite where the teacher's rest is 0 and the student's is not:
    the teacher's rest is floored at 1e-30 there.

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
        # The student's rest is every id outside the teacher's *real* top-k: entries of log-prob
        # -inf (folded ids pointing at a duplicate) leave their id in it. A row whose top-k covers
        # the whole vocabulary has an empty rest; its teacher rest is a rounding residue and adds
        # nothing (a clamped log of 0 would add r * (log r + large) per token).
        real = (~_wide(topk_logprobs).isneginf()).to(torch.uint8)
        # one byte per logit (a float [C, V] buffer here cost as much as the logits); amax keeps a
        # real entry whatever a zero-weight duplicate of its id writes
        covered = torch.zeros(s_all.shape, dtype=torch.uint8, device=s_all.device).scatter_reduce(
            -1, topk_ids, real, reduce="amax").bool()
        empty = covered.all(-1)
        masked = s_all.masked_fill(covered, torch.finfo(s_all.dtype).min)  # finite: no 0 * inf in backward
        s_rest = torch.logsumexp(masked, dim=-1)  # log of the student's mass outside the top-k
        t_top = _wide(topk_logprobs)
        # The stored rest was computed in float64 by the teacher; 1 - sum(exp) of float32 values
        # here loses small rests to cancellation. Recomputed only when the caller has none.
        t_rest_mass = (_wide(rest_mass) if rest_mass is not None else 1.0 - t_top.exp().sum(-1)).clamp(min=0.0)
        t_p = t_top.exp()
        if divergence != "forward":
            return _bucket_divergence(divergence, t_top, t_rest_mass, s_top, s_rest, real.bool(), empty)
        top_term = (torch.xlogy(t_p, t_p) - t_p * s_top).sum(-1)
        rest_term = torch.xlogy(t_rest_mass, t_rest_mass) - t_rest_mass * s_rest
        return top_term + rest_term.masked_fill(empty, 0.0)
    raise ValueError(f"unknown tail {tail!r}; use 'renorm' or 'rest'")


def _bucket_divergence(divergence: str, t_top: torch.Tensor, t_rest_mass: torch.Tensor, s_top: torch.Tensor,
                       s_rest: torch.Tensor, real: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """Reverse KL or JSD over k + 1 buckets given as log-probs (teacher's rest as a mass); entries
    that are not `real` (folded duplicates) are no bucket, an `empty` row has no rest bucket."""
    t_log = torch.cat([t_top, t_rest_mass.clamp(min=0.0).log()[:, None]], -1)  # [N, k+1], -inf where 0
    s_log = torch.cat([s_top, s_rest[:, None]], -1)
    keep = torch.cat([real, ~empty[:, None]], -1)
    s_p = s_log.exp()
    if divergence == "reverse":
        per = s_p * (s_log - t_log.clamp(min=math.log(1e-30)))
        return per.masked_fill(~keep, 0.0).sum(-1)
    if divergence == "jsd":
        m_log = torch.logaddexp(t_log, s_log) - math.log(2.0)
        finite_m = m_log.clamp(min=torch.finfo(m_log.dtype).min)  # both 0: their terms are 0 below
        t_p = t_log.exp()
        per = 0.5 * (torch.xlogy(t_p, t_p) - t_p * finite_m) + 0.5 * (s_p * s_log - s_p * finite_m)
        return per.masked_fill(~keep, 0.0).sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}; use forward, reverse or jsd")


def preference_loss(
    policy_chosen: torch.Tensor,  # [B] summed log-probs of the chosen response under the student
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,  # [B] the teacher's (reference) summed log-probs, from the shards
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "dpo",
    label_smoothing: float = 0.0,
    kl_baselines: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair loss, chosen reward, rejected reward (rewards are beta * log-ratio, detached).

    dpo: -log sigmoid(beta * h) (conservative DPO with label smoothing eps:
         -(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)), h = chosen - rejected log-ratio.
    ipo: (h - 1/(2 beta))^2.
    kto_pair: [1 - sigmoid(beta (chosen_ratio - KL_rejected)), 1 - sigmoid(beta (KL_chosen -
         rejected_ratio))], the KL terms being batch-mean log-ratios clamped at 0, as TRL's kto_pair
         (which LLaVA-MoD's released scripts use); returns 2B values. The KL terms are baselines:
         constants to the gradient (as the KTO paper and TRL's KTOTrainer treat them), which is what
         lets N data-parallel ranks pass the means over all their pairs (`kl_baselines`, see
         `kto_means`) and compute exactly what one process computes on the whole batch.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "dpo":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "kto_pair":
        chosen_kl, rejected_kl = kl_baselines if kl_baselines is not None else kto_means(chosen_ratio,
                                                                                         rejected_ratio)
        chosen_kl, rejected_kl = chosen_kl.detach().clamp(min=0), rejected_kl.detach().clamp(min=0)
        loss = torch.cat([
            1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)),
            1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio)),
        ])
    else:
        raise ValueError(f"unknown preference loss {loss_type!r}; use dpo, ipo or kto_pair")
    return loss, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()


def kto_means(chosen_ratio: torch.Tensor, rejected_ratio: torch.Tensor, all_sum=None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """kto_pair's KL baselines: the mean chosen and rejected log-ratios over the batch, over every
    rank's pairs when `all_sum` (a sum over ranks) is given."""
    sums = torch.stack([chosen_ratio.detach().sum(), rejected_ratio.detach().sum(),
                        torch.tensor(float(chosen_ratio.numel()), dtype=chosen_ratio.dtype,
                                     device=chosen_ratio.device)])
    if all_sum is not None:
        sums = all_sum(sums)
    return sums[0] / sums[2].clamp(min=1), sums[1] / sums[2].clamp(min=1)


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
    at the row's first id (or 0): `sparse_kl` reads entries of log-prob -inf as absent, so the id they
    point at keeps its place in the student's rest."""
    outside = topk_ids >= vocab
    if not bool(outside.any()):
        return topk_ids, topk_logprobs, rest_mass
    first = topk_ids[:, :1].masked_fill(outside[:, :1], 0)
    moved = topk_logprobs.double().exp().masked_fill(~outside, 0.0).sum(-1).to(rest_mass.dtype)
    return (torch.where(outside, first, topk_ids), topk_logprobs.masked_fill(outside, float("-inf")),
            rest_mass + moved)


@dataclass(frozen=True)
class OutputHead:
    """The student's output projection, applied by the loss instead of the model: logits = hidden @
    weight[:vocab].T (+ bias), computed in `dtype` (the autocast dtype; float32 otherwise). Rows of a
    padded embedding beyond `vocab` are no tokens and are never projected."""

    weight: torch.Tensor  # [V_padded, H], a parameter (tied or not)
    bias: torch.Tensor | None = None
    vocab: int | None = None
    dtype: torch.dtype | None = None  # None: the weight's dtype

    @classmethod
    def of(cls, module: torch.nn.Module, vocab: int | None = None, dtype: torch.dtype | None = None) -> OutputHead:
        return cls(module.weight, getattr(module, "bias", None), vocab, dtype)

    def parts(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = self.vocab if self.vocab is not None else self.weight.shape[0]
        return self.weight[:n], None if self.bias is None else self.bias[:n]


def _project(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(h, w, None if b is None else b.to(w.dtype))


class _HeadChunks(torch.autograd.Function):
    """y = fn(hidden @ W.T + b, *row_args) for a row-wise fn, `chunk` rows at a time, forward and
    backward: at most one [chunk, V] block of logits (and its gradient) exists at a time. Backward
    recomputes each chunk's logits (one extra head matmul, as activation checkpointing does) so the
    upstream gradient may differ per row (DPO's per-sequence weights); the loss and the weight
    gradient are computed in float32 whatever the compute dtype of the projection. With W None, `hidden` are already
    the logits. fn returns [C] or [C, m]; with m columns only column 0 carries a gradient."""

    @staticmethod
    def forward(ctx, fn, chunk, dtype, hidden, weight, bias, *row_args):
        ctx.fn, ctx.chunk, ctx.dtype = fn, chunk, dtype
        ctx.save_for_backward(hidden, weight, bias, *row_args)
        out = []
        with torch.autocast(hidden.device.type, enabled=False):
            w = None if weight is None else weight.to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk]
                logits = h if w is None else _project(h.to(dtype), w, bias)
                out.append(fn(logits, *[a[s : s + chunk] for a in row_args]))
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, *row_args = ctx.saved_tensors
        fn, chunk, dtype = ctx.fn, ctx.chunk, ctx.dtype
        upstream = grad_out if grad_out.dim() == 1 else grad_out[:, 0]
        want_w, want_b = ctx.needs_input_grad[4:6]
        grad_h = torch.zeros_like(hidden)
        # The weight gradient sums over every scored token: each chunk's share is computed and summed
        # in float32 (float64 for float64 weights), never rounded to bf16 per chunk.
        wide = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=wide, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=wide, device=bias.device) if want_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = None if weight is None else weight.detach().to(dtype)
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].detach()
                logits = h if w is None else _project(h.to(dtype), w, None if bias is None else bias.detach())
                with torch.enable_grad():
                    leaf = logits.to(torch.promote_types(logits.dtype, torch.float32)).requires_grad_()
                    value = fn(leaf, *[a[s : s + chunk] for a in row_args])
                    objective = value if value.dim() == 1 else value[:, 0]
                    weight_rows = upstream[s : s + chunk].to(objective.dtype)
                    (g,) = torch.autograd.grad(objective, leaf, grad_outputs=weight_rows)
                if w is None:
                    grad_h[s : s + chunk] = g.to(hidden.dtype)
                    continue
                grad_h[s : s + chunk] = (g.to(dtype) @ w).to(hidden.dtype)
                if grad_w is not None:
                    grad_w += g.to(wide).T @ h.to(wide)
                if grad_b is not None:
                    grad_b += g.to(wide).sum(0)
        return (None, None, None, grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), *([None] * len(row_args)))


def chunked_rows(fn, x: torch.Tensor, *row_args: torch.Tensor, head: OutputHead | None = None,
                 chunk: int = 1024) -> torch.Tensor:
    """`fn(logits, *row_args)` for a row-wise `fn`, with the memory of `chunk` rows. `x` is the
    logits [N, V], or with `head` the hidden states [N, H] that the head projects chunk by chunk (a
    [N, V] tensor never exists). Values and gradients equal the unchunked call. x must have rows."""
    if head is None:
        return _HeadChunks.apply(fn, chunk, x.dtype, x, None, None, *row_args)
    weight, bias = head.parts()
    dtype = head.dtype or weight.dtype
    if torch.is_autocast_enabled(x.device.type) and head.dtype is None:
        dtype = torch.get_autocast_dtype(x.device.type)
    return _HeadChunks.apply(fn, chunk, dtype, x, weight, bias, *row_args)


def _selective_logprobs(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    x = _wide(x)
    return x.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)


def token_logprobs(x: torch.Tensor, targets: torch.Tensor, head: OutputHead | None = None,
                   chunk: int = 1024) -> torch.Tensor:
    """log softmax(logits)[n, targets[n]] for logits [N, V] (or hidden states and their `head`),
    without a [N, V] log-softmax (TRL's selective log-softmax, chunked)."""
    return chunked_rows(_selective_logprobs, x, targets, head=head, chunk=chunk)


def _no_rest(rest_mass: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return rest_mass if rest_mass is not None else like.new_full(like.shape[:1], float("nan"))


def chunked_sparse_kl(x: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      rest_mass: torch.Tensor | None = None, tail: str = "renorm", temperature: float = 1.0,
                      head: OutputHead | None = None, chunk: int = 1024) -> torch.Tensor:
    """`sparse_kl`, `chunk` tokens at a time (equal values and gradients, bounded memory)."""
    return chunked_rows(lambda x, i, lp, r: sparse_kl(x, i, lp, tail, temperature, None if rest_mass is None else r),
                        x, topk_ids, topk_logprobs, _no_rest(rest_mass, topk_logprobs), head=head, chunk=chunk)


def mimic_token_losses(x: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                       rest_mass: torch.Tensor | None, targets: torch.Tensor, kd_weight: float, ce_weight: float,
                       tail: str = "rest", temperature: float = 1.0, head: OutputHead | None = None,
                       chunk: int = 1024, kd_mask: torch.Tensor | None = None,
                       divergence: str = "forward") -> torch.Tensor:
    """Per token [N, 3]: kd_weight * KL + ce_weight * CE (differentiable), KL, CE (metrics), in one
    chunked pass over the logits (or over hidden states projected by `head`). Tokens where `kd_mask`
    [N] is False have no teacher row (cross-tokenizer positions inside a teacher token): there the
    teacher target is the label itself (having chosen its token, the teacher's next characters are
    certain), so the KD term is the label's CE; the KL column reports 0. Their rows must be finite
    (one entry of log-prob 0)."""
    mask = kd_mask if kd_mask is not None else torch.ones(targets.shape, dtype=torch.bool, device=targets.device)

    def rows(x, i, lp, r, t, m):
        kl = sparse_kl(x, i, lp, tail, temperature, None if rest_mass is None else r, divergence) * m
        ce = -_selective_logprobs(x, t)
        kd = kl + ce * ~m
        return torch.stack([kd_weight * kd + ce_weight * ce, kl, ce], dim=-1)

    return chunked_rows(rows, x, topk_ids, topk_logprobs, _no_rest(rest_mass, topk_logprobs), targets, mask,
                        head=head, chunk=chunk)


def sampled_kd(student_logits: torch.Tensor, sampled_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Random-sampling KD (RS-KD, Anshumann et al., ACL 2025), per token [N]: -sum_j w_j log s(id_j)
    over the unique ids of N draws from the teacher at temperature 1, w_j = count_j / N (padding:
    w = 0). The proposal is the teacher itself, so the importance weights p/q are 1 and the
    estimate's expectation is the cross-entropy H(p, s) = KL(p || s) + H(p): its gradient is the
    full-distribution KL gradient, unbiased (top-k's is not)."""
    x = _wide(student_logits)
    log_s = x.gather(-1, sampled_ids) - torch.logsumexp(x, dim=-1, keepdim=True)
    return -(weights.to(log_s.dtype) * log_s).sum(-1)


def sampled_token_losses(x: torch.Tensor, sampled_ids: torch.Tensor, weights: torch.Tensor, targets: torch.Tensor,
                         kd_weight: float, ce_weight: float, head: OutputHead | None = None,
                         chunk: int = 1024) -> torch.Tensor:
    """Per token [N, 3]: kd_weight * sampled KD + ce_weight * CE (differentiable), sampled KD, CE."""

    def rows(x, i, w, t):
        kd = sampled_kd(x, i, w)
        ce = -_selective_logprobs(x, t)
        return torch.stack([kd_weight * kd + ce_weight * ce, kd, ce], dim=-1)

    return chunked_rows(rows, x, sampled_ids, weights, targets, head=head, chunk=chunk)
