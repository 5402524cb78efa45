"""Classifier layers of the long-tail box predictor, one registered builder per kind.

``MODEL.LONGTAIL.CLS_LAYER`` names an entry of :data:`CLS_LAYER_REGISTRY`: a function
``(cfg, default, in_features, out_features) -> nn.Module`` that returns the predictor's
``cls_score`` (``[N, D] -> [N, K]`` logits), where ``default`` is the ``nn.Linear(D, C + 1)`` that
detectron2's ``FastRCNNOutputLayers`` already built (returned unchanged when it fits, so a
softmax model initialises exactly as detectron2's). Registered: ``"linear"``, ``"cosine"`` and
``"normed_linear"``.

:class:`CosineClassifier` is RIO's cosine classifier (RIO: Chang et al., ICML 2021; the
official code's ``distLinear``): a bias-free linear layer with explicit weight normalisation and a learnable
per-class norm, applied to the L2-normalised feature and scaled by ``s``:

    z_k = s * g_k * < v_k / ||v_k||, x / (||x|| + eps) >,   k = 0..K-1 (background row included)

It replaces ``cls_score`` of the box predictor (``MODEL.LONGTAIL.CLS_LAYER "cosine"``); its
parameters ``weight_v`` and ``weight_g`` receive the optimizer's default weight decay, as in the
official code (``weight_norm`` on a ``Linear``, without the deprecated hook).
"""
import math
from typing import Optional, Sequence

import torch
from detectron2.utils.registry import Registry
from torch import nn
from torch.nn import functional as F

from .registry import register_as, refuse_keys_of_unselected

__all__ = ["CosineClassifier", "NormedLinear", "normed_linear", "CLS_LAYER_REGISTRY",
           "build_cls_layer", "register_layer"]

CLS_LAYER_REGISTRY = Registry("LONGTAIL_CLS_LAYER")
CLS_LAYER_REGISTRY.__doc__ = """
Classifier layers of the long-tail box predictor (``MODEL.LONGTAIL.CLS_LAYER``): functions
``(cfg, default, in_features, out_features) -> nn.Module`` registered under the config value.
"""


def register_layer(name: str, keys: Sequence[str] = ()):
    """Decorator: register a classifier-layer builder under the config value ``name``
    (``MODEL.LONGTAIL.CLS_LAYER``); ``keys``: the config keys only this layer reads (refused
    while another layer is selected, :func:`build_cls_layer`)."""
    return register_as(CLS_LAYER_REGISTRY, name, keys)


def build_cls_layer(cfg, default: nn.Linear, out_features: int) -> nn.Module:
    """The classifier ``MODEL.LONGTAIL.CLS_LAYER`` names, with ``out_features`` outputs."""
    name = cfg.MODEL.LONGTAIL.CLS_LAYER
    if name not in CLS_LAYER_REGISTRY:
        raise ValueError(f"MODEL.LONGTAIL.CLS_LAYER={name!r}; choose one of "
                         f"{sorted(k for k, _ in CLS_LAYER_REGISTRY)}.")
    refuse_keys_of_unselected(cfg, CLS_LAYER_REGISTRY, name, "MODEL.LONGTAIL.CLS_LAYER")
    return CLS_LAYER_REGISTRY.get(name)(cfg, default, default.in_features, out_features)


@register_layer("linear")
def linear_classifier(cfg, default, in_features, out_features):
    """detectron2's linear classifier; a new ``nn.Linear`` (default initialisation) when the loss
    needs another width than ``C + 1``."""
    if out_features == default.out_features:
        return default
    return nn.Linear(in_features, out_features)


@register_layer("cosine", keys=("MODEL.RIO.COSINE_SCALE", "MODEL.RIO.COSINE_EPS"))
def cosine_classifier(cfg, default, in_features, out_features):
    """RIO's scaled cosine classifier (:class:`CosineClassifier`, ``MODEL.RIO.COSINE_*``)."""
    return CosineClassifier(in_features, out_features, cfg.MODEL.RIO.COSINE_SCALE,
                            cfg.MODEL.RIO.COSINE_EPS)


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


def normed_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  scale: float, eps: float = 1e-6) -> torch.Tensor:
    """
    ``z_k = scale * < x / (||x|| + eps), W_k / (||W_k|| + eps) > + b_k``: [N, D] -> [N, K].
    ``eps`` is added to the norms (a zero feature gives ``z = b`` exactly), as MMDetection's
    ``NormedLinear`` does.
    """
    x_unit = x / (x.norm(dim=1, keepdim=True) + eps)
    w_unit = weight / (weight.norm(dim=1, keepdim=True) + eps)
    return F.linear(x_unit, scale * w_unit, bias)


@register_layer("normed_linear", keys=("MODEL.LONGTAIL.NORMED_LINEAR_SCALE",))
def normed_linear_classifier(cfg, default, in_features, out_features):
    """Seesaw's normalised linear classifier with bias (:class:`NormedLinear`,
    ``MODEL.LONGTAIL.NORMED_LINEAR_SCALE``)."""
    return NormedLinear(in_features, out_features, cfg.MODEL.LONGTAIL.NORMED_LINEAR_SCALE)


class NormedLinear(nn.Module):
    """
    Normalised linear classifier (Seesaw's, MMDetection ``NormedLinear`` with temperature 20):
    :func:`normed_linear` of the flattened input, weights ``N(0, 0.01^2)`` and bias 0 at init;
    computed in float32 whatever the autocast state (a scale of 20 on bfloat16 cosines would move
    logits by ~0.08).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 20.0,
                 eps: float = 1e-6):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = scale
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(out_features, in_features).normal_(0, 0.01))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return normed_linear(x.float(), self.weight.float(), self.bias.float(), self.scale,
                                 self.eps)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scale={self.scale}, eps={self.eps}")
