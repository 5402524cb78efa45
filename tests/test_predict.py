"""tools/predict.py: a model on a folder / glob of images, PNGs and a json of detections."""
import json
import os
import shutil
import sys

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from PIL import Image

from longtail import Trainer, add_longtail_config
from longtail.datasets import FREQUENCY

CONFIG = "configs/Synthetic/mask_rcnn_R18_FPN.yaml"
OPTS = ["DATASETS.TRAIN", "('longtail_synth_mini_train',)",
        "DATASETS.TEST", "('longtail_synth_mini_val',)", "MODEL.DEVICE", "cpu"]


@pytest.fixture(scope="module")
def predict(repo_root):
    sys.path.insert(0, os.path.join(repo_root, "tools"))
    import predict as module

    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(OPTS)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    path = str(tmp_path_factory.mktemp("weights") / "model.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


def test_expand_inputs_files_folders_globs(predict, tmp_path):
    for name in ("b.jpg", "a.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.JPG").write_bytes(b"x")
    got = predict.expand_inputs([str(tmp_path), str(tmp_path / "sub" / "*.JPG"),
                                 str(tmp_path / "a.png")])
    assert got == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg"), str(tmp_path / "sub" / "c.JPG")]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        predict.expand_inputs([str(tmp_path / "nothing_here" / "*.jpg")])


def test_predict_writes_pngs_and_detections(predict, weights, tmp_path):
    val = MetadataCatalog.get("longtail_synth_mini_val")
    images = tmp_path / "images"
    images.mkdir()
    src = sorted(os.listdir(os.path.join(os.path.dirname(val.json_file), "..", "val")))[:2]
    for name in src:
        shutil.copy(os.path.join(os.path.dirname(val.json_file), "..", "val", name), images / name)
    out = tmp_path / "out"
    common = ["--config-file", CONFIG, "--input", str(images), "--confidence-threshold", "0.0"]
    assert predict.main(common + ["--output", str(out), "--opts", *OPTS,
                                  "MODEL.WEIGHTS", weights]) == 0
    stems = [os.path.splitext(n)[0] for n in src]
    assert sorted(os.listdir(out)) == sorted([s + ".png" for s in stems] + ["predictions.json"])
    result = json.load(open(out / "predictions.json"))
    assert [r["file_name"] for r in result] == [str(images / n) for n in src]
    classes = list(val.thing_classes)
    frequency = val.get(FREQUENCY)
    for r, name in zip(result, src):
        w, h = Image.open(images / name).size
        assert (r["width"], r["height"]) == (w, h)
        drawn = Image.open(out / (os.path.splitext(name)[0] + ".png"))
        assert min(drawn.size) >= min(w, h)  # drawn at >= the image's size
        dets = r["detections"]
        assert dets, "a random model at threshold 0 keeps detections"
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True)
        for d in dets:
            c = d["category_id"] - 1  # LVIS-format: json ids 1..C
            assert d["category_name"] == classes[c] and d["frequency"] == frequency[c]
            x, y, bw, bh = d["bbox"]
            assert -0.01 <= x and -0.01 <= y and x + bw <= w + 0.01 and y + bh <= h + 0.01
            assert tuple(mask_util.decode(d["segmentation"]).shape) == (h, w)

    rare = tmp_path / "rare"
    assert predict.main(common + ["--output", str(rare), "--frequency", "r", "--opts", *OPTS,
                                  "MODEL.WEIGHTS", weights]) == 0
    only_r = json.load(open(rare / "predictions.json"))
    for full, part in zip(result, only_r):
        expect = [d for d in full["detections"] if d["frequency"] == "r"]
        assert [(d["category_id"], d["score"]) for d in part["detections"]] == [
            (d["category_id"], d["score"]) for d in expect]


def test_predict_refuses_missing_weights(predict, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(img)
    with pytest.raises(ValueError, match="MODEL.WEIGHTS"):
        predict.main(["--config-file", CONFIG, "--input", str(img), "--output",
                      str(tmp_path / "o"), "--opts", *OPTS])
