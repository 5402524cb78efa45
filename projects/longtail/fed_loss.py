"""Sigmoid cross-entropy and the federated loss (Zhou et al., "Probabilistic two-stage detection",
2021, appendix D; detectron2 main's ``FastRCNNOutputLayers`` with ``USE_SIGMOID_CE`` /
``USE_FED_LOSS``): ``MODEL.LONGTAIL.CLS_LOSS "sigmoid_ce"`` and ``"fed_loss"``.

The classifier keeps detectron2's ``C + 1`` outputs; the background column is never trained (no
gradient) and dropped at inference. Sigmoid CE over the ``C`` foreground columns, background rows
all-negative, summed and divided by the number of rows ``R``:

    L = (1 / R) * sum_i sum_{c < C} m_c * BCE(z_ic, [y_i == c])

``m = 1`` for ``"sigmoid_ce"``. For ``"fed_loss"``, ``m`` marks the federated class set ``S`` of
the batch: the distinct labels ``U`` (background included when present, as detectron2 does, so a
typical batch has ``K - 1`` foreground classes), plus ``K - |U|`` classes drawn without replacement
with probability proportional to ``v_c = n_c^rho`` (``n_c`` = training images containing ``c``;
``K`` = ``MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES`` 50, ``rho`` =
``FED_LOSS_FREQ_WEIGHT_POWER`` 0.5), never drawing a class of ``U``; nothing is drawn when
``|U| >= K``. The draw is the Gumbel-top-k form of weighted sampling without replacement (the same
distribution as ``torch.multinomial(v, K - |U|)``), done for all VGPU chunks at once: each chunk
has its own set from its own labels and its own normaliser (``IMS_PER_VGPU 0``: the whole process
batch, as detectron2). The draws come from a generator seeded by (seed, iteration, rank), so a
resumed run draws what the uninterrupted one would.

Inference: ``sigmoid(z)`` for all ``C + 1`` columns (detectron2 drops column ``C``).

Class weights ``v`` are the persistent buffer ``fed_loss_cls_weights`` [C], from the training
set's per-class image counts (metadata of ``DATASETS.TRAIN``, computed from the training json for
any LVIS-format dataset, LVIS v0.5 included).
"""
from typing import Optional

import torch
from detectron2.utils import comm
from torch.nn import functional as F

from .cls_losses import ClassificationLoss, init_prior_bias, register_loss
from .datasets import IMAGE_COUNT, train_metadata
from .equilibrium import chunk_mean

__all__ = ["SigmoidCE", "FederatedLoss", "fed_loss_class_weights", "federated_class_mask",
           "sigmoid_ce_loss"]


def fed_loss_class_weights(image_counts, power: float = 0.5) -> torch.Tensor:
    """[C] ``n_c ** power`` from the per-class training image counts."""
    return torch.as_tensor(image_counts, dtype=torch.float32) ** power


def federated_class_mask(labels: torch.Tensor, chunk: torch.Tensor, num_chunks: int,
                         class_weights: torch.Tensor, num_fed_classes: int,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """
    [V, C] bool: the federated class set of every chunk (module docstring).

    Args:
        labels: [R] labels in ``0..C``; chunk: [R] chunk of every row; num_chunks: V.
        class_weights: [C] sampling weights ``v`` (>= 0; a zero-weight class is never drawn).
        num_fed_classes: K.
        generator: source of the Gumbel noise (on the labels' device).
    """
    num_classes = class_weights.shape[0]
    present = torch.zeros(num_chunks, num_classes + 1, dtype=torch.bool, device=labels.device)
    present[chunk, labels] = True
    need = (num_fed_classes - present.sum(1)).clamp(min=0)  # [V]
    u = torch.rand(num_chunks, num_classes, generator=generator, device=labels.device)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
    keys = torch.log(class_weights.to(labels.device).float())[None] + gumbel
    keys = keys.masked_fill(present[:, :num_classes], float("-inf"))
    order = keys.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(num_classes, device=labels.device).expand_as(order).contiguous())
    drawn = (rank < need[:, None]) & torch.isfinite(keys)
    return present[:, :num_classes] | drawn


def sigmoid_ce_loss(logits: torch.Tensor, labels: torch.Tensor,
                    class_mask: Optional[torch.Tensor] = None,
                    chunk: Optional[torch.Tensor] = None, num_chunks: int = 1,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """
    Sigmoid CE over the ``C`` foreground columns of [R, C + 1] logits (background column unused),
    masked per chunk by ``class_mask`` [V, C] (None: all classes), per-chunk sum / rows, mean over
    chunks.
    """
    num_classes = logits.shape[1] - 1
    logits = logits[:, :num_classes].float()
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits)
    per_elem = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if class_mask is not None:
        rows_chunk = chunk if chunk is not None else torch.zeros_like(labels)
        per_elem = per_elem * class_mask[rows_chunk].to(per_elem)
    return chunk_mean(per_elem.sum(1), chunk, num_chunks, weights)


@register_loss("sigmoid_ce", keys=("MODEL.LONGTAIL.SIGMOID_PRIOR_PROB",))
class SigmoidCE(ClassificationLoss):
    """Sigmoid cross-entropy over the foreground columns (module docstring), detectron2's
    ``USE_SIGMOID_CE``; ``C + 1`` logits, bias 0 unless ``MODEL.LONGTAIL.SIGMOID_PRIOR_PROB``."""

    softmax_logits = False

    def __init__(self, num_classes: int, prior_prob: float = 0.0):
        super().__init__(num_classes)
        self.prior_prob = prior_prob

    @classmethod
    def from_config(cls, cfg, num_classes):
        return cls(num_classes, cfg.MODEL.LONGTAIL.SIGMOID_PRIOR_PROB)

    def init_classifier(self, layer):
        """Bias ``-log((1 - pi) / pi)`` when a prior ``pi > 0`` is set (CenterNet2's 0.01);
        otherwise detectron2's initialisation is kept (bias 0)."""
        if self.prior_prob > 0:
            init_prior_bias(layer, self.prior_prob, "MODEL.LONGTAIL.SIGMOID_PRIOR_PROB")

    def class_mask(self, labels, batch) -> Optional[torch.Tensor]:
        return None

    def forward(self, scores, labels, batch):
        mask = self.class_mask(labels, batch) if labels.numel() else None
        return {"loss_cls": sigmoid_ce_loss(scores, labels, mask, batch.chunk, batch.num_chunks,
                                            batch.weights)}

    def probabilities(self, scores):
        return torch.sigmoid(scores.float())


@register_loss("fed_loss", keys=("MODEL.LONGTAIL.SIGMOID_PRIOR_PROB",
                                 "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES",
                                 "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER"))
class FederatedLoss(SigmoidCE):
    """Federated sigmoid CE (module docstring), detectron2's ``USE_FED_LOSS``."""

    def __init__(self, num_classes: int, image_counts, num_fed_classes: int = 50,
                 power: float = 0.5, prior_prob: float = 0.0):
        super().__init__(num_classes, prior_prob)
        if len(image_counts) != num_classes:
            raise ValueError(f"the federated loss has image counts of {len(image_counts)} classes "
                             f"but MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}.")
        if num_fed_classes > num_classes:
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES={num_fed_classes} exceeds the "
                f"{num_classes} classes (detectron2's sampler would crash); set it to at most "
                f"{num_classes}.")
        self.num_fed_classes = num_fed_classes
        self.register_buffer("fed_loss_cls_weights", fed_loss_class_weights(image_counts, power))

    @classmethod
    def from_config(cls, cfg, num_classes):
        head = cfg.MODEL.ROI_BOX_HEAD
        counts = train_metadata(cfg, IMAGE_COUNT, "per-class training image counts",
                                "MODEL.LONGTAIL.CLS_LOSS='fed_loss'")
        return cls(num_classes, counts, head.FED_LOSS_NUM_CLASSES,
                   head.FED_LOSS_FREQ_WEIGHT_POWER, cfg.MODEL.LONGTAIL.SIGMOID_PRIOR_PROB)

    def class_mask(self, labels, batch):
        generator = torch.Generator(device=labels.device)
        # independent per iteration and process, reproducible for a seed, stateless on resume
        generator.manual_seed((batch.seed * 1_000_003 + batch.iteration) * 4099 + comm.get_rank())
        return federated_class_mask(labels, batch.chunk, batch.num_chunks,
                                    self.fed_loss_cls_weights, self.num_fed_classes, generator)
