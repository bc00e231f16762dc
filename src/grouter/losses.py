"""The losses routers are trained with: balancing (Switch/GShard), the z-loss, and distillation's KL.

One place for them, below every stage: the baseline routers (:mod:`grouter.routers`), distillation
and tuning all use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def load_balancing_loss(logits: torch.Tensor, ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/GShard loss ``E * sum_i f_i * P_i``; equals 1 at perfect balance.

    f_i: fraction of the token-slots routed to expert i (no gradient); P_i: mean softmax
    probability of expert i (carries the gradient).
    """
    probs = logits.float().softmax(dim=-1).reshape(-1, n_experts)
    f = torch.bincount(ids.reshape(-1), minlength=n_experts).to(probs.dtype) / ids.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition, keeps logits small."""
    return logits.float().logsumexp(dim=-1).square().mean()


def kl_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher/T) || softmax(student/T)), times T^2 (distillation;
    tuning's keep term)."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, -2)
    s = F.log_softmax(student.float() / temperature, dim=-1).flatten(0, -2)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2
