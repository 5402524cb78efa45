"""Top-k-per-class inference for the fixed-AP protocol (``LONGTAIL.TEST_TOPK_PER_CLASS``).

Dave et al. (2021) evaluate the top 10,000 detections of each class over the whole dataset with
no per-image limit (AP_fixed). detectron2's inference keeps only the ``TEST.DETECTIONS_PER_IMAGE``
best detections of an image over all classes, which starves rare classes of detections. This
mode keeps, per image and per class, the ``k`` best detections above the score threshold after
class-wise NMS, with no per-image cap; the evaluator then keeps each class's dataset-wide top
``LONGTAIL.EVAL.MAX_DETS_PER_CLASS`` (:mod:`longtail.evaluation`).

:func:`topk_per_class_single_image` is a pure function on tensors (no Python loop over classes:
one batched NMS, then ranks within classes from one stable sort). :func:`enable_topk_per_class`
applies it to any Fast R-CNN box predictor that has detectron2's ``predict_boxes`` /
``predict_probs`` / ``test_score_thresh`` / ``test_nms_thresh`` (detectron2's
``FastRCNNOutputLayers`` and the project's ``LongTailFastRCNNOutputLayers``) by replacing its
``inference`` on the instance; training is untouched.
"""
import logging
import types
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms
from detectron2.structures import Boxes, Instances

__all__ = ["topk_per_class_single_image", "topk_per_class_inference", "enable_topk_per_class"]

logger = logging.getLogger(__name__)


def rank_within_groups(groups: torch.Tensor) -> torch.Tensor:
    """Position of every element among the elements of its group, in input order.

    ``groups`` [N] int64; returns [N] int64 (0 for the first element of each group)."""
    n = groups.numel()
    if n == 0:
        return groups.new_zeros(0)
    order = torch.sort(groups, stable=True).indices
    g = groups[order]
    new_group = torch.ones_like(g, dtype=torch.bool)
    new_group[1:] = g[1:] != g[:-1]
    positions = torch.arange(n, device=groups.device)
    # start index of each element's group, carried forward with a cumulative max
    starts = torch.where(new_group, positions, torch.zeros_like(positions))
    starts = torch.cummax(starts, dim=0).values
    ranks = torch.empty_like(positions)
    ranks[order] = positions - starts
    return ranks


def topk_per_class_single_image(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_shape: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk_per_class: int,
) -> Tuple[Instances, torch.Tensor]:
    """
    Args:
        boxes: [R, 4C] class-specific or [R, 4] class-agnostic boxes (XYXY, absolute).
        scores: [R, C + 1] probabilities, background last.
        image_shape: (height, width) to clip boxes to.
        score_thresh: keep scores strictly above it (as detectron2).
        nms_thresh: IoU threshold of the class-wise NMS.
        topk_per_class: detections kept per class (after NMS, best first); no per-image cap.

    Returns:
        (Instances with pred_boxes, scores, pred_classes sorted by decreasing score,
        [M] index of the proposal each detection comes from), as detectron2's
        ``fast_rcnn_inference_single_image``.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not valid.all():
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, :-1]
    num_reg = boxes.shape[1] // 4
    clipped = Boxes(boxes.reshape(-1, 4))
    clipped.clip(image_shape)
    boxes = clipped.tensor.view(-1, num_reg, 4)

    mask = scores > score_thresh
    inds = mask.nonzero()  # [M, 2]: proposal, class
    boxes = boxes[inds[:, 0], 0] if num_reg == 1 else boxes[mask]
    scores = scores[mask]
    classes = inds[:, 1]

    keep = batched_nms(boxes, scores, classes, nms_thresh)  # sorted by decreasing score
    keep = keep[rank_within_groups(classes[keep]) < topk_per_class]

    result = Instances(image_shape)
    result.pred_boxes = Boxes(boxes[keep])
    result.scores = scores[keep]
    result.pred_classes = classes[keep]
    return result, inds[keep, 0]


def topk_per_class_inference(
    boxes: List[torch.Tensor],
    scores: List[torch.Tensor],
    image_shapes: List[Tuple[int, int]],
    score_thresh: float,
    nms_thresh: float,
    topk_per_class: int,
):
    """:func:`topk_per_class_single_image` on every image (detectron2's
    ``fast_rcnn_inference`` signature with ``topk_per_class`` for ``topk_per_image``)."""
    out = [
        topk_per_class_single_image(b, s, shape, score_thresh, nms_thresh, topk_per_class)
        for b, s, shape in zip(boxes, scores, image_shapes)
    ]
    return [o[0] for o in out], [o[1] for o in out]


def _inference(self, predictions, proposals):
    boxes = self.predict_boxes(predictions, proposals)
    scores = self.predict_probs(predictions, proposals)
    image_shapes = [p.image_size for p in proposals]
    return topk_per_class_inference(
        boxes, scores, image_shapes, self.test_score_thresh, self.test_nms_thresh,
        self.topk_per_class,
    )


def enable_topk_per_class(model: torch.nn.Module, topk_per_class: int) -> torch.nn.Module:
    """Switch ``model.roi_heads.box_predictor`` to top-k-per-class inference (in place).

    ``topk_per_class <= 0`` leaves the model unchanged. Raises for models without a single
    Fast R-CNN box predictor (e.g. cascades)."""
    if topk_per_class <= 0:
        return model
    predictor = getattr(getattr(model, "roi_heads", None), "box_predictor", None)
    needed = ("predict_boxes", "predict_probs", "test_score_thresh", "test_nms_thresh")
    if predictor is None or not all(hasattr(predictor, a) for a in needed):
        raise ValueError(
            "LONGTAIL.TEST_TOPK_PER_CLASS needs a model with one Fast R-CNN box predictor "
            "(model.roi_heads.box_predictor with predict_boxes/predict_probs); got "
            f"{type(predictor).__name__}."
        )
    predictor.topk_per_class = int(topk_per_class)
    # an instance attribute shadows the class's method; a bound method survives deepcopy
    predictor.inference = types.MethodType(_inference, predictor)
    logger.info(
        "Top-k-per-class inference: %d per class and image above score %.4g, no per-image cap.",
        topk_per_class, predictor.test_score_thresh,
    )
    return model
