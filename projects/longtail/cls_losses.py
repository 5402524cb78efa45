"""Classification losses of the long-tail box predictor, one registered class per method.

``MODEL.LONGTAIL.CLS_LOSS`` names an entry of :data:`CLS_LOSS_REGISTRY`. A loss is an
``nn.Module`` built by its ``from_config(cfg, num_classes)``; it owns its hyper-parameters and its
state (buffers, saved in checkpoints), and tells the predictor

* :meth:`ClassificationLoss.num_logits`: the classifier's output width ``K`` (``C + 1`` for a
  softmax over the classes and background; BAGS ``C + 2 + G``);
* :meth:`ClassificationLoss.init_classifier`: how a freshly built classifier layer is initialised
  (nothing: the layer's own initialisation);
* :meth:`ClassificationLoss.forward`: the loss terms of a batch (:class:`LossBatch`: the real RoIs
  followed by object-memory rows, with their VGPU chunks), computed by the pure functions of
  :mod:`longtail.equilibrium` / :mod:`longtail.bags`;
* :meth:`ClassificationLoss.probabilities`: ``[N, C + 1]`` probabilities for detectron2's
  inference (background last);
* :meth:`ClassificationLoss.accuracy_logits`: ``[N, C + 1]`` scores whose argmax is the predicted
  class, for detectron2's ``fast_rcnn/*accuracy`` metrics.

Adding a loss: a new module with a subclass decorated by ``@register_loss("<name>", keys=...)``
(``<name>`` is the config value; ``keys`` the config keys or nodes only this loss reads, refused
while another loss is selected), imported by ``longtail/__init__.py``.

Registered here: ``"softmax_ce"`` (detectron2's softmax cross-entropy, per-VGPU normalisers),
``"ebl"`` (LOCE's Equilibrium Loss) and ``"bags"`` (balanced group softmax); in their own modules:
``"seesaw"`` (:mod:`longtail.seesaw`), ``"eqlv2"`` (:mod:`longtail.eqlv2`), ``"sigmoid_ce"`` and
``"fed_loss"`` (:mod:`longtail.fed_loss`).
"""
import dataclasses
import logging
import math
from typing import Dict, List, Optional, Sequence

import torch
from detectron2.layers import cat
from detectron2.structures import Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry
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
from .memory import MemoryRows
from .registry import register_as, refuse_keys_of_unselected

__all__ = [
    "CLS_LOSS_REGISTRY",
    "ClassificationLoss",
    "LossBatch",
    "SoftmaxCE",
    "EquilibriumLoss",
    "BalancedGroupSoftmax",
    "build_cls_loss",
    "register_loss",
    "resolve_cls_loss",
    "init_prior_bias",
    "dense_group_ids",
]

logger = logging.getLogger(__name__)

CLS_LOSS_REGISTRY = Registry("LONGTAIL_CLS_LOSS")
CLS_LOSS_REGISTRY.__doc__ = """
Classification losses of the long-tail box predictor (``MODEL.LONGTAIL.CLS_LOSS``): classes
with ``name`` (the config value) and ``from_config(cfg, num_classes)``.
"""


@dataclasses.dataclass
class LossBatch:
    """
    What a classification loss may read besides the logits and labels.

    Attributes:
        proposals: the ``R`` real RoIs, per image (``gt_classes``, ``gt_inds`` of the matched gt).
        chunk: [R + M] long, VGPU chunk of every row (:mod:`longtail.vgpu`).
        num_chunks: number of chunks.
        memory_rows: the ``M`` object-memory rows after the real ones, or None.
        weights: [R + M] float row weights (0: a row that counts nowhere, e.g. an MFS draw of an
            empty class), or None (all 1).
        seed: the run's base seed (per-step random draws derive from it).
        iteration: the training iteration (0 outside training).
    """

    proposals: List[Instances]
    chunk: torch.Tensor
    num_chunks: int
    memory_rows: Optional[MemoryRows] = None
    weights: Optional[torch.Tensor] = None
    seed: int = 0
    iteration: int = 0

    @property
    def num_memory(self) -> int:
        return len(self.memory_rows) if self.memory_rows is not None else 0


def init_prior_bias(layer: nn.Module, prior_prob: float, key: str) -> None:
    """
    Set every classifier bias to ``-log((1 - pi) / pi)`` (sigmoid of the bias = ``pi``, the
    usual prior-probability initialisation of sigmoid classifiers). A layer without a bias is
    refused, naming the config ``key`` that asked for the prior.
    """
    if getattr(layer, "bias", None) is None:
        raise ValueError(
            f"{key} {prior_prob} sets the classifier bias, but the classifier layer "
            f"{type(layer).__name__} has no bias; use MODEL.LONGTAIL.CLS_LAYER 'linear' or "
            "'normed_linear'.")
    with torch.no_grad():
        layer.bias.fill_(-math.log((1 - prior_prob) / prior_prob))


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


class ClassificationLoss(nn.Module):
    """Base class and interface of a classification loss (module docstring). Subclasses set
    ``name`` and implement :meth:`forward`."""

    name = ""
    # True when :meth:`probabilities` is the softmax of the ``C + 1`` logits (NorCal applies)
    softmax_logits = True

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def num_logits(self) -> int:
        """Output width ``K`` of the classifier layer: ``C + 1`` by default."""
        return self.num_classes + 1

    def init_classifier(self, layer: nn.Module) -> None:
        """Initialise a classifier layer built for this loss (default: leave it as built)."""

    def forward(self, scores: torch.Tensor, labels: torch.Tensor,
                batch: LossBatch) -> Dict[str, torch.Tensor]:
        """
        Args:
            scores: [R + M, K] logits of the real rows then the memory rows.
            labels: [R + M] labels in ``0..C`` (background ``C``).
            batch: the rest (:class:`LossBatch`).

        Returns:
            dict of loss terms (``"loss_cls"``), each a scalar.
        """
        raise NotImplementedError

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, K] logits -> [N, C + 1] float32 probabilities (softmax by default; float32 so
        rare-class probabilities keep their precision)."""
        return F.softmax(scores.float(), dim=-1)

    def accuracy_logits(self, scores: torch.Tensor) -> torch.Tensor:
        """[N, K] logits -> [N, C + 1] detached scores whose argmax is the predicted class."""
        return scores.detach()

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> "ClassificationLoss":
        return cls(num_classes)


# detectron2 main's loss switches of FastRCNNOutputLayers -> the loss of this registry they ask for
_UPSTREAM_LOSSES = (("USE_FED_LOSS", "fed_loss"), ("USE_SIGMOID_CE", "sigmoid_ce"))


def resolve_cls_loss(cfg) -> str:
    """
    The loss to build: ``MODEL.LONGTAIL.CLS_LOSS``, or the one detectron2's own switches
    ``MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE`` / ``USE_FED_LOSS`` ask for ("sigmoid_ce" / "fed_loss")
    when ``CLS_LOSS`` is left at its default ("softmax_ce"), so an upstream config trains the same
    loss here. A switch that contradicts ``CLS_LOSS`` (e.g. ``USE_FED_LOSS True`` with "ebl"), or
    ``USE_FED_LOSS`` without ``USE_SIGMOID_CE`` (detectron2 asserts it too), is refused.
    """
    name = cfg.MODEL.LONGTAIL.CLS_LOSS
    head = cfg.MODEL.ROI_BOX_HEAD
    if head.get("USE_FED_LOSS", False) and not head.get("USE_SIGMOID_CE", False):
        raise ValueError("MODEL.ROI_BOX_HEAD.USE_FED_LOSS True needs USE_SIGMOID_CE True (as in "
                         "detectron2), or use MODEL.LONGTAIL.CLS_LOSS 'fed_loss' alone.")
    wanted = next((loss for key, loss in _UPSTREAM_LOSSES if head.get(key, False)), None)
    if wanted is None or name == wanted:
        return name
    if name == "softmax_ce":
        return wanted
    switches = [f"MODEL.ROI_BOX_HEAD.{k} True" for k, _ in _UPSTREAM_LOSSES if head.get(k, False)]
    raise ValueError(
        f"{' and '.join(switches)} ask for detectron2's {wanted!r} loss but "
        f"MODEL.LONGTAIL.CLS_LOSS is {name!r}: one classification loss only. Set those switches "
        f"False to train {name!r}, or MODEL.LONGTAIL.CLS_LOSS {wanted!r}.")


def build_cls_loss(cfg, num_classes: int) -> ClassificationLoss:
    """The loss :func:`resolve_cls_loss` names (``MODEL.LONGTAIL.CLS_LOSS``), built from
    ``cfg``. Keys that only another loss reads (``register_loss(keys=...)``), set away from
    their defaults, are refused: they could not take effect."""
    name = resolve_cls_loss(cfg)
    if name not in CLS_LOSS_REGISTRY:
        raise ValueError(f"MODEL.LONGTAIL.CLS_LOSS={name!r}; choose one of "
                         f"{sorted(k for k, _ in CLS_LOSS_REGISTRY)}.")
    refuse_keys_of_unselected(cfg, CLS_LOSS_REGISTRY, name, "MODEL.LONGTAIL.CLS_LOSS")
    return CLS_LOSS_REGISTRY.get(name).from_config(cfg, num_classes)


def register_loss(name: str, keys: Sequence[str] = ()):
    """Class decorator: register a :class:`ClassificationLoss` subclass under the config value
    ``name`` (``MODEL.LONGTAIL.CLS_LOSS``) and set its ``name``; ``keys``: the config keys / nodes
    only this loss reads (refused while another loss is selected, :func:`build_cls_loss`)."""
    return register_as(CLS_LOSS_REGISTRY, name, keys)


@register_loss("softmax_ce")
class SoftmaxCE(ClassificationLoss):
    """detectron2's softmax cross-entropy over ``C + 1`` classes, normalised per VGPU chunk."""

    def forward(self, scores, labels, batch):
        per_row = F.cross_entropy(scores.float(), labels, reduction="none")
        return {"loss_cls": chunk_mean(per_row, batch.chunk, batch.num_chunks, batch.weights)}


@register_loss("ebl", keys=("MODEL.LOCE.ALPHA", "MODEL.LOCE.BG_SCORE",
                            "MODEL.LOCE.INIT_SCORE"))
class EquilibriumLoss(ClassificationLoss):
    """
    LOCE's Equilibrium Loss: cross-entropy on ``z + log m`` with the running mean scores ``m``
    (:class:`longtail.equilibrium.MeanScoreTracker`, buffer ``mean_score.mean_scores``, global
    over processes), updated from this batch's real RoIs (one entry per matched gt instance) and
    memory rows *before* the loss, as LOCE does; inference is plain softmax. Logs the r/c/f means
    of ``m`` every ``log_period`` iterations (``loce/mean_score_{r,c,f}``).
    """

    def __init__(self, num_classes: int, alpha: float = 0.9, bg_score: float = 0.01,
                 init_score: float = 0.01, class_frequency: Optional[Sequence[str]] = None,
                 log_period: int = 20):
        super().__init__(num_classes)
        self.class_frequency = list(class_frequency) if class_frequency is not None else None
        self.log_period = log_period
        self.mean_score = MeanScoreTracker(num_classes, alpha, bg_score, init_score,
                                           self.class_frequency)
        logger.info("Long-tail state: LOCE mean scores, %d floats (%.1f KiB), in the checkpoint",
                    num_classes + 1, (num_classes + 1) * 4 / 1024)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return cls(
            num_classes, cfg.MODEL.LOCE.ALPHA, cfg.MODEL.LOCE.BG_SCORE, cfg.MODEL.LOCE.INIT_SCORE,
            train_metadata(cfg, FREQUENCY, "the r/c/f frequency",
                           f"MODEL.LONGTAIL.CLS_LOSS={cfg.MODEL.LONGTAIL.CLS_LOSS!r}"),
            cfg.MODEL.LONGTAIL.LOG_PERIOD,
        )

    @property
    def mean_scores(self) -> torch.Tensor:
        """[C + 1] the running mean scores ``m`` (background last)."""
        return self.mean_score.mean_scores

    def instance_ids(self, proposals: List[Instances], labels: torch.Tensor) -> torch.Tensor:
        """[R] dense id of the gt instance each foreground RoI is matched to; -1 otherwise."""
        device = labels.device
        keys = []
        for i, p in enumerate(proposals):
            inds = (p.gt_inds if p.has("gt_inds")
                    else torch.zeros(len(p), dtype=torch.long, device=device))
            keys.append(inds.long() + (i << 32))
        keys = cat(keys, dim=0) if keys else torch.zeros(0, dtype=torch.long, device=device)
        keys = torch.where(labels < self.num_classes, keys, torch.full_like(keys, -1))
        return dense_group_ids(keys)

    def forward(self, scores, labels, batch):
        num_real = labels.shape[0] - batch.num_memory
        with torch.no_grad():
            probs = F.softmax(scores.detach().float(), dim=1)
            ids = self.instance_ids(batch.proposals, labels[:num_real])
            sums, counts = instance_score_entries(probs[:num_real], labels[:num_real], ids,
                                                  ids.numel())
            if batch.memory_rows is not None:
                s2, n2 = memory_score_entries(
                    probs[num_real:], labels[num_real:], batch.chunk[num_real:],
                    batch.num_chunks, batch.memory_rows.valid,
                )
                sums, counts = sums + s2, counts + n2
            self.mean_score.update(sums, counts)  # before the loss (LOCE order)
        self._log_mean_scores()
        loss = equilibrium_loss(scores, labels, self.mean_score.mean_scores, batch.chunk,
                                batch.num_chunks, batch.weights)
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


@register_loss("bags", keys=("MODEL.BAGS",))
class BalancedGroupSoftmax(ClassificationLoss):
    """
    BAGS's balanced group softmax: the classifier has ``C + 2 + G`` outputs (groups of classes by
    training instance count, :func:`longtail.bags.build_group_tables`), the loss is the sum of the
    group softmax CEs with sampled "others" (:func:`longtail.bags.bags_loss`), inference merges
    the groups into ``[N, C + 1]`` probabilities (:func:`longtail.bags.bags_merge`, not
    renormalised). The group tables are persistent buffers (saved in checkpoints, so a model
    evaluates with the groups it was trained with); the "others" draws come from a generator
    seeded by (seed, iteration, rank): nothing to save for an exact resume.
    """

    # merged group probabilities, not a softmax of one logit vector (NorCal only as extension)
    softmax_logits = False

    def __init__(self, num_classes: int, instance_counts, bin_edges=(10, 100, 1000),
                 others_ratio: float = 8.0, init_std: float = 0.01):
        super().__init__(num_classes)
        tables = bags.build_group_tables(instance_counts, bin_edges)
        if tables.num_classes != num_classes:
            raise ValueError(
                f"BAGS instance counts cover {tables.num_classes} classes but "
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes}."
            )
        self._layout = tables
        for name, value in tables.tensors().items():
            self.register_buffer(name, value)
        self.others_ratio = others_ratio
        self.init_std = init_std
        logger.info("BAGS: %d foreground groups of sizes %s (bins %s), %d logits",
                    tables.num_groups, tables.group_sizes.tolist(), list(bin_edges),
                    tables.num_logits)

    @classmethod
    def from_config(cls, cfg, num_classes):
        return cls(
            num_classes,
            train_metadata(cfg, INSTANCE_COUNT, "per-class training instance counts",
                           f"MODEL.LONGTAIL.CLS_LOSS={cfg.MODEL.LONGTAIL.CLS_LOSS!r}"),
            tuple(cfg.MODEL.BAGS.BIN_EDGES), cfg.MODEL.BAGS.OTHERS_SAMPLE_RATIO,
            cfg.MODEL.BAGS.CLS_INIT_STD,
        )

    def tables(self) -> bags.BagsTables:
        """The BAGS tables, as the (device-following, checkpointed) buffers hold them."""
        return dataclasses.replace(
            self._layout, **{k: getattr(self, k) for k in self._layout.tensors()})

    def num_logits(self) -> int:
        return self._layout.num_logits

    def init_classifier(self, layer):
        """BAGS's normal(0, CLS_INIT_STD) weights and zero bias on a linear classifier (a
        cosine classifier keeps its own initialisation)."""
        if isinstance(layer, nn.Linear):
            bags.bags_classifier_init_(layer, self.init_std)

    def forward(self, scores, labels, batch):
        # memory rows, if any, are all valid (the MFS policy needs EBL)
        generator = torch.Generator(device=scores.device)
        # independent per iteration and per process, reproducible for a seed, stateless on resume
        generator.manual_seed((batch.seed * 1_000_003 + batch.iteration) * 4099 + comm.get_rank())
        loss = bags.bags_loss(scores, labels, self.tables(), self.others_ratio, generator,
                              batch.chunk, batch.num_chunks)
        return {"loss_cls": loss}

    def probabilities(self, scores):
        return bags.bags_merge(scores.float(), self.tables())

    def accuracy_logits(self, scores):
        return bags.bags_merge(scores.detach(), self.tables())
