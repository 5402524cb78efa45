"""The long-tail box predictor: detectron2's ``FastRCNNOutputLayers`` whose classification loss
(``MODEL.LONGTAIL.CLS_LOSS``, :mod:`longtail.cls_losses`) and classifier layer
(``MODEL.LONGTAIL.CLS_LAYER``, :mod:`longtail.layers`) are registered parts, plus object-memory rows.

This module knows no method: the loss says how many logits the classifier has (``C + 1``; BAGS
``C + 2 + G``), computes the classification loss, turns logits into the ``[N, C + 1]``
probabilities inference uses and into the scores of the accuracy metrics; the layer registry
builds ``cls_score``. Conventions as in detectron2: foreground classes ``0..C-1``, background
``C``; ``forward`` returns ``(scores [N, K], deltas [N, 4C])`` and ``predict_probs`` always
``[N, C + 1]`` probabilities, so detectron2's ``fast_rcnn_inference`` is used unchanged.

Losses and memory rows. ``losses(predictions, proposals, memory_rows)`` takes the predictions of
the ``R`` real RoIs followed by those of ``M`` memory rows (:class:`longtail.memory.MemoryRows`,
appended by :class:`longtail.roi_heads.LongTailROIHeads`). Memory rows are ordinary rows of the
classification and box-regression losses (weight 1, stored labels and box targets) and count in
both normalisers; rows flagged invalid (MFS draws of an empty class) count nowhere. Every loss is
normalised per VGPU chunk (:mod:`longtail.vgpu`, ``MODEL.LONGTAIL.IMS_PER_VGPU``) and averaged
over chunks. Per-proposal fields read: ``gt_classes``, ``proposal_boxes``, ``gt_boxes`` and
``gt_inds`` (index of the matched gt within its image, written by
:class:`longtail.roi_heads.LongTailROIHeads`; LOCE's statistics use it).

Checkpoints written before the losses owned their state (``box_predictor.mean_score.*``,
``box_predictor.bags_*``) load into the new names (``box_predictor.cls_loss.*``).
"""
import logging
from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.structures import Instances
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, smooth_l1_loss

from . import vgpu
from .cls_losses import ClassificationLoss, LossBatch, build_cls_loss
from .datasets import IMAGE_COUNT, train_metadata
from .equilibrium import chunk_mean
from .layers import build_cls_layer
from .memory import MemoryRows
from .norcal import NorCal

__all__ = [
    "LongTailFastRCNNOutputLayers",
    "build_calibration",
    "without_upstream_loss",
]

logger = logging.getLogger(__name__)


def without_upstream_loss(cfg):
    """``cfg`` with detectron2 main's own loss switches off, for ``FastRCNNOutputLayers``'s
    ``from_config`` (this predictor implements them through its own loss,
    :func:`longtail.cls_losses.resolve_cls_loss`; upstream's would look for its own metadata)."""
    head = cfg.MODEL.ROI_BOX_HEAD
    if not (head.get("USE_SIGMOID_CE", False) or head.get("USE_FED_LOSS", False)):
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = False
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = False
    return cfg


def build_calibration(cfg, cls_loss: ClassificationLoss) -> Optional[NorCal]:
    """NorCal (``TEST.CALIBRATION.*``, :mod:`longtail.norcal`) for this loss, or None when
    ``GAMMA`` is 0. Refuses options that could not take effect."""
    cal = cfg.TEST.CALIBRATION
    if cal.GAMMA == 0:
        changed = [f"{k} {cal[k]!r}" for k, d in (("METHOD", "gamma"), ("WITH", "exps"),
                                                   ("RENORM", True), ("ALLOW_NON_SOFTMAX", False))
                   if cal[k] != d]
        if changed:
            raise ValueError(
                f"TEST.CALIBRATION.{', '.join(changed)} take effect only with NorCal on: set "
                "TEST.CALIBRATION.GAMMA > 0 (tools/calibrate.py chooses one), or leave them at "
                "their defaults.")
        return None
    if not cls_loss.softmax_logits and not cal.ALLOW_NON_SOFTMAX:
        raise ValueError(
            f"TEST.CALIBRATION.GAMMA {cal.GAMMA} (NorCal) is defined for softmax classifiers; the "
            f"{cls_loss.name!r} loss's scores are not a softmax of its logits. Set "
            "TEST.CALIBRATION.ALLOW_NON_SOFTMAX True to rescale its [N, C + 1] scores anyway "
            "(the 'probs' form, an extension), or GAMMA 0.")
    if not cls_loss.softmax_logits and cal.WITH != "probs":
        raise ValueError(
            f"TEST.CALIBRATION.WITH {cal.WITH!r} needs softmax logits; the {cls_loss.name!r} "
            "loss's scores are calibrated in the 'probs' form only (set WITH 'probs').")
    counts = train_metadata(cfg, IMAGE_COUNT, "per-class training image counts",
                            "TEST.CALIBRATION.GAMMA > 0 (NorCal)")
    if len(counts) != cls_loss.num_classes:
        raise ValueError(f"NorCal: the training set has image counts of {len(counts)} classes, "
                         f"the model {cls_loss.num_classes} (MODEL.ROI_HEADS.NUM_CLASSES).")
    calibration = NorCal(counts, cal.GAMMA, cal.METHOD, cal.WITH, cal.RENORM,
                         softmax_logits=cls_loss.softmax_logits)
    logger.info("NorCal calibration at inference: %s", calibration.extra_repr())
    return calibration


class LongTailFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor with a registered classification loss and classifier layer (module
    docstring)."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        cls_loss: ClassificationLoss,
        cls_layer_builder=None,
        ims_per_vgpu: int = 0,
        seed: int = 0,
        calibration: Optional[NorCal] = None,
        **kwargs,
    ):
        """
        Args:
            cls_loss: the classification loss (:mod:`longtail.cls_losses`); it says how many
                logits the classifier needs.
            cls_layer_builder: ``(default nn.Linear, out_features) -> nn.Module``, the classifier
                layer (:func:`longtail.layers.build_cls_layer`); None keeps detectron2's linear
                layer (``C + 1`` outputs only).
            ims_per_vgpu: images per loss chunk (0: the whole process batch is one chunk).
            seed: base seed of the losses' per-iteration random draws.
            calibration: NorCal applied to the probabilities at inference, or None.
            kwargs: arguments of ``FastRCNNOutputLayers``.
        """
        super().__init__(input_shape, **kwargs)
        self.cls_loss = cls_loss
        self.ims_per_vgpu = ims_per_vgpu
        self.seed = seed
        default = self.cls_score
        out_features = cls_loss.num_logits()
        if cls_layer_builder is not None:
            self.cls_score = cls_layer_builder(default, out_features)
        elif out_features != default.out_features:
            raise ValueError(f"the {cls_loss.name!r} loss needs {out_features} logits; pass a "
                             "cls_layer_builder")
        cls_loss.init_classifier(self.cls_score)
        self.calibration = calibration
        # checkpoints written before the losses owned their state
        self._register_load_state_dict_pre_hook(_upgrade_loss_state)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(without_upstream_loss(cfg), input_shape)
        cls_loss = build_cls_loss(cfg, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        ret.update(
            cls_loss=cls_loss,
            calibration=build_calibration(cfg, cls_loss),
            cls_layer_builder=lambda default, out: build_cls_layer(cfg, default, out),
            ims_per_vgpu=cfg.MODEL.LONGTAIL.IMS_PER_VGPU,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
        )
        return ret

    # ------------------------------------------------------------------------------------------
    def num_chunks(self, num_images: int) -> int:
        """Number of VGPU chunks of a batch of ``num_images`` images."""
        return vgpu.num_chunks(num_images, self.ims_per_vgpu)

    def chunk_index(self, proposals: List[Instances]) -> torch.Tensor:
        """[R] VGPU chunk of every real RoI (image ``i`` -> chunk ``i // IMS_PER_VGPU``)."""
        device = proposals[0].proposal_boxes.tensor.device
        return vgpu.chunk_of_rows([len(p) for p in proposals], self.ims_per_vgpu, device)

    def _storage_iter(self) -> int:
        try:
            return get_event_storage().iter
        except AssertionError:  # outside a training loop (e.g. unit tests)
            return 0

    def box_regression_loss(
        self,
        proposal_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        deltas: torch.Tensor,
        labels: torch.Tensor,
        chunk: torch.Tensor,
        num_chunks: int,
        weights: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        detectron2's class-specific box loss (smooth L1 or GIoU) summed over foreground rows and
        normalised by the chunk's number of rows (all rows, as detectron2 does), then averaged
        over chunks. With one chunk and no weights this equals ``FastRCNNOutputLayers.box_reg_loss``.
        """
        box_dim = proposal_boxes.shape[1]
        fg = (labels >= 0) & (labels < self.num_classes)
        if weights is not None:
            fg = fg & (weights > 0)
        if deltas.shape[1] == box_dim:  # class-agnostic
            fg_deltas = deltas
        else:
            cls = labels.clamp(0, self.num_classes - 1)
            fg_deltas = deltas.view(-1, self.num_classes, box_dim)[
                torch.arange(labels.shape[0], device=labels.device), cls
            ]
        # rows outside the loss (background, ignored memory draws) get a unit box as proposal
        # and target, so the transforms stay finite; they are masked out below
        unit = proposal_boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        proposal_boxes = torch.where(fg[:, None], proposal_boxes, unit)
        gt = torch.where(fg[:, None], gt_boxes, unit)
        if self.box_reg_loss_type == "smooth_l1":
            target = self.box2box_transform.get_deltas(proposal_boxes, gt)
            per_row = smooth_l1_loss(fg_deltas, target, self.smooth_l1_beta, reduction="none").sum(1)
        elif self.box_reg_loss_type == "giou":
            pred = self.box2box_transform.apply_deltas(fg_deltas, proposal_boxes)
            per_row = giou_loss(pred, gt, reduction="none")
        else:
            raise ValueError(
                f"MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE={self.box_reg_loss_type!r} is not supported "
                "by the long-tail predictor; use 'smooth_l1' or 'giou'."
            )
        rows = torch.ones_like(per_row) if weights is None else weights
        return chunk_mean(per_row, chunk, num_chunks, fg.to(per_row.dtype), rows)

    def _log_accuracy(self, scores, labels, weights):
        """detectron2's fast_rcnn/{cls_accuracy, fg_cls_accuracy, false_negative}, weighted."""
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        if labels.numel() == 0:
            return
        with torch.no_grad():
            pred = scores.argmax(dim=1)
            bg = scores.shape[1] - 1
            w = weights if weights is not None else torch.ones_like(labels, dtype=torch.float32)
            fg = ((labels >= 0) & (labels < bg)).float() * w
            stats = torch.stack([
                w.sum(), ((pred == labels).float() * w).sum(), fg.sum(),
                ((pred == labels).float() * fg).sum(), ((pred == bg).float() * fg).sum(),
            ]).tolist()
        total, correct, num_fg, fg_correct, fg_bg = stats
        if total > 0:
            storage.put_scalar("fast_rcnn/cls_accuracy", correct / total)
        if num_fg > 0:
            storage.put_scalar("fast_rcnn/fg_cls_accuracy", fg_correct / num_fg)
            storage.put_scalar("fast_rcnn/false_negative", fg_bg / num_fg)

    def losses(self, predictions, proposals, memory_rows: Optional[MemoryRows] = None):
        """
        Args:
            predictions: ``(scores [R + M, K], deltas [R + M, 4C])`` of the real RoIs followed by
                the memory rows.
            proposals (list[Instances]): the R real RoIs, per image, with ``gt_classes``,
                ``proposal_boxes``, ``gt_boxes`` (and ``gt_inds`` for EBL).
            memory_rows (MemoryRows or None): the M memory rows.
        """
        scores, proposal_deltas = predictions
        device = scores.device
        if len(proposals):
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
            chunk = self.chunk_index(proposals)
        else:
            gt_classes = torch.empty(0, dtype=torch.long, device=device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=device)
            chunk = torch.empty(0, dtype=torch.long, device=device)
        num_chunks = self.num_chunks(len(proposals))
        weights = None
        if memory_rows is not None:
            gt_classes = cat([gt_classes, memory_rows.labels.to(device)])
            proposal_boxes = cat([proposal_boxes, memory_rows.proposal_boxes.to(proposal_boxes)])
            gt_boxes = cat([gt_boxes, memory_rows.gt_boxes.to(gt_boxes)])
            chunk = cat([chunk, memory_rows.chunk.to(device)])
            if memory_rows.valid is not None:
                weights = cat([
                    torch.ones(len(gt_classes) - len(memory_rows), device=device),
                    memory_rows.weights().to(device),
                ])
        losses = self.cls_loss(scores, gt_classes, LossBatch(
            proposals, chunk, num_chunks, memory_rows, weights, self.seed, self._storage_iter()))
        self._log_accuracy(self.cls_loss.accuracy_logits(scores), gt_classes, weights)
        losses["loss_box_reg"] = self.box_regression_loss(
            proposal_boxes, gt_boxes, proposal_deltas, gt_classes, chunk, num_chunks, weights
        )
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def predict_probs(self, predictions, proposals):
        """[N_i, C + 1] probabilities per image, as the loss turns its logits into them (then
        NorCal-calibrated when ``TEST.CALIBRATION.GAMMA > 0``)."""
        scores, _ = predictions
        num_inst_per_image = [len(p) for p in proposals]
        if self.calibration is None:
            probs = self.cls_loss.probabilities(scores)
        elif self.cls_loss.softmax_logits:
            probs = self.calibration(scores)
        else:
            probs = self.calibration(self.cls_loss.probabilities(scores))
        return probs.split(num_inst_per_image, dim=0)


# checkpoint keys of the losses' state before it moved into the loss modules -> now
_OLD_LOSS_KEYS = (("mean_score.", "cls_loss.mean_score."), ("bags_", "cls_loss."))


def _upgrade_loss_state(state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        for old, new in _OLD_LOSS_KEYS:
            if rest.startswith(old):
                state_dict[prefix + new + rest[len(old):]] = state_dict.pop(key)
                break
