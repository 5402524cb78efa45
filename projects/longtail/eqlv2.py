"""EQLv2 (Tan et al., "Equalization Loss v2: A New Gradient Balance Approach for Long-tailed Object
Detection", CVPR 2021), as the official code (tztztztztz/eqlv2, MMDetection 2.3) implements it:
``MODEL.LONGTAIL.CLS_LOSS "eqlv2"``.

A sigmoid classifier over ``C + 1`` columns (column ``C`` is an objectness/background sigmoid
trained like a class, target 1 on background rows). With the accumulated positive and negative
gradient magnitudes ``P``, ``Q`` [C] and ``g = P / (Q + 1e-10)``:

    q_j = sigmoid(gamma * (g_j - mu))  (j < C),   q_C = 1,    r_j = 1 + alpha * (1 - q_j)
    w_ij = r_j * t_ij + q_j * (1 - t_ij)
    L = (1 / R) * sum_i sum_j w_ij * BCE(z_ij, t_ij)

per VGPU chunk (``R`` its rows, the official per-GPU normaliser), averaged over chunks. After the
loss the statistics grow by ``sum_i t_ij |sigmoid(z_ij) - t_ij| w_ij`` (positives) and
``sum_i (1 - t_ij) |sigmoid(z_ij) - t_ij| w_ij`` (negatives), summed over every chunk and every
process (all-reduce): the state is global, identical on all processes, as in the official code.
The weights of a step use the statistics up to the previous step. Initial state ``P = Q = 0``,
``g = 100``, so the first step is plain sigmoid BCE.

The statistics are persistent buffers (``pos_grad``, ``neg_grad``, ``pos_neg``; the official HEAD
names): in the checkpoint, restored on resume. Inference (``TEST_WITH_OBJ``):
``P_j = sigmoid(z_j) * (1 - sigmoid(z_C))``, ``P_C = sigmoid(z_C)`` (rows not normalised). The
classifier bias starts at ``-log((1 - pi) / pi)``, ``pi = PRIOR_PROB`` (0.001), every column.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch.nn import functional as F

from .cls_losses import ClassificationLoss, init_prior_bias, register_loss
from .equilibrium import chunk_mean

__all__ = ["EQLv2Loss", "eqlv2_weights", "eqlv2_loss", "eqlv2_gradient_stats",
           "eqlv2_probabilities"]


def eqlv2_weights(pos_neg: torch.Tensor, gamma: float = 12.0, mu: float = 0.8,
                  alpha: float = 4.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Per-column weights from the gradient ratio ``g`` [C]: ``(pos_w [C + 1], neg_w [C + 1])``,
    ``neg_w = q``, ``pos_w = 1 + alpha (1 - q)``, background column 1 for both.
    """
    q = torch.sigmoid(gamma * (pos_neg.float() - mu))
    neg_w = torch.cat([q, q.new_ones(1)])
    pos_w = 1 + alpha * (1 - neg_w)
    return pos_w, neg_w


def eqlv2_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_w: torch.Tensor,
    neg_w: torch.Tensor,
    chunk: Optional[torch.Tensor] = None,
    num_chunks: int = 1,
    weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        logits: [R, C + 1] sigmoid logits; labels: [R] in ``0..C``.
        pos_w, neg_w: [C + 1] weights of :func:`eqlv2_weights`.
        chunk, num_chunks: VGPU chunk of every row (None: one chunk).
        weights: [R] row weights (0: a row that counts nowhere), or None.

    Returns:
        ``(loss, w)``: the loss (sum over rows and columns of ``w * BCE`` / rows of the chunk,
        mean over chunks) and the [R, C + 1] element weights ``w`` (for the statistics).
    """
    logits = logits.float()
    target = F.one_hot(labels, logits.shape[1]).to(logits)
    w = pos_w[None] * target + neg_w[None] * (1 - target)
    per_row = (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * w).sum(1)
    return chunk_mean(per_row, chunk, num_chunks, weights), w


def eqlv2_gradient_stats(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor,
                         weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    This batch's increments ``[2, C]``: the positive and negative weighted gradient magnitudes
    ``sum_i t_ij |sigmoid(z_ij) - t_ij| w_ij`` and ``sum_i (1 - t_ij) |...| w_ij`` of the
    foreground columns (rows of weight 0 left out).
    """
    with torch.no_grad():
        logits = logits.detach().float()
        target = F.one_hot(labels, logits.shape[1]).to(logits)
        grad = (torch.sigmoid(logits) - target).abs() * w
        if weights is not None:
            grad = grad * (weights > 0).to(grad)[:, None]
        pos = (grad * target).sum(0)[:-1]
        neg = (grad * (1 - target)).sum(0)[:-1]
        return torch.stack([pos, neg])


def eqlv2_probabilities(logits: torch.Tensor, test_with_obj: bool = True) -> torch.Tensor:
    """[N, C + 1] logits -> [N, C + 1] scores: sigmoid, foreground times ``1 - sigmoid(z_C)``
    when ``test_with_obj`` (rows do not sum to 1)."""
    p = torch.sigmoid(logits.float())
    if not test_with_obj:
        return p
    return torch.cat([p[:, :-1] * (1 - p[:, -1:]), p[:, -1:]], dim=1)


@register_loss("eqlv2", keys=("MODEL.EQLV2",))
class EQLv2Loss(ClassificationLoss):
    """EQLv2 (module docstring); ``C + 1`` sigmoid logits, global gradient statistics."""

    softmax_logits = False

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8,
                 alpha: float = 4.0, test_with_obj: bool = True, prior_prob: float = 0.001):
        super().__init__(num_classes)
        self.gamma, self.mu, self.alpha = gamma, mu, alpha
        self.test_with_obj = test_with_obj
        self.prior_prob = prior_prob
        self.register_buffer("pos_grad", torch.zeros(num_classes))
        self.register_buffer("neg_grad", torch.zeros(num_classes))
        self.register_buffer("pos_neg", torch.full((num_classes,), 100.0))

    @classmethod
    def from_config(cls, cfg, num_classes):
        e = cfg.MODEL.EQLV2
        return cls(num_classes, e.GAMMA, e.MU, e.ALPHA, e.TEST_WITH_OBJ, e.PRIOR_PROB)

    def init_classifier(self, layer):
        """Every column's bias at the prior ``-log((1 - pi) / pi)`` (weights as built:
        detectron2's N(0, 0.01^2)); a classifier without a bias is refused (the prior could not
        take effect)."""
        init_prior_bias(layer, self.prior_prob, "MODEL.EQLV2.PRIOR_PROB")

    def forward(self, scores, labels, batch):
        pos_w, neg_w = eqlv2_weights(self.pos_neg, self.gamma, self.mu, self.alpha)
        loss, w = eqlv2_loss(scores, labels, pos_w, neg_w, batch.chunk, batch.num_chunks,
                             batch.weights)
        self.collect(eqlv2_gradient_stats(scores, labels, w, batch.weights))
        return {"loss_cls": loss}

    @torch.no_grad()
    def collect(self, increments: torch.Tensor) -> None:
        """Add ``[2, C]`` increments, summed over all processes, to the statistics."""
        increments = increments.to(self.pos_grad)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(increments, op=dist.ReduceOp.SUM)
        self.pos_grad += increments[0]
        self.neg_grad += increments[1]
        self.pos_neg.copy_(self.pos_grad / (self.neg_grad + 1e-10))

    def probabilities(self, scores):
        return eqlv2_probabilities(scores, self.test_with_obj)
