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
) -> torch.Tensor:
    """Per-token KL(teacher || student) from a sparse teacher; returns [N].

    tail="renorm": the teacher's top-k renormalised (optionally at temperature T) against the
    student renormalised over the same k ids; scaled by T^2 as in Hinton et al.
    tail="rest": k + 1 buckets, the teacher's top-k and one bucket holding its remaining mass,
    against the student's probabilities of the same k ids and of everything else. The student's
    rest is a logsumexp over the other logits (no 1 - sum(p) cancellation), and a teacher rest of 0
    contributes 0 (xlogy), so gradients stay finite at rest masses of 0 or 1.
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
        t_rest_mass = (1.0 - t_top.exp().sum(-1)).clamp(min=0.0)
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
