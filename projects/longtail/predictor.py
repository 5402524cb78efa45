"""The long-tail box predictor: detectron2's ``FastRCNNOutputLayers`` with a choice of
classification loss (``MODEL.LONGTAIL.CLS_LOSS``):

* ``"softmax_ce"``: detectron2's softmax cross-entropy (with per-VGPU normalisers);
* ``"ebl"``: LOCE's Equilibrium Loss, CE on ``z + log m`` with the running mean scores ``m``
  (:class:`longtail.equilibrium.MeanScoreTracker`, a checkpointed buffer), updated from this
  batch *before* the loss; inference is plain softmax;
* ``"bags"``: BAGS's balanced group softmax: ``cls_score`` has ``C + 2 + G`` outputs, the loss is
  the sum of group softmax CEs (:func:`longtail.bags.bags_loss`) and inference merges the groups
  into ``[N, C + 1]`` probabilities (:func:`longtail.bags.bags_merge`; not renormalised).

Conventions as in detectron2: foreground classes ``0..C-1``, background ``C``; ``forward``
returns ``(scores [N, K], deltas [N, 4C])`` with ``K = C + 1`` (``C + 2 + G`` for BAGS) and
``predict_probs`` always returns ``[N, C + 1]`` probabilities, so detectron2's
``fast_rcnn_inference`` is used unchanged.

The math lives in :mod:`longtail.equilibrium` and :mod:`longtail.bags`; this module wires it to
detectron2's proposals. Per-proposal fields read: ``gt_classes``, ``proposal_boxes``,
``gt_boxes`` and, for EBL, ``gt_inds`` (index of the matched gt within its image, written by
:class:`longtail.roi_heads.LongTailROIHeads`).
"""
import dataclasses
import logging
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F

from . import bags
from .equilibrium import MeanScoreTracker, equilibrium_loss, instance_score_entries

__all__ = ["LongTailFastRCNNOutputLayers", "CLS_LOSSES", "chunk_index_of_rows", "dense_group_ids"]

logger = logging.getLogger(__name__)

CLS_LOSSES = ("softmax_ce", "ebl", "bags")


def chunk_index_of_rows(rows_per_image: List[int], ims_per_chunk: int, device) -> torch.Tensor:
    """[R] chunk id of every row; images ``i`` belong to chunk ``i // ims_per_chunk``."""
    parts = [
        torch.full((n,), i // ims_per_chunk, dtype=torch.long, device=device)
        for i, n in enumerate(rows_per_image)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


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


def _chunked_cross_entropy(logits, labels, chunk_index, num_chunks):
    """Softmax CE normalised per chunk by its row count, averaged over chunks."""
    if num_chunks == 1:
        if labels.numel() == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels, reduction="mean")
    per_row = F.cross_entropy(logits.float(), labels, reduction="none")
    rows = torch.zeros(num_chunks, device=logits.device).index_add_(
        0, chunk_index, torch.ones_like(per_row)
    )
    sums = torch.zeros(num_chunks, device=logits.device).index_add_(0, chunk_index, per_row)
    return (sums / rows.clamp(min=1)).mean()


def _train_metadata(cfg, key: str, what: str):
    names = cfg.DATASETS.TRAIN
    values = [MetadataCatalog.get(n).get(key, None) for n in names]
    missing = [n for n, v in zip(names, values) if v is None]
    if missing or not names:
        raise ValueError(
            f"MODEL.LONGTAIL.CLS_LOSS={cfg.MODEL.LONGTAIL.CLS_LOSS!r} needs {what} (metadata "
            f"'{key}') of the training dataset(s) DATASETS.TRAIN={tuple(names)}; missing for "
            f"{missing or names}. LVIS and longtail_synth datasets get it from "
            "longtail.datasets.prepare_datasets (run by the Trainer); for another dataset set "
            f"MetadataCatalog.get(name).{key} = [...] (one entry per class) before building."
        )
    if len(values) > 1 and any(v != values[0] for v in values[1:]):
        raise ValueError(f"DATASETS.TRAIN {tuple(names)} disagree on metadata '{key}'.")
    return values[0]


class LongTailFastRCNNOutputLayers(FastRCNNOutputLayers):
    """Box predictor with a selectable long-tail classification loss (module docstring)."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        cls_loss: str = "softmax_ce",
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
        self.cls_loss = cls_loss
        self.ims_per_vgpu = ims_per_vgpu
        self.seed = seed
        self.log_period = log_period
        self.class_frequency = list(class_frequency) if class_frequency is not None else None
        if cls_loss == "ebl":
            self.mean_score = MeanScoreTracker(
                self.num_classes, loce_alpha, loce_bg_score, loce_init_score, self.class_frequency
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
            self.cls_score = nn.Linear(self.cls_score.in_features, tables.num_logits)
            bags.bags_classifier_init_(self.cls_score, bags_init_std)
            logger.info(
                "BAGS: %d foreground groups of sizes %s (bins %s), %d logits",
                tables.num_groups, tables.group_sizes.tolist(), list(bags_bin_edges),
                tables.num_logits,
            )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        lt = cfg.MODEL.LONGTAIL
        ret.update(
            cls_loss=lt.CLS_LOSS,
            ims_per_vgpu=lt.IMS_PER_VGPU,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
            log_period=lt.LOG_PERIOD,
        )
        if lt.CLS_LOSS == "ebl":
            ret.update(
                class_frequency=_train_metadata(cfg, "class_frequency", "the r/c/f frequency"),
                loce_alpha=cfg.MODEL.LOCE.ALPHA,
                loce_bg_score=cfg.MODEL.LOCE.BG_SCORE,
                loce_init_score=cfg.MODEL.LOCE.INIT_SCORE,
            )
        if lt.CLS_LOSS == "bags":
            ret.update(
                bags_instance_counts=_train_metadata(
                    cfg, "class_instance_count", "per-class training instance counts"
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

    def _chunks(self, proposals):
        if self.ims_per_vgpu <= 0 or len(proposals) <= self.ims_per_vgpu:
            return None, 1
        rows = [len(p) for p in proposals]
        device = proposals[0].proposal_boxes.tensor.device
        num_chunks = (len(proposals) + self.ims_per_vgpu - 1) // self.ims_per_vgpu
        return chunk_index_of_rows(rows, self.ims_per_vgpu, device), num_chunks

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

    def classification_loss(self, scores, gt_classes, proposals) -> Dict[str, torch.Tensor]:
        """The configured classification loss (and, for EBL, the mean-score update)."""
        chunk_index, num_chunks = self._chunks(proposals)
        if self.cls_loss == "softmax_ce":
            return {"loss_cls": _chunked_cross_entropy(scores, gt_classes, chunk_index, num_chunks)}
        if self.cls_loss == "ebl":
            with torch.no_grad():
                probs = F.softmax(scores.detach().float(), dim=1)
                ids = self._instance_ids(proposals, gt_classes)
                sums, counts = instance_score_entries(probs, gt_classes, ids, ids.numel())
                self.mean_score.update(sums, counts)  # before the loss (LOCE order)
            self._log_mean_scores()
            loss = equilibrium_loss(
                scores, gt_classes, self.mean_score.mean_scores, chunk_index, num_chunks
            )
            return {"loss_cls": loss}
        # bags
        it = self._storage_iter()
        generator = torch.Generator(device=scores.device)
        # Independent per iteration and per process, reproducible for a seed, stateless on resume.
        generator.manual_seed((self.seed * 1_000_003 + it) * 4099 + comm.get_rank())
        loss = bags.bags_loss(
            scores, gt_classes, self.bags_tables(), self.bags_others_ratio, generator,
            chunk_index, num_chunks,
        )
        return {"loss_cls": loss}

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

    def losses(self, predictions, proposals):
        scores, proposal_deltas = predictions
        gt_classes = (
            cat([p.gt_classes for p in proposals], dim=0)
            if len(proposals)
            else torch.empty(0, dtype=torch.long, device=scores.device)
        )
        if len(proposals):
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        losses = self.classification_loss(scores, gt_classes, proposals)
        _log_classification_stats(
            self._merged(scores) if self.cls_loss == "bags" else scores, gt_classes
        )
        losses["loss_box_reg"] = self.box_reg_loss(
            proposal_boxes, gt_boxes, proposal_deltas, gt_classes
        )
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _merged(self, scores):
        return bags.bags_merge(scores.detach(), self.bags_tables())

    def predict_probs(self, predictions, proposals):
        if self.cls_loss != "bags":
            scores, _ = predictions
            num_inst_per_image = [len(p) for p in proposals]
            return F.softmax(scores, dim=-1).split(num_inst_per_image, dim=0)
        scores, _ = predictions
        probs = bags.bags_merge(scores, self.bags_tables())
        return probs.split([len(p) for p in proposals], dim=0)
