#!/usr/bin/env python
"""
Time LVIS evaluation backends against the official ``lvis`` package on an LVIS-scale generated
result set, side by side in one run, check that the numbers agree, and write the section
"LVIS evaluation speed" of docs/benchmarks.md. Run from the repository root:

    python tools/benchmark_eval.py                      # 5,000 images x 300 detections, 1,203 classes
    python tools/benchmark_eval.py --images 500 --no-write   # a quick look

The ground truth is an LVIS v1-like federated val set (1,203 categories with r/c/f buckets, about
12 objects per 640x480 image, polygon masks, negative and not-exhaustive category lists). Every
image gets ``--dets`` detections (boxes and RLE masks): jittered copies of its objects, some with
a wrong class, plus random boxes, with random scores. The official package runs as detectron2
calls it (``LVISResults(gt, results, max_dets=300)`` + ``LVISEval``); the other backends run through
:func:`longtail.evaluation.evaluate_detections`. Times are wall-clock seconds of one evaluation
with the ground truth already loaded (what an evaluation during training costs); "identical"
means every one of AP, AP50, AP75, APs/m/l, APr/c/f is within 1e-4 of the official value.
"""
import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np
import pycocotools.mask as mask_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.benchmark_runs import machine  # noqa: E402
from tools.benchmarks_md import replace_section  # noqa: E402

TITLE = "LVIS evaluation speed"
TOL = 1e-4


def make_dataset(num_images, num_classes, objects_per_image, seed=0):
    """An LVIS-format val dict: federated fields, r/c/f buckets in LVIS v1's proportions."""
    rng = np.random.default_rng(seed)
    W, H = 640, 480
    # LVIS v1: 337 rare, 461 common, 405 frequent of 1,203; class popularity ~ Zipf
    n_r, n_c = round(num_classes * 337 / 1203), round(num_classes * 461 / 1203)
    freq = ["f"] * (num_classes - n_r - n_c) + ["c"] * n_c + ["r"] * n_r
    pop = 1.0 / np.arange(1, num_classes + 1) ** 0.9
    pop /= pop.sum()
    cats = [{"id": i + 1, "name": f"class_{i + 1}", "synset": f"class_{i + 1}.n.01",
             "synonyms": [], "def": "", "frequency": freq[i], "image_count": 0,
             "instance_count": 0} for i in range(num_classes)]
    images, anns = [], []
    for img in range(1, num_images + 1):
        n = max(1, int(rng.poisson(objects_per_image)))
        present = np.unique(rng.choice(num_classes, size=min(n, 6), p=pop)) + 1
        labels = rng.choice(present, size=n)
        w = rng.uniform(8, 200, n)
        h = rng.uniform(8, 200, n)
        x = rng.uniform(0, W - w)
        y = rng.uniform(0, H - h)
        for j in range(n):
            poly = [x[j], y[j] + h[j] / 2, x[j] + w[j] / 2, y[j], x[j] + w[j], y[j] + h[j] / 2,
                    x[j] + w[j] / 2, y[j] + h[j]]
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": int(labels[j]),
                         "bbox": [float(x[j]), float(y[j]), float(w[j]), float(h[j])],
                         "area": float(w[j] * h[j] / 2),
                         "segmentation": [[float(v) for v in poly]]})
        neg = np.setdiff1d(rng.choice(num_classes, size=20, replace=False) + 1, present)
        not_exh = present[: int(rng.random() < 0.1)]
        images.append({"id": img, "width": W, "height": H, "file_name": f"{img:012d}.jpg",
                       "coco_url": f"http://bench.invalid/{img:012d}.jpg",
                       "neg_category_ids": [int(c) for c in neg],
                       "not_exhaustive_category_ids": [int(c) for c in not_exh]})
    return {"images": images, "annotations": anns, "categories": cats}


def make_results(data, dets_per_image, seed=1):
    """``dets_per_image`` detections per image with boxes and RLE masks (see module doc)."""
    rng = np.random.default_rng(seed)
    num_classes = len(data["categories"])
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    results = []
    for im in data["images"]:
        objs = by_image.get(im["id"], [])
        n_obj = min(len(objs) * 5, dets_per_image // 2)
        src = [objs[i % len(objs)] for i in range(n_obj)] if objs else []
        boxes = np.zeros((dets_per_image, 4))
        labels = rng.integers(1, num_classes + 1, dets_per_image)
        for i, a in enumerate(src):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.1, 4)
            boxes[i] = [x + j[0] * w, y + j[1] * h, w * (1 + j[2]), h * (1 + j[3])]
            if rng.random() < 0.7:
                labels[i] = a["category_id"]
        m = dets_per_image - n_obj
        w = rng.uniform(8, 200, m)
        h = rng.uniform(8, 200, m)
        boxes[n_obj:] = np.stack([rng.uniform(0, im["width"] - w), rng.uniform(0, im["height"] - h), w, h], 1)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        scores = rng.random(dets_per_image)
        x, y, w, h = boxes.T
        polys = np.stack([x, y + h / 2, x + w / 2, y, x + w, y + h / 2, x + w / 2, y + h], 1)
        rles = mask_util.frPyObjects([p.tolist() for p in polys], im["height"], im["width"])
        for i in range(dets_per_image):
            rle = rles[i]
            results.append({"image_id": im["id"], "category_id": int(labels[i]),
                            "bbox": [float(v) for v in boxes[i]], "score": float(scores[i]),
                            "segmentation": {"size": rle["size"],
                                             "counts": rle["counts"].decode("ascii")}})
    return results


def run_official(api, results, iou_type):
    from lvis import LVISEval, LVISResults

    from longtail.evaluation import METRICS

    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    t = time.perf_counter()
    ev = LVISEval(api, LVISResults(api, results, max_dets=300), iou_type)
    ev.run()
    elapsed = time.perf_counter() - t
    return {k: float(ev.results[k]) for k in METRICS}, elapsed


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--objects", type=float, default=12.0, help="mean objects per image")
    parser.add_argument("--segm-images", type=int, default=0,
                        help="images of the segm comparison (0: --images)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to time besides the official one (default: all installed)")
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()

    from lvis import LVIS

    from longtail.evaluation import (
        METRICS, LVISGroundTruth, available_backends, evaluate_detections, resolve_backend)

    backends = args.backends or [b for b in available_backends() if b != "lvis"]
    auto = resolve_backend("auto")
    rows, loads = [], []
    for task in args.tasks:
        n_img = args.segm_images if task == "segm" and args.segm_images else args.images
        t = time.perf_counter()
        data = make_dataset(n_img, args.classes, args.objects)
        results = make_results(data, args.dets)
        print(f"[{task}] generated {n_img} images, {len(data['annotations'])} objects, "
              f"{len(results)} detections in {time.perf_counter() - t:.0f} s", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench_val.json")
            with open(path, "w") as f:
                json.dump(data, f)
            del data
            api = LVIS(path)
            loads.append(os.getloadavg()[0])
            ref, t_ref = run_official(api, results, task)
            print(f"[{task}] lvis (official): {t_ref:.1f} s  AP={ref['AP']:.6f}", flush=True)
            gc.collect()
            gt = LVISGroundTruth(path, api)
            for b in backends:
                gt.api(b)  # ground truth loaded once, outside the timing
                loads.append(os.getloadavg()[0])
                t = time.perf_counter()
                out = evaluate_detections(gt, results, task, b).summary
                t_b = time.perf_counter() - t
                diff = max(abs(out[k] - ref[k]) for k in METRICS)
                print(f"[{task}] {b}: {t_b:.1f} s ({t_ref / t_b:.1f}x), max |diff| {diff:.2e}",
                      flush=True)
                rows.append((task, n_img, len(results), b, t_ref, t_b, diff, ref))
                gc.collect()
        del results
        gc.collect()

    cmd = "python tools/benchmark_eval.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a != "--no-write")
    lines = [
        f"Machine: {machine()}. Command (repository root): `{cmd}`.",
        "",
        f"Generated LVIS v1-scale federated set: {args.classes} categories (r/c/f in LVIS v1's "
        f"proportions), about {args.objects:g} objects per 640x480 image, {args.dets} detections "
        "per image with boxes and RLE masks. Official = `lvis` 0.5.3 as detectron2 calls it; the "
        "others through `longtail.evaluation.evaluate_detections` (same caps and area rule). "
        "Seconds of one evaluation, ground truth already loaded. \"identical\": all of AP, AP50, "
        "AP75, APs/m/l, APr/c/f within 1e-4 of the official values (max |diff| shown, [0, 1] scale).",
        "",
        "| task | images | detections | backend | official `lvis` (s) | backend (s) | speed-up | "
        "max abs diff | identical |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task, n_img, n_det, b, t_ref, t_b, diff, ref in rows:
        lines.append(f"| {task} | {n_img:,} | {n_det:,} | `{b}` | {t_ref:.1f} | {t_b:.1f} | "
                     f"{t_ref / t_b:.1f}x | {diff:.1e} | {'yes' if diff <= TOL else 'no'} |")
    lines += ["", f"`LONGTAIL.EVAL.BACKEND auto` resolves to `{auto}` here. 1-minute load average "
              f"of the machine when the timed runs started: {min(loads):.1f} to {max(loads):.1f} "
              f"({os.cpu_count()} cores; the benchmark itself accounts for about 1, the rest are other "
              "jobs that shared the cores)."]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), TITLE, section)


if __name__ == "__main__":
    main()
