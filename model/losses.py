"""Training losses over a batch of matching (ground, aerial) descriptor pairs (row i matches row i)."""
from __future__ import annotations

import math

import numpy as np
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

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor, overlap: torch.Tensor | None = None) -> torch.Tensor:
        """``overlap`` [B, B] (optional, e.g. `footprint_overlap`): how much of ground i's place aerial j
        shows. Each row's (and column's) target is then spread over the tiles (views) in proportion, so
        an overlapping neighbour is a semi-positive instead of a negative; without it, row i matches
        row i only."""
        scale = self.log_inv_temperature.clamp(max=math.log(100.0)).exp()
        logits = scale * ground @ aerial.t()
        if overlap is None:
            target = torch.arange(ground.shape[0], device=ground.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2.0
        return (F.cross_entropy(logits, overlap / overlap.sum(1, keepdim=True))
                + F.cross_entropy(logits.t(), (overlap / overlap.sum(0, keepdim=True)).t())) / 2.0


def footprint_overlap(camera_latlon: np.ndarray, tile_latlon: np.ndarray, tile_m: float) -> np.ndarray:
    """[B, B]: the share of a north-up ``tile_m`` square centred on camera i that tile j (its centre in
    ``tile_latlon``, the same size) covers; 1 for a tile centred on the camera, 0 beyond a tile's side
    (VIGOR's positives and semi-positives, weighted by how much of the camera's place they show)."""
    from .metrics import local_xy_m

    lat0, lon0 = (float(v) for v in camera_latlon.mean(0))
    cameras = local_xy_m(camera_latlon[:, 0], camera_latlon[:, 1], lat0, lon0)
    tiles = local_xy_m(tile_latlon[:, 0], tile_latlon[:, 1], lat0, lon0)
    apart = np.abs(cameras[:, None, :] - tiles[None, :, :]) / tile_m  # [B, B, east/north] in tile sides
    return np.clip(1.0 - apart, 0.0, None).prod(-1)


class TripletLoss(nn.Module):
    def __init__(self, weight: float = 10.0):
        super().__init__()
        self.weight = weight

    def forward(self, ground: torch.Tensor, aerial: torch.Tensor, overlap: torch.Tensor | None = None) -> torch.Tensor:
        if overlap is not None:
            raise ValueError("the triplet loss has no semi-positives; use the InfoNCE loss with overlapping tiles")
        return soft_margin_triplet_loss(ground, aerial, self.weight)


def make_loss(name: str, **kwargs) -> nn.Module:
    if name == "triplet":
        return TripletLoss(**kwargs)
    if name == "infonce":
        return InfoNCELoss(**kwargs)
    raise ValueError(f"unknown loss {name!r}; choose 'triplet' or 'infonce'")
