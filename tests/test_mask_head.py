"""Tests of ``longtail.mask_head``: the LOCE normed (scaled-cosine) mask head (loce.md 7, 11.9)."""
import pytest
import torch
from torch.nn import functional as F

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, build_mask_head
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from longtail import add_longtail_config
from longtail.mask_head import CosineMaskPredictor, NormedMaskRCNNConvUpsampleHead

NAME = "NormedMaskRCNNConvUpsampleHead"


def _cfg(num_classes=5, cls_agnostic=False, scale=None):
    cfg = add_longtail_config(get_cfg())
    cfg.MODEL.ROI_MASK_HEAD.NAME = NAME
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 2
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = cls_agnostic
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    if scale is not None:
        cfg.MODEL.ROI_MASK_HEAD.COSINE_SCALE = scale
    return cfg


def _predictor(seed=0, d=16, k=5):
    torch.manual_seed(seed)
    pred = CosineMaskPredictor(d, k)
    with torch.no_grad():
        pred.weight.normal_()  # O(1) kernels so the cosine is far from 0
        pred.bias.normal_()
    return pred


def test_registered_and_built_from_config():
    assert ROI_MASK_HEAD_REGISTRY.get(NAME) is NormedMaskRCNNConvUpsampleHead
    head = build_mask_head(_cfg(), ShapeSpec(channels=8, height=14, width=14))
    assert isinstance(head, NormedMaskRCNNConvUpsampleHead)
    assert isinstance(head.predictor, CosineMaskPredictor)
    assert head.predictor.scale == 20.0  # default while the key is undeclared
    assert head.predictor.weight.shape == (5, 16, 1, 1)
    assert torch.equal(head.predictor.bias, torch.zeros(5))
    assert head.predictor.weight.std().item() == pytest.approx(0.001, rel=0.5)
    # Same layers as the parent, predictor last in the Sequential.
    names = [n for n, _ in head.named_children()]
    assert names == ["mask_fcn1", "mask_fcn2", "deconv", "deconv_relu", "predictor"]
    assert set(head.state_dict()) >= {"predictor.weight", "predictor.bias", "deconv.weight"}
    head10 = build_mask_head(_cfg(scale=10.0), ShapeSpec(channels=8, height=14, width=14))
    assert head10.predictor.scale == 10.0


def test_logits_equal_scaled_cosine_plus_bias():
    pred = _predictor()
    x = torch.randn(3, 16, 4, 4)
    out = pred(x)
    assert out.shape == (3, 5, 4, 4)
    xs = x.permute(0, 2, 3, 1).reshape(-1, 16)  # one row per pixel
    w = pred.weight.detach().reshape(5, 16)
    cos = (xs @ w.t()) / (xs.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    naive = 20.0 * cos + pred.bias.detach()[None, :]
    naive = naive.reshape(3, 4, 4, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out[:, :, 1, 2],
        20.0 * F.cosine_similarity(x[:, None, :, 1, 2], w[None], dim=2) + pred.bias.detach(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_invariant_to_positive_rescaling():
    pred = _predictor(seed=1)
    x = torch.randn(2, 16, 3, 3)
    ref = pred(x)
    # Per-pixel positive rescaling of the input features.
    pixel_scale = torch.rand(2, 1, 3, 3) * 100 + 1e-3
    torch.testing.assert_close(pred(x * pixel_scale), ref, rtol=1e-5, atol=1e-5)
    # Per-class positive rescaling of the kernels.
    with torch.no_grad():
        pred.weight.mul_(torch.tensor([0.01, 3.0, 1e3, 7.0, 0.5]).view(5, 1, 1, 1))
    torch.testing.assert_close(pred(x), ref, rtol=1e-5, atol=1e-5)


def test_zero_features_give_bias_and_finite_grad():
    pred = _predictor(seed=2)
    x = torch.zeros(2, 16, 3, 3, requires_grad=True)
    out = pred(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, pred.bias.detach().view(1, 5, 1, 1).expand_as(out))
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(pred.weight.grad).all()


def _tiny_instances(num_classes, n_per_image=(2, 3), size=32):
    g = torch.Generator().manual_seed(0)
    out = []
    for n in n_per_image:
        inst = Instances((size, size))
        xy = torch.rand(n, 2, generator=g) * 12
        wh = torch.rand(n, 2, generator=g) * 12 + 4
        inst.proposal_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.rand(n, size, size, generator=g) > 0.5)
        out.append(inst)
    return out


@pytest.mark.parametrize("cls_agnostic", [False, True])
def test_training_forward_gives_finite_loss(cls_agnostic):
    torch.manual_seed(0)
    head = build_mask_head(
        _cfg(num_classes=5, cls_agnostic=cls_agnostic), ShapeSpec(channels=8, height=14, width=14)
    )
    assert head.predictor.num_classes == (1 if cls_agnostic else 5)
    head.train()
    instances = _tiny_instances(5)
    x = torch.randn(5, 8, 14, 14)
    with EventStorage():
        losses = head(x, instances)
    assert set(losses) == {"loss_mask"}
    assert torch.isfinite(losses["loss_mask"])
    losses["loss_mask"].backward()
    grad = head.predictor.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    # Inference path: soft masks [1, 28, 28] per predicted instance.
    head.eval()
    pred = Instances((32, 32))
    pred.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))
    pred.pred_classes = torch.tensor([3])
    with torch.no_grad():
        head(torch.randn(1, 8, 14, 14), [pred])
    assert pred.pred_masks.shape == (1, 1, 28, 28)
