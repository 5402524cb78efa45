"""Weights that cannot be what the user meant are refused before anything runs (longtail.weights)."""
import os
import subprocess

import pytest
import torch
from detectron2.config import get_cfg

from longtail import Trainer, add_longtail_config
from longtail.weights import check_initial_weights, configs_writing, load_weights_for_evaluation

STAGE2 = "configs/LVISv1/loce_mask_rcnn_R_50_FPN_ebl_stage2.yaml"


def make_cfg(config="configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", **extra):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.DATASETS.TRAIN = ("longtail_synth_mini_train",)
    cfg.DATASETS.TEST = ("longtail_synth_mini_val",)
    cfg.merge_from_list([x for kv in extra.items() for x in kv])
    return cfg


def _yaml_value(path, key):
    """The value of a top-level ``key: "value"`` line, read as text (not through the code)."""
    for line in open(path):
        if line.startswith(f"{key}:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise KeyError(key)


def test_configs_writing_finds_the_stage1_of_every_stage2_weight_path():
    stage1 = "configs/LVISv1/loce_mask_rcnn_R_50_FPN_normed_mask_stage1.yaml"
    out = _yaml_value(stage1, "OUTPUT_DIR")
    assert configs_writing(out) == [stage1]
    assert configs_writing("output/nothing/writes/here") == []


def test_missing_stage1_weights_fail_first_naming_the_stage1_config(python, repo_root, tmp_path):
    """Before: AssertionError 'Checkpoint ... not found!' after data and model were built."""
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(STAGE2)
    assert not os.path.exists(cfg.MODEL.WEIGHTS)
    with pytest.raises(FileNotFoundError,
                       match="loce_mask_rcnn_R_50_FPN_normed_mask_stage1.yaml: train that first"):
        check_initial_weights(cfg)
    # through train_net.py, before any dataset is read
    proc = subprocess.run(
        [python, "train_net.py", "--config-file", "configs/Synthetic/loce_stage2_ebl.yaml",
         "MODEL.WEIGHTS", "output/synthetic/loce_stage1/nope.pth", "OUTPUT_DIR",
         str(tmp_path / "out")], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "configs/Synthetic/loce_stage1_normed_mask.yaml: train that first" in proc.stderr
    assert "Loaded" not in proc.stdout + proc.stderr  # no dataset was loaded


def test_resume_with_a_checkpoint_does_not_need_the_initial_weights(tmp_path):
    cfg = make_cfg(**{"MODEL.WEIGHTS": str(tmp_path / "missing.pth"),
                      "OUTPUT_DIR": str(tmp_path)})
    with pytest.raises(FileNotFoundError):
        check_initial_weights(cfg, resume=True)  # nothing to resume from yet
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    check_initial_weights(cfg, resume=True)


def test_eval_only_refuses_random_heads_unless_allowed(tmp_path):
    """Before: --eval-only without weights evaluated a random model and exited 0."""
    cfg = make_cfg(**{"MODEL.WEIGHTS": "", "OUTPUT_DIR": str(tmp_path)})
    model = Trainer.build_model(cfg)
    with pytest.raises(ValueError, match="without MODEL.WEIGHTS"):
        load_weights_for_evaluation(cfg, model)
    # weights of the backbone only (e.g. an ImageNet initialisation)
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    torch.save({"model": backbone}, tmp_path / "backbone.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="hold no roi_heads.box_predictor"):
        load_weights_for_evaluation(cfg, Trainer.build_model(cfg))
    # a checkpoint of another class count: its predictor does not fit this model
    other = make_cfg(**{"MODEL.ROI_HEADS.NUM_CLASSES": 7, "DATASETS.TRAIN": (),
                        "DATASETS.TEST": ()})
    torch.save({"model": Trainer.build_model(other).state_dict()}, tmp_path / "other.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "other.pth")
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES"):
        load_weights_for_evaluation(cfg, Trainer.build_model(cfg))
    # allowed explicitly; and a whole checkpoint of this config loads as before
    cfg.LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS = True
    load_weights_for_evaluation(cfg, Trainer.build_model(cfg))
    cfg.LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS = False
    torch.save({"model": model.state_dict()}, tmp_path / "whole.pth")
    cfg.MODEL.WEIGHTS = str(tmp_path / "whole.pth")
    loaded = Trainer.build_model(cfg)
    load_weights_for_evaluation(cfg, loaded)
    name = "roi_heads.box_predictor.cls_score.weight"
    assert torch.equal(loaded.state_dict()[name], model.state_dict()[name])
