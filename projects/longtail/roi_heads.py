"""``LongTailROIHeads``: detectron2's ``StandardROIHeads`` with the long-tail box predictor.

It also records, for every sampled proposal, which ground-truth instance of its image it was
matched to (field ``gt_inds``), without re-running the matching: each target gets a ``gt_inds``
field ``[0..n_gt)`` and detectron2's ``label_and_sample_proposals`` copies every ``gt_*`` field of
the matched target onto the sampled proposals (for background proposals the value is
meaningless; ``gt_classes == C`` marks them).
"""
from typing import List

import torch
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.structures import Instances

from .predictor import LongTailFastRCNNOutputLayers

__all__ = ["LongTailROIHeads"]


@ROI_HEADS_REGISTRY.register()
class LongTailROIHeads(StandardROIHeads):
    """StandardROIHeads + ``LongTailFastRCNNOutputLayers`` + ``gt_inds`` on sampled proposals."""

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
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
