"""``LongTailROIHeads``: detectron2's ``StandardROIHeads`` with the long-tail box predictor and
the object memory.

* Every sampled proposal records which ground-truth instance of its image it was matched to
  (field ``gt_inds``), without re-running the matching: each target gets a ``gt_inds`` field
  ``[0..n_gt)`` and detectron2's ``label_and_sample_proposals`` copies every ``gt_*`` field of the
  matched target onto the sampled proposals (for background proposals the value is meaningless;
  ``gt_classes == C`` marks them).
* ``MODEL.MEMORY.POLICY`` wires an :class:`longtail.memory.ObjectMemory` into the box branch
  during training (inference never touches it):

  - ``"rio"``: pool, box head -> ``X`` [R, 1024]; replay the newest entries of the cached classes
    present in each VGPU chunk (before pushing), push ``X`` of the sampled foreground rows of
    cached classes, then predict on ``[X; replayed]``. Replayed rows are constants, so their
    gradients reach only the predictor.
  - ``"mfs"``: jitter every gt box 16 times, pool and push (first ``capacity`` rows per class);
    draw memory rows with the mean scores of *before* this step's update; pool the real RoIs and
    run the box head and predictor on ``[real; memory]``; EBL and the box loss use both, the mean
    scores are updated from both (before the loss), the mask branch sees the real RoIs only.

Random draws (MFS jitter and class/entry sampling, RIO random selection) come from generators
seeded by (``SEED``, rank, purpose, iteration): reproducible for a seed, different across ranks
and steps, and nothing to save for an exact resume.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .memory import (
    POLICIES,
    ObjectMemory,
    cached_classes_from_image_counts,
    jitter_boxes,
    mfs_class_probabilities,
)
from .datasets import IMAGE_COUNT, train_metadata
from .predictor import LongTailFastRCNNOutputLayers, num_chunks_of, refuse_upstream_loss_keys

__all__ = [
    "LongTailROIHeads",
    "build_object_memory",
    "check_trainable_for_memory",
    "refuse_method_keys_without_longtail_heads",
]

logger = logging.getLogger(__name__)

# purposes of the per-step random generators
_RNG_JITTER, _RNG_SAMPLE, _RNG_REPLAY = 1, 2, 3


def _vector_shape(shape) -> tuple:
    if shape.height is None and shape.width is None:
        return (shape.channels,)
    return (shape.channels, shape.height or 1, shape.width or 1)


def build_object_memory(cfg, box_head_shape, pooled_shape, predictor) -> Optional[ObjectMemory]:
    """
    The object memory ``MODEL.MEMORY`` asks for, or None. Fails with a message naming the key
    when the predictor, dataset or batch layout lacks what the policy needs.

    Args:
        box_head_shape (ShapeSpec): output of the box head (RIO stores it).
        pooled_shape (tuple): (channels, res, res) of the box pooler (MFS stores it).
        predictor (LongTailFastRCNNOutputLayers): the box predictor.
    """
    mem = cfg.MODEL.MEMORY
    policy = mem.POLICY
    if not policy:
        return None
    if policy not in POLICIES:
        raise ValueError(f"MODEL.MEMORY.POLICY={policy!r}; choose '' (off) or one of {POLICIES}.")
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    world = comm.get_world_size()
    ims = cfg.SOLVER.IMS_PER_BATCH // max(world, 1)
    banks = num_chunks_of(ims, cfg.MODEL.LONGTAIL.IMS_PER_VGPU)
    if policy == "rio":
        feature_shape = _vector_shape(box_head_shape)
        if len(feature_shape) != 1:
            raise ValueError(
                "MODEL.MEMORY.POLICY 'rio' stores box-head output vectors, but the box head "
                f"({cfg.MODEL.ROI_BOX_HEAD.NAME}) outputs {feature_shape}; use a box head with "
                "fully connected layers (MODEL.ROI_BOX_HEAD.NUM_FC > 0)."
            )
        if cfg.MODEL.MEMORY.RIO.CACHED_CLASSES:
            classes = list(cfg.MODEL.MEMORY.RIO.CACHED_CLASSES)
        else:
            counts = train_metadata(
                cfg, IMAGE_COUNT, "per-class training image counts",
                "MODEL.MEMORY.POLICY 'rio' (cached classes, MODEL.MEMORY.RIO.CACHE_MAX_IMAGE_COUNT)",
            )
            classes = cached_classes_from_image_counts(counts, mem.RIO.CACHE_MAX_IMAGE_COUNT)
        if not classes:
            raise ValueError(
                "MODEL.MEMORY.POLICY 'rio': no class has at most "
                f"MODEL.MEMORY.RIO.CACHE_MAX_IMAGE_COUNT={mem.RIO.CACHE_MAX_IMAGE_COUNT} training "
                "images; raise it or list MODEL.MEMORY.RIO.CACHED_CLASSES."
            )
        keep = "last"
    else:  # mfs
        if predictor.cls_loss != "ebl":
            raise ValueError(
                "MODEL.MEMORY.POLICY 'mfs' draws classes by LOCE's mean classification scores, "
                f"which only the EBL predictor keeps; MODEL.LONGTAIL.CLS_LOSS is "
                f"{predictor.cls_loss!r}: set it to 'ebl'."
            )
        feature_shape = tuple(pooled_shape)
        classes = list(range(num_classes))
        keep = "first"
    bad = [c for c in classes if not 0 <= int(c) < num_classes]
    if bad:
        raise ValueError(
            f"MODEL.MEMORY.RIO.CACHED_CLASSES has indices {bad[:10]} outside 0..{num_classes - 1}."
        )
    device = mem.DEVICE or cfg.MODEL.DEVICE
    memory = ObjectMemory(
        num_classes, classes, banks, mem.CAPACITY, feature_shape, keep, mem.DTYPE, device
    )
    logger.info(
        "Long-tail state: object memory (%s) of %d bank(s) x %d classes x %d entries of %s %s = "
        "%.1f MiB per process on %s, allocated when training starts (never for inference)%s",
        policy, banks, len(classes), mem.CAPACITY, feature_shape, mem.DTYPE,
        memory.planned_bytes() / 2**20, device,
        "; saved beside every checkpoint, one file per process" if mem.CHECKPOINT else "",
    )
    return memory


# MFS stores RoIAlign features of the backbone and runs them through the box head later: both
# must be frozen for stored and fresh features to stay comparable (LOCE's stage 2)
MFS_FROZEN_PREFIXES = ("backbone.", "roi_heads.box_head.")


def check_trainable_for_memory(cfg, model) -> None:
    """
    Refuse ``MODEL.MEMORY.POLICY "mfs"`` when a parameter of the backbone or the box head trains
    (MFS reuses stored pooled features, which assumes both are frozen). Call after
    ``MODEL.LONGTAIL.TRAINABLE_PREFIXES`` was applied.
    """
    if cfg.MODEL.MEMORY.POLICY != "mfs":
        return
    moving = [
        n for n, p in model.named_parameters()
        if p.requires_grad and n.startswith(MFS_FROZEN_PREFIXES)
    ]
    if moving:
        raise ValueError(
            "MODEL.MEMORY.POLICY 'mfs' replays stored RoIAlign features through the box head, "
            f"which needs the backbone and the box head frozen, but {len(moving)} of their "
            f"parameter tensors train (e.g. {moving[:3]}). Set MODEL.LONGTAIL.TRAINABLE_PREFIXES "
            "to what LOCE's stage 2 trains, e.g. ['proposal_generator.', "
            "'roi_heads.box_predictor.', 'roi_heads.mask_head.']."
        )


# config nodes / keys read only by LongTailROIHeads and its predictor
HEAD_ONLY_NODES = ("MODEL.MEMORY", "MODEL.LOCE", "MODEL.BAGS")
HEAD_ONLY_KEYS = ("MODEL.LONGTAIL.CLS_LOSS", "MODEL.LONGTAIL.CLS_LAYER",
                  "MODEL.LONGTAIL.IMS_PER_VGPU", "MODEL.LONGTAIL.LOG_PERIOD",
                  "MODEL.LONGTAIL.COSINE_SCALE", "MODEL.LONGTAIL.COSINE_EPS")


def _flat(node, prefix: str) -> Dict[str, object]:
    out = {}
    for key, value in node.items():
        name = f"{prefix}.{key}"
        out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def refuse_method_keys_without_longtail_heads(cfg) -> None:
    """
    Refuse method keys that only :class:`LongTailROIHeads` reads (:data:`HEAD_ONLY_KEYS`, every
    key under :data:`HEAD_ONLY_NODES`) when they differ from their defaults and
    ``MODEL.ROI_HEADS.NAME`` is not ``LongTailROIHeads`` (or a subclass): detectron2's heads
    would train a plain softmax model and ignore them.
    """
    heads = ROI_HEADS_REGISTRY.get(cfg.MODEL.ROI_HEADS.NAME)
    if isinstance(heads, type) and issubclass(heads, LongTailROIHeads):
        return
    from detectron2.config import get_cfg

    from .config import add_longtail_config

    default = add_longtail_config(get_cfg())
    values, defaults = {}, {}
    for node in HEAD_ONLY_NODES:
        *parents, leaf = node.split(".")
        got, ref = cfg, default
        for part in [*parents, leaf]:
            got, ref = got[part], ref[part]
        values.update(_flat(got, node))
        defaults.update(_flat(ref, node))
    for key in HEAD_ONLY_KEYS:
        values[key] = cfg.MODEL.LONGTAIL[key.rsplit(".", 1)[1]]
        defaults[key] = default.MODEL.LONGTAIL[key.rsplit(".", 1)[1]]
    changed = sorted(k for k in values if values[k] != defaults.get(k))
    if changed:
        raise ValueError(
            f"{', '.join(f'{k} {values[k]!r}' for k in changed)}: read only by the project's "
            f"ROI heads, but MODEL.ROI_HEADS.NAME is {cfg.MODEL.ROI_HEADS.NAME!r}, which would "
            "ignore them and train plain softmax. Set MODEL.ROI_HEADS.NAME LongTailROIHeads "
            "(see configs/LVISv1/*loce*, *bags*, *rio*), or remove these keys."
        )


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """StandardROIHeads + ``LongTailFastRCNNOutputLayers`` + ``gt_inds`` + object memory."""

    @configurable
    def __init__(
        self,
        *,
        memory: Optional[ObjectMemory] = None,
        memory_policy: str = "",
        rio_replay_per_class: int = 20,
        rio_random_select: bool = False,
        mfs_jitter_ratio: float = 1.0 / 6.0,
        mfs_num_classes: int = 8,
        mfs_num_features: int = 4,
        mfs_score_eps: float = 1e-7,
        seed: int = 0,
        **kwargs,
    ):
        """
        Args:
            memory: the object memory (None: no memory).
            memory_policy: "", "rio" or "mfs".
            rio_*: RIO replay settings (MODEL.MEMORY.RIO.*).
            mfs_*: MFS settings (MODEL.MEMORY.MFS.*).
            seed: base seed of the memory's random draws.
            kwargs: arguments of ``StandardROIHeads``.
        """
        super().__init__(**kwargs)
        self.memory = memory
        self.memory_policy = memory_policy if memory is not None else ""
        self.rio_replay_per_class = rio_replay_per_class
        self.rio_random_select = rio_random_select
        self.mfs_jitter_ratio = mfs_jitter_ratio
        self.mfs_num_classes = mfs_num_classes
        self.mfs_num_features = mfs_num_features
        self.mfs_score_eps = mfs_score_eps
        self.seed = seed
        # Step counter of the MFS initialisation pass (-1 outside it): keeps its random streams
        # apart from the training iterations'.
        self.init_step = -1

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        mem = cfg.MODEL.MEMORY
        in_channels = [input_shape[f].channels for f in ret["box_in_features"]]
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        ret.update(
            memory=build_object_memory(
                cfg, ret["box_head"].output_shape, (in_channels[0], res, res), ret["box_predictor"]
            ),
            memory_policy=mem.POLICY,
            rio_replay_per_class=mem.RIO.REPLAY_PER_CLASS,
            rio_random_select=mem.RIO.RANDOM_SELECT,
            mfs_jitter_ratio=mem.MFS.JITTER_RATIO,
            mfs_num_classes=mem.MFS.SAMPLED_NUM_CLASSES,
            mfs_num_features=mem.MFS.SAMPLED_NUM_FEATURES,
            mfs_score_eps=mem.MFS.SCORE_EPS,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
        )
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # before detectron2 builds (and asserts on) its own predictor, which ours replaces
        refuse_upstream_loss_keys(cfg)
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = LongTailFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret

    @torch.no_grad()
    def label_and_sample_proposals(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        indexed = []
        for t in targets:
            t = Instances(t.image_size, **t.get_fields())
            t.gt_inds = torch.arange(len(t), device=t.gt_classes.device)
            indexed.append(t)
        return super().label_and_sample_proposals(proposals, indexed)

    # -- memory ---------------------------------------------------------------------------------
    def _generator(self, device, purpose: int) -> torch.Generator:
        try:
            it = get_event_storage().iter
        except AssertionError:  # outside a training loop (unit tests)
            it = 0
        key = (((self.seed * 1_000_003 + it) * 8191 + self.init_step + 1) * 131 + purpose)
        key = key * 4099 + comm.get_rank()
        g = torch.Generator(device=device)
        g.manual_seed(key % (2**63 - 1))
        return g

    def forward(self, images, features, proposals, targets=None):
        if not self.training or self.memory is None:
            return super().forward(images, features, proposals, targets)
        del images
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box_with_memory(features, proposals, targets)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    @torch.no_grad()
    def _mfs_push(self, features: List[torch.Tensor], targets: List[Instances]) -> None:
        """Jitter every gt box 16 times, pool the boxes and push them (spec loce.md 4.2-4.3)."""
        device = features[0].device
        num_images = len(targets)
        n_gt = [len(t) for t in targets]
        total = sum(n_gt)
        if total == 0:
            return
        gt = cat([t.gt_boxes.tensor for t in targets])
        gt_classes = cat([t.gt_classes for t in targets])
        image_of_gt = torch.repeat_interleave(
            torch.arange(num_images, device=device), torch.tensor(n_gt, device=device),
            output_size=total,
        )
        sizes = torch.tensor([t.image_size for t in targets], device=device, dtype=torch.float32)
        uniforms = torch.rand(
            num_images, 4, 16, generator=self._generator(device, _RNG_JITTER), device=device
        )
        boxes, valid = jitter_boxes(gt, uniforms[image_of_gt], sizes[image_of_gt], self.mfs_jitter_ratio)
        flat = boxes.reshape(-1, 4)
        pooled = self.box_pooler(
            features, [Boxes(b.reshape(-1, 4)) for b in boxes.split(n_gt, dim=0)]
        )
        pred = self.box_predictor
        per_chunk = pred.ims_per_vgpu if pred.num_chunks(num_images) > 1 else num_images
        chunk = (image_of_gt // max(per_chunk, 1)).repeat_interleave(16)
        self.memory.push(
            pooled, gt_classes.repeat_interleave(16), chunk, flat, gt.repeat_interleave(16, dim=0),
            valid.reshape(-1),
        )

    def _forward_box_with_memory(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances], targets
    ) -> Dict[str, torch.Tensor]:
        feats = [features[f] for f in self.box_in_features]
        pred = self.box_predictor
        x = self.box_pooler(feats, [p.proposal_boxes for p in proposals])
        num_real = x.shape[0]
        memory_rows = None
        if self.memory_policy == "mfs":
            self._mfs_push(feats, targets)
            probs = mfs_class_probabilities(pred.mean_score.mean_scores, self.mfs_score_eps)
            memory_rows = self.memory.sample_classes(
                probs, self.mfs_num_classes, self.mfs_num_features,
                self._generator(probs.device, _RNG_SAMPLE),
            )
            # a batch smaller than the configured one (e.g. the init pass's last) has fewer
            # chunks than the memory has banks: draws of the missing banks are dropped
            in_batch = memory_rows.chunk < pred.num_chunks(len(proposals))
            memory_rows.valid = memory_rows.valid & in_batch
            memory_rows.chunk = torch.where(in_batch, memory_rows.chunk, torch.zeros_like(memory_rows.chunk))
            x = cat([x, memory_rows.features.to(x.dtype)])
        h = self.box_head(x)
        if self.memory_policy == "rio":
            labels = cat([p.gt_classes for p in proposals])
            chunk = pred.chunk_index(proposals)
            memory_rows = self.memory.replay_recent(
                labels, chunk, self.rio_replay_per_class,
                # the draws happen where the rings are (MODEL.MEMORY.DEVICE may differ)
                self._generator(self.memory.storage_device, _RNG_REPLAY), self.rio_random_select,
            )  # before the push (RIO order)
            self.memory.push(
                h, labels, chunk, cat([p.proposal_boxes.tensor for p in proposals]),
                cat([p.gt_boxes.tensor for p in proposals]),
            )
            h = cat([h, memory_rows.features.to(h.dtype)])
        predictions = pred(h)
        del h, x
        losses = pred.losses(predictions, proposals, memory_rows)
        if self.train_on_pred_boxes:
            with torch.no_grad():
                real = tuple(p[:num_real] for p in predictions)  # spec fix: real rows only
                boxes = pred.predict_boxes_for_gt_classes(real, proposals)
                for p, b in zip(proposals, boxes):
                    p.proposal_boxes = Boxes(b)
        return losses
