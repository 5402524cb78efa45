"""Object-memory policies (``MODEL.MEMORY.POLICY``), one registered class per method.

A policy owns an :class:`longtail.memory.ObjectMemory` (the ring buffers; built by the policy's
``from_config``, allocated when training starts, never for inference) and decides, in each
training step of :class:`longtail.roi_heads.LongTailROIHeads`, what is pushed and which memory
rows join the real RoIs. The ROI heads call one method, :meth:`MemoryPolicy.box_features`, which
returns the box-head features of the real RoIs followed by the memory rows, and the rows'
:class:`longtail.memory.MemoryRows`; the predictor's losses take it from there.

Registered:

* ``"rio"`` (:class:`RIOReplay`): pool, box head -> ``X`` [R, D]; replay the newest entries of the
  cached classes present in each VGPU chunk (before pushing), push ``X`` of the sampled foreground
  rows of cached classes, and return ``[X; replayed]``. Replayed rows are constants, so their
  gradients reach only the predictor.
* ``"mfs"`` (:class:`MFSSampling`, LOCE): jitter every gt box 16 times, pool and push (first
  ``capacity`` rows per class); draw memory rows with the mean scores of *before* this step's
  update; run the box head on ``[pooled real; memory]``. Needs a loss that keeps mean scores
  (EBL) and a frozen backbone and box head.

Random draws (MFS jitter and class/entry sampling, RIO random selection) come from generators
seeded by (``SEED``, rank, purpose, iteration, MFS initialisation step): reproducible for a
seed, different across ranks and steps, and nothing to save for an exact resume.

Adding a policy: a subclass registered with ``@register_policy("name")`` in a new module,
imported by ``longtail/__init__.py``.
"""
import logging
from typing import List, Optional, Tuple

import torch
from detectron2.layers import cat
from detectron2.structures import Boxes, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.registry import Registry

from . import vgpu
from .datasets import IMAGE_COUNT, train_metadata
from .memory import (
    MemoryRows,
    ObjectMemory,
    cached_classes_from_image_counts,
    jitter_boxes,
    mfs_class_probabilities,
)
from .registry import register_as

__all__ = [
    "MEMORY_POLICY_REGISTRY",
    "MemoryPolicy",
    "RIOReplay",
    "MFSSampling",
    "build_memory_policy",
    "register_policy",
    "step_generator",
]

logger = logging.getLogger(__name__)

MEMORY_POLICY_REGISTRY = Registry("LONGTAIL_MEMORY_POLICY")
MEMORY_POLICY_REGISTRY.__doc__ = """
Object-memory policies (``MODEL.MEMORY.POLICY``): :class:`MemoryPolicy` subclasses registered
under the config value.
"""

# purposes of the per-step random generators
_RNG_JITTER, _RNG_SAMPLE, _RNG_REPLAY = 1, 2, 3


def register_policy(name: str):
    """Class decorator: register a :class:`MemoryPolicy` subclass under the config value ``name``
    (``MODEL.MEMORY.POLICY``) and set its ``name``."""
    return register_as(MEMORY_POLICY_REGISTRY, name)


def _vector_shape(shape) -> tuple:
    if shape.height is None and shape.width is None:
        return (shape.channels,)
    return (shape.channels, shape.height or 1, shape.width or 1)


def step_generator(device, seed: int, init_step: int, purpose: int) -> torch.Generator:
    """The generator of one purpose in this step: seeded by (seed, iteration, init_step, purpose,
    rank)."""
    try:
        it = get_event_storage().iter
    except AssertionError:  # outside a training loop (unit tests)
        it = 0
    key = (((seed * 1_000_003 + it) * 8191 + init_step + 1) * 131 + purpose)
    key = key * 4099 + comm.get_rank()
    g = torch.Generator(device=device)
    g.manual_seed(key % (2**63 - 1))
    return g


class MemoryPolicy:
    """
    Interface of a memory policy (module docstring). ``memory`` is registered by the ROI heads
    as their submodule ``memory`` (so its per-process checkpoint state keeps that name).
    """

    name = ""

    def __init__(self, memory: ObjectMemory):
        self.memory = memory

    @classmethod
    def from_config(cls, cfg, box_head_shape, pooled_shape, predictor) -> "MemoryPolicy":
        raise NotImplementedError

    def check_trainable(self, model) -> None:
        """Refuse (ValueError naming the key) a set of trainable parameters the policy cannot
        work with; called once the model is built and frozen. Default: any set."""

    def training_hooks(self, cfg, train_dicts) -> list:
        """detectron2 hooks the policy needs, run before the others (default: none)."""
        return []

    def box_features(self, heads, features: List[torch.Tensor], proposals: List[Instances],
                     targets: List[Instances]) -> Tuple[torch.Tensor, Optional[MemoryRows]]:
        """
        Args:
            heads: the :class:`longtail.roi_heads.LongTailROIHeads` (pooler, box head, predictor,
                seed, init_step).
            features: the box-in feature maps.
            proposals: the sampled RoIs, per image (with ``gt_*`` fields).
            targets: the ground truth, per image.

        Returns:
            ([R + M, D] box-head features of the real RoIs then the memory rows, the rows).
        """
        raise NotImplementedError

    @staticmethod
    def _log_memory(policy, banks, classes, mem, feature_shape, memory, device):
        logger.info(
            "Long-tail state: object memory (%s) of %d bank(s) x %d classes x %d entries of %s %s "
            "= %.1f MiB per process on %s, allocated when training starts (never for "
            "inference)%s",
            policy, banks, len(classes), mem.CAPACITY, feature_shape, mem.DTYPE,
            memory.planned_bytes() / 2**20, device,
            "; saved beside every checkpoint, one file per process" if mem.CHECKPOINT else "",
        )

    @classmethod
    def _build_memory(cls, cfg, classes, feature_shape, keep) -> ObjectMemory:
        mem = cfg.MODEL.MEMORY
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        bad = [c for c in classes if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"MODEL.RIO.CACHED_CLASSES has indices {bad[:10]} outside "
                             f"0..{num_classes - 1}.")
        banks = vgpu.chunks_per_process(cfg.SOLVER.IMS_PER_BATCH, comm.get_world_size(),
                                        cfg.MODEL.LONGTAIL.IMS_PER_VGPU)
        device = mem.DEVICE or cfg.MODEL.DEVICE
        memory = ObjectMemory(num_classes, classes, banks, mem.CAPACITY, feature_shape, keep,
                              mem.DTYPE, device)
        cls._log_memory(cls.name, banks, classes, mem, feature_shape, memory, device)
        return memory


def build_memory_policy(cfg, box_head_shape, pooled_shape, predictor) -> Optional[MemoryPolicy]:
    """
    The policy ``MODEL.MEMORY.POLICY`` names (None for ""), with its memory. Fails with a message
    naming the key when the predictor, dataset or batch layout lacks what the policy needs.

    Args:
        box_head_shape (ShapeSpec): output of the box head (RIO stores it).
        pooled_shape (tuple): (channels, res, res) of the box pooler (MFS stores it).
        predictor (LongTailFastRCNNOutputLayers): the box predictor.
    """
    name = cfg.MODEL.MEMORY.POLICY
    if not name:
        return None
    if name not in MEMORY_POLICY_REGISTRY:
        raise ValueError(f"MODEL.MEMORY.POLICY={name!r}; choose '' (off) or one of "
                         f"{sorted(k for k, _ in MEMORY_POLICY_REGISTRY)}.")
    return MEMORY_POLICY_REGISTRY.get(name).from_config(cfg, box_head_shape, pooled_shape,
                                                        predictor)


@register_policy("rio")
class RIOReplay(MemoryPolicy):
    """RIO's episodic replay of box-head features of rare ("cached") classes."""

    def __init__(self, memory: ObjectMemory, replay_per_class: int = 20,
                 random_select: bool = False):
        super().__init__(memory)
        self.replay_per_class = replay_per_class
        self.random_select = random_select

    @classmethod
    def from_config(cls, cfg, box_head_shape, pooled_shape, predictor):
        rio = cfg.MODEL.RIO
        feature_shape = _vector_shape(box_head_shape)
        if len(feature_shape) != 1:
            raise ValueError(
                "MODEL.MEMORY.POLICY 'rio' stores box-head output vectors, but the box head "
                f"({cfg.MODEL.ROI_BOX_HEAD.NAME}) outputs {feature_shape}; use a box head with "
                "fully connected layers (MODEL.ROI_BOX_HEAD.NUM_FC > 0)."
            )
        if rio.CACHED_CLASSES:
            classes = list(rio.CACHED_CLASSES)
        else:
            counts = train_metadata(
                cfg, IMAGE_COUNT, "per-class training image counts",
                "MODEL.MEMORY.POLICY 'rio' (cached classes, MODEL.RIO.CACHE_MAX_IMAGE_COUNT)",
            )
            classes = cached_classes_from_image_counts(counts, rio.CACHE_MAX_IMAGE_COUNT)
        if not classes:
            raise ValueError(
                "MODEL.MEMORY.POLICY 'rio': no class has at most "
                f"MODEL.RIO.CACHE_MAX_IMAGE_COUNT={rio.CACHE_MAX_IMAGE_COUNT} training "
                "images; raise it or list MODEL.RIO.CACHED_CLASSES."
            )
        memory = cls._build_memory(cfg, classes, feature_shape, "last")
        return cls(memory, rio.REPLAY_PER_CLASS, rio.RANDOM_SELECT)

    def box_features(self, heads, features, proposals, targets):
        pred = heads.box_predictor
        x = heads.box_pooler(features, [p.proposal_boxes for p in proposals])
        h = heads.box_head(x)
        del x
        labels = cat([p.gt_classes for p in proposals])
        chunk = pred.chunk_index(proposals)
        rows = self.memory.replay_recent(
            labels, chunk, self.replay_per_class,
            # the draws happen where the rings are (MODEL.MEMORY.DEVICE may differ)
            step_generator(self.memory.storage_device, heads.seed, heads.init_step, _RNG_REPLAY),
            self.random_select,
        )  # before the push (RIO order)
        self.memory.push(
            h, labels, chunk, cat([p.proposal_boxes.tensor for p in proposals]),
            cat([p.gt_boxes.tensor for p in proposals]),
        )
        return cat([h, rows.features.to(h.dtype)]), rows


@register_policy("mfs")
class MFSSampling(MemoryPolicy):
    """LOCE's memory-augmented feature sampling of jittered-gt RoIAlign features."""

    def __init__(self, memory: ObjectMemory, jitter_ratio: float = 1.0 / 6.0,
                 num_classes: int = 8, num_features: int = 4, score_eps: float = 1e-7):
        super().__init__(memory)
        self.jitter_ratio = jitter_ratio
        self.num_classes = num_classes
        self.num_features = num_features
        self.score_eps = score_eps

    @classmethod
    def from_config(cls, cfg, box_head_shape, pooled_shape, predictor):
        if not hasattr(predictor.cls_loss, "mean_scores"):
            raise ValueError(
                "MODEL.MEMORY.POLICY 'mfs' draws classes by LOCE's mean classification scores, "
                f"which only the EBL loss keeps; MODEL.LONGTAIL.CLS_LOSS is "
                f"{predictor.cls_loss.name!r}: set it to 'ebl'."
            )
        mfs = cfg.MODEL.LOCE.MFS
        memory = cls._build_memory(cfg, list(range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)),
                                   tuple(pooled_shape), "first")
        return cls(memory, mfs.JITTER_RATIO, mfs.SAMPLED_NUM_CLASSES, mfs.SAMPLED_NUM_FEATURES,
                   mfs.SCORE_EPS)

    def training_hooks(self, cfg, train_dicts):
        """LOCE's initialisation pass (``MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS`` > 0)."""
        from .hooks import MemoryInitHook  # the hook builds loaders: imported when training

        if cfg.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS > 0:
            return [MemoryInitHook(cfg, train_dicts)]
        return []

    # stored RoIAlign features run through the box head later: the backbone and the box head must
    # be frozen for stored and fresh features to stay comparable (LOCE's stage 2)
    FROZEN_PREFIXES = ("backbone.", "roi_heads.box_head.")

    def check_trainable(self, model) -> None:
        moving = [n for n, p in model.named_parameters()
                  if p.requires_grad and n.startswith(self.FROZEN_PREFIXES)]
        if moving:
            raise ValueError(
                "MODEL.MEMORY.POLICY 'mfs' replays stored RoIAlign features through the box "
                f"head, which needs the backbone and the box head frozen, but {len(moving)} of "
                f"their parameter tensors train (e.g. {moving[:3]}). Set "
                "MODEL.LONGTAIL.TRAINABLE_PREFIXES to what LOCE's stage 2 trains, e.g. "
                "['proposal_generator.', 'roi_heads.box_predictor.', 'roi_heads.mask_head.']."
            )

    @torch.no_grad()
    def push(self, heads, features: List[torch.Tensor], targets: List[Instances]) -> None:
        """Jitter every gt box 16 times, pool the boxes and push them (LOCE's memory update)."""
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
            num_images, 4, 16, device=device,
            generator=step_generator(device, heads.seed, heads.init_step, _RNG_JITTER),
        )
        boxes, valid = jitter_boxes(gt, uniforms[image_of_gt], sizes[image_of_gt],
                                    self.jitter_ratio)
        flat = boxes.reshape(-1, 4)
        pooled = heads.box_pooler(
            features, [Boxes(b.reshape(-1, 4)) for b in boxes.split(n_gt, dim=0)]
        )
        ims_per_vgpu = heads.box_predictor.ims_per_vgpu
        chunk = vgpu.chunk_of_images(image_of_gt, num_images, ims_per_vgpu).repeat_interleave(16)
        self.memory.push(
            pooled, gt_classes.repeat_interleave(16), chunk, flat, gt.repeat_interleave(16, dim=0),
            valid.reshape(-1),
        )

    def box_features(self, heads, features, proposals, targets):
        pred = heads.box_predictor
        x = heads.box_pooler(features, [p.proposal_boxes for p in proposals])
        self.push(heads, features, targets)
        probs = mfs_class_probabilities(pred.cls_loss.mean_scores, self.score_eps)
        rows = self.memory.sample_classes(
            probs, self.num_classes, self.num_features,
            step_generator(probs.device, heads.seed, heads.init_step, _RNG_SAMPLE),
        )
        # a batch smaller than the configured one (e.g. the init pass's last) has fewer chunks
        # than the memory has banks: draws of the missing banks are dropped
        in_batch = rows.chunk < pred.num_chunks(len(proposals))
        rows.valid = rows.valid & in_batch
        rows.chunk = torch.where(in_batch, rows.chunk, torch.zeros_like(rows.chunk))
        x = cat([x, rows.features.to(x.dtype)])
        return heads.box_head(x), rows
