"""Classifier layers of the long-tail box predictor.

:class:`CosineClassifier` is RIO's cosine classifier (spec ``rio.md`` section 4, the official
``distLinear``): a bias-free linear layer with explicit weight normalisation and a learnable
per-class norm, applied to the L2-normalised feature and scaled by ``s``:

    z_k = s * g_k * < v_k / ||v_k||, x / (||x|| + eps) >,   k = 0..K-1 (background row included)

It replaces ``cls_score`` of the box predictor (``MODEL.LONGTAIL.CLS_LAYER "cosine"``); its
parameters ``weight_v`` and ``weight_g`` receive the optimizer's default weight decay, as in the
official code (``weight_norm`` on a ``Linear``, without the deprecated hook).
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["CosineClassifier"]


class CosineClassifier(nn.Module):
    """Scaled cosine classifier ``[N, D] -> [N, K]`` (module docstring)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 48.0, eps: float = 1e-5):
        """
        Args:
            in_features (int): D.
            out_features (int): K (``C + 1`` for a softmax box classifier, background last).
            scale (float): s (RIO's ``TEMP_S`` = 48).
            eps (float): added to the feature norm (RIO: 1e-5), so a zero feature gives z = 0.
        """
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.eps = eps
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_g = nn.Parameter(self.weight_v.detach().norm(dim=1).clone())

    @property
    def weight(self) -> torch.Tensor:
        """[K, D] effective weight ``g_k v_k / ||v_k||``."""
        return self.weight_g[:, None] * F.normalize(self.weight_v, dim=1, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] (or [N, ...] flattened) -> [N, K] logits, computed in float32 whatever the
        autocast state: with s = 48, bfloat16's 8-bit mantissa would move logits by ~0.2."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            x_unit = x / (x.norm(dim=1, keepdim=True) + self.eps)
            return self.scale * F.linear(x_unit, self.weight.float())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"scale={self.scale}, eps={self.eps}"
        )
