import glob
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


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path):
    cfg = load(path)
    assert cfg.DATALOADER.SAMPLER_TRAIN in SAMPLER_REGISTRY
    assert cfg.TEST.DETECTIONS_PER_IMAGE == (100 if "Synthetic" in path else 300)
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == pytest.approx(1e-4)
    if "rfs" in os.path.basename(path):
        assert cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"


@pytest.mark.parametrize("path", [p for p in CONFIGS if "/LVIS" in p or "Base-LongTail" in p])
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


def test_synthetic_configs_fit_the_embedded_dataset():
    for path in [p for p in CONFIGS if "Synthetic" in p]:
        cfg = load(path)
        assert cfg.DATASETS.TRAIN == ("longtail_synth_train",)
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 48
        assert cfg.MODEL.WEIGHTS == ""  # trained from scratch
        assert max(cfg.INPUT.MIN_SIZE_TRAIN) <= 160 and cfg.INPUT.MIN_SIZE_TEST <= 160
