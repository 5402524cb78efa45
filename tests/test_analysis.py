"""Plots (tools/plot_results.py, longtail.analysis) and visualize_json_results.py."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.analysis import (
    load_per_category,
    mean_scores_from_checkpoint,
    plot_ap_vs_instances,
    plot_mean_scores,
    plot_run,
)

from test_evaluation import MINI_VAL, mini_val_json, perturbed_results  # noqa: F401


def assert_nontrivial_png(path, min_bytes=8000):
    assert os.path.exists(path), path
    assert os.path.getsize(path) >= min_bytes, (path, os.path.getsize(path))
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[0] >= 100 and img.shape[1] >= 100
    assert img.std() > 5.0, f"{path} looks blank (pixel std {img.std():.2f})"
    return img


def fake_rows(seed=0, n=48):
    rng = np.random.default_rng(seed)
    freq = ["r"] * 16 + ["c"] * 16 + ["f"] * 16
    inst = np.concatenate([rng.integers(1, 12, 16), rng.integers(12, 120, 16), rng.integers(120, 990, 16)])
    rows = []
    for i in range(n):
        ap = None if i == 3 else float(np.clip(10 * np.log(inst[i]) + rng.normal(0, 5), 0, 100))
        rows.append({"category_id": i + 1, "name": f"c{i + 1}", "frequency": freq[i],
                     "train_image_count": int(inst[i]), "train_instance_count": int(inst[i]),
                     "val_instance_count": 5, "AP": ap, "AP50": ap, "AP75": ap})
    return rows


def write_run(root, rows, name="run"):
    folder = root / name / "inference" / "dataset_val"
    folder.mkdir(parents=True)
    for task in ("bbox", "segm"):
        (folder / f"per_category_{task}.json").write_text(json.dumps(rows))
    return str(root / name)


def test_ap_vs_instances_one_and_two_runs(tmp_path):
    one = assert_nontrivial_png(plot_ap_vs_instances([("a", fake_rows())], str(tmp_path / "one.png")))
    two = assert_nontrivial_png(plot_ap_vs_instances(
        [("a", fake_rows(0)), ("b", fake_rows(1))], str(tmp_path / "two.png")))
    assert one.shape == two.shape and np.abs(one - two).mean() > 1.0  # the overlay differs
    with pytest.raises(ValueError, match="one or two"):
        plot_ap_vs_instances([], str(tmp_path / "none.png"))


def test_mean_score_plot_from_checkpoint(tmp_path):
    rows = fake_rows()
    inst = np.array([r["train_instance_count"] for r in rows], dtype=np.float32)
    scores = np.concatenate([inst / inst.max() * 0.5 + 1e-3, [0.01]]).astype(np.float32)
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": {"roi_heads.box_predictor.mean_score.mean_scores": torch.tensor(scores),
                          "other.weight": torch.zeros(2)}}, ckpt)
    got = mean_scores_from_checkpoint(str(ckpt))
    assert np.allclose(got, scores)
    assert_nontrivial_png(plot_mean_scores(got, rows, str(tmp_path / "m.png")))
    with pytest.raises(ValueError, match="47 foreground mean scores"):
        plot_mean_scores(got[1:], rows, str(tmp_path / "bad.png"))
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"other.weight": torch.zeros(2)}}, plain)
    assert mean_scores_from_checkpoint(str(plain)) is None


def test_plot_command_on_output_dirs(tmp_path, repo_root):
    run = write_run(tmp_path, fake_rows(0), "run")
    other = write_run(tmp_path, fake_rows(1), "other")
    rows = fake_rows(0)
    scores = np.full(len(rows) + 1, 0.05, dtype=np.float32)
    torch.save({"model": {"roi_heads.box_predictor.mean_score.mean_scores": torch.tensor(scores)}},
               os.path.join(run, "model_final.pth"))
    proc = subprocess.run([sys.executable, "tools/plot_results.py", run, "--compare", other],
                          cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(os.listdir(os.path.join(run, "plots")))
    assert names == ["ap_vs_instances_bbox.png", "ap_vs_instances_bbox_compare.png",
                     "ap_vs_instances_segm.png", "ap_vs_instances_segm_compare.png",
                     "mean_score_vs_instances.png"]
    for n in names:
        assert_nontrivial_png(os.path.join(run, "plots", n))
    with pytest.raises(FileNotFoundError, match="per_category_bbox.json"):
        plot_run(str(tmp_path / "nothing"))


def run_vis(repo_root, *args):
    return subprocess.run([sys.executable, "visualize_json_results.py", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=600)


def test_visualize_json_results(tmp_path, repo_root, mini_val_json):  # noqa: F811
    results = perturbed_results(mini_val_json, fp_per_image=3)
    res_file = tmp_path / "lvis_instances_results.json"
    res_file.write_text(json.dumps(results))
    out = tmp_path / "vis"
    proc = run_vis(repo_root, "--input", str(res_file), "--output", str(out), "--dataset", MINI_VAL,
                   "--conf-threshold", "0.5", "--max-images", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert len(files) == 3
    full = assert_nontrivial_png(str(out / files[0]))
    # rare categories only: fewer things drawn on the same image
    proc = run_vis(repo_root, "--input", str(res_file), "--output", str(tmp_path / "rare"),
                   "--dataset", MINI_VAL, "--conf-threshold", "0.0", "--max-images", "3",
                   "--frequency", "r")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rare = np.asarray(Image.open(tmp_path / "rare" / files[0]).convert("L"), dtype=np.float64)
    assert rare.shape == full.shape and np.abs(rare - full).mean() > 0.5


def _vis_module(repo_root):
    spec = importlib.util.spec_from_file_location(
        "visualize_json_results", os.path.join(repo_root, "visualize_json_results.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_visualize_bad_input_names_file_and_ids(tmp_path, repo_root, mini_val_json):  # noqa: F811
    vis = _vis_module(repo_root)
    out = str(tmp_path / "vis")
    broken = tmp_path / "broken.json"
    broken.write_text("[{]")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        vis.main(["--input", str(broken), "--output", out, "--dataset", MINI_VAL])
    results = perturbed_results(mini_val_json, fp_per_image=0, per_gt=1)[:10]
    bad = [dict(results[0], category_id=777), dict(results[1], category_id=999)] + results[2:]
    bad_file = tmp_path / "bad_ids.json"
    bad_file.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad_ids.json: predictions for 2 category id.*777, 999"):
        vis.main(["--input", str(bad_file), "--output", out, "--dataset", MINI_VAL])
    assert not os.path.exists(out) or not os.listdir(out)


# ------------------------------------------------------------------------------------------
# From a trained run's output directory (train_net.py on the mini dataset, a few iterations)
# ------------------------------------------------------------------------------------------
SMALL = [
    "DATASETS.TRAIN", "('longtail_synth_mini_train',)",
    "DATASETS.TEST", "('longtail_synth_mini_val',)",
    "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "2",
    "DATALOADER.NUM_WORKERS", "0",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, repo_root):
    """A demo-like run (the demo's config, mini dataset, 4 iterations) evaluated with AP_fixed,
    AP_pool and top-k-per-class inference (k=1 with a per-image cap of 10 keeps it cheap: an
    untrained model scores every class of every proposal alike, and each detection gets a mask)."""
    out = str(tmp_path_factory.mktemp("demo_like") / "run")
    proc = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml",
         *SMALL, "SOLVER.MAX_ITER", "4", "LONGTAIL.EVAL.FIXED_AP", "True",
         "LONGTAIL.EVAL.POOLED_AP", "True", "LONGTAIL.TEST_TOPK_PER_CLASS", "1",
         "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0001",
         "OUTPUT_DIR", out],
        cwd=repo_root, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return out, proc.stdout + proc.stderr


@pytest.mark.slow
def test_trained_run_outputs_plots_and_visualisation(trained_run, repo_root):
    out, log = trained_run
    folder = os.path.join(out, "inference", MINI_VAL)
    for task in ("bbox", "segm"):
        assert len(load_per_category(out, task)) == 48
        assert os.path.exists(os.path.join(folder, f"per_category_{task}.csv"))
    assert "AP by frequency bucket" in log and "per_category_{bbox,segm}" in log
    assert "AP_fixed" in log and "AP_pool" in log
    results = json.load(open(os.path.join(out, "eval_results.json")))
    assert set(results) == {"bbox", "segm"} and "AP_fixed" in results["bbox"]

    proc = subprocess.run([sys.executable, "tools/plot_results.py", out], cwd=repo_root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("bbox", "segm"):
        assert_nontrivial_png(os.path.join(out, "plots", f"ap_vs_instances_{task}.png"))
    vis = os.path.join(out, "vis")
    proc = run_vis(repo_root, "--input", os.path.join(folder, "lvis_instances_results.json"),
                   "--output", vis, "--dataset", MINI_VAL, "--conf-threshold", "0.0",
                   "--max-images", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(os.listdir(vis)) == 2
    for name in os.listdir(vis):
        assert_nontrivial_png(os.path.join(vis, name))


@pytest.mark.slow
def test_topk_per_class_inference_through_train_net(trained_run):
    out, log = trained_run
    assert "Top-k-per-class inference: 1 per class" in log
    dets = json.load(open(os.path.join(out, "inference", MINI_VAL, "lvis_instances_results.json")))
    per_image = np.bincount([d["image_id"] for d in dets])
    assert per_image.max() > 10  # TEST.DETECTIONS_PER_IMAGE does not cap it
    per_class_image = np.unique([(d["image_id"], d["category_id"]) for d in dets], axis=0,
                                return_counts=True)[1]
    assert per_class_image.max() == 1
