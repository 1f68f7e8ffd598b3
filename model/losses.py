"""Training losses over a batch of matching (ground, aerial) descriptor pairs (row i matches row i)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def soft_margin_triplet_loss(ground: torch.Tensor, aerial: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """The paper's weighted soft-margin triplet loss, all in-batch negatives, both directions.

    With distance d = 2 - 2 cos, each (anchor, negative) pair contributes log(1 + exp(w (d_pos - d_neg))).
    """
    b = ground.shape[0]
    if b < 2:
        raise ValueError("the triplet loss needs at least 2 pairs in a batch (in-batch negatives)")
    dist = 2.0 - 2.0 * ground @ aerial.t()
    pos = dist.diagonal()
    off_diag = ~torch.eye(b, dtype=torch.bool, device=dist.device)
    g2a = F.softplus(weight * (pos[:, None] - dist))[off_diag].mean()   # ground anchor vs aerial negatives
    a2g = F.softplus(weight * (pos[None, :] - dist))[off_diag].mean()   # aerial anchor vs ground negatives
    return (g2a + a2g) / 2.0


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE; the temperature is learnable (log-parametrised) or fixed."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True):
        super().__init__()
        log_inv_t = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_inv_temperature = nn.Parameter(log_inv_t)
        else:
            self.register_buffer("log_inv_temperature", log_inv_t)

    @property
    def temperature(self) -> float:
        return float(torch.exp(-self.log_inv_temperature.detach()))

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor) -> torch.Tensor:
        scale = self.log_inv_temperature.clamp(max=math.log(100.0)).exp()
        logits = scale * ground @ aerial.t()
        target = torch.arange(ground.shape[0], device=ground.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2.0


class TripletLoss(nn.Module):
    def __init__(self, weight: float = 10.0):
        super().__init__()
        self.weight = weight

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor) -> torch.Tensor:
        return soft_margin_triplet_loss(ground, aerial, self.weight)


def make_loss(name: str, **kwargs) -> nn.Module:
    if name == "triplet":
        return TripletLoss(**kwargs)
    if name == "infonce":
        return InfoNCELoss(**kwargs)
    raise ValueError(f"unknown loss {name!r}; choose 'triplet' or 'infonce'")
