"""``LongTailROIHeads``: detectron2's ``StandardROIHeads`` with the long-tail box predictor and
the object memory.

* Every sampled proposal records which ground-truth instance of its image it was matched to
  (field ``gt_inds``), without re-running the matching: each target gets a ``gt_inds`` field
  ``[0..n_gt)`` and detectron2's ``label_and_sample_proposals`` copies every ``gt_*`` field of the
  matched target onto the sampled proposals (for background proposals the value is meaningless;
  ``gt_classes == C`` marks them).
* ``MODEL.MEMORY.POLICY`` names a memory policy (:mod:`longtail.memory_policies`: RIO replay,
  LOCE MFS) that, during training only, gives the box branch its memory rows through one call
  (``box_features``); inference never touches the memory.
"""
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Boxes, Instances

from .memory import ObjectMemory
from .memory_policies import MemoryPolicy, build_memory_policy
from .predictor import LongTailFastRCNNOutputLayers, without_upstream_loss
from .registry import flat_keys, lookup_key

__all__ = [
    "LongTailROIHeads",
    "check_trainable_for_memory",
    "refuse_method_keys_without_longtail_heads",
]

logger = logging.getLogger(__name__)

def check_trainable_for_memory(cfg, model) -> None:
    """
    Let the model's memory policy refuse a trainable set it cannot work with (LOCE's MFS replays
    stored RoIAlign features through the box head, so backbone and box head must be frozen).
    Call after ``MODEL.LONGTAIL.TRAINABLE_PREFIXES`` was applied.
    """
    for m in model.modules():
        if isinstance(m, LongTailROIHeads) and m.memory_policy is not None:
            m.memory_policy.check_trainable(model)


# config nodes / keys read only by LongTailROIHeads and its predictor
HEAD_ONLY_NODES = ("MODEL.MEMORY", "MODEL.LOCE", "MODEL.BAGS", "MODEL.RIO", "MODEL.SEESAW",
                   "MODEL.EQLV2", "TEST.CALIBRATION")
HEAD_ONLY_KEYS = ("MODEL.LONGTAIL.CLS_LOSS", "MODEL.LONGTAIL.CLS_LAYER",
                  "MODEL.LONGTAIL.IMS_PER_VGPU", "MODEL.LONGTAIL.LOG_PERIOD",
                  "MODEL.LONGTAIL.NORMED_LINEAR_SCALE", "MODEL.LONGTAIL.SIGMOID_PRIOR_PROB")


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
        values.update(flat_keys(lookup_key(cfg, node), node))
        defaults.update(flat_keys(lookup_key(default, node), node))
    for key in HEAD_ONLY_KEYS:
        values[key] = cfg.MODEL.LONGTAIL[key.rsplit(".", 1)[1]]
        defaults[key] = default.MODEL.LONGTAIL[key.rsplit(".", 1)[1]]
    changed = sorted(k for k in values if values[k] != defaults.get(k))
    # detectron2 v0.6's own predictor has no sigmoid / federated loss: its heads would ignore the
    # switches that add_longtail_config declares there (main's heads honour them)
    import inspect

    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    if "use_fed_loss" not in inspect.signature(FastRCNNOutputLayers.__init__).parameters:
        for key in ("USE_SIGMOID_CE", "USE_FED_LOSS"):
            if cfg.MODEL.ROI_BOX_HEAD.get(key, False):
                name = f"MODEL.ROI_BOX_HEAD.{key}"
                values[name] = True
                changed.append(name)
    if changed:
        raise ValueError(
            f"{', '.join(f'{k} {values[k]!r}' for k in changed)}: read only by the project's "
            f"ROI heads, but MODEL.ROI_HEADS.NAME is {cfg.MODEL.ROI_HEADS.NAME!r}, which would "
            "ignore them and train plain softmax. Set MODEL.ROI_HEADS.NAME LongTailROIHeads "
            "(see configs/LVISv1/*loce*, *bags*, *rio*), or remove these keys."
        )


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """StandardROIHeads + ``LongTailFastRCNNOutputLayers`` + ``gt_inds`` + a memory policy."""

    @configurable
    def __init__(self, *, memory_policy: Optional[MemoryPolicy] = None, seed: int = 0, **kwargs):
        """
        Args:
            memory_policy: the object-memory policy (:mod:`longtail.memory_policies`), or None.
            seed: base seed of the memory's random draws.
            kwargs: arguments of ``StandardROIHeads``.
        """
        super().__init__(**kwargs)
        self.memory_policy = memory_policy
        # the policy's ring buffers, a submodule (device moves, per-process checkpoint state)
        self.memory: Optional[ObjectMemory] = memory_policy.memory if memory_policy else None
        self.seed = seed
        # Step counter of the MFS initialisation pass (-1 outside it): keeps its random streams
        # apart from the training iterations'.
        self.init_step = -1

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        in_channels = [input_shape[f].channels for f in ret["box_in_features"]]
        res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
        ret.update(
            memory_policy=build_memory_policy(
                cfg, ret["box_head"].output_shape, (in_channels[0], res, res), ret["box_predictor"]
            ),
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
        )
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        # detectron2 builds its own predictor first (replaced below): without upstream's loss
        # switches, which ours implements (longtail.cls_losses.resolve_cls_loss)
        ret = super()._init_box_head(without_upstream_loss(cfg), input_shape)
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

    def forward(self, images, features, proposals, targets=None):
        if not self.training or self.memory_policy is None:
            return super().forward(images, features, proposals, targets)
        del images
        assert targets, "'targets' argument is required during training"
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box_with_memory(features, proposals, targets)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box_with_memory(
        self, features: Dict[str, torch.Tensor], proposals: List[Instances], targets
    ) -> Dict[str, torch.Tensor]:
        pred = self.box_predictor
        feats = [features[f] for f in self.box_in_features]
        h, memory_rows = self.memory_policy.box_features(self, feats, proposals, targets)
        predictions = pred(h)
        del h
        losses = pred.losses(predictions, proposals, memory_rows)
        if self.train_on_pred_boxes:
            with torch.no_grad():
                num_real = sum(len(p) for p in proposals)
                real = tuple(p[:num_real] for p in predictions)  # real rows only
                boxes = pred.predict_boxes_for_gt_classes(real, proposals)
                for p, b in zip(proposals, boxes):
                    p.proposal_boxes = Boxes(b)
        return losses
