"""The training objectives of a micro-batch as sums (normalised by the caller): mimic (KL to the
stored teacher + CE) and preference (DPO/IPO/kto_pair against the stored teacher references),
plus the MoE router terms. Training and evaluation both import them."""

from __future__ import annotations

import torch

from shared.mllm import FinalHidden, expert_counts, moe_routers
from student_train.config import TrainConfig
from student_train.data import MimicBatch, PrefBatch
from student_train.losses import (
    OutputHead,
    fold_outside_vocab,
    kto_means,
    load_balancing_loss,
    mimic_token_losses,
    preference_loss,
    router_z_loss,
    sampled_token_losses,
    token_logprobs,
)


class RouterTap:
    """Collects router logits of every MoE layer during a forward (the MLLM wrapper drops them)."""

    def __init__(self, model: torch.nn.Module):
        self.logits: list[torch.Tensor] = []
        self.handles = [m.register_forward_hook(lambda m, i, o: self.logits.append(o[0])) for m in moe_routers(model)]
        # Each forward starts a fresh list: with activation checkpointing, backward re-runs the layers
        # (and these hooks), which must not leak into the next micro-batch's router terms.
        self.handles.append(model.register_forward_pre_hook(lambda m, a: self.logits.clear()))
        text = model.config.get_text_config()
        self.top_k = getattr(text, "num_experts_per_tok", 1)

    def losses(self, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Switch aux loss and z-loss (means over layers) and routed-slot counts [layers, E], all over
        the real tokens of the last forward (padding excluded)."""
        keep = token_mask.reshape(-1).bool()
        logits, self.logits = self.logits, []
        if not logits:
            zero = torch.zeros((), device=token_mask.device)
            return zero, zero, torch.zeros((0, 1), device=token_mask.device)
        aux = torch.stack([load_balancing_loss(lg[keep], self.top_k) for lg in logits]).mean()
        z = torch.stack([router_z_loss(lg[keep]) for lg in logits]).mean()
        return aux, z, expert_counts(logits, token_mask, self.top_k).detach()



def mimic_terms(model, batch: MimicBatch, cfg: TrainConfig, body: FinalHidden, vocab: int,
                tap: RouterTap | None = None) -> dict[str, torch.Tensor]:
    """Summed KL(teacher || student) and CE over the batch's label tokens, their weighted sum as
    "objective" (+ router terms). The model runs its body; the output projection runs only at the
    label positions, chunk by chunk inside the loss (no [tokens, V] logits)."""
    inputs = batch.inputs
    student = body(model, inputs)[batch.rows, batch.cols]  # [N, H]
    # Rows of a padded embedding beyond the shared vocabulary are no tokens: they get no mass.
    head = OutputHead.of(body.head, vocab)
    targets = inputs["input_ids"][batch.rows, batch.cols + 1]
    if cfg.kd == "sampled":
        per_token = sampled_token_losses(student, batch.sampled_ids, batch.sampled_weights, targets, cfg.kd_weight,
                                         cfg.ce_weight, head=head, chunk=cfg.loss_chunk)
        terms = {"objective": per_token[:, 0].sum(), "sampled_kd": per_token[:, 1].sum(), "ce": per_token[:, 2].sum()}
        return _with_router_terms(terms, tap, inputs["attention_mask"])
    ids, lps, rest = fold_outside_vocab(batch.topk_ids, batch.topk_logprobs, batch.rest_mass, vocab)
    per_token = mimic_token_losses(student, ids, lps, rest if cfg.kd_tail == "rest" else None, targets,
                                   cfg.kd_weight, cfg.ce_weight, tail=cfg.kd_tail, temperature=cfg.temperature,
                                   head=head, chunk=cfg.loss_chunk, kd_mask=batch.kd_mask,
                                   divergence=cfg.kd_divergence)
    terms = {"objective": per_token[:, 0].sum(), "kl": per_token[:, 1].sum(), "ce": per_token[:, 2].sum()}
    return _with_router_terms(terms, tap, inputs["attention_mask"])


def pref_terms(model, batch: PrefBatch, cfg: TrainConfig, body: FinalHidden, vocab: int,
               tap: RouterTap | None = None, all_sum=None) -> dict[str, torch.Tensor]:
    """Summed per-pair preference loss, rewards and chosen-answer CE (+ router terms); `all_sum`
    sums a tensor over data-parallel ranks (kto_pair's baselines are means over all ranks). IPO compares
    per-token mean log-probs (policy and teacher alike), as TRL does: its squared loss aims the
    log-ratio margin at 1/(2 beta), a target that only means something independent of length."""
    inputs = batch.inputs
    hidden = body(model, inputs)[batch.rows, batch.cols]
    targets = inputs["input_ids"][batch.rows, batch.cols + 1]
    tokens = token_logprobs(hidden, targets, head=OutputHead.of(body.head, vocab), chunk=cfg.loss_chunk)
    n_seq = 2 * batch.pairs
    seq_logps = torch.zeros(n_seq, dtype=torch.float64, device=tokens.device).index_add(0, batch.rows, tokens.double())
    n = batch.pairs
    policy_c, policy_r, ref_c, ref_r = seq_logps[:n], seq_logps[n:], batch.ref_chosen, batch.ref_rejected
    if cfg.pref_loss == "ipo":
        lengths = torch.bincount(batch.rows, minlength=n_seq).double()
        policy_c, policy_r = policy_c / lengths[:n], policy_r / lengths[n:]
        ref_c, ref_r = ref_c / lengths[:n], ref_r / lengths[n:]
    baselines = kto_means(policy_c - ref_c, policy_r - ref_r, all_sum) if cfg.pref_loss == "kto_pair" else None
    losses, r_c, r_r = preference_loss(policy_c, policy_r, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.pref_loss,
                                       label_smoothing=cfg.label_smoothing, kl_baselines=baselines)
    per_pair = losses.view(-1, n).mean(0)  # kto_pair gives a chosen and a rejected term per pair
    terms = {"dpo_loss": per_pair.sum(), "pref_accuracy": (r_c > r_r).double().sum(),
             "reward_margin": (r_c - r_r).sum(), "ce": -seq_logps[:n].sum()}
    return _with_router_terms(terms, tap, inputs["attention_mask"])


def _with_router_terms(terms: dict[str, torch.Tensor], tap: RouterTap | None, mask: torch.Tensor) -> dict:
    if tap is not None:
        terms["aux_loss"], terms["z_loss"], terms["expert_counts"] = tap.losses(mask)
    return terms
