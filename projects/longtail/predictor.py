"""The long-tail box predictor: detectron2's ``FastRCNNOutputLayers`` with a choice of
classification loss (``MODEL.LONGTAIL.CLS_LOSS``) and classifier layer
(``MODEL.LONGTAIL.CLS_LAYER``), and support for object-memory rows:

* ``"softmax_ce"``: detectron2's softmax cross-entropy (with per-VGPU normalisers);
* ``"ebl"``: LOCE's Equilibrium Loss, CE on ``z + log m`` with the running mean scores ``m``
  (:class:`longtail.equilibrium.MeanScoreTracker`, a checkpointed buffer), updated from this
  batch *before* the loss; inference is plain softmax;
* ``"bags"``: BAGS's balanced group softmax: ``cls_score`` has ``C + 2 + G`` outputs, the loss is
  the sum of group softmax CEs (:func:`longtail.bags.bags_loss`) and inference merges the groups
  into ``[N, C + 1]`` probabilities (:func:`longtail.bags.bags_merge`; not renormalised).
* classifier layer ``"linear"`` (detectron2's) or ``"cosine"`` (RIO's scaled cosine classifier,
  :class:`longtail.layers.CosineClassifier`).

Conventions as in detectron2: foreground classes ``0..C-1``, background ``C``; ``forward``
returns ``(scores [N, K], deltas [N, 4C])`` with ``K = C + 1`` (``C + 2 + G`` for BAGS) and
``predict_probs`` always returns ``[N, C + 1]`` probabilities, so detectron2's
``fast_rcnn_inference`` is used unchanged.

Losses and memory rows. ``losses(predictions, proposals, memory_rows)`` takes the predictions of
the ``R`` real RoIs followed by those of ``M`` memory rows (:class:`longtail.memory.MemoryRows`,
appended by :class:`longtail.roi_heads.LongTailROIHeads`). Memory rows are ordinary rows of the
classification and box-regression losses (weight 1, stored labels and box targets) and count in
both normalisers; rows flagged invalid (MFS draws of an empty class) count nowhere. Every loss is
normalised per VGPU chunk (``MODEL.LONGTAIL.IMS_PER_VGPU``) and averaged over chunks.

The math lives in :mod:`longtail.equilibrium` and :mod:`longtail.bags`; this module wires it to
detectron2's proposals. Per-proposal fields read: ``gt_classes``, ``proposal_boxes``,
``gt_boxes`` and, for EBL, ``gt_inds`` (index of the matched gt within its image, written by
:class:`longtail.roi_heads.LongTailROIHeads`).
"""
import dataclasses
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.structures import Instances
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from fvcore.nn import giou_loss, smooth_l1_loss
from torch import nn
from torch.nn import functional as F

from . import bags
from .datasets import FREQUENCY, INSTANCE_COUNT, train_metadata
from .equilibrium import (
    MeanScoreTracker,
    chunk_mean,
    equilibrium_loss,
    instance_score_entries,
    memory_score_entries,
)
from .layers import CosineClassifier
from .memory import MemoryRows

__all__ = [
    "LongTailFastRCNNOutputLayers",
    "CLS_LOSSES",
    "CLS_LAYERS",
    "chunk_index_of_rows",
    "dense_group_ids",
    "refuse_upstream_loss_keys",
]

logger = logging.getLogger(__name__)

CLS_LOSSES = ("softmax_ce", "ebl", "bags")
CLS_LAYERS = ("linear", "cosine")


def chunk_index_of_rows(rows_per_image: List[int], ims_per_chunk: int, device) -> torch.Tensor:
    """[R] chunk id of every row; images ``i`` belong to chunk ``i // ims_per_chunk``."""
    parts = [
        torch.full((n,), i // ims_per_chunk, dtype=torch.long, device=device)
        for i, n in enumerate(rows_per_image)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def num_chunks_of(num_images: int, ims_per_chunk: int) -> int:
    """Number of VGPU chunks of a batch of ``num_images`` (1 when chunking is off)."""
    if ims_per_chunk <= 0 or num_images <= ims_per_chunk:
        return 1
    return (num_images + ims_per_chunk - 1) // ims_per_chunk


def dense_group_ids(keys: torch.Tensor) -> torch.Tensor:
    """
    Map integer keys [R] to dense ids in ``0..R-1`` (equal keys -> equal ids), keeping negative
    keys as -1. Sort-based, so no host synchronisation (unlike ``torch.unique``).
    """
    r = keys.numel()
    if r == 0:
        return keys.clone()
    sorted_keys, order = keys.sort()
    starts = torch.ones_like(sorted_keys, dtype=torch.long)
    starts[1:] = (sorted_keys[1:] != sorted_keys[:-1]).long()
    dense_sorted = starts.cumsum(0) - 1
    dense = torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)
    return torch.where(keys >= 0, dense, torch.full_like(dense, -1))


# detectron2 main's own classification-loss switches of FastRCNNOutputLayers (absent in v0.6)
UPSTREAM_LOSS_KEYS = ("USE_SIGMOID_CE", "USE_FED_LOSS")


def refuse_upstream_loss_keys(cfg) -> None:
    """
    ``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE`` / ``USE_FED_LOSS`` (detectron2 main) switch
    ``FastRCNNOutputLayers`` to sigmoid CE / federated loss; this predictor replaces its loss and
    its probabilities, so they could not take effect: refuse them, naming the way out.
    """
    head = cfg.MODEL.ROI_BOX_HEAD
    on = [k for k in UPSTREAM_LOSS_KEYS if head.get(k, False)]
    if on:
        raise ValueError(
            f"MODEL.ROI_BOX_HEAD.{' / '.join(on)} True is detectron2's own loss switch, which "
            "the long-tail box predictor (MODEL.ROI_HEADS.NAME 'LongTailROIHeads') does not "
            f"implement: its loss is MODEL.LONGTAIL.CLS_LOSS ({cfg.MODEL.LONGTAIL.CLS_LOSS!r}). "
            f"Set {', '.join('MODEL.ROI_BOX_HEAD.' + k for k in on)} False, or use "
            "detectron2's federated loss with MODEL.ROI_HEADS.NAME 'StandardROIHeads' "
            "(detectron2 main only)."
        )


class LongTailFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor with a selectable long-tail classification loss (module docstring)."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        cls_loss: str = "softmax_ce",
        cls_layer: str = "linear",
        cosine_scale: float = 48.0,
        cosine_eps: float = 1e-5,
        ims_per_vgpu: int = 0,
        class_frequency=None,
        loce_alpha: float = 0.9,
        loce_bg_score: float = 0.01,
        loce_init_score: float = 0.01,
        bags_instance_counts=None,
        bags_bin_edges=(10, 100, 1000),
        bags_others_ratio: float = 8.0,
        bags_init_std: float = 0.01,
        seed: int = 0,
        log_period: int = 20,
        **kwargs,
    ):
        """
        Args:
            cls_loss: one of :data:`CLS_LOSSES`.
            cls_layer: one of :data:`CLS_LAYERS`.
            cosine_scale, cosine_eps: scale ``s`` and feature-norm eps of the cosine layer.
            ims_per_vgpu: images per loss chunk (0: the whole process batch is one chunk).
            class_frequency: [C] "r"/"c"/"f", for logging the r/c/f means of EBL's mean scores.
            loce_*: EBL hyper-parameters (MODEL.LOCE.*).
            bags_instance_counts: [C] training instance counts defining the BAGS groups.
            bags_*: BAGS hyper-parameters (MODEL.BAGS.*).
            seed: base seed of the per-iteration BAGS "others" draws.
            log_period: iterations between logging the EBL mean-score group means.
            kwargs: arguments of ``FastRCNNOutputLayers``.
        """
        super().__init__(input_shape, **kwargs)
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"MODEL.LONGTAIL.CLS_LOSS={cls_loss!r}; choose one of {CLS_LOSSES}.")
        if cls_layer not in CLS_LAYERS:
            raise ValueError(f"MODEL.LONGTAIL.CLS_LAYER={cls_layer!r}; choose one of {CLS_LAYERS}.")
        self.cls_loss = cls_loss
        self.cls_layer = cls_layer
        self.ims_per_vgpu = ims_per_vgpu
        self.seed = seed
        self.log_period = log_period
        self.class_frequency = list(class_frequency) if class_frequency is not None else None
        in_features = self.cls_score.in_features
        if cls_loss == "ebl":
            self.mean_score = MeanScoreTracker(
                self.num_classes, loce_alpha, loce_bg_score, loce_init_score, self.class_frequency
            )
            logger.info(
                "Long-tail state: LOCE mean scores, %d floats (%.1f KiB), in the checkpoint",
                self.num_classes + 1, (self.num_classes + 1) * 4 / 1024,
            )
        if cls_loss == "bags":
            tables = bags.build_group_tables(bags_instance_counts, bags_bin_edges)
            if tables.num_classes != self.num_classes:
                raise ValueError(
                    f"BAGS instance counts cover {tables.num_classes} classes but "
                    f"MODEL.ROI_HEADS.NUM_CLASSES is {self.num_classes}."
                )
            self._bags_layout = tables
            for name, value in tables.tensors().items():
                self.register_buffer(f"bags_{name}", value)
            self.bags_others_ratio = bags_others_ratio
            self.cls_score = nn.Linear(in_features, tables.num_logits)
            bags.bags_classifier_init_(self.cls_score, bags_init_std)
            logger.info(
                "BAGS: %d foreground groups of sizes %s (bins %s), %d logits",
                tables.num_groups, tables.group_sizes.tolist(), list(bags_bin_edges),
                tables.num_logits,
            )
        if cls_layer == "cosine":
            out = self.cls_score.out_features
            self.cls_score = CosineClassifier(in_features, out, cosine_scale, cosine_eps)

    @classmethod
    def from_config(cls, cfg, input_shape):
        refuse_upstream_loss_keys(cfg)
        ret = super().from_config(cfg, input_shape)
        lt = cfg.MODEL.LONGTAIL
        ret.update(
            cls_loss=lt.CLS_LOSS,
            cls_layer=lt.CLS_LAYER,
            cosine_scale=lt.COSINE_SCALE,
            cosine_eps=lt.COSINE_EPS,
            ims_per_vgpu=lt.IMS_PER_VGPU,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
            log_period=lt.LOG_PERIOD,
        )
        needed_by = f"MODEL.LONGTAIL.CLS_LOSS={lt.CLS_LOSS!r}"
        if lt.CLS_LOSS == "ebl":
            ret.update(
                class_frequency=train_metadata(
                    cfg, FREQUENCY, "the r/c/f frequency", needed_by
                ),
                loce_alpha=cfg.MODEL.LOCE.ALPHA,
                loce_bg_score=cfg.MODEL.LOCE.BG_SCORE,
                loce_init_score=cfg.MODEL.LOCE.INIT_SCORE,
            )
        if lt.CLS_LOSS == "bags":
            ret.update(
                bags_instance_counts=train_metadata(
                    cfg, INSTANCE_COUNT, "per-class training instance counts", needed_by
                ),
                bags_bin_edges=tuple(cfg.MODEL.BAGS.BIN_EDGES),
                bags_others_ratio=cfg.MODEL.BAGS.OTHERS_SAMPLE_RATIO,
                bags_init_std=cfg.MODEL.BAGS.CLS_INIT_STD,
            )
        return ret

    # ------------------------------------------------------------------------------------------
    def bags_tables(self) -> bags.BagsTables:
        """The BAGS tables, as the (device-following, checkpointed) buffers hold them."""
        return dataclasses.replace(
            self._bags_layout,
            **{k: getattr(self, f"bags_{k}") for k in self._bags_layout.tensors()},
        )

    def num_chunks(self, num_images: int) -> int:
        """Number of VGPU chunks of a batch of ``num_images`` images."""
        return num_chunks_of(num_images, self.ims_per_vgpu)

    def chunk_index(self, proposals: List[Instances]) -> torch.Tensor:
        """[R] VGPU chunk of every real RoI (image ``i`` -> chunk ``i // IMS_PER_VGPU``)."""
        device = proposals[0].proposal_boxes.tensor.device
        per_chunk = self.ims_per_vgpu if self.num_chunks(len(proposals)) > 1 else len(proposals)
        return chunk_index_of_rows([len(p) for p in proposals], max(per_chunk, 1), device)

    def _instance_ids(self, proposals, gt_classes) -> torch.Tensor:
        """[R] dense id of the gt instance each foreground RoI is matched to; -1 otherwise."""
        device = gt_classes.device
        keys = []
        for i, p in enumerate(proposals):
            inds = p.gt_inds if p.has("gt_inds") else torch.zeros(len(p), dtype=torch.long, device=device)
            keys.append(inds.long() + (i << 32))
        keys = cat(keys, dim=0) if keys else torch.zeros(0, dtype=torch.long, device=device)
        keys = torch.where(gt_classes < self.num_classes, keys, torch.full_like(keys, -1))
        return dense_group_ids(keys)

    def _storage_iter(self) -> int:
        try:
            return get_event_storage().iter
        except AssertionError:  # outside a training loop (e.g. unit tests)
            return 0

    def classification_loss(
        self,
        scores: torch.Tensor,
        labels: torch.Tensor,
        proposals,
        chunk: torch.Tensor,
        num_chunks: int,
        memory_rows: Optional[MemoryRows] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        The configured classification loss over real rows then memory rows (and, for EBL, the
        mean-score update from both, before the loss).

        Args:
            scores (Tensor): [R + M, K] logits.
            labels (Tensor): [R + M] labels (``0..C``).
            proposals (list[Instances]): the R real RoIs, per image.
            chunk (Tensor): [R + M] VGPU chunk of every row.
            num_chunks (int): number of chunks.
            memory_rows (MemoryRows or None): the M memory rows.
        """
        weights = None
        num_real = labels.shape[0] - (len(memory_rows) if memory_rows is not None else 0)
        if memory_rows is not None and memory_rows.valid is not None:
            weights = cat([labels.new_ones(num_real, dtype=torch.float32), memory_rows.weights()])
        if self.cls_loss == "softmax_ce":
            per_row = F.cross_entropy(scores.float(), labels, reduction="none")
            return {"loss_cls": chunk_mean(per_row, chunk, num_chunks, weights)}
        if self.cls_loss == "ebl":
            with torch.no_grad():
                probs = F.softmax(scores.detach().float(), dim=1)
                ids = self._instance_ids(proposals, labels[:num_real])
                sums, counts = instance_score_entries(
                    probs[:num_real], labels[:num_real], ids, ids.numel()
                )
                if memory_rows is not None:
                    s2, n2 = memory_score_entries(
                        probs[num_real:], labels[num_real:], chunk[num_real:], num_chunks,
                        memory_rows.valid,
                    )
                    sums, counts = sums + s2, counts + n2
                self.mean_score.update(sums, counts)  # before the loss (LOCE order)
            self._log_mean_scores()
            loss = equilibrium_loss(
                scores, labels, self.mean_score.mean_scores, chunk, num_chunks, weights
            )
            return {"loss_cls": loss}
        # bags (memory rows, if any, are all valid: build_memory rejects MFS with BAGS)
        it = self._storage_iter()
        generator = torch.Generator(device=scores.device)
        # Independent per iteration and per process, reproducible for a seed, stateless on resume.
        generator.manual_seed((self.seed * 1_000_003 + it) * 4099 + comm.get_rank())
        loss = bags.bags_loss(
            scores, labels, self.bags_tables(), self.bags_others_ratio, generator, chunk, num_chunks,
        )
        return {"loss_cls": loss}

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

    def _log_mean_scores(self):
        if self.class_frequency is None:
            return
        try:
            storage = get_event_storage()
        except AssertionError:
            return
        if storage.iter % self.log_period == 0:
            for group, value in self.mean_score.group_means(self.class_frequency).items():
                storage.put_scalar(f"loce/mean_score_{group}", float(value), smoothing_hint=False)

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
        losses = self.classification_loss(
            scores, gt_classes, proposals, chunk, num_chunks, memory_rows
        )
        self._log_accuracy(
            self._merged(scores) if self.cls_loss == "bags" else scores.detach(), gt_classes, weights
        )
        losses["loss_box_reg"] = self.box_regression_loss(
            proposal_boxes, gt_boxes, proposal_deltas, gt_classes, chunk, num_chunks, weights
        )
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _merged(self, scores):
        return bags.bags_merge(scores.detach(), self.bags_tables())

    def predict_probs(self, predictions, proposals):
        scores, _ = predictions
        num_inst_per_image = [len(p) for p in proposals]
        if self.cls_loss != "bags":  # float32: rare-class probabilities keep their precision
            return F.softmax(scores.float(), dim=-1).split(num_inst_per_image, dim=0)
        probs = bags.bags_merge(scores.float(), self.bags_tables())
        return probs.split(num_inst_per_image, dim=0)
