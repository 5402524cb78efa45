"""Normed (scaled-cosine) mask head of LOCE (the official code's normed mask head,
``FCNNormMaskHead``).

Same layers as detectron2's :class:`MaskRCNNConvUpsampleHead` (``NUM_CONV`` 3x3 convs + ReLU,
2x deconv + ReLU); only the final 1x1 predictor changes, from a plain convolution to

    logit_k(p) = s * < x(p) / ||x(p)||, W_k / ||W_k|| > + b_k

where ``x(p)`` is the deconv feature vector at pixel ``p`` (normalised over channels), ``W_k`` the
1x1 kernel of mask class ``k`` (normalised over input channels), ``s`` the fixed scale
``MODEL.ROI_MASK_HEAD.COSINE_SCALE`` (20) and ``b_k`` a learnt bias. Norms are clamped below at
1e-12, so an all-zero feature vector (common after the ReLU) yields ``logit_k = b_k``.
Mask classes are the foreground classes ``0..C-1`` (a single channel when
``CLS_AGNOSTIC_MASK``); the loss is detectron2's per-class sigmoid BCE, unchanged.

Select it with ``MODEL.ROI_MASK_HEAD.NAME: "NormedMaskRCNNConvUpsampleHead"``.

Seesaw's "normed mask" variant (MMDetection's ``NormedConv2d``, temperature 20) is the same
predictor with the small constant *added* to the norms instead of clamping them
(``x / (||x|| + 1e-6)``, likewise ``W_k``) and a kaiming-normal (fan-out) initialisation of the
kernel: ``MODEL.ROI_MASK_HEAD.NAME: "SeesawNormedMaskRCNNConvUpsampleHead"``.
"""
import torch
from torch import nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
)

__all__ = ["CosineMaskPredictor", "NormedConvMaskPredictor", "NormedMaskRCNNConvUpsampleHead",
           "SeesawNormedMaskRCNNConvUpsampleHead"]


class CosineMaskPredictor(nn.Module):
    """
    1x1 scaled-cosine classifier applied at every pixel.

    Parameters have the shapes of a 1x1 ``Conv2d`` (``weight`` [K, D, 1, 1], ``bias`` [K]) so
    that checkpoints keep the keys ``predictor.weight`` / ``predictor.bias``.
    """

    def __init__(self, in_channels: int, num_classes: int, scale: float = 20.0, eps: float = 1e-12):
        """
        Args:
            in_channels (int): D, channels of the input feature map.
            num_classes (int): K, number of mask classes (C, or 1 if class-agnostic).
            scale (float): fixed cosine scale ``s``.
            eps (float): lower clamp of the feature and kernel norms.
        """
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.scale = float(scale)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.empty(num_classes, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.empty(num_classes))
        # Same initialisation as detectron2's mask predictor.
        nn.init.normal_(self.weight, std=0.001)
        nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x (Tensor): [N, D, H, W] features.

        Returns:
            Tensor: [N, K, H, W] logits ``s * cos(x(p), W_k) + b_k``.
        """
        # Norms in float32 (robust for fp16/bf16), then back to the working dtypes.
        x_unit = F.normalize(x.float(), p=2.0, dim=1, eps=self.eps).to(x.dtype)
        w = self.weight.flatten(1).float()  # [K, D]
        w_unit = F.normalize(w, p=2.0, dim=1, eps=self.eps) * self.scale
        w_unit = w_unit.to(self.weight.dtype).view_as(self.weight)
        return F.conv2d(x_unit, w_unit, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
            f"scale={self.scale}, eps={self.eps}"
        )


@ROI_MASK_HEAD_REGISTRY.register()
class NormedMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """
    :class:`MaskRCNNConvUpsampleHead` whose final 1x1 predictor is a :class:`CosineMaskPredictor`.
    Input: pooled RoI features [N, D, 14, 14]; output logits [N, K, 28, 28] with K = C
    (foreground classes 0..C-1) or 1 when class-agnostic. Loss and inference are the parent's.
    """

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, cosine_scale: float = 20.0, **kwargs):
        """
        Args:
            input_shape (ShapeSpec): shape of the input feature.
            cosine_scale (float): scale ``s`` of the cosine logits.
            kwargs: arguments of :class:`MaskRCNNConvUpsampleHead` (``num_classes``,
                ``conv_dims``, ``conv_norm``, ``loss_weight``, ``vis_period``).
        """
        super().__init__(input_shape, **kwargs)
        plain = self.predictor
        # Re-assigning an existing child keeps its position in the nn.Sequential, so the
        # parent's ``layers`` still runs convs -> deconv -> ReLU -> predictor.
        self.predictor = CosineMaskPredictor(
            plain.in_channels, plain.out_channels, scale=cosine_scale
        )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["cosine_scale"] = cfg.MODEL.ROI_MASK_HEAD.COSINE_SCALE
        return ret


class NormedConvMaskPredictor(CosineMaskPredictor):
    """
    Seesaw's normed 1x1 mask predictor (MMDetection ``NormedConv2d``): ``eps`` (1e-6) added to
    the feature and kernel norms, ``s * <x / (||x|| + eps), W_k / (||W_k|| + eps)> + b_k``;
    kernel kaiming-normal (fan-out, ReLU gain), bias 0.
    """

    def __init__(self, in_channels: int, num_classes: int, scale: float = 20.0, eps: float = 1e-6):
        super().__init__(in_channels, num_classes, scale, eps)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        nn.init.constant_(self.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D, H, W] -> [N, K, H, W] float32 logits (computed in float32 whatever the
        autocast state: at scale 20, bfloat16 cosines would move logits by up to ~0.1)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            x_unit = xf / (xf.norm(dim=1, keepdim=True) + self.eps)
            w = self.weight.flatten(1).float()
            w_unit = w / (w.norm(dim=1, keepdim=True) + self.eps) * self.scale
            return F.conv2d(x_unit, w_unit.view_as(self.weight), self.bias.float())


@ROI_MASK_HEAD_REGISTRY.register()
class SeesawNormedMaskRCNNConvUpsampleHead(NormedMaskRCNNConvUpsampleHead):
    """:class:`MaskRCNNConvUpsampleHead` with Seesaw's :class:`NormedConvMaskPredictor` (scale
    ``MODEL.ROI_MASK_HEAD.COSINE_SCALE``, 20 in the official configs)."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, cosine_scale: float = 20.0, **kwargs):
        super().__init__(input_shape, cosine_scale=cosine_scale, **kwargs)
        old = self.predictor
        self.predictor = NormedConvMaskPredictor(old.in_channels, old.num_classes,
                                                 scale=cosine_scale)
