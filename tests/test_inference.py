"""Top-k-per-class inference (LONGTAIL.TEST_TOPK_PER_CLASS)."""
import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from torchvision.ops import nms

from longtail import add_longtail_config
from longtail.inference import (
    enable_topk_per_class,
    rank_within_groups,
    topk_per_class_single_image,
)


def reference(boxes, scores, shape, thresh, nms_thresh, k):
    """Loop over classes: clip, threshold, NMS, keep the k best; (class, score) pairs."""
    h, w = shape
    num_classes = scores.shape[1] - 1
    out = []
    for c in range(num_classes):
        b = boxes.view(len(boxes), -1, 4)[:, c if boxes.shape[1] > 4 else 0].clone()
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        s = scores[:, c]
        m = s > thresh
        keep = nms(b[m], s[m], nms_thresh)[:k]
        out += [(c, float(x)) for x in s[m][keep]]
    return sorted(out, key=lambda t: (t[0], -t[1]))


def random_inputs(n=300, num_classes=7, class_specific=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, num_classes if class_specific else 1, 2, generator=g) * 80
    wh = torch.rand(n, num_classes if class_specific else 1, 2, generator=g) * 40 + 2
    boxes = torch.cat([xy, xy + wh], dim=2).reshape(n, -1)
    scores = torch.softmax(torch.randn(n, num_classes + 1, generator=g) * 3, dim=1)
    return boxes, scores


def test_rank_within_groups():
    g = torch.tensor([3, 1, 3, 3, 0, 1])
    assert rank_within_groups(g).tolist() == [0, 0, 1, 2, 0, 1]
    assert rank_within_groups(torch.zeros(0, dtype=torch.long)).numel() == 0


@pytest.mark.parametrize("class_specific", [True, False])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_matches_a_per_class_loop(class_specific, k):
    boxes, scores = random_inputs(class_specific=class_specific, seed=k)
    inst, rows = topk_per_class_single_image(boxes, scores, (90, 100), 0.01, 0.5, k)
    got = sorted(zip(inst.pred_classes.tolist(), inst.scores.tolist()), key=lambda t: (t[0], -t[1]))
    want = reference(boxes, scores, (90, 100), 0.01, 0.5, k)
    assert len(got) == len(want) and all(
        a[0] == b[0] and abs(a[1] - b[1]) < 1e-7 for a, b in zip(got, want))
    assert torch.all(inst.scores[:-1] >= inst.scores[1:])  # best first
    counts = torch.bincount(inst.pred_classes, minlength=7)
    assert counts.max() <= k
    # rows index the proposals the detections come from
    assert torch.allclose(scores[rows, inst.pred_classes], inst.scores)


def test_no_per_image_cap_and_nonfinite_rows():
    boxes, scores = random_inputs(n=600, num_classes=40, seed=1)
    boxes[5] = float("nan")
    inst, _ = topk_per_class_single_image(boxes, scores, (200, 200), 0.0, 0.7, 20)
    assert len(inst) > 300  # far more than detectron2's 100/300 per image
    assert torch.isfinite(inst.pred_boxes.tensor).all()


def _tiny_cfg(roi_heads):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file("configs/Synthetic/mask_rcnn_R18_FPN.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.ROI_HEADS.NAME = roi_heads
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 5
    return cfg


@pytest.mark.parametrize("roi_heads", ["StandardROIHeads", "LongTailROIHeads"])
def test_wraps_detectron2_and_longtail_predictors(repo_root, roi_heads, monkeypatch):
    monkeypatch.chdir(repo_root)
    cfg = _tiny_cfg(roi_heads)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    image = {"image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8), "height": 128,
             "width": 128}
    with torch.no_grad():
        plain = model([image])[0]["instances"]
    assert len(plain) <= 5  # detectron2's per-image cap
    enable_topk_per_class(model, 5)
    with torch.no_grad():
        top = model([image])[0]["instances"]
    assert len(top) > 5 and torch.bincount(top.pred_classes).max() <= 5
    assert top.has("pred_masks") and len(top.pred_masks) == len(top)
    # with k >= 5, the 5 best of the top-k output are detectron2's 5 detections
    assert torch.allclose(top.scores[:5], plain.scores, atol=1e-6)
    assert torch.equal(top.pred_classes[:5], plain.pred_classes)
    # the replacement follows a deep copy to the copy's own predictor
    clone = copy.deepcopy(model)
    assert clone.roi_heads.box_predictor.inference.__self__ is clone.roi_heads.box_predictor


def test_zero_leaves_the_model_alone(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    model = build_model(_tiny_cfg("StandardROIHeads"))
    enable_topk_per_class(model, 0)
    assert "inference" not in vars(model.roi_heads.box_predictor)
