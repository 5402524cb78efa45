"""Datasets declared in the config (LONGTAIL.REGISTER_DATASETS): LVIS and COCO format."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

from longtail import Trainer, add_longtail_config
from longtail import custom_datasets as cd
from longtail.datasets import FREQUENCY, IMAGE_COUNT, INSTANCE_COUNT, prepare_datasets
from longtail.synthetic import SyntheticConfig, ensure_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lvis_rule(n):  # LVIS's frequency buckets, written out independently of the package
    return "r" if n <= 10 else ("c" if n <= 100 else "f")


# ------------------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------------------
def tiny_coco():
    """3 categories, 2 images; image 1: a cat-1 object and a crowd region of cat 2; image 2: cat 3."""
    return {
        "images": [{"id": 1, "width": 50, "height": 40, "file_name": "a.jpg"},
                   {"id": 2, "width": 60, "height": 30, "file_name": "sub/b.jpg"}],
        "annotations": [
            {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 5], "area": 40.0,
             "segmentation": [[1, 2, 11, 2, 11, 7]], "iscrowd": 0},
            {"id": 8, "image_id": 1, "category_id": 2, "bbox": [20, 2, 10, 10], "area": 100.0,
             "segmentation": {"size": [40, 50], "counts": "abc"}, "iscrowd": 1},
            {"id": 9, "image_id": 2, "category_id": 3, "bbox": [0, 0, 4, 4],
             "segmentation": [[0, 0, 4, 0, 4, 4]], "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}, {"id": 3, "name": "z"}],
    }


def test_check_instances_json_names_the_file_and_the_problem():
    cd.check_instances_json(tiny_coco(), "ok.json")
    with pytest.raises(ValueError, match=r"captions\.json: not an instances json"):
        cd.check_instances_json({"images": [], "annotations": [{"caption": "a dog"}]},
                                "captions.json")
    bad = tiny_coco()
    bad["annotations"][0]["image_id"] = 99
    with pytest.raises(ValueError, match=r"u\.json: annotations refer to image ids \[99\]"):
        cd.check_instances_json(bad, "u.json")
    bad = tiny_coco()
    bad["categories"][2]["id"] = 5
    bad["annotations"][2]["category_id"] = 5
    with pytest.raises(ValueError, match=r"c\.json: category ids must be contiguous 1\.\.C.*\[3"):
        cd.check_instances_json(bad, "c.json")
    bad = tiny_coco()
    del bad["images"][1]["file_name"]
    with pytest.raises(ValueError, match=r"f\.json: images need .*file_name.*positions \[1\]"):
        cd.check_instances_json(bad, "f.json")
    bad = tiny_coco()
    bad["images"][1]["id"] = 1
    with pytest.raises(ValueError, match=r"d\.json: image ids \[1\] occur more than once"):
        cd.check_instances_json(bad, "d.json")


def test_detect_format():
    data = tiny_coco()
    assert cd.detect_format(data, "j") == "coco"
    for im in data["images"]:
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = [], []
    assert cd.detect_format(data, "j") == "lvis"
    del data["images"][0]["neg_category_ids"]
    with pytest.raises(ValueError, match="mix.json: 1 images carry LVIS"):
        cd.detect_format(data, "mix.json")


def test_normalize_coco_is_exhaustive_and_crowd_is_not_exhaustive():
    out = cd.normalize(tiny_coco(), "coco", ["f", "c", "r"])
    im1, im2 = out["images"]
    # image 1: cat 1 present, cat 2 only as crowd -> not exhaustive, cat 3 absent -> negative
    assert im1["neg_category_ids"] == [3] and im1["not_exhaustive_category_ids"] == [2]
    assert im2["neg_category_ids"] == [1, 2] and im2["not_exhaustive_category_ids"] == []
    assert [a["id"] for a in out["annotations"]] == [7, 9]  # the crowd annotation is gone
    assert out["annotations"][1]["area"] == 16  # missing area: box area
    assert [c["frequency"] for c in out["categories"]] == ["f", "c", "r"]
    assert [im["file_name"] for im in out["images"]] == ["a.jpg", "sub/b.jpg"]
    # only trained on: no negative lists
    assert all(im["neg_category_ids"] == [] for im in
               cd.normalize(tiny_coco(), "coco", None, negatives=False)["images"])


def test_normalize_lvis_keeps_federated_lists_and_reads_coco_url():
    data = tiny_coco()
    for im, neg, ne in zip(data["images"], ([2], [1]), ([], [3])):
        im["neg_category_ids"], im["not_exhaustive_category_ids"] = neg, ne
    del data["images"][0]["file_name"]
    data["images"][0]["coco_url"] = "http://images.cocodataset.org/train2017/000000000001.jpg"
    data["categories"][0]["frequency"] = "r"
    out = cd.normalize(data, "lvis", None)
    assert [im["neg_category_ids"] for im in out["images"]] == [[2], [1]]
    assert [im["not_exhaustive_category_ids"] for im in out["images"]] == [[], [3]]
    assert out["images"][0]["file_name"] == "train2017/000000000001.jpg"
    assert out["categories"][0]["frequency"] == "r" and "frequency" not in out["categories"][1]


def test_records_from_normalized():
    records = cd.records_from_normalized(cd.normalize(tiny_coco(), "coco", None), "/img")
    assert [r["file_name"] for r in records] == ["/img/a.jpg", "/img/sub/b.jpg"]
    assert [[a["category_id"] for a in r["annotations"]] for r in records] == [[0], [2]]
    assert records[0]["annotations"][0]["bbox"] == [1, 2, 10, 5]
    assert (records[1]["height"], records[1]["width"], records[1]["image_id"]) == (30, 60, 2)


def test_check_masks():
    records = cd.records_from_normalized(cd.normalize(tiny_coco(), "coco", None), "/img")
    cd.check_masks(records, "m.json", "polygon")
    records[0]["annotations"][0]["segmentation"] = {"size": [40, 50], "counts": "abc"}
    with pytest.raises(ValueError, match="m.json: 1 annotation.*RLE.*INPUT.MASK_FORMAT bitmask"):
        cd.check_masks(records, "m.json", "polygon")
    cd.check_masks(records, "m.json", "bitmask")
    del records[1]["annotations"][0]["segmentation"]
    with pytest.raises(ValueError, match="m.json: MODEL.MASK_ON is True but 1 annotation"):
        cd.check_masks(records, "m.json", "bitmask")


def test_parse_register_entries():
    specs = cd.parse_register_entries([("a", "x.json", "imgs"), ["b", "/y.json", "/i", "coco"]])
    assert specs[0] == cd.DatasetSpec("a", os.path.abspath("x.json"), os.path.abspath("imgs"))
    assert specs[1].fmt == "coco"
    for bad in ([("a", "x.json")], [("a", "x.json", "i", "yolo")], ["a"], [("a", "", "i")]):
        with pytest.raises(ValueError, match="LONGTAIL.REGISTER_DATASETS: bad entry"):
            cd.parse_register_entries(bad)
    with pytest.raises(ValueError, match="'a' is declared twice"):
        cd.parse_register_entries([("a", "x", "i"), ("a", "y", "j")])


# ------------------------------------------------------------------------------------------------
# Registration through the config
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    cfg = SyntheticConfig(num_train_images=120, num_val_images=30, min_val_images_per_class=1,
                          annotation_format="coco")
    return ensure_dataset(str(tmp_path_factory.mktemp("shapes") / "shapes_coco"), cfg)


@pytest.fixture(scope="module")
def lvis_paths():
    name = "longtail_synth_mini_train"
    MetadataCatalog.get(name).longtail_prepare()
    train = MetadataCatalog.get(name)
    val = MetadataCatalog.get("longtail_synth_mini_val")
    return {"train_json": train.json_file, "val_json": val.json_file,
            "image_root": train.image_root}


def entries(paths, prefix):
    if "train_images" in paths:  # COCO layout
        return [(f"{prefix}_train", paths["train_json"], paths["train_images"]),
                (f"{prefix}_val", paths["val_json"], paths["val_images"])]
    return [(f"{prefix}_train", paths["train_json"], paths["image_root"]),
            (f"{prefix}_val", paths["val_json"], paths["image_root"])]


def overrides(paths, prefix, out_dir):
    return ["LONGTAIL.REGISTER_DATASETS", repr(entries(paths, prefix)),
            "DATASETS.TRAIN", f"('{prefix}_train',)", "DATASETS.TEST", f"('{prefix}_val',)",
            "OUTPUT_DIR", str(out_dir)]


def make_cfg(config, opts):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, config))
    cfg.merge_from_list(opts)
    return cfg


def test_coco_train_statistics_follow_lvis_rule(coco_root, tmp_path):
    cfg = make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml",
                   overrides(coco_root, "stats_coco", tmp_path))
    assert cd.register_from_config(cfg) == ["stats_coco_train", "stats_coco_val"]
    prepare_datasets(["stats_coco_train", "stats_coco_val"], 48)
    with open(coco_root["train_json"]) as f:
        raw = json.load(f)
    assert not any("frequency" in c for c in raw["categories"])
    assert not any("neg_category_ids" in im for im in raw["images"])
    images = {c["id"]: set() for c in raw["categories"]}
    instances = {c["id"]: 0 for c in raw["categories"]}
    for a in raw["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    ids = sorted(images)
    for name in ("stats_coco_train", "stats_coco_val"):  # the val split takes train statistics
        meta = MetadataCatalog.get(name)
        assert meta.get(IMAGE_COUNT) == [len(images[i]) for i in ids]
        assert meta.get(INSTANCE_COUNT) == [instances[i] for i in ids]
        assert meta.get(FREQUENCY) == [lvis_rule(len(images[i])) for i in ids]
    assert {"r", "c"} <= set(MetadataCatalog.get("stats_coco_train").get(FREQUENCY))
    # the evaluation json: exhaustive negatives, train r/c/f
    with open(MetadataCatalog.get("stats_coco_val").json_file) as f:
        ev = json.load(f)
    with open(coco_root["val_json"]) as f:
        raw_val = json.load(f)
    present = {}
    for a in raw_val["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    for im in ev["images"]:
        assert im["neg_category_ids"] == [i for i in ids if i not in present.get(im["id"], ())]
    assert [c["frequency"] for c in ev["categories"]] == [lvis_rule(len(images[i])) for i in ids]
    # registering the same config again is a no-op; a name taken by another dataset is refused
    assert cd.register_from_config(cfg) == ["stats_coco_train", "stats_coco_val"]
    cfg.LONGTAIL.REGISTER_DATASETS = [("longtail_synth_train", coco_root["train_json"], "x")]
    with pytest.raises(ValueError, match="'longtail_synth_train' is already a registered"):
        cd.register_from_config(cfg)


def test_bad_declared_datasets_fail_at_load_naming_the_file(coco_root, tmp_path):
    with open(coco_root["val_json"]) as f:
        val = json.load(f)
    # a test json whose categories differ from the training json's
    renamed = dict(val, categories=[dict(c, name=c["name"] + "_x") if c["id"] == 5 else c
                                    for c in val["categories"]])
    bad_json = tmp_path / "renamed.json"
    bad_json.write_text(json.dumps(renamed))
    opts = overrides(coco_root, "bad1", tmp_path / "o1")
    ents = entries(coco_root, "bad1")
    ents[1] = ("bad1_val", str(bad_json), coco_root["val_images"])
    opts[1] = repr(ents)
    cfg = make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", opts)
    cd.register_from_config(cfg)
    with pytest.raises(ValueError, match=r"renamed\.json: its categories differ .*id 5"):
        prepare_datasets(["bad1_train", "bad1_val"], 48)
    # a missing evaluation image
    images = tmp_path / "val_images"
    images.mkdir()
    for name in sorted(os.listdir(coco_root["val_images"]))[1:]:
        os.symlink(os.path.join(coco_root["val_images"], name), images / name)
    missing = sorted(os.listdir(coco_root["val_images"]))[0]
    opts = overrides(coco_root, "bad2", tmp_path / "o2")
    ents = entries(coco_root, "bad2")
    ents[1] = ("bad2_val", coco_root["val_json"], str(images))
    opts[1] = repr(ents)
    cd.register_from_config(make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", opts))
    with pytest.raises(FileNotFoundError, match=f"evaluation image file.*{missing}"):
        DatasetCatalog.get("bad2_val")
    # a caption json
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": val["images"], "annotations": []}))
    opts = overrides(coco_root, "bad3", tmp_path / "o3")
    opts[1] = repr([("bad3_train", str(captions), coco_root["train_images"])])
    cd.register_from_config(make_cfg("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", opts))
    with pytest.raises(ValueError, match=r"captions\.json: not an instances json"):
        prepare_datasets(["bad3_train"], 48)


def test_num_classes_from_dataset_or_error_with_the_number(coco_root, tmp_path):
    sys.path.insert(0, ROOT)
    import train_net

    base = ["--config-file", "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml"]
    opts = overrides(coco_root, "nc", tmp_path) + ["MODEL.ROI_HEADS.NUM_CLASSES", "80"]
    cfg = train_net.setup(default_argument_parser().parse_args(base + opts))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 48  # left at detectron2's default: from the json
    opts[-1] = "30"
    cfg = train_net.setup(default_argument_parser().parse_args(base + opts))
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 30  # set explicitly: kept, and refused at build
    with pytest.raises(ValueError, match="Set MODEL.ROI_HEADS.NUM_CLASSES 48"):
        Trainer.build_model(cfg)


TRAIN_SHORT = ["SOLVER.MAX_ITER", "10", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "2",
               "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0",
               "TEST.DETECTIONS_PER_IMAGE", "20", "MODEL.RPN.POST_NMS_TOPK_TEST", "50"]


@pytest.mark.parametrize("config,extra", [
    ("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", []),
    # LOCE stage 2 (EBL + MFS) from scratch weights: the data path is under test, not stage 1
    ("configs/Synthetic/loce_stage2_ebl_mfs.yaml",
     ["MODEL.WEIGHTS", "", "MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS", "1"]),
], ids=["rfs", "loce_stage2"])
@pytest.mark.parametrize("fmt", ["coco", "lvis"])
def test_train_10_iterations_on_datasets_declared_by_overrides(fmt, config, extra, coco_root,
                                                               lvis_paths, tmp_path):
    sys.path.insert(0, ROOT)
    import train_net

    paths = coco_root if fmt == "coco" else lvis_paths
    prefix = f"cfg_{fmt}_{os.path.basename(config).split('_')[0]}"
    args = default_argument_parser().parse_args(
        ["--config-file", config] + overrides(paths, prefix, tmp_path) + TRAIN_SHORT + extra)
    cfg = train_net.setup(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 10  # detectron2 leaves iter at max_iter after the last step
    meta = MetadataCatalog.get(f"{prefix}_val")
    assert meta.longtail_source_json == os.path.abspath(paths["val_json"])
    results = trainer._last_eval_results
    for task in ("bbox", "segm"):
        assert set(results[task]) >= {"AP", "APr", "APc", "APf"}
    with open(os.path.join(str(tmp_path), "metrics.json")) as f:
        losses = [json.loads(line)["total_loss"] for line in f if '"total_loss"' in line]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    if "loce" in config:
        roi = trainer.model.roi_heads
        assert roi.box_predictor.cls_loss.name == "ebl"
        assert len(trainer.train_dicts) == (120 if fmt == "coco" else 300)


# ------------------------------------------------------------------------------------------------
# The README's "Train on your own data" commands, shortened
# ------------------------------------------------------------------------------------------------
def readme_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"<!-- own-data-commands -->\s*```bash\n(.*?)```", text, re.S).group(1)
    block = block.replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_own_data_commands(tmp_path):
    commands = readme_commands()
    assert [c[1] for c in commands] == ["tools/generate_dataset.py", "train_net.py",
                                        "tools/predict.py"]
    data, out = str(tmp_path / "shapes_coco"), str(tmp_path / "out")

    def run(command, extra=()):
        command = [sys.executable] + [a.replace("datasets/shapes_coco", data)
                                      .replace("output/shapes_coco", out) for a in command[1:]]
        proc = subprocess.run(command + list(extra), cwd=ROOT, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc.stdout + proc.stderr

    run(commands[0], ["--num-train-images", "120", "--num-val-images", "30"])
    log = run(commands[1], TRAIN_SHORT)
    assert "COCO-format" in open(os.path.join(out, "log.txt")).read()
    assert re.search(r"\| r \| \d+ \(\d+\) \|", log), "no r/c/f table printed"
    with open(os.path.join(out, "eval_results.json")) as f:
        assert "APr" in json.load(f)["bbox"]
    run(commands[2])
    pngs = sorted(os.listdir(os.path.join(out, "predictions")))
    assert len([p for p in pngs if p.endswith(".png")]) == 30
    with open(os.path.join(out, "predictions", "predictions.json")) as f:
        predictions = json.load(f)
    assert len(predictions) == 30
    assert all(d["frequency"] == "r" for p in predictions for d in p["detections"])


def test_declared_in_a_yaml(coco_root, tmp_path):
    # the README's yaml form: a config file that extends a project config and declares the data
    yaml = tmp_path / "shapes.yaml"
    yaml.write_text(
        f"_BASE_: {os.path.join(ROOT, 'configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml')}\n"
        "LONGTAIL:\n  REGISTER_DATASETS:\n"
        f"    - [yaml_train, {coco_root['train_json']}, {coco_root['train_images']}]\n"
        f"    - [yaml_val, {coco_root['val_json']}, {coco_root['val_images']}, coco]\n"
        'DATASETS:\n  TRAIN: ("yaml_train",)\n  TEST: ("yaml_val",)\n'
        f"OUTPUT_DIR: {tmp_path / 'out'}\n")
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(str(yaml))
    assert cd.register_from_config(cfg) == ["yaml_train", "yaml_val"]
    prepare_datasets(["yaml_train", "yaml_val"], 48)
    assert len(DatasetCatalog.get("yaml_val")) == 30
    assert MetadataCatalog.get("yaml_val").get(FREQUENCY) == MetadataCatalog.get(
        "yaml_train").get(FREQUENCY)
