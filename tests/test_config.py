import glob
import re
import os

import pytest
from detectron2.config import get_cfg

from longtail import add_longtail_config
from longtail.samplers import SAMPLER_REGISTRY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
)


def load(path):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, path))
    return cfg


def test_new_keys_have_defaults():
    cfg = get_cfg()
    add_longtail_config(cfg)
    assert cfg.DATALOADER.REPEAT_SQRT is True
    assert cfg.LONGTAIL.NUM_THREADS == 0


def test_add_config_is_compatible_with_existing_key():
    # upstream detectron2 declares DATALOADER.REPEAT_SQRT itself: add_longtail_config keeps it
    cfg = get_cfg()
    cfg.DATALOADER.REPEAT_SQRT = False
    add_longtail_config(cfg)
    assert cfg.DATALOADER.REPEAT_SQRT is False


BASELINES = [p for p in CONFIGS if os.path.basename(p).startswith("mask_rcnn_R_")]
LOCE = [p for p in CONFIGS if "/LVIS" in p and os.path.basename(p).startswith("loce_")]
BAGS = [p for p in CONFIGS if "/LVIS" in p and os.path.basename(p).startswith("bags_")]


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path):
    cfg = load(path)
    assert cfg.DATALOADER.SAMPLER_TRAIN in SAMPLER_REGISTRY
    assert cfg.TEST.DETECTIONS_PER_IMAGE == (100 if "Synthetic" in path else 300)
    if "rfs" in os.path.basename(path):
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    if "stage2" in path:
        assert cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES and cfg.MODEL.WEIGHTS.endswith("model_final.pth")
    # no key of an unselected loss or classifier layer (it would be ignored)
    from longtail.cls_losses import CLS_LOSS_REGISTRY, resolve_cls_loss
    from longtail.layers import CLS_LAYER_REGISTRY
    from longtail.registry import refuse_keys_of_unselected

    refuse_keys_of_unselected(cfg, CLS_LOSS_REGISTRY, resolve_cls_loss(cfg),
                              "MODEL.LONGTAIL.CLS_LOSS")
    refuse_keys_of_unselected(cfg, CLS_LAYER_REGISTRY, cfg.MODEL.LONGTAIL.CLS_LAYER,
                              "MODEL.LONGTAIL.CLS_LAYER")


@pytest.mark.parametrize("path", BASELINES + ["configs/Base-LongTail-RCNN-FPN.yaml"])
def test_lvis_configs_follow_the_standard_recipe(path):
    cfg = load(path)
    v05 = "LVISv0.5" in path
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == (1230 if v05 else 1203)
    assert cfg.DATASETS.TRAIN == (("lvis_v0.5_train",) if v05 else ("lvis_v1_train",))
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)
    assert cfg.SOLVER.MAX_ITER == (90000 if v05 else 180000)
    if "rfs" in path:
        assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    if "R_101" in path:
        assert cfg.MODEL.RESNETS.DEPTH == 101 and "R-101" in cfg.MODEL.WEIGHTS
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-4)


# (MAX_ITER, STEPS) derived in the specs: ceil(epochs * N / 16), N = 99,388 (v1) / 56,740 (v0.5)
LOCE_SCHEDULES = {
    ("LVISv1", "stage1"): (149082, (99388, 136659)),
    ("LVISv1", "stage2"): (37271, (18636, 31059)),
    ("LVISv0.5", "stage1"): (85110, (56740, 78018)),
    ("LVISv0.5", "stage2"): (21278, (10639, 17732)),
}


@pytest.mark.parametrize("path", LOCE)
def test_loce_configs_match_the_spec(path):
    cfg = load(path)
    version = path.split("/")[1]
    stage = "stage2" if "stage2" in path else "stage1"
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == LOCE_SCHEDULES[(version, stage)]
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == (1230 if version == "LVISv0.5" else 1203)
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "NormedMaskRCNNConvUpsampleHead"
    assert cfg.MODEL.ROI_MASK_HEAD.COSINE_SCALE == 20.0
    assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.WARMUP_ITERS == 500
    assert cfg.SOLVER.WARMUP_FACTOR == 0.001 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    assert cfg.MODEL.RESNETS.DEPTH == (101 if "R_101" in path else 50)
    if stage == "stage2":
        assert cfg.MODEL.ROI_HEADS.NAME == "LongTailROIHeads"
        assert cfg.MODEL.LONGTAIL.CLS_LOSS == "ebl" and cfg.MODEL.LONGTAIL.IMS_PER_VGPU == 2
        assert cfg.MODEL.LOCE.ALPHA == 0.9 and cfg.MODEL.LOCE.BG_SCORE == 0.01
        assert cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES == [
            "proposal_generator.", "roi_heads.box_predictor.", "roi_heads.mask_head."]


@pytest.mark.parametrize("path", BAGS)
def test_bags_configs_match_the_spec(path):
    cfg = load(path)
    v05 = "LVISv0.5" in path
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (
        (42555, (28370, 39009)) if v05 else (74541, (49694, 68330)))
    assert cfg.SOLVER.BASE_LR == 0.01 and cfg.SOLVER.CLIP_GRADIENTS.ENABLED
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 35.0 and cfg.SOLVER.WARMUP_FACTOR == 0.3333
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,) and cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    assert cfg.MODEL.MASK_ON == ("mask_rcnn" in path)
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == (0.001 if "mask_rcnn" in path else 0.0)
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 2000 and cfg.MODEL.RPN.BOUNDARY_THRESH == 0
    if "stage2" in path:
        assert cfg.MODEL.LONGTAIL.CLS_LOSS == "bags" and cfg.MODEL.LONGTAIL.IMS_PER_VGPU == 2
        assert list(cfg.MODEL.BAGS.BIN_EDGES) == [10, 100, 1000]
        assert cfg.MODEL.BAGS.OTHERS_SAMPLE_RATIO == 8.0
        assert cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES == ["roi_heads.box_predictor.cls_score."]
    else:
        assert "COCO" in cfg.MODEL.WEIGHTS


def test_synthetic_configs_fit_the_embedded_dataset():
    for path in [p for p in CONFIGS if "Synthetic" in p]:
        cfg = load(path)
        assert cfg.DATASETS.TRAIN == ("longtail_synth_train",)
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 48
        if "stage2" not in path:
            assert cfg.MODEL.WEIGHTS == ""  # trained from scratch
        assert max(cfg.INPUT.MIN_SIZE_TRAIN) <= 160 and cfg.INPUT.MIN_SIZE_TEST <= 160


RIO = [p for p in CONFIGS if "/LVIS" in p and os.path.basename(p).startswith("rio_")]
LOCE_FULL = [p for p in LOCE if p.endswith("_FPN_stage2.yaml")]


def _lvis_configs(names, backbones=(50, 101)):
    return {f"configs/LVIS{v}/{n.format(b=b)}" for v in ("v0.5", "v1") for b in backbones
            for n in names}


# every method of the specs, R50 and R101, LVIS v0.5 and v1 (named, not counted: a missing file
# is reported by name)
METHOD_CONFIGS = _lvis_configs([
    "mask_rcnn_R_{b}_FPN_1x.yaml", "mask_rcnn_R_{b}_FPN_1x_rfs.yaml",
    "loce_mask_rcnn_R_{b}_FPN_normed_mask_stage1.yaml", "loce_mask_rcnn_R_{b}_FPN_stage2.yaml",
    "loce_mask_rcnn_R_{b}_FPN_ebl_stage2.yaml", "rio_mask_rcnn_R_{b}_FPN_1x.yaml",
]) | _lvis_configs([f"bags_{kind}_rcnn_R_{{b}}_FPN_1x_stage{stage}.yaml"
                    for kind in ("faster", "mask") for stage in (1, 2)], backbones=(50,))
BAGS_R101 = _lvis_configs([f"bags_{kind}_rcnn_R_{{b}}_FPN_1x_stage{stage}.yaml"
                           for kind in ("faster", "mask") for stage in (1, 2)], backbones=(101,))


def test_every_method_has_lvis_configs():
    missing = sorted(METHOD_CONFIGS - set(CONFIGS))
    assert not missing, f"missing configs: {missing}"
    assert len(RIO) == 4 and len(LOCE_FULL) == 4


def test_bags_r101_configs_exist():
    missing = sorted(BAGS_R101 - set(CONFIGS))
    assert not missing, f"missing configs: {missing}"


# the reference suite: each method's official recipe on v1 (R50 and R101), the port extensions
REFERENCE_CONFIGS = {
    f"configs/LVISv1/{n}" for n in (
        "seesaw_mask_rcnn_R_50_FPN_2x.yaml", "seesaw_mask_rcnn_R_50_FPN_2x_rfs.yaml",
        "seesaw_mask_rcnn_R_101_FPN_2x.yaml", "seesaw_mask_rcnn_R_101_FPN_2x_rfs.yaml",
        "seesaw_mask_rcnn_R_50_FPN_2x_rfs_normed_mask.yaml",
        "seesaw_mask_rcnn_R_101_FPN_2x_rfs_normed_mask.yaml",
        "eqlv2_mask_rcnn_R_50_FPN_1x.yaml", "eqlv2_mask_rcnn_R_101_FPN_1x.yaml",
        "fed_loss_mask_rcnn_R_50_FPN_1x_rfs.yaml", "fed_loss_mask_rcnn_R_101_FPN_1x_rfs.yaml",
        "norcal_mask_rcnn_R_50_FPN_1x_rfs.yaml")
} | {f"configs/LVISv0.5/{n}" for n in (
    "seesaw_mask_rcnn_R_50_FPN_2x_rfs.yaml", "eqlv2_mask_rcnn_R_50_FPN_1x.yaml",
    "fed_loss_mask_rcnn_R_50_FPN_1x_rfs.yaml", "norcal_mask_rcnn_R_50_FPN_1x_rfs.yaml")}


def test_reference_methods_have_lvis_configs():
    missing = sorted(REFERENCE_CONFIGS - set(CONFIGS))
    assert not missing, f"missing configs: {missing}"


def _common_test_settings(cfg, path):
    assert cfg.MODEL.ROI_HEADS.NAME == "LongTailROIHeads"
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0001
    assert cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.5 and cfg.TEST.DETECTIONS_PER_IMAGE == 300
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.BASE_LR == 0.02
    assert cfg.MODEL.RESNETS.DEPTH == (101 if "R_101" in path else 50)


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS if "/LVIS" in p
                                        and os.path.basename(p).startswith("seesaw_")))
def test_seesaw_configs_match_the_spec(path):
    cfg = load(path)
    _common_test_settings(cfg, path)
    assert cfg.MODEL.LONGTAIL.CLS_LOSS == "seesaw" and cfg.MODEL.LONGTAIL.IMS_PER_VGPU == 2
    assert cfg.MODEL.LONGTAIL.CLS_LAYER == "normed_linear"
    assert cfg.MODEL.LONGTAIL.NORMED_LINEAR_SCALE == 20.0
    assert (cfg.MODEL.SEESAW.P, cfg.MODEL.SEESAW.Q, cfg.MODEL.SEESAW.EPS) == (0.8, 2.0, 0.01)
    rfs = "_rfs" in os.path.basename(path)
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == ("SeesawNormedMaskRCNNConvUpsampleHead"
                                            if path.endswith("_normed_mask.yaml")
                                            else "MaskRCNNConvUpsampleHead")
    assert cfg.DATALOADER.SAMPLER_TRAIN == ("RepeatFactorTrainingSampler" if rfs
                                            else "TrainingSampler")
    if not rfs:  # 24 epochs of the 99,388 non-empty v1 images, steps at epochs 16 and 22
        assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (149082, (99388, 136659))


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS if "/LVIS" in p
                                        and os.path.basename(p).startswith("eqlv2_")))
def test_eqlv2_configs_match_the_spec(path):
    cfg = load(path)
    _common_test_settings(cfg, path)
    e = cfg.MODEL.EQLV2
    assert cfg.MODEL.LONGTAIL.CLS_LOSS == "eqlv2" and cfg.MODEL.LONGTAIL.CLS_LAYER == "linear"
    assert (e.GAMMA, e.MU, e.ALPHA, e.TEST_WITH_OBJ, e.PRIOR_PROB) == (12.0, 0.8, 4.0, True, 0.001)
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"  # no RFS
    v05 = "LVISv0.5" in path
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (
        (42555, (28370, 39009)) if v05 else (74541, (49694, 68330)))


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS if "/LVIS" in p
                                        and os.path.basename(p).startswith("fed_loss_")))
def test_fed_loss_configs_match_the_spec(path):
    from longtail.cls_losses import resolve_cls_loss

    cfg = load(path)
    _common_test_settings(cfg, path)
    head = cfg.MODEL.ROI_BOX_HEAD
    assert resolve_cls_loss(cfg) == "fed_loss"
    assert (head.FED_LOSS_NUM_CLASSES, head.FED_LOSS_FREQ_WEIGHT_POWER) == (50, 0.5)
    assert cfg.MODEL.LONGTAIL.SIGMOID_PRIOR_PROB == 0.0  # detectron2's bias 0
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001
    v05 = "LVISv0.5" in path
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == (1230 if v05 else 1203)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (
        (90000, (60000, 80000)) if v05 else (180000, (120000, 160000)))


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS if "/LVIS" in p
                                        and os.path.basename(p).startswith("norcal_")))
def test_norcal_configs_evaluate_a_softmax_rfs_model(path):
    cfg = load(path)
    assert cfg.MODEL.ROI_HEADS.NAME == "LongTailROIHeads"
    assert cfg.MODEL.LONGTAIL.CLS_LOSS == "softmax_ce"
    assert cfg.TEST.CALIBRATION.METHOD == "gamma" and cfg.TEST.CALIBRATION.WITH == "exps"
    assert cfg.TEST.CALIBRATION.RENORM
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0001 and cfg.TEST.DETECTIONS_PER_IMAGE == 300


@pytest.mark.parametrize("path", RIO)
def test_rio_configs_match_the_spec(path):
    cfg = load(path)
    v05 = "LVISv0.5" in path
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == (1230 if v05 else 1203)
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == (
        (90000, (60000, 80000)) if v05 else (180000, (120000, 160000)))
    assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
    assert cfg.DATALOADER.REPEAT_THRESHOLD == 0.001 and cfg.DATALOADER.REPEAT_SQRT
    assert cfg.MODEL.ROI_HEADS.NAME == "LongTailROIHeads"
    assert cfg.MODEL.LONGTAIL.CLS_LAYER == "cosine" and cfg.MODEL.RIO.COSINE_SCALE == 48.0
    assert cfg.MODEL.LONGTAIL.CLS_LOSS == "softmax_ce" and cfg.MODEL.LONGTAIL.IMS_PER_VGPU == 4
    mem = cfg.MODEL.MEMORY
    assert (mem.POLICY, mem.CAPACITY, cfg.MODEL.RIO.REPLAY_PER_CLASS) == ("rio", 60, 20)
    assert cfg.MODEL.RIO.CACHE_MAX_IMAGE_COUNT == 30 and not cfg.MODEL.RIO.RANDOM_SELECT
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.IMS_PER_BATCH == 16
    assert cfg.SOLVER.WARMUP_ITERS == 1000 and cfg.SOLVER.WARMUP_FACTOR == 0.001
    depth = 101 if "R_101" in path else 50
    assert cfg.MODEL.RESNETS.DEPTH == depth and f"R-{depth}.pkl" in cfg.MODEL.WEIGHTS


@pytest.mark.parametrize("path", LOCE_FULL)
def test_full_loce_configs_add_mfs(path):
    cfg = load(path)
    mem = cfg.MODEL.MEMORY
    assert (mem.POLICY, mem.CAPACITY) == ("mfs", 80)
    assert cfg.MODEL.LOCE.MFS.SAMPLED_NUM_CLASSES == 8 and cfg.MODEL.LOCE.MFS.SAMPLED_NUM_FEATURES == 4
    assert cfg.MODEL.LOCE.MFS.JITTER_RATIO == pytest.approx(1 / 6) and cfg.MODEL.LOCE.MFS.SCORE_EPS == 1e-7
    assert cfg.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS == 5 and mem.CHECKPOINT
    assert cfg.MODEL.LONGTAIL.CLS_LOSS == "ebl" and cfg.MODEL.LONGTAIL.IMS_PER_VGPU == 2


# one value per key that no method can honour, and one at the edge that is allowed
OUT_OF_RANGE = {
    "MODEL.ROI_MASK_HEAD.COSINE_SCALE": (0.0, 1e-3),
    "MODEL.LONGTAIL.CLS_LOSS": ("focal", "bags"),
    "MODEL.LONGTAIL.IMS_PER_VGPU": (-1, 0),
    "MODEL.LONGTAIL.LOG_PERIOD": (0, 1),
    "MODEL.LONGTAIL.CLS_LAYER": ("norm", "cosine"),
    "MODEL.RIO.COSINE_SCALE": (-48.0, 1.0),
    "MODEL.RIO.COSINE_EPS": (-1e-5, 0.0),
    "MODEL.MEMORY.POLICY": ("replay", "mfs"),
    "MODEL.MEMORY.CAPACITY": (0, 1),
    "MODEL.MEMORY.DTYPE": ("float8", "int8"),
    "MODEL.MEMORY.DEVICE": ("gpu", "cuda:1"),
    "MODEL.RIO.REPLAY_PER_CLASS": (-1, 0),
    "MODEL.RIO.CACHE_MAX_IMAGE_COUNT": (0, 1),
    "MODEL.RIO.CACHED_CLASSES": ([3, -1], [0, 5]),
    "MODEL.LOCE.MFS.JITTER_RATIO": (1.0, 0.0),
    "MODEL.LOCE.MFS.SAMPLED_NUM_CLASSES": (0, 1),
    "MODEL.LOCE.MFS.SAMPLED_NUM_FEATURES": (0, 1),
    "MODEL.LOCE.MFS.SCORE_EPS": (0.0, 1e-12),
    "MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS": (-5, 0),
    "MODEL.LOCE.ALPHA": (1.5, 0.0),
    "MODEL.LOCE.BG_SCORE": (0.0, 1.0),
    "MODEL.LOCE.INIT_SCORE": (1.5, 1.0),
    "MODEL.BAGS.BIN_EDGES": ([100, 10], [1]),
    "MODEL.BAGS.OTHERS_SAMPLE_RATIO": (-8.0, 0.0),
    "MODEL.BAGS.CLS_INIT_STD": (0.0, 1e-4),
    "LONGTAIL.NUM_THREADS": (-2, 0),
    "LONGTAIL.CHECK_IMAGES_MAX_IMAGES": (-1, 0),
    "LONGTAIL.EVAL.BACKEND": ("coco", "lvis"),
    "LONGTAIL.EVAL.MAX_DETS_PER_IMAGE": (0, 1),
    "LONGTAIL.EVAL.MAX_DETS_PER_CLASS": (0, 1),
    "LONGTAIL.TEST_TOPK_PER_CLASS": (-1, 0),
    "MODEL.LONGTAIL.NORMED_LINEAR_SCALE": (0.0, 1e-3),
    "MODEL.LONGTAIL.SIGMOID_PRIOR_PROB": (1.0, 0.0),
    "MODEL.SEESAW.P": (-0.8, 0.0),
    "MODEL.SEESAW.Q": (-2.0, 0.0),
    "MODEL.SEESAW.EPS": (0.0, 1.0),
    "MODEL.EQLV2.GAMMA": (-12.0, 0.0),
    "MODEL.EQLV2.MU": ("0.8", -0.5),
    "MODEL.EQLV2.ALPHA": (-4.0, 0.0),
    "MODEL.EQLV2.PRIOR_PROB": (1.0, 0.5),
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": (0, 1),
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": (-0.5, 0.0),
    "TEST.CALIBRATION.METHOD": ("norcal", "cb"),
    "TEST.CALIBRATION.WITH": ("exp", "logits"),
    "TEST.CALIBRATION.GAMMA": (-0.5, 0.0),
}


def _set(cfg, key, value):
    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = node[part]
    node[leaf] = value


def test_every_range_checked_key_is_covered_and_the_defaults_pass():
    from longtail.config import VALID, check_longtail_config

    assert set(VALID) == set(OUT_OF_RANGE)
    check_longtail_config(add_longtail_config(get_cfg()))


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_values_out_of_range_are_refused_naming_the_key(key):
    from longtail.config import check_longtail_config

    bad, edge = OUT_OF_RANGE[key]
    cfg = add_longtail_config(get_cfg())
    _set(cfg, key, edge)
    check_longtail_config(cfg)  # the edge value is allowed
    _set(cfg, key, bad)
    with pytest.raises(ValueError, match=re.escape(f"{key} {bad!r} (must be")):
        check_longtail_config(cfg)


def test_trainer_refuses_loce_alpha_above_one_before_building():
    """Before: MODEL.LOCE.ALPHA 1.5 trained (mean scores diverging) without a word."""
    from longtail import Trainer

    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file("configs/Synthetic/loce_stage2_ebl_mfs.yaml")
    cfg.merge_from_list(["MODEL.LOCE.ALPHA", "1.5", "MODEL.DEVICE", "cpu"])
    with pytest.raises(ValueError, match=r"MODEL.LOCE.ALPHA 1.5 \(must be a number >= 0 and < 1\)"):
        Trainer.build_model(cfg)


def test_import_longtail_needs_no_shapely():
    # the dataset generator imports shapely when it builds geometry, not on `import longtail`
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sys, longtail; "
                          "print('shapely' in sys.modules)"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout.strip().splitlines()[-1]
    assert out == "False"


@pytest.mark.parametrize("old,new", [
    ("MODEL.MEMORY.RIO.REPLAY_PER_CLASS", "MODEL.RIO.REPLAY_PER_CLASS"),
    ("MODEL.MEMORY.MFS.SAMPLED_NUM_CLASSES", "MODEL.LOCE.MFS.SAMPLED_NUM_CLASSES"),
    ("MODEL.LONGTAIL.COSINE_SCALE", "MODEL.RIO.COSINE_SCALE"),
])
def test_removed_keys_fail_naming_the_new_key(old, new, tmp_path):
    cfg = add_longtail_config(get_cfg())
    with pytest.raises(KeyError, match=new.replace(".", r"\.")):
        cfg.merge_from_list([old, "3"])
    # the same key in a yaml file
    *nodes, leaf = old.split(".")
    text = "".join("  " * i + f"{n}:\n" for i, n in enumerate(nodes)) + "  " * len(nodes) + f"{leaf}: 3\n"
    path = tmp_path / "old.yaml"
    path.write_text(text)
    with pytest.raises(KeyError, match=r"MODEL\.(RIO|LOCE)"):
        add_longtail_config(get_cfg()).merge_from_file(str(path))


# keys read by one loss / classifier layer only: (key, a value != default, its readers)
OWNED = [
    ("MODEL.SEESAW.P", 0.5, {"seesaw"}),
    ("MODEL.EQLV2.GAMMA", 6.0, {"eqlv2"}),
    ("MODEL.BAGS.BIN_EDGES", [5, 50], {"bags"}),
    ("MODEL.LOCE.ALPHA", 0.5, {"ebl"}),
    ("MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", 16, {"fed_loss"}),
    ("MODEL.LONGTAIL.SIGMOID_PRIOR_PROB", 0.01, {"sigmoid_ce", "fed_loss"}),
]
LOSSES = ["softmax_ce", "ebl", "bags", "seesaw", "eqlv2", "sigmoid_ce", "fed_loss"]


@pytest.mark.parametrize("key,value,readers", OWNED)
@pytest.mark.parametrize("loss", LOSSES)
def test_keys_of_an_unselected_loss_are_refused_naming_the_key(key, value, readers, loss):
    from longtail.cls_losses import CLS_LOSS_REGISTRY
    from longtail.registry import refuse_keys_of_unselected

    cfg = add_longtail_config(get_cfg())
    cfg.MODEL.LONGTAIL.CLS_LOSS = loss
    refuse_keys_of_unselected(cfg, CLS_LOSS_REGISTRY, loss, "MODEL.LONGTAIL.CLS_LOSS")  # defaults
    _set(cfg, key, value)
    if loss in readers:
        refuse_keys_of_unselected(cfg, CLS_LOSS_REGISTRY, loss, "MODEL.LONGTAIL.CLS_LOSS")
        return
    with pytest.raises(ValueError) as e:
        refuse_keys_of_unselected(cfg, CLS_LOSS_REGISTRY, loss, "MODEL.LONGTAIL.CLS_LOSS")
    msg = str(e.value)
    assert f"{key} {value!r}" in msg and f"MODEL.LONGTAIL.CLS_LOSS is {loss!r}" in msg
    for reader in readers:
        assert repr(reader) in msg


@pytest.mark.parametrize("layer,key,value", [
    ("linear", "MODEL.LONGTAIL.NORMED_LINEAR_SCALE", 16.0),
    ("cosine", "MODEL.LONGTAIL.NORMED_LINEAR_SCALE", 16.0),
    ("linear", "MODEL.RIO.COSINE_SCALE", 20.0),
    ("normed_linear", "MODEL.RIO.COSINE_EPS", 1e-3),
])
def test_keys_of_an_unselected_classifier_layer_are_refused(layer, key, value):
    from longtail.layers import CLS_LAYER_REGISTRY
    from longtail.registry import refuse_keys_of_unselected

    cfg = add_longtail_config(get_cfg())
    _set(cfg, key, value)
    with pytest.raises(ValueError, match=re.escape(f"{key} {value!r}")):
        refuse_keys_of_unselected(cfg, CLS_LAYER_REGISTRY, layer, "MODEL.LONGTAIL.CLS_LAYER")
    from torch import nn

    from longtail.layers import build_cls_layer

    cfg.MODEL.LONGTAIL.CLS_LAYER = layer  # wired into the classifier's build
    with pytest.raises(ValueError, match=re.escape(f"{key} {value!r}")):
        build_cls_layer(cfg, nn.Linear(8, 4), 4)
    reader = "cosine" if key.startswith("MODEL.RIO") else "normed_linear"
    refuse_keys_of_unselected(cfg, CLS_LAYER_REGISTRY, reader, "MODEL.LONGTAIL.CLS_LAYER")


def test_model_build_refuses_a_seesaw_key_with_softmax(tmp_path):
    # the refusal is wired into the predictor's build, not only callable
    from longtail.cls_losses import build_cls_loss

    cfg = add_longtail_config(get_cfg())
    cfg.MODEL.SEESAW.Q = 0.0
    with pytest.raises(ValueError, match=r"MODEL\.SEESAW\.Q 0\.0 \(read only by "
                       r"MODEL\.LONGTAIL\.CLS_LOSS 'seesaw'\)"):
        build_cls_loss(cfg, 3)
    cfg.MODEL.LONGTAIL.CLS_LOSS = "seesaw"
    assert build_cls_loss(cfg, 3).q == 0.0
