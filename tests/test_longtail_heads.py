"""LongTailROIHeads / LongTailFastRCNNOutputLayers / decoupled training, on small models."""
import io
import os
import re

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage
from torch.nn import functional as F

from longtail import Trainer, add_longtail_config
from longtail.datasets import FREQUENCY, INSTANCE_COUNT
from longtail.equilibrium import equilibrium_loss, update_mean_scores
from longtail.cls_losses import dense_group_ids

MINI = ("longtail_synth_mini_train",)
LOCE_STAGE2 = ["proposal_generator.", "roi_heads.box_predictor.", "roi_heads.mask_head."]


def make_cfg(cls_loss="softmax_ce", trainable=(), **extra):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file("configs/Synthetic/loce_stage1_normed_mask.yaml")
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = MINI
    cfg.DATASETS.TEST = ()
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    cfg.MODEL.LONGTAIL.CLS_LOSS = cls_loss
    cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES = list(trainable)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATALOADER.NUM_WORKERS = 0
    for k, v in extra.items():
        node = cfg
        *path, last = k.split("__")
        for p in path:
            node = getattr(node, p)
        setattr(node, last, v)
    return cfg


def batch_of(cfg, n=2):
    loader = iter(Trainer.build_train_loader(cfg))
    return next(loader)[:n]


def test_dense_group_ids():
    keys = torch.tensor([7, -1, 3, 7, 9, 3, -1])
    ids = dense_group_ids(keys)
    assert ids[1] == -1 and ids[6] == -1
    assert ids[0] == ids[3] and ids[2] == ids[5] and len({int(ids[0]), int(ids[2]), int(ids[4])}) == 3
    assert ids.max() < keys.numel()


def test_sampled_proposals_carry_their_matched_gt():
    cfg = make_cfg()
    model = Trainer.build_model(cfg)
    heads = model.roi_heads
    img = (96, 96)
    gt = Instances(img)
    gt.gt_boxes = Boxes(torch.tensor([[10.0, 10, 40, 40], [50, 50, 90, 90]]))
    gt.gt_classes = torch.tensor([3, 7])
    props = Instances(img)
    props.proposal_boxes = Boxes(torch.tensor([[12.0, 12, 42, 41], [48, 52, 88, 90], [0, 60, 20, 90]]))
    props.objectness_logits = torch.zeros(3)
    with EventStorage(0):
        out = heads.label_and_sample_proposals([props], [gt])[0]
    fg = out.gt_classes < cfg.MODEL.ROI_HEADS.NUM_CLASSES
    best = pairwise_iou(out.proposal_boxes, gt.gt_boxes).argmax(dim=1)
    assert fg.any()
    assert torch.equal(out.gt_inds[fg], best[fg])
    assert torch.equal(gt.gt_classes[out.gt_inds[fg]], out.gt_classes[fg])
    assert not gt.has("gt_inds")  # the caller's targets are not modified


def test_ebl_updates_mean_scores_before_the_loss_with_true_offsets():
    cfg = make_cfg("ebl")
    model = Trainer.build_model(cfg)
    pred = model.roi_heads.box_predictor
    C = pred.num_classes
    # two images with 300 and 512 RoIs; instance k of image i has RoIs at known rows
    torch.manual_seed(0)
    props = []
    for rows, n_gt in ((300, 3), (512, 2)):
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.rand(rows, 4) * 10 + torch.tensor([0, 0, 20, 20.0]))
        p.gt_boxes = Boxes(p.proposal_boxes.tensor + 1)
        labels = torch.full((rows,), C)
        inds = torch.zeros(rows, dtype=torch.long)
        labels[: 4 * n_gt] = torch.arange(n_gt).repeat_interleave(4) + 5  # classes 5, 6, ...
        inds[: 4 * n_gt] = torch.arange(n_gt).repeat_interleave(4)
        p.gt_classes, p.gt_inds = labels, inds
        props.append(p)
    scores = torch.randn(812, C + 1, requires_grad=True)
    deltas = torch.randn(812, 4 * C, requires_grad=True)
    m0 = pred.cls_loss.mean_scores.clone()
    with EventStorage(0):
        losses = pred.losses((scores, deltas), props)
    # expected entries: per instance the mean over its 4 rows of p[., y]
    prob = scores.detach().softmax(1)
    sums = torch.zeros(C + 1)
    counts = torch.zeros(C + 1)
    for start, n_gt in ((0, 3), (300, 2)):
        for k in range(n_gt):
            rows = torch.arange(start + 4 * k, start + 4 * k + 4)
            sums[5 + k] += prob[rows, 5 + k].mean()
            counts[5 + k] += 1
    m1 = update_mean_scores(m0, sums, counts, 0.9, 0.01)
    assert torch.allclose(pred.cls_loss.mean_scores, m1, atol=1e-7)
    labels = torch.cat([p.gt_classes for p in props])
    assert torch.allclose(losses["loss_cls"], equilibrium_loss(scores, labels, m1), rtol=1e-6)
    assert counts[5] == 2 and counts[6] == 2 and counts[7] == 1  # one entry per instance


def test_mean_scores_survive_checkpoint_bit_for_bit(tmp_path):
    cfg = make_cfg("ebl")
    model = Trainer.build_model(cfg)
    m = model.roi_heads.box_predictor.cls_loss.mean_scores
    m.copy_(torch.rand_like(m))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    other = Trainer.build_model(cfg)
    DetectionCheckpointer(other).load(str(tmp_path / "ckpt.pth"))
    assert torch.equal(other.roi_heads.box_predictor.cls_loss.mean_scores, m)


def test_decoupled_training_freezes_the_rest():
    cfg = make_cfg("ebl", trainable=LOCE_STAGE2)
    model = Trainer.build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable and all(n.startswith(tuple(LOCE_STAGE2)) for n in trainable)
    assert in_opt == {id(named[n]) for n in trainable}
    before = {n: p.detach().clone() for n, p in named.items()}
    data = batch_of(cfg)
    model.train()
    with EventStorage(0):
        for _ in range(2):
            loss = sum(model(data).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    for n, p in named.items():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), n
    assert any(not torch.equal(named[n], before[n]) for n in trainable)


def test_bags_predictor_layout_and_inference():
    cfg = make_cfg("bags", trainable=["roi_heads.box_predictor.cls_score."])
    model = Trainer.build_model(cfg)
    pred = model.roi_heads.box_predictor
    C = pred.num_classes
    counts = MetadataCatalog.get(MINI[0]).get(INSTANCE_COUNT)
    groups = sum(1 for lo, hi in ((0, 10), (10, 100), (100, 1000), (1000, 10**9))
                 if any(lo <= c < hi for c in counts))
    assert pred.cls_score.out_features == C + 2 + groups
    assert abs(pred.cls_score.weight.std().item() - 0.01) < 0.002
    assert torch.count_nonzero(pred.cls_score.bias) == 0
    x = torch.randn(50, pred.cls_score.in_features)
    props = Instances((80, 80))
    props.proposal_boxes = Boxes(torch.tensor([[5.0, 5, 30, 30]]).repeat(50, 1))
    predictions = pred(x)
    (probs,) = pred.predict_probs(predictions, [props])
    assert probs.shape == (50, C + 1)
    assert probs.min() >= 0 and probs.max() <= 1
    boxes = pred.predict_boxes(predictions, [props])
    inst, _ = fast_rcnn_inference(boxes, (probs,), [(80, 80)], 0.0, 0.5, 300)
    assert len(inst[0]) <= 300 and (inst[0].scores > 0).all()
    # a training step (forward, backward, optimizer step) moves the classifier and nothing else
    data = batch_of(cfg)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = Trainer.build_optimizer(cfg, model)
    model.train()
    with EventStorage(0):
        losses = model(data)
    assert torch.isfinite(losses["loss_cls"])
    sum(losses.values()).backward()
    optimizer.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"roi_heads.box_predictor.cls_score.weight",
                     "roi_heads.box_predictor.cls_score.bias"}


def test_bad_configuration_fails_at_build_time():
    MetadataCatalog.get("longtail_test_no_meta").set(evaluator_type="lvis")
    for loss, key in (("ebl", FREQUENCY), ("bags", INSTANCE_COUNT)):
        cfg = make_cfg(loss)
        cfg.DATASETS.TRAIN = ("longtail_test_no_meta",)
        from detectron2.modeling import build_model

        with pytest.raises(ValueError) as e:
            build_model(cfg)
        assert key in str(e.value) and "MODEL.LONGTAIL.CLS_LOSS" in str(e.value)
    cfg = make_cfg("ebl", trainable=["roi_heads.no_such_module."])
    with pytest.raises(ValueError, match="MODEL.LONGTAIL.TRAINABLE_PREFIXES"):
        Trainer.build_model(cfg)
    cfg = make_cfg("focal_whatever")
    with pytest.raises(ValueError, match="MODEL.LONGTAIL.CLS_LOSS"):
        Trainer.build_model(cfg)


def test_full_model_gradient_clipping():
    cfg = make_cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 35.0
    cfg.SOLVER.BASE_LR = 0.0  # only the clipping acts
    cfg.SOLVER.MOMENTUM = 0.0
    cfg.SOLVER.WEIGHT_DECAY = 0.0
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = Trainer.build_optimizer(cfg, model)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 10.0 * (i + 1))
    before = torch.cat([p.grad.flatten() for p in model.parameters()])
    opt.step()
    after = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert before.norm() > 35
    assert after.norm() == pytest.approx(35.0, rel=1e-4)  # one norm over the whole model
    assert torch.allclose(after / after.norm(), before / before.norm())  # direction kept


@pytest.mark.parametrize("key,value", [("MODEL.LONGTAIL.CLS_LOSS", "ebl"),
                                       ("MODEL.MEMORY.POLICY", "rio"),
                                       ("MODEL.LONGTAIL.CLS_LAYER", "cosine"),
                                       ("MODEL.LOCE.ALPHA", 0.8),
                                       ("MODEL.LONGTAIL.CLS_LOSS", "seesaw"),
                                       ("MODEL.SEESAW.P", 0.5),
                                       ("MODEL.EQLV2.MU", 0.5),
                                       ("MODEL.LONGTAIL.NORMED_LINEAR_SCALE", 16.0),
                                       ("TEST.CALIBRATION.GAMMA", 0.5)])
def test_method_keys_without_the_project_heads_are_refused(key, value):
    """Before: detectron2's StandardROIHeads trained plain softmax and ignored the key."""
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml")
    assert cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    cfg.MODEL.DEVICE = "cpu"
    Trainer.build_model(cfg)  # the RFS config as it is builds
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=f"{key} .*MODEL.ROI_HEADS.NAME LongTailROIHeads"):
        Trainer.build_model(cfg)


def test_predictor_and_roi_heads_dispatch_on_no_method_name():
    # the loss, the classifier layer and the memory policy are registered parts: no branch on
    # their names is left in the shared classes
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "projects", "longtail")
    for name in ("predictor.py", "roi_heads.py"):
        with open(os.path.join(root, name)) as f:
            code = f.read()
        for pattern in (r"cls_loss\s*[!=]=", r"cls_layer\s*[!=]=", r"memory_policy\s*[!=]=",
                        r"POLICY\s*[!=]=", r"CLS_LOSS\s*[!=]=", r"[\"'](ebl|bags|softmax_ce|rio|"
                        r"mfs|cosine)[\"']"):
            assert not re.search(pattern, code), (name, pattern)


def test_a_new_loss_is_one_registered_class():
    from longtail.cls_losses import CLS_LOSS_REGISTRY, ClassificationLoss, LossBatch, register_loss
    from longtail.equilibrium import chunk_mean

    class LabelSmoothingCE(ClassificationLoss):
        """Softmax CE with label smoothing 0.1: defined here, registered, selected by name."""

        def forward(self, scores, labels, batch: LossBatch):
            per_row = F.cross_entropy(scores.float(), labels, reduction="none",
                                      label_smoothing=0.1)
            return {"loss_cls": chunk_mean(per_row, batch.chunk, batch.num_chunks,
                                           batch.weights)}

    if "test_label_smoothing" not in CLS_LOSS_REGISTRY:
        register_loss("test_label_smoothing")(LabelSmoothingCE)
    cfg = make_cfg("test_label_smoothing")
    model = Trainer.build_model(cfg)
    pred = model.roi_heads.box_predictor
    assert type(pred.cls_loss).__name__ == "LabelSmoothingCE"
    data = batch_of(cfg)
    model.train()
    with EventStorage(0):
        losses = model(data)
    # the step's classification loss is the smoothed CE of the predictor's own logits
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0
    x = torch.randn(6, pred.cls_score.in_features)
    scores, _ = pred(x)
    labels = torch.tensor([0, 1, 2, 3, 4, pred.num_classes])
    props = Instances((80, 80))
    props.proposal_boxes = Boxes(torch.tensor([[5.0, 5, 30, 30]]).repeat(6, 1))
    props.gt_boxes = props.proposal_boxes
    props.gt_classes = labels
    with EventStorage(0):
        got = pred.losses((scores, torch.zeros(6, 4 * pred.num_classes)), [props])["loss_cls"]
    torch.testing.assert_close(got, F.cross_entropy(scores, labels, label_smoothing=0.1))


@pytest.mark.parametrize("loss", ["ebl", "bags"])
def test_checkpoints_from_before_the_loss_modules_load(loss, tmp_path):
    # earlier versions kept the losses' state on the predictor itself (mean_score.*, bags_*)
    model = Trainer.build_model(make_cfg(loss))
    state = model.state_dict()
    prefix = "roi_heads.box_predictor.cls_loss."
    old = {}
    for key, value in state.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            key = ("roi_heads.box_predictor." + rest if rest.startswith("mean_score.")
                   else "roi_heads.box_predictor.bags_" + rest)
            value = value + 1 if value.is_floating_point() else value
        old[key] = value
    assert any(k.startswith(prefix) for k in state)  # the loss has state to carry
    path = str(tmp_path / "old.pth")
    torch.save({"model": old}, path)
    other = Trainer.build_model(make_cfg(loss))
    DetectionCheckpointer(other).load(path)
    for key, value in other.state_dict().items():
        if key.startswith(prefix):
            expected = state[key] + 1 if state[key].is_floating_point() else state[key]
            assert torch.equal(value, expected), key
