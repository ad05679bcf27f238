"""Stage losses: cross-entropy (Eq. 13) and the prior loss between teacher and diffused EPDs (Eq. 17, 18)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lldif.models.config import LossConfig


def _same_shape(z_teacher: torch.Tensor, z_pred: torch.Tensor) -> None:
    if z_pred.ndim != 2:
        raise ValueError(f"z_pred must have shape (B, dim), got {tuple(z_pred.shape)}")
    if z_teacher.shape != z_pred.shape:
        raise ValueError(f"z_teacher must have z_pred's shape {tuple(z_pred.shape)}, got {tuple(z_teacher.shape)}")


def prior_kl(z_teacher: torch.Tensor, z_pred: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 17: KL(softmax(Z/tau) || softmax(Z-hat/tau)) summed over dims, mean over the batch; teacher detached."""
    _same_shape(z_teacher, z_pred)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    target = F.log_softmax(z_teacher.detach() / temperature, dim=1)
    return F.kl_div(F.log_softmax(z_pred / temperature, dim=1), target, reduction="batchmean", log_target=True)


def prior_loss(z_teacher: torch.Tensor, z_pred: torch.Tensor, config: LossConfig) -> torch.Tensor:
    """The stage-2 prior term chosen by `config.prior_loss`: "kl", "l1", "kl+l1" or "none" (zero)."""
    _same_shape(z_teacher, z_pred)
    kind = config.prior_loss
    if kind == "none":
        return z_pred.new_zeros(())
    if kind not in ("kl", "l1", "kl+l1"):
        raise ValueError(f"config.prior_loss must be 'kl', 'l1', 'kl+l1' or 'none', got {kind!r}")
    loss = z_pred.new_zeros(())
    if "kl" in kind:
        loss = loss + prior_kl(z_teacher, z_pred, config.kl_temperature)
    if "l1" in kind:
        loss = loss + F.l1_loss(z_pred, z_teacher.detach())
    return loss


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Eq. 13: mean cross-entropy of (B, K) logits against (B,) class indices."""
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (B, K), got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype != torch.long:
        raise ValueError(f"labels must be a long tensor of shape ({logits.shape[0]},), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
