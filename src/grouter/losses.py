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
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return _kl(t, s) * temperature**2


def kept_kl_loss(kept: torch.Tensor, ids: torch.Tensor, rest: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """:func:`kl_loss` (T = 1) over the partition of the experts into the teacher's kept ones
    (``ids``, scores ``kept`` ``[..., M]``) and one bucket of all others, whose teacher score is
    their log-sum-exp ``rest`` ``[...]``: the softmax over every expert is exact for the kept ones,
    and the student's probabilities are grouped the same way (compact targets,
    docs/method.md#compact-targets). It equals the full KL of the partitioned distributions, and
    is at most the full KL."""
    s = F.log_softmax(student.float(), dim=-1)
    s_rest = s.scatter(-1, ids, float("-inf")).logsumexp(dim=-1, keepdim=True)
    t = torch.cat([kept.float(), rest.float().unsqueeze(-1)], dim=-1).log_softmax(dim=-1)
    return _kl(t, torch.cat([s.gather(-1, ids), s_rest], dim=-1))


def _kl(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(t || s), both log-probabilities ``[..., n]``."""
    return F.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")
