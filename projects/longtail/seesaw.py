"""Seesaw Loss (Wang et al., "Seesaw Loss for Long-Tailed Instance Segmentation", CVPR 2021), as
MMDetection 2.28 / 3.3 implement it: ``MODEL.LONGTAIL.CLS_LOSS "seesaw"``.

The classifier has ``C + 2`` outputs ``z = [z_cls (C), z_obj (2)]``: ``C`` class logits and a
two-way "objectness" softmax (column ``C`` = object, ``C + 1`` = background). Per VGPU chunk
(:mod:`longtail.vgpu`, ``MODEL.LONGTAIL.IMS_PER_VGPU``; the official 8 GPUs x 2 images is
``IMS_PER_VGPU 2``):

1. the chunk's cumulative label counts ``N`` [C + 1] grow by the chunk's labels (sampled RoIs,
   background included) *before* the loss, so a batch counts itself;
2. on foreground rows (``y < C``), the class logits get ``log S_ij`` added off the true class, with
   ``S = M * K``: mitigation ``M_ij = (N_j / N_y)^p`` where ``N_j < N_y`` (counts clamped at 1),
   compensation ``K_ij = (sigma_j / max(sigma_y, 0.01))^q`` where that ratio exceeds 1 (``sigma``
   the detached softmax over the ``C`` class logits); cross-entropy, summed, divided by ``A`` =
   the number of rows of the chunk (foreground *and* background);
3. objectness cross-entropy of every row (target 0 = object, 1 = background), divided by ``A``.

The two terms are logged as ``loss_cls_classes`` and ``loss_cls_objectness``. Inference:
``P_j = softmax(z_cls)_j * softmax(z_obj)_0`` and ``P_C = softmax(z_obj)_1``.

State: the counts, one row per VGPU chunk of this process, never synchronised (the official
counts are per GPU). They are a non-persistent buffer saved in each process's state file beside
every checkpoint (:mod:`longtail.checkpoint`), so each chunk of each process resumes with its own
counts (the official code reloads rank 0's counts on every GPU; fixed). They are not in the model
file: a model loaded from weights (inference, or fine-tuning with ``MODEL.WEIGHTS``) starts with
zero counts, where MMDetection's ``load_from`` would copy rank 0's counts to every GPU (the
count vector's shape depends on the process layout; no official recipe fine-tunes a Seesaw
model). Rows of weight 0 (rows that count nowhere, e.g. invalid memory draws) are not counted.

The classifier is usually :class:`longtail.layers.NormedLinear` (``MODEL.LONGTAIL.CLS_LAYER
"normed_linear"``, scale 20, with bias), as in the official configs.
"""
import logging
from typing import Dict, Optional, Tuple

import torch
from torch.nn import functional as F

from . import vgpu
from .cls_losses import ClassificationLoss, register_loss
from .equilibrium import chunk_mean

__all__ = [
    "SeesawLoss",
    "seesaw_log_factors",
    "seesaw_loss",
    "seesaw_probabilities",
    "update_class_counts",
]

logger = logging.getLogger(__name__)


def update_class_counts(counts: torch.Tensor, labels: torch.Tensor, chunk: torch.Tensor,
                        weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    Counts after adding a batch: ``counts[k, y_i] += 1`` for every row ``i`` of chunk ``k`` (rows
    of weight 0 are not counted). Out of place.

    Args:
        counts: [V, C + 1] float cumulative counts per chunk (background last).
        labels: [R] long labels in ``0..C``.
        chunk: [R] long chunk of every row.
        weights: [R] or None.
    """
    add = torch.ones_like(labels, dtype=counts.dtype)
    if weights is not None:
        add = (weights > 0).to(counts.dtype)
    return counts.index_put((chunk, labels), add, accumulate=True)


def seesaw_log_factors(cls_logits: torch.Tensor, labels: torch.Tensor, row_counts: torch.Tensor,
                       p: float = 0.8, q: float = 2.0, eps: float = 1e-2) -> torch.Tensor:
    """
    ``log S`` [R, C] of foreground rows (constants: computed without gradient).

    Args:
        cls_logits: [R, C] class logits.
        labels: [R] labels, all in ``0..C-1``.
        row_counts: [R, C] the cumulative class counts of each row's chunk (foreground columns).
        p: mitigation exponent (0: no mitigation).
        q: compensation exponent (0: no compensation).
        eps: clamp of the true-class score in the compensation ratio.

    Returns:
        [R, C] ``log M + log K``; the true-class column is 0.
    """
    with torch.no_grad():
        rows = torch.arange(labels.shape[0], device=labels.device)
        log_s = torch.zeros_like(cls_logits, dtype=torch.float32)
        if p > 0:
            n = row_counts.float().clamp(min=1.0)
            ratio = n / n[rows, labels][:, None]
            log_s = log_s + p * torch.log(ratio.clamp(max=1.0))
        if q > 0:
            sigma = F.softmax(cls_logits.detach().float(), dim=1)
            self_score = sigma[rows, labels].clamp(min=eps)
            ratio = sigma / self_score[:, None]
            log_s = log_s + q * torch.log(ratio.clamp(min=1.0))
        log_s[rows, labels] = 0.0
    return log_s


def seesaw_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor,
    chunk: torch.Tensor,
    num_chunks: int,
    weights: Optional[torch.Tensor] = None,
    p: float = 0.8,
    q: float = 2.0,
    eps: float = 1e-2,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    The two Seesaw terms of a batch, each normalised per chunk by the chunk's rows and averaged
    over chunks (module docstring).

    Args:
        scores: [R, C + 2] logits (classes, then object / background).
        labels: [R] labels in ``0..C`` (background ``C``).
        counts: [V, C + 1] cumulative counts, *already including this batch*
            (:func:`update_class_counts`).
        chunk: [R] chunk of every row; num_chunks: V' <= V chunks in this batch.
        weights: [R] row weights (0: the row counts nowhere), or None (all 1).

    Returns:
        ``(loss_classes, loss_objectness)``, scalars.
    """
    num_classes = scores.shape[1] - 2
    scores = scores.float()
    fg = labels < num_classes
    w = torch.ones_like(labels, dtype=scores.dtype) if weights is None else weights.to(scores)
    counted = (w > 0).to(scores.dtype)
    cls_logits = scores[:, :num_classes]
    safe_labels = torch.where(fg, labels, torch.zeros_like(labels))
    row_counts = counts[chunk, :num_classes]
    log_s = seesaw_log_factors(cls_logits, safe_labels, row_counts, p, q, eps)
    per_row = F.cross_entropy(cls_logits + log_s, safe_labels, reduction="none")
    loss_classes = chunk_mean(per_row, chunk, num_chunks, w * fg.to(w), counted)
    objectness = F.cross_entropy(scores[:, num_classes:], (~fg).long(), reduction="none")
    loss_objectness = chunk_mean(objectness, chunk, num_chunks, w, counted)
    return loss_classes, loss_objectness


def seesaw_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """[N, C + 2] logits -> [N, C + 1] probabilities (rows sum to 1): class softmax times the
    objectness "object" probability; background = the objectness "background" probability."""
    scores = scores.float()
    num_classes = scores.shape[1] - 2
    cls = F.softmax(scores[:, :num_classes], dim=1)
    obj = F.softmax(scores[:, num_classes:], dim=1)
    return torch.cat([cls * obj[:, :1], obj[:, 1:]], dim=1)


@register_loss("seesaw", keys=("MODEL.SEESAW",))
class SeesawLoss(ClassificationLoss):
    """Seesaw Loss with its objectness split (module docstring); ``C + 2`` logits."""

    softmax_logits = False

    def __init__(self, num_classes: int, num_chunks: int, p: float = 0.8, q: float = 2.0,
                 eps: float = 1e-2):
        """
        Args:
            num_classes: C.
            num_chunks: VGPU chunks of one process batch (one count vector each).
            p, q, eps: mitigation exponent, compensation exponent, true-score clamp.
        """
        super().__init__(num_classes)
        self.p, self.q, self.eps = p, q, eps
        self.register_buffer("class_counts",
                             torch.zeros(num_chunks, num_classes + 1, dtype=torch.float32),
                             persistent=False)
        logger.info("Seesaw: cumulative class counts per VGPU chunk, %d x %d floats, in each "
                    "process's state file", num_chunks, num_classes + 1)

    @classmethod
    def from_config(cls, cfg, num_classes):
        from detectron2.utils import comm

        chunks = vgpu.chunks_per_process(cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size(),
                                         cfg.MODEL.LONGTAIL.IMS_PER_VGPU)
        s = cfg.MODEL.SEESAW
        return cls(num_classes, chunks, s.P, s.Q, s.EPS)

    def num_logits(self) -> int:
        return self.num_classes + 2

    def init_classifier(self, layer):
        """MMDetection's head initialisation: weights N(0, 0.01^2), bias 0 (a normalised linear
        layer initialises itself the same way)."""
        if hasattr(layer, "weight") and isinstance(layer.weight, torch.nn.Parameter):
            torch.nn.init.normal_(layer.weight, std=0.01)
        if getattr(layer, "bias", None) is not None:
            torch.nn.init.zeros_(layer.bias)

    def forward(self, scores, labels, batch):
        if batch.num_chunks > self.class_counts.shape[0]:
            raise RuntimeError(
                f"Seesaw keeps counts for {self.class_counts.shape[0]} VGPU chunks per process "
                f"(SOLVER.IMS_PER_BATCH / processes / MODEL.LONGTAIL.IMS_PER_VGPU) but the batch "
                f"has {batch.num_chunks}."
            )
        with torch.no_grad():
            self.class_counts.copy_(update_class_counts(self.class_counts, labels, batch.chunk,
                                                        batch.weights))
        classes, objectness = seesaw_loss(scores, labels, self.class_counts, batch.chunk,
                                          batch.num_chunks, batch.weights, self.p, self.q,
                                          self.eps)
        return {"loss_cls_classes": classes, "loss_cls_objectness": objectness}

    def probabilities(self, scores):
        return seesaw_probabilities(scores)

    def accuracy_logits(self, scores):
        return seesaw_probabilities(scores.detach())

    # per-process state (longtail.checkpoint): each process's chunks resume with their counts
    def process_state(self) -> Dict[str, torch.Tensor]:
        return {"class_counts": self.class_counts.detach().cpu().clone()}

    def load_process_state(self, state: Dict[str, torch.Tensor]) -> None:
        saved = state["class_counts"]
        if saved.shape != self.class_counts.shape:
            raise ValueError(
                f"Saved Seesaw counts have shape {tuple(saved.shape)}, this model "
                f"{tuple(self.class_counts.shape)} (VGPU chunks x (C + 1)); resume with the "
                "SOLVER.IMS_PER_BATCH, MODEL.LONGTAIL.IMS_PER_VGPU and --num-gpus it was saved with."
            )
        self.class_counts.copy_(saved)
