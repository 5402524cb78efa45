"""NorCal post-hoc calibration: the pure functions against the closed form computed here, the
spec's properties (background untouched, rows sum to 1, ratio scaling, no side effects, finite
where the official exp overflows), the predictor option and its build-time refusals, and
tools/calibrate.py end to end on the mini dataset."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from longtail.norcal import NorCal, norcal_log_weights, norcal_probabilities, norcal_rescale


def _reference(z, counts, gamma, renorm=True):
    """a_c exp(z_c) on the foreground, exp(z_C) on the background, per row (plain Python)."""
    out = []
    for row in z.tolist():
        vals = [math.exp(v) * max(n, 1) ** -gamma for v, n in zip(row[:-1], counts)]
        vals.append(math.exp(row[-1]))
        s = sum(vals)
        out.append([v / s for v in vals] if renorm else vals)
    return torch.tensor(out)


def test_exps_matches_closed_form_and_gamma_zero_is_softmax():
    torch.manual_seed(0)
    z = torch.randn(5, 6)
    counts = [1, 3, 10, 100, 0]  # a zero count is clamped to 1
    for gamma in (0.0, 0.5, 1.0):
        p = norcal_probabilities(z, norcal_log_weights(counts, gamma))
        assert torch.allclose(p, _reference(z, counts, gamma), atol=1e-6)
    assert torch.allclose(norcal_probabilities(z, norcal_log_weights(counts, 0.0)),
                          F.softmax(z, dim=1), atol=1e-7)
    raw = norcal_probabilities(z, norcal_log_weights(counts, 0.5), renorm=False)
    assert torch.allclose(raw, _reference(z, counts, 0.5, renorm=False), rtol=1e-5)


def test_background_never_reweighted_ratios_scale_and_rows_sum_to_one():
    torch.manual_seed(1)
    z = torch.randn(4, 4)
    counts = [4, 16, 64]
    p0 = F.softmax(z, dim=1)
    p = norcal_probabilities(z, norcal_log_weights(counts, 0.5))
    assert torch.allclose(p.sum(1), torch.ones(4), atol=1e-6)
    # P_c / P_c' scales by (N_c' / N_c)^gamma; background vs class c by N_c^gamma
    assert torch.allclose(p[:, 0] / p[:, 1], p0[:, 0] / p0[:, 1] * (16 / 4) ** 0.5, rtol=1e-5)
    assert torch.allclose(p[:, 3] / p[:, 2], p0[:, 3] / p0[:, 2] * 64 ** 0.5, rtol=1e-5)
    assert torch.all(p[:, 3] > p0[:, 3])  # background mass grows


def test_variants_probs_logits_and_class_balanced():
    torch.manual_seed(2)
    z = torch.randn(3, 4)
    counts = [2, 5, 50]
    lw = norcal_log_weights(counts, 0.7)
    assert torch.allclose(norcal_probabilities(z, lw, "probs"), norcal_probabilities(z, lw, "exps"),
                          atol=1e-6)
    unnorm = norcal_probabilities(z, lw, "probs", renorm=False)
    expected = F.softmax(z, dim=1) * torch.tensor([2 ** -0.7, 5 ** -0.7, 50 ** -0.7, 1.0])
    assert torch.allclose(unnorm, expected, atol=1e-6)
    logits = norcal_probabilities(z, lw, "logits")
    a = torch.tensor([2 ** -0.7, 5 ** -0.7, 50 ** -0.7])
    assert torch.allclose(logits, F.softmax(torch.cat([z[:, :3] * a, z[:, 3:]], 1), 1), atol=1e-6)
    beta = 0.999
    cb = norcal_log_weights(counts, beta, "cb").exp()
    assert torch.allclose(cb, torch.tensor([(1 - beta) / (1 - beta ** n) for n in counts]),
                          rtol=1e-5)
    with pytest.raises(ValueError, match="0 < GAMMA"):
        norcal_log_weights(counts, 1.5, "cb")


def test_no_side_effects_and_finite_where_official_exp_overflows():
    z = torch.tensor([[100.0, 1.0, 2.0], [0.5, -0.2, 0.1]])
    before = z.clone()
    lw = norcal_log_weights([10, 1], 0.5)
    p = norcal_probabilities(z, lw, "logits")
    p2 = norcal_probabilities(z, lw)
    assert torch.equal(z, before)
    assert torch.isfinite(p).all() and torch.isfinite(p2).all()
    # the official exp(z) overflows in float32 for z = 100; the log-space form is finite
    assert not torch.isfinite(torch.exp(z[0, 0]) / torch.exp(z[0]).sum())
    assert p2[0, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_rescale_extension_for_non_softmax_scores():
    probs = torch.tensor([[0.2, 0.4, 0.3], [0.1, 0.1, 0.05]])  # sigmoid-like, rows not summing to 1
    lw = norcal_log_weights([4, 1], 0.5)
    out = norcal_rescale(probs, lw)
    raw = probs * torch.tensor([0.5, 1.0, 1.0])
    assert torch.allclose(out, raw / raw.sum(1, keepdim=True))
    assert torch.allclose(NorCal([4, 1], 0.5, mode="probs", softmax_logits=False)(probs), out)


# ------------------------------------------------------------------------------------------------
# the predictor option
# ------------------------------------------------------------------------------------------------
def _cfg(path="configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", **calibration):
    from detectron2.config import get_cfg

    from longtail import add_longtail_config
    from longtail.datasets import prepare_datasets

    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("longtail_synth_mini_train",)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    for k, v in calibration.items():
        cfg.TEST.CALIBRATION[k] = v
    prepare_datasets(cfg.DATASETS.TRAIN)
    return cfg


def test_predictor_calibrates_softmax_probabilities_training_untouched():
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    from longtail.datasets import IMAGE_COUNT

    torch.manual_seed(3)
    plain = build_model(_cfg())
    calibrated = build_model(_cfg(GAMMA=0.5))
    calibrated.load_state_dict(plain.state_dict())
    pred_p, pred_c = plain.roi_heads.box_predictor, calibrated.roi_heads.box_predictor
    assert pred_p.calibration is None and pred_c.calibration is not None
    x = torch.randn(6, pred_p.cls_score.in_features)
    scores, deltas = pred_c(x)

    class P:  # a proposal list of one image with 6 boxes
        def __len__(self):
            return 6

    counts = MetadataCatalog.get(_cfg().DATASETS.TRAIN[0]).get(IMAGE_COUNT)
    probs = pred_c.predict_probs((scores, deltas), [P()])[0]
    assert torch.allclose(probs, _reference(scores.detach(), counts, 0.5), atol=1e-5)
    assert torch.allclose(pred_p.predict_probs((scores, deltas), [P()])[0],
                          F.softmax(scores.detach(), 1), atol=1e-6)
    assert "calibration.log_weights" not in calibrated.state_dict()  # weights stay loadable


def test_calibration_refusals():
    from detectron2.modeling import build_model

    with pytest.raises(ValueError, match="take effect only with NorCal on"):
        build_model(_cfg(WITH="logits"))
    with pytest.raises(ValueError, match="ALLOW_NON_SOFTMAX"):
        build_model(_cfg("configs/Synthetic/eqlv2_R18_FPN.yaml", GAMMA=0.5))
    with pytest.raises(ValueError, match="'probs' form only"):
        build_model(_cfg("configs/Synthetic/eqlv2_R18_FPN.yaml", GAMMA=0.5,
                         ALLOW_NON_SOFTMAX=True))
    model = build_model(_cfg("configs/Synthetic/eqlv2_R18_FPN.yaml", GAMMA=0.5,
                             ALLOW_NON_SOFTMAX=True, WITH="probs"))
    assert not model.roi_heads.box_predictor.calibration.softmax_logits


@pytest.mark.slow
def test_calibrate_tool_sweeps_on_training_images_and_evaluates_both(repo_root, tmp_path):
    """tools/calibrate.py on a briefly trained mini model: the sweep table, the chosen gamma
    (the argmax of the sweep it reports), and the test evaluation with and without NorCal."""
    mini = ["DATASETS.TRAIN", "('longtail_synth_mini_train',)",
            "DATASETS.TEST", "('longtail_synth_mini_val',)", "SOLVER.IMS_PER_BATCH", "4",
            "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TEST", "96"]
    out = str(tmp_path / "rfs")
    subprocess.run([sys.executable, "train_net.py", "--config-file",
                    "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", *mini, "SOLVER.MAX_ITER", "30",
                    "SOLVER.WARMUP_ITERS", "5", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out],
                   cwd=repo_root, check=True, capture_output=True)
    proc = subprocess.run(
        [sys.executable, "tools/calibrate.py", "--config-file",
         "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", "--images", "20", "--gammas", "0.5,1",
         *mini, "MODEL.ROI_HEADS.NAME", "LongTailROIHeads",
         "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "OUTPUT_DIR", out],
        cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(os.path.join(out, "calibration", "calibration.json")) as f:
        report = json.load(f)
    assert report["calibration_images"] == 20
    assert report["calibration_dataset"] == "longtail_synth_mini_train"
    with open(os.path.join(out, "calibration", "longtail_synth_mini_train_calibration.json")) as f:
        assert len(json.load(f)["images"]) == 20
    sweep = report["sweep"]
    assert set(sweep) == {"0", "0.5", "1"}
    best = max(sweep, key=lambda g: (sweep[g]["segm"]["AP"], -float(g)))
    assert report["chosen_gamma"] == float(best)
    test = report["test"]["longtail_synth_mini_val"]
    assert set(test) == {"uncalibrated", "calibrated"}
    if report["chosen_gamma"] > 0:  # calibration changes which detections survive
        assert test["calibrated"]["bbox"] != test["uncalibrated"]["bbox"]
    assert "Chosen gamma" in proc.stdout and "uncalibrated" in proc.stdout


def test_bags_calibration_only_as_the_probs_extension():
    from detectron2.modeling import build_model

    cfg = _cfg("configs/Synthetic/bags_stage2.yaml", GAMMA=0.5)
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(ValueError, match="ALLOW_NON_SOFTMAX"):
        build_model(cfg)
    cfg = _cfg("configs/Synthetic/bags_stage2.yaml", GAMMA=0.5, ALLOW_NON_SOFTMAX=True,
               WITH="probs")
    cfg.MODEL.WEIGHTS = ""
    pred = build_model(cfg).roi_heads.box_predictor
    x = torch.randn(5, pred.cls_score.in_features)
    scores, deltas = pred(x)

    class P:
        def __len__(self):
            return 5

    probs = pred.predict_probs((scores, deltas), [P()])[0]
    merged = pred.cls_loss.probabilities(scores.detach())
    assert probs.shape == merged.shape == (5, 49)
    assert torch.allclose(probs, norcal_rescale(merged, pred.calibration.log_weights), atol=1e-6)
