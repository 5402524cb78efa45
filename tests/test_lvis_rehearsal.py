"""
Tests of the LVIS rehearsal data (:mod:`longtail.rehearsal`) and tool (tools/lvis_rehearsal.py).

Fast tests check the generated data against values computed here independently: detectron2's
own LVIS category lists and buckets, image counts recomputed from the annotations, detectron2's
built-in ``lvis_*`` registrations loading the tree. The slow tests run a representative subset of
the LVIS configs through the tool (train, resume, evaluate) at the real class count.
"""
import dataclasses
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from longtail import rehearsal
from longtail.rehearsal import RehearsalConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools import lvis_rehearsal as tool  # noqa: E402

D2_CATEGORY_MODULES = {"v1": "detectron2.data.datasets.lvis_v1_categories",
                       "v0.5": "detectron2.data.datasets.lvis_v0_5_categories"}
REAL_COUNTS = {"v1": (1203, {"r": 337, "c": 461, "f": 405}),
               "v0.5": (1230, {"r": 454, "c": 461, "f": 315})}
# a few categories of v1 only, fast to generate
TINY = RehearsalConfig(versions=("v1",), num_categories=40, num_val_images=12,
                       num_minival_images=4, seed=5)


def _load(path):
    with open(path) as f:
        return json.load(f)


def _bucket(n_images):
    # LVIS: rare 1-10 training images, common 11-100, frequent > 100
    return "r" if n_images <= 10 else ("c" if n_images <= 100 else "f")


def _tree_digest(root):
    """Hash of every file's path and bytes; the stamp without its generation time."""
    digest = hashlib.sha256()
    stamp = _load(os.path.join(root, rehearsal.STAMP_FILE))
    del stamp["seconds"]
    digest.update(json.dumps(stamp, sort_keys=True).encode())
    for dirpath, dirnames, files in sorted(os.walk(root)):
        dirnames.sort()
        for name in sorted(set(files) - {rehearsal.STAMP_FILE}):
            path = os.path.join(dirpath, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def default_root():
    """The default rehearsal data (both versions), generated once per checkout."""
    root = rehearsal.default_root()
    rehearsal.ensure_rehearsal(root)
    return os.path.abspath(root)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["v1", "v0.5"])
def test_real_categories_and_buckets_for_every_category(default_root, version):
    paths = rehearsal.rehearsal_paths(default_root, version)
    train, val = _load(paths["train_json"]), _load(paths["val_json"])
    real = importlib.import_module(D2_CATEGORY_MODULES[version]).LVIS_CATEGORIES
    real_by_id = {c["id"]: c for c in real}
    num, buckets = REAL_COUNTS[version]
    assert len(real_by_id) == num and Counter(c["frequency"] for c in real) == buckets

    images_of = defaultdict(set)
    instances = Counter()
    for ann in train["annotations"]:
        images_of[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    assert sorted(c["id"] for c in train["categories"]) == sorted(real_by_id)
    for cat in train["categories"]:
        ref = real_by_id[cat["id"]]
        n = len(images_of[cat["id"]])
        assert cat["name"] == ref["name"] and cat["synset"] == ref["synset"]
        # recomputed from the annotations, the bucket is the real one, for every category
        assert _bucket(n) == ref["frequency"], (version, cat["id"], n, ref["frequency"])
        assert cat["frequency"] == ref["frequency"]
        assert cat["image_count"] == n and cat["instance_count"] == instances[cat["id"]]
    # frequent categories just above the edge (small data)
    assert max(len(s) for s in images_of.values()) <= 130
    # every category has validation objects; val carries the same category list
    assert {a["category_id"] for a in val["annotations"]} == set(real_by_id)
    assert val["categories"] == train["categories"]


@pytest.mark.parametrize("version", ["v1", "v0.5"])
def test_lvis_fields_geometry_and_image_files(default_root, version):
    paths = rehearsal.rehearsal_paths(default_root, version)
    for split in ("train", "val"):
        data = _load(paths[f"{split}_json"])
        ids = [img["id"] for img in data["images"]]
        assert len(set(ids)) == len(ids)
        ann_ids = [a["id"] for a in data["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        by_image = defaultdict(list)
        for ann in data["annotations"]:
            by_image[ann["image_id"]].append(ann)
        num_cats = len(data["categories"])
        for img in data["images"][:200]:
            base = f"{img['id']:012d}.jpg"
            assert img["coco_url"] == f"http://images.cocodataset.org/{split}2017/{base}"
            assert img["file_name"] == base
            path = os.path.join(paths["image_root"], f"{split}2017", base)
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (img["width"], img["height"])
            present = {a["category_id"] for a in by_image[img["id"]]}
            assert present, "every image has objects"
            assert not present & set(img["neg_category_ids"])
            assert all(1 <= c <= num_cats for c in img["neg_category_ids"])
            assert set(img["not_exhaustive_category_ids"]) <= present
            for ann in by_image[img["id"]]:
                poly = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
                assert len(ann["segmentation"]) == 1 and len(poly) >= 3
                x0, y0 = poly.min(axis=0)
                x1, y1 = poly.max(axis=0)
                assert 0 <= x0 and 0 <= y0 and x1 <= img["width"] and y1 <= img["height"]
                np.testing.assert_allclose(ann["bbox"], [x0, y0, x1 - x0, y1 - y0], atol=0.011)
                x, y = poly[:, 0], poly[:, 1]
                area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
                assert ann["area"] == pytest.approx(area, abs=0.011) and area > 0


def test_command_line_reports_the_buckets(default_root, capsys):
    assert rehearsal.main(["--root", default_root, "--version", "v0.5"]) == 0
    out = capsys.readouterr().out
    assert "LVIS v0.5 rehearsal: 1230 categories (r/c/f = 454/461/315)" in out
    assert "LVIS v1" not in out and "MB on disk" in out


@pytest.mark.parametrize("version", ["v1", "v0.5"])
def test_minival_is_the_head_of_val(default_root, version):
    paths = rehearsal.rehearsal_paths(default_root, version)
    val, minival = _load(paths["val_json"]), _load(paths["minival_json"])
    n = RehearsalConfig().num_minival_images
    assert minival["images"] == val["images"][:n]
    ids = {img["id"] for img in minival["images"]}
    assert minival["annotations"] == [a for a in val["annotations"] if a["image_id"] in ids]
    assert minival["categories"] == val["categories"]


def test_image_ids_are_disjoint_across_versions_and_splits(default_root):
    seen = {}
    for version in ("v1", "v0.5"):
        paths = rehearsal.rehearsal_paths(default_root, version)
        for split in ("train", "val"):
            for img in _load(paths[f"{split}_json"])["images"]:
                assert seen.setdefault(img["id"], (version, split)) == (version, split)


def test_spread_over_images_places_exact_counts():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 50, size=300)
    images, cats = rehearsal.spread_over_images(counts, 60, np.random.default_rng(1))
    per_cat = defaultdict(list)
    for i, c in zip(images.tolist(), cats.tolist()):
        per_cat[c].append(i)
    for c, n in enumerate(counts.tolist()):
        assert len(per_cat[c]) == n and len(set(per_cat[c])) == n  # distinct images
    per_image = np.bincount(images, minlength=60)
    assert per_image.max() - per_image.min() <= 1
    with pytest.raises(ValueError, match="num_images"):
        rehearsal.spread_over_images(np.array([61]), 60, np.random.default_rng(0))


def test_config_rejects_ranges_outside_the_lvis_buckets():
    with pytest.raises(ValueError, match="'c' image range"):
        RehearsalConfig(common_image_range=(10, 100))
    with pytest.raises(ValueError, match="'f' image range"):
        RehearsalConfig(frequent_image_range=(100, 120))
    with pytest.raises(ValueError, match="versions"):
        RehearsalConfig(versions=("v2",))


def test_generation_is_deterministic_cached_and_atomic(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    stamp = rehearsal.generate(a, TINY)
    rehearsal.generate(b, TINY)
    assert _tree_digest(a) != "" and _tree_digest(a) == _tree_digest(b)
    assert stamp["fingerprint"] == TINY.fingerprint()
    rehearsal.generate(b, dataclasses.replace(TINY, seed=6))
    assert _tree_digest(a) != _tree_digest(b)

    # up to date: nothing is rebuilt; changed config: rebuilt
    mtime = os.stat(os.path.join(a, rehearsal.STAMP_FILE)).st_mtime_ns
    rehearsal.ensure_rehearsal(a, TINY)
    assert os.stat(os.path.join(a, rehearsal.STAMP_FILE)).st_mtime_ns == mtime
    rehearsal.ensure_rehearsal(a, dataclasses.replace(TINY, seed=6))
    assert _tree_digest(a) == _tree_digest(b)

    # a generation that dies half-way leaves the previous dataset and no temporary directory
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rehearsal, "_statistics", die)
    with pytest.raises(KeyboardInterrupt):
        rehearsal.generate(a, TINY)
    assert _tree_digest(a) == _tree_digest(b)
    assert sorted(os.listdir(tmp_path)) == ["a", "a.lock", "b", "b.lock"]
    # a directory that is not a rehearsal root is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="not a rehearsal dataset"):
        rehearsal.generate(str(other), TINY)


def test_registration_is_lazy_and_prepare_generates(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = str(tmp_path / "lazy")
    try:
        names = rehearsal.register_rehearsal(root, TINY)
        assert names == ["rehearsal_lvis_v1_train", "rehearsal_lvis_v1_val",
                         "rehearsal_lvis_v1_minival"]
        assert not os.path.exists(root)  # registering generates nothing
        meta = MetadataCatalog.get("rehearsal_lvis_v1_train")
        assert meta.evaluator_type == "lvis"
        assert meta.class_stats_source == "rehearsal_lvis_v1_train"
        assert MetadataCatalog.get("rehearsal_lvis_v1_val").class_stats_source == meta.name
        assert meta.json_file == os.path.join(root, "lvis", "lvis_v1_train.json")
        meta.longtail_prepare()
        train = _load(meta.json_file)
        records = DatasetCatalog.get("rehearsal_lvis_v1_val")
        val = _load(MetadataCatalog.get("rehearsal_lvis_v1_val").json_file)
        assert len(records) == len(val["images"]) == TINY.num_val_images
        assert all(os.path.isfile(r["file_name"]) for r in records)
        minival = DatasetCatalog.get("rehearsal_lvis_v1_minival")
        assert [r["file_name"] for r in minival] == [r["file_name"] for r in records][:4]
        assert len(train["categories"]) == TINY.num_categories
    finally:
        rehearsal.register_rehearsal()  # the default registration again


_BUILTIN_CHECK = r"""
import json, os, sys
from detectron2.data import DatasetCatalog, MetadataCatalog
root = sys.argv[1]
out = {}
for name in ("lvis_v1_train", "lvis_v1_val", "lvis_v0.5_train", "lvis_v0.5_val"):
    meta = MetadataCatalog.get(name)
    records = DatasetCatalog.get(name)
    out[name] = {"json_file": meta.json_file, "image_root": meta.image_root,
                 "records": len(records), "missing": sum(not os.path.isfile(r["file_name"])
                                                         for r in records),
                 "num_classes": len(meta.thing_classes),
                 "categories": sorted({a["category_id"] for r in records
                                       for a in r["annotations"]})[-1] + 1}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.parametrize("d2", ["v0.6", "main"])
def test_detectron2_builtin_lvis_names_load_the_tree(default_root, d2, tmp_path):
    """DETECTRON2_DATASETS=<root>: detectron2's own registrations (no longtail import)."""
    cmd = [sys.executable, "-c", _BUILTIN_CHECK, default_root]
    if d2 == "main":
        if not os.path.isfile(tool.DEFAULT_WRAPPER):
            pytest.skip(f"no detectron2 main wrapper at {tool.DEFAULT_WRAPPER}")
        cmd = ["bash", tool.DEFAULT_WRAPPER, *cmd]
    env = dict(os.environ, DETECTRON2_DATASETS=default_root)
    if d2 == "v0.6":
        env.pop("PYTHONPATH", None)  # the installed detectron2, also under the main wrapper
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT "):])
    for version in ("v1", "v0.5"):
        paths = rehearsal.rehearsal_paths(default_root, version)
        for split in ("train", "val"):
            got = out[f"lvis_{version}_{split}"]
            assert os.path.abspath(got["json_file"]) == paths[f"{split}_json"]
            assert got["records"] == len(_load(paths[f"{split}_json"])["images"])
            assert got["missing"] == 0
            assert got["num_classes"] == REAL_COUNTS[version][0]
            assert got["categories"] == REAL_COUNTS[version][0]  # contiguous ids 0..C-1 used


# ------------------------------------------------------------------------------------------------
# tool helpers
# ------------------------------------------------------------------------------------------------
def test_every_lvis_config_is_found_and_stage2_chained_to_its_stage1():
    infos = tool.all_configs()
    assert len(infos) == 58
    stage2 = [i for i in infos.values() if i.stage == 2]
    assert len(stage2) == 16  # BAGS mask/faster + LOCE EBL/full x R50/R101, both versions
    for info in stage2:
        parent = infos[info.parent]
        assert parent.stage == 1 and parent.folder == info.folder
        assert os.path.normpath(os.path.dirname(info.weights)) == parent.output_dir
        assert info.facts["depth"] == parent.facts["depth"]
    chosen = [c.path for c in tool.select_configs(["loce_mask_rcnn_R_101_FPN_stage2.yaml"],
                                                  infos)]
    # the stage 1 and the RFS baseline of each version are added, in dependency order
    assert chosen == [
        "configs/LVISv1/mask_rcnn_R_50_FPN_1x_rfs.yaml",
        "configs/LVISv1/loce_mask_rcnn_R_101_FPN_normed_mask_stage1.yaml",
        "configs/LVISv1/loce_mask_rcnn_R_101_FPN_stage2.yaml",
        "configs/LVISv0.5/mask_rcnn_R_50_FPN_1x_rfs.yaml",
        "configs/LVISv0.5/loce_mask_rcnn_R_101_FPN_normed_mask_stage1.yaml",
        "configs/LVISv0.5/loce_mask_rcnn_R_101_FPN_stage2.yaml",
    ]
    with pytest.raises(ValueError, match="matches none"):
        tool.select_configs(["nothing*.yaml"], infos)


def test_state_bytes_and_first_error_line(tmp_path):
    assert tool.state_bytes(
        "Long-tail state: object memory (mfs): 1 bank(s) x 1203 classes x 80 entries of "
        "(256, 7, 7) float16 = 2411.2 MiB per process on cpu (20000 MiB available); saved") \
        == round(2411.2 * 2 ** 20)
    assert tool.state_bytes(
        "Long-tail state: object memory (rio): 1 bank(s) x 546 classes x 60 entries of (1024,) "
        "float32 = 128.0 MiB per process on cpu (unknown available)") == 128 * 2 ** 20
    assert tool.state_bytes("Long-tail state: LOCE mean scores, 1204 floats (4.7 KiB), in the "
                            "checkpoint") == round(4.7 * 1024)
    assert tool.state_bytes("Long-tail state: none") == 0
    # the same memory announced when built and when allocated counts once; subjects add up
    assert tool.process_state_bytes([
        "Long-tail state: LOCE mean scores, 1204 floats (4.7 KiB), in the checkpoint",
        "Long-tail state: object memory (mfs) of 1 bank(s) x 1203 classes x 80 entries of "
        "(256, 7, 7) float16 = 2305.6 MiB per process on cpu, allocated when training starts",
        "Long-tail state: object memory allocated, 2305.6 MiB on cpu (16347 MiB available)",
    ]) == round(2305.6 * 2 ** 20) + round(4.7 * 1024)
    assert tool.process_state_bytes([]) == 0
    log = tmp_path / "phase.log"
    log.write_text(
        "noise\nTraceback (most recent call last):\n  File \"x\", line 1\n"
        "torch.multiprocessing.spawn.ProcessRaisedException: \n\n-- Process 0 terminated:\n"
        "Traceback (most recent call last):\n  File \"y\", line 2\n    boom()\n"
        "FloatingPointError: Loss became non-finite at iteration 3\n")
    assert tool.first_error_line(str(log), [], {"rc": 1}) == \
        "FloatingPointError: Loss became non-finite at iteration 3"
    assert tool.first_error_line(str(log), [{"error": "KeyError: 'x'"}], {"rc": 1}) == \
        "KeyError: 'x'"
    empty = tmp_path / "empty.log"
    empty.write_text("")
    assert "signal 9" in tool.first_error_line(str(empty), [], {"rc": -9})


def test_calibrated_frozen_bn_standardises_every_layer():
    from detectron2.config import get_cfg
    from detectron2.layers import FrozenBatchNorm2d
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-LongTail-RCNN-FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    backbone = build_backbone(cfg).eval()
    images = torch.randn(4, 3, 64, 96)
    layers = [m for m in backbone.bottom_up.modules() if isinstance(m, FrozenBatchNorm2d)]

    def bn_outputs():
        outputs = []
        # clone: the blocks apply an in-place ReLU to the BN output right after it
        handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
                   for m in layers]
        with torch.no_grad():
            backbone(images)
        for h in handles:
            h.remove()
        return outputs

    identity_std = [float(o.std()) for o in bn_outputs()]
    stats = tool.calibrate_frozen_bn(backbone, images)
    outputs = bn_outputs()
    assert stats["layers"] == len(layers) == 53
    # every frozen BN now outputs zero mean, unit variance per channel on the calibration batch
    for out in outputs:
        mean = out.double().mean(dim=(0, 2, 3))
        var = out.double().var(dim=(0, 2, 3), unbiased=False)
        live = var > 1e-6
        assert mean.abs().max() < 1e-4
        assert torch.allclose(var[live], torch.ones_like(var[live]), atol=2e-3)
    # identity statistics: the activations grow block after block
    assert identity_std[-1] > 20 * identity_std[0]
    assert stats["max_abs_output_identity_bn"] > 2 * stats["max_abs_output_calibrated"]


# ------------------------------------------------------------------------------------------------
# the rehearsal itself (slow)
# ------------------------------------------------------------------------------------------------
def _memory_floor(num_classes, capacity, feature_numel, bytes_per):
    return num_classes * capacity * feature_numel * bytes_per


def _check_run(result, mask=True):
    """A run passed every phase it ran, with finite losses and the iterations asked for."""
    assert result["status"] == "pass", (result["config"], result.get("error"))
    phases = result["phases_run"]
    assert list(result["phases"]) == phases
    for phase in ("train", "resume"):
        if phase in phases:
            losses = result["phases"][phase]["losses"]
            assert losses and all(math.isfinite(x) for x in losses)
    assert len(result["phases"]["train"]["iter_times"]) == result["iters"][0]
    if "resume" in phases:
        resumed = result["phases"]["resume"]["iter_times"]
        assert len(resumed) == result["iters"][1] - result["iters"][0]
    if "eval" in phases:
        metrics = result["phases"]["eval"]["metrics"]
        assert set(metrics) == ({"bbox", "segm"} if mask else {"bbox"})
        assert all(k in metrics["bbox"] for k in ("AP", "APr", "APc", "APf"))
    assert result["to_first_iter_s"] > 0 and result["step_s"] > 0
    assert all(m > 100 for m in result["peak_rss_mib"])


def _d2_label():
    """The detectron2 the suite runs on (the children inherit it): v0.6 (installed) or main."""
    import detectron2

    return "v0.6" if "site-packages" in detectron2.__file__ else "main"


@pytest.mark.slow
def test_rehearsal_subset_trains_resumes_and_evaluates(default_root, tmp_path):
    """
    RFS baseline, BAGS stage 1 + 2 (Faster R-CNN), LOCE stage 1 + stage 2 with MFS, RIO on LVIS
    v1: one process with one thread each, 2 + 1 iterations, cheaper heads (64 RoIs per image, 50
    proposals and 10 detections per image in the evaluation), evaluation on minival (24 images),
    no MFS initialisation pass; the two stage 1s only train (their evaluation and resume are the
    baseline's code paths) and the baseline does not resume (the two-process test does).
    """
    infos = tool.all_configs()
    wanted = ["configs/LVISv1/mask_rcnn_R_50_FPN_1x_rfs.yaml",
              "configs/LVISv1/bags_faster_rcnn_R_50_FPN_1x_stage2.yaml",
              "configs/LVISv1/loce_mask_rcnn_R_50_FPN_stage2.yaml",
              "configs/LVISv1/rio_mask_rcnn_R_50_FPN_1x.yaml"]
    configs = tool.select_configs(wanted, infos)
    assert len(configs) == 6  # + BAGS and LOCE stage 1
    stage1 = ["configs/LVISv1/bags_faster_rcnn_R_50_FPN_1x_stage1.yaml",
              "configs/LVISv1/loce_mask_rcnn_R_50_FPN_normed_mask_stage1.yaml"]
    settings = tool.Settings(d2=_d2_label(), iters=2, extra_iters=1, num_gpus=1, jobs=1,
                             output=str(tmp_path / "out"), mfs_init_images=0, rois_per_image=64,
                             dets_per_image=10, rehearsal_root=default_root, timeout=900,
                             eval_split="minival",
                             opts=["MODEL.RPN.POST_NMS_TOPK_TEST", "50"],
                             phases={wanted[0]: ("train", "eval"),
                                     **{path: ("train",) for path in stage1}})
    results = {r["config"]: r for r in tool.run_configs(settings, configs)}
    for path, result in results.items():
        _check_run(result, mask=infos[path].facts["mask"])
    train = _load(rehearsal.rehearsal_paths(default_root, "v1")["train_json"])
    images_of = defaultdict(set)
    for ann in train["annotations"]:
        images_of[ann["category_id"]].add(ann["image_id"])
    # long-tail state at the real sizes, from the training process's own log lines
    assert results[wanted[0]]["state_bytes"] == [0]
    loce = results[wanted[2]]["state_bytes"][0]
    mfs_floor = _memory_floor(1203, 80, 256 * 7 * 7, 2)  # float16 features, one bank
    assert mfs_floor <= loce <= 1.05 * mfs_floor + 2 ** 20
    cached = sum(len(s) <= 30 for s in images_of.values())
    rio = results[wanted[3]]["state_bytes"][0]
    rio_floor = _memory_floor(cached, 60, 1024, 4)
    assert rio_floor <= rio <= 1.05 * rio_floor + 2 ** 20
    # stage 2 started from its stage 1's rehearsal model, stage 1 from the calibration
    assert results[wanted[1]]["weights"].endswith("bags_faster_rcnn_R_50_FPN_1x_stage1/"
                                                  "model_final.pth")
    for path in stage1:
        assert results[path]["phases_run"] == ["train"]
        assert os.path.join("calibration", "LVISv1") in results[path]["weights"]
    # checkpoints pruned: only the stage 1s' model_final.pth is left, for their stage 2s
    for path, result in results.items():
        out = os.path.join(ROOT, result["output_dir"])
        left = sorted(f for f in os.listdir(out) if f.endswith(".pth"))
        assert left == (["model_final.pth"] if path in stage1 else []), path
        assert result["pruned_mib"] > 0
    # the docs table renders every run, with the step ratio to the RFS baseline
    text = tool.render(tool.collect_results(settings.output), "test machine")
    assert text.count(f"| {settings.d2} | pass") == 6 and "1.00x" in text


@pytest.mark.slow
@pytest.mark.dist
def test_rehearsal_two_processes_rfs_baseline(default_root, tmp_path):
    infos = tool.all_configs()
    configs = tool.select_configs(["configs/LVISv1/mask_rcnn_R_50_FPN_1x_rfs.yaml"], infos)
    settings = tool.Settings(d2=_d2_label(), iters=2, extra_iters=1, num_gpus=2, jobs=1,
                             output=str(tmp_path / "out"), rois_per_image=64, dets_per_image=10,
                             rehearsal_root=default_root, timeout=900, eval_split="minival",
                             opts=["MODEL.RPN.POST_NMS_TOPK_TEST", "50"])
    (result,) = tool.run_configs(settings, configs)
    _check_run(result)
    assert len(result["peak_rss_mib"]) == 2  # one figure per training process
    assert result["phases"]["train"]["processes"] == 2
