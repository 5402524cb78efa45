"""LVIS evaluation: backend parity with the official ``lvis`` package, AP_fixed / AP_pool, the
evaluator's outputs, bad input, and results on every process (2 gloo processes)."""
import copy
import csv
import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from lvis import LVIS, LVISEval, LVISResults

import longtail  # noqa: F401  (registers the datasets)
from longtail.datasets import FREQUENCY, IMAGE_COUNT, INSTANCE_COUNT, prepare_datasets
from longtail.detection_columns import max_per_group_pair
from longtail.evaluation import (
    BACKENDS,
    METRICS,
    DetectionColumns,
    LongTailLVISEvaluator,
    LVISGroundTruth,
    available_backends,
    check_results,
    evaluate_detections,
    load_results_json,
    pooled_ap,
    resolve_backend,
    select_detections,
)

TOL = 1e-4  # absolute, on the official package's [0, 1] scale
FAST = [b for b in available_backends() if b != "lvis"]
MINI_VAL = "longtail_synth_mini_val"


@pytest.fixture(scope="module")
def mini_val_json():
    from detectron2.data import MetadataCatalog

    prepare_datasets([MINI_VAL])
    return MetadataCatalog.get(MINI_VAL).json_file


def _rle(poly, h, w):
    rle = mask_util.merge(mask_util.frPyObjects(poly, h, w))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def perturbed_results(gt_json, seed=0, fp_per_image=15, per_gt=3):
    """GT-derived predictions: jittered boxes and masks, some with the wrong class, random
    scores, plus random false positives (some masks empty: they fall outside the image)."""
    with open(gt_json) as f:
        d = json.load(f)
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in d["categories"]]
    imgs = {im["id"]: im for im in d["images"]}
    out = []

    def add(img_id, cat, box, score):
        im = imgs[img_id]
        x, y, w, h = (float(v) for v in box)
        poly = [[x, y, x + w, y, x + 0.8 * w, y + h, x, y + 0.9 * h]]
        out.append({"image_id": img_id, "category_id": int(cat), "bbox": [x, y, w, h],
                    "score": float(score), "segmentation": _rle(poly, im["height"], im["width"])})

    for a in d["annotations"]:
        for k in range(per_gt):
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.15 * k + 0.03, 4)
            box = [x + j[0] * w, y + j[1] * h, max(1, w * (1 + j[2])), max(1, h * (1 + j[3]))]
            cat = a["category_id"] if rng.random() < 0.7 else rng.choice(cats)
            add(a["image_id"], cat, box, rng.random())
    for img_id, im in imgs.items():
        for _ in range(fp_per_image):
            w, h = rng.uniform(4, im["width"] / 2), rng.uniform(4, im["height"] / 2)
            x = rng.uniform(-w / 2, im["width"] - w / 2)
            y = rng.uniform(-h / 2, im["height"] - h / 2)
            add(img_id, rng.choice(cats), [x, y, w, h], rng.random())
    return out


def official(gt_json, results, iou_type, max_dets=300, dets_per_class=-1, api=None):
    """The official package as detectron2 calls it (standard AP) or as Dave et al.'s
    evaluate_ap_fixed does (top-k per class, max_dets=-1). Returns (results, LVISEval)."""
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    if dets_per_class > 0:
        by_cat = {}
        for r in results:
            by_cat.setdefault(r["category_id"], []).append(r)
        results = [r for anns in by_cat.values()
                   for r in sorted(anns, key=lambda a: a["score"], reverse=True)[:dets_per_class]]
    api = api or LVIS(gt_json)
    ev = LVISEval(api, LVISResults(api, results, max_dets=max_dets), iou_type)
    ev.run()
    return {k: ev.results[k] for k in METRICS}, ev


def assert_close(ours, ref, what):
    diffs = {k: abs(ours[k] - ref[k]) for k in METRICS}
    assert max(diffs.values()) <= TOL, f"{what}: {diffs}\nours {ours}\nref  {ref}"


# ------------------------------------------------------------------------------------------
# Parity on the embedded (mini) validation set
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_backends_match_official_on_embedded_val(mini_val_json, iou_type):
    results = perturbed_results(mini_val_json)
    ref, _ = official(mini_val_json, results, iou_type)
    assert ref["AP"] > 0.01 and ref["APr"] > 0 and ref["APf"] > 0  # a non-trivial set
    gt = LVISGroundTruth(mini_val_json)
    for backend in available_backends():
        res = evaluate_detections(gt, results, iou_type, backend)
        assert_close(res.summary, ref, f"{backend} {iou_type}")


def test_empty_masks_are_dropped_as_official_does(mini_val_json):
    # the official package skips detections of zero area (lvis get_ann_ids: area > 0); the
    # libraries count them as false positives unless select_detections drops them
    results = perturbed_results(mini_val_json, seed=3)
    assert any(mask_util.area(r["segmentation"]) == 0 for r in results)
    kept = select_detections(results, "segm", 300)
    assert all(mask_util.area(r["segmentation"]) > 0 for r in kept)
    assert all("bbox" not in r for r in kept)
    assert len(kept) < len(results)


# ------------------------------------------------------------------------------------------
# Parity on generated edge cases
# ------------------------------------------------------------------------------------------
def edge_case_dataset(tmp_path, seed=0):
    """A small LVIS-format val set with the federated edge cases, and predictions for it.

    Categories 1-12 (4 r, 4 c, 4 f); category 2 has ground truth but no detection, category 11
    has detections but no ground truth anywhere, category 12 has neither. Image 1 has only negative
    categories (no annotation); images 2-3 mark categories as not exhaustive; image 4 is
    crowded (80 objects, over 300 detections, so the per-image cap binds) and has one ``iscrowd``
    annotation (the official package ignores the flag); scores have ties."""
    rng = np.random.default_rng(seed)
    freq = ["r"] * 4 + ["c"] * 4 + ["f"] * 4
    cats = [{"id": i + 1, "name": f"cat{i + 1}", "frequency": f, "image_count": 1,
             "instance_count": 1, "synset": f"cat{i + 1}.n.01", "synonyms": [], "def": ""}
            for i, f in enumerate(freq)]
    images, anns, results = [], [], []
    H = W = 200

    def box_poly(x, y, w, h):
        return [[x, y, x + w, y, x + w, y + h, x, y + h]]

    def add_ann(img, cat, box, **extra):
        x, y, w, h = box
        anns.append({"id": len(anns) + 1, "image_id": img, "category_id": cat, "bbox": box,
                     "area": w * h, "segmentation": box_poly(*box), **extra})

    def add_det(img, cat, box, score):
        x, y, w, h = (float(v) for v in box)
        results.append({"image_id": img, "category_id": cat, "bbox": [x, y, w, h],
                        "score": float(score), "segmentation": _rle(box_poly(x, y, w, h), H, W)})

    def rand_box(lo=8, hi=80):
        w, h = rng.uniform(lo, hi, 2)
        return [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)]

    for img in range(1, 21):
        neg = sorted(rng.choice(np.arange(1, 12), 4, replace=False).tolist()) if img != 4 else [11]
        images.append({"id": img, "width": W, "height": H, "file_name": f"{img}.jpg",
                       "coco_url": f"http://x.invalid/{img}.jpg", "neg_category_ids": neg,
                       "not_exhaustive_category_ids": []})
        if img == 1:  # only negative categories
            for c in neg:
                add_det(img, c, rand_box(), rng.random())
            continue
        n_obj = 80 if img == 4 else int(rng.integers(1, 6))
        present = set()
        for _ in range(n_obj):
            cat = int(rng.integers(1, 11))  # categories 1..10 have ground truth
            if cat in neg:
                continue
            box = rand_box(4, 30) if img == 4 else rand_box()
            add_ann(img, cat, box, **({"iscrowd": 1} if img == 4 and not present else {}))
            present.add(cat)
            for k in range(2 if img != 4 else 6):
                j = rng.normal(0, 0.1 * (k + 1), 4)
                b = [box[0] + j[0] * box[2], box[1] + j[1] * box[3],
                     max(1.0, box[2] * (1 + j[2])), max(1.0, box[3] * (1 + j[3]))]
                add_det(img, cat if rng.random() < 0.8 else int(rng.integers(1, 12)), b,
                        round(float(rng.random()), 2))  # 2 decimals: ties
        if img in (2, 3) and present:
            images[-1]["not_exhaustive_category_ids"] = sorted(present)[:1]
        for _ in range(10):
            add_det(img, int(rng.integers(1, 12)), rand_box(), rng.random())
    results = [r for r in results if r["category_id"] != 2]  # ground truth, no detection
    data = {"images": images, "annotations": anns, "categories": cats}
    path = tmp_path / "edge_val.json"
    path.write_text(json.dumps(data))
    assert sum(r["image_id"] == 4 for r in results) > 300
    return str(path), results


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_backends_match_official_on_edge_cases(tmp_path, iou_type):
    gt_json, results = edge_case_dataset(tmp_path)
    gt = LVISGroundTruth(gt_json)
    ref, ev = official(gt_json, results, iou_type)
    ref_fixed, _ = official(gt_json, results, iou_type, max_dets=-1, dets_per_class=25)
    assert ref["AP"] > 0 and ref_fixed["AP"] != ref["AP"]
    for backend in available_backends():
        res = evaluate_detections(gt, results, iou_type, backend)
        assert_close(res.summary, ref, f"{backend} {iou_type} standard")
        fixed = evaluate_detections(gt, results, iou_type, backend, -1, 25)
        assert_close(fixed.summary, ref_fixed, f"{backend} {iou_type} AP_fixed")
        # per-category AP = the official precision array's per-category mean
        p = ev.eval["precision"][..., 0]
        for k in range(p.shape[2]):
            s = p[:, :, k]
            want = s[s > -1].mean() if (s > -1).any() else np.nan
            got = res.per_category()[k]
            assert (np.isnan(want) and np.isnan(got)) or abs(want - got) <= TOL, (backend, k)
        # categories 11 (detections, no gt) and 12 (nothing) have no AP; 2 (no detection) has 0
        assert np.isnan(res.per_category()[10]) and np.isnan(res.per_category()[11])
        assert res.per_category()[1] == 0.0


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_no_per_image_cap_reaches_every_backend(tmp_path, iou_type):
    # image 4 keeps its > 300 detections: no backend may add a cap of its own (hotcoco caps a
    # plain result set at 300 unless it is marked as capped)
    gt_json, results = edge_case_dataset(tmp_path)
    ref, _ = official(gt_json, results, iou_type, max_dets=-1)
    ref_300, _ = official(gt_json, results, iou_type, max_dets=300)
    assert abs(ref["AP"] - ref_300["AP"]) > 1e-3
    gt = LVISGroundTruth(gt_json)
    for backend in available_backends():
        assert_close(evaluate_detections(gt, results, iou_type, backend, -1, -1).summary, ref,
                     f"{backend} {iou_type} no cap")


def test_fixed_ap_without_per_image_cap_sees_more_detections(tmp_path):
    gt_json, results = edge_case_dataset(tmp_path, seed=1)
    gt = LVISGroundTruth(gt_json)
    std = evaluate_detections(gt, results, "bbox", "lvis", max_dets_per_image=20)
    fixed = evaluate_detections(gt, results, "bbox", "lvis", -1, 10000)
    assert fixed.num_detections > std.num_detections
    assert fixed.summary["AP"] > std.summary["AP"]  # the crowded image is no longer cut


# ------------------------------------------------------------------------------------------
# The columnar selection and the shared columns
# ------------------------------------------------------------------------------------------
def reference_selection(results, iou_type, max_dets_per_image, max_dets_per_class):
    """The selection rules written out with Python's stable sort (ties in input order)."""
    idx = list(range(len(results)))

    def top_k(idx, key, k):
        groups = {}
        for i in idx:
            groups.setdefault(results[i][key], []).append(i)
        kept = set()
        for members in groups.values():
            kept.update(sorted(members, key=lambda i: -results[i]["score"])[:k])
        return [i for i in idx if i in kept]

    if max_dets_per_class > 0:
        idx = top_k(idx, "category_id", max_dets_per_class)
    if max_dets_per_image > 0:
        idx = top_k(idx, "image_id", max_dets_per_image)
    if iou_type == "segm":
        return [i for i in idx if mask_util.area(results[i]["segmentation"]) > 0]
    return [i for i in idx if results[i]["bbox"][2] * results[i]["bbox"][3] > 0]


@pytest.mark.parametrize("id_offset", [0, 10**12, -7])  # small ids: bincount; else a sort
def test_columnar_selection_matches_the_rules(tmp_path, id_offset):
    _, results = edge_case_dataset(tmp_path)
    rng = np.random.default_rng(0)
    results = [dict(r, image_id=r["image_id"] + id_offset, category_id=r["category_id"] + id_offset,
                    score=round(r["score"], 1)) for r in results]  # many ties
    for r in results[::17]:  # zero-area boxes
        r["bbox"] = [r["bbox"][0], r["bbox"][1], 0.0, r["bbox"][3]]
    rng.shuffle(results)
    cols = DetectionColumns(results)
    for iou_type in ("bbox", "segm"):
        for caps in ((300, -1), (40, -1), (-1, 25), (30, 20), (-1, -1)):
            want = reference_selection(results, iou_type, *caps)
            assert cols.select(iou_type, *caps).tolist() == want, (iou_type, caps)
            got = select_detections(results, iou_type, *caps)
            assert got == [{k: v for k, v in results[i].items()
                            if not (iou_type == "segm" and k == "bbox")} for i in want]
            if caps == (40, -1):
                assert len(want) < len(reference_selection(results, iou_type, -1, -1))


def test_columnar_selection_drops_empty_masks_like_the_rules(mini_val_json):
    results = perturbed_results(mini_val_json, seed=3)
    want = reference_selection(results, "segm", 300, -1)
    assert DetectionColumns(results).select("segm", 300).tolist() == want
    assert len(want) < len(results)


def test_columns_read_the_fields_once_and_check_them():
    dets = [{"image_id": 3, "category_id": 1, "bbox": [0, 0, 2, 2], "score": 0.5},
            {"image_id": 3, "category_id": 1, "bbox": [1, 1, 2, 2], "score": 0.7},
            {"image_id": 4, "category_id": 2, "bbox": [1, 1, 2, 2], "score": 0.7}]
    cols = DetectionColumns(dets)
    assert cols.bbox() is cols.bbox() and cols.bbox().shape == (3, 4)
    assert max_per_group_pair(cols.image_id, cols.category_id) == 2
    assert max_per_group_pair(cols.image_id + 10**13, -cols.category_id) == 2  # sort path
    assert max_per_group_pair(cols.image_id[:0], cols.category_id[:0]) == 0
    with pytest.raises(ValueError, match="segmentation"):
        DetectionColumns(dets).select("segm")
    for bad in ([0, 0, 2], [0, 0, 2, 2, 5]):
        with pytest.raises(ValueError, match="4 numbers"):
            DetectionColumns([dict(dets[0], bbox=bad)] + dets[1:]).bbox()


def test_shared_columns_give_the_same_numbers_and_leave_the_dicts_alone(tmp_path):
    gt_json, results = edge_case_dataset(tmp_path)
    untouched = copy.deepcopy(results)
    gt = LVISGroundTruth(gt_json)
    cols = DetectionColumns(results)  # one for every evaluation, as the evaluator does
    for backend in available_backends():
        for iou_type in ("bbox", "segm"):
            for caps in ((300, -1), (-1, 25)):
                a = evaluate_detections(gt, results, iou_type, backend, *caps)
                b = evaluate_detections(gt, cols, iou_type, backend, *caps)
                assert a.summary == b.summary, (backend, iou_type, caps)
                assert np.array_equal(a.precision, b.precision)
                assert a.num_detections == b.num_detections
                phases = {"select", "convert", "load", "match", "accumulate", "results"}
                assert set(b.timings) == phases | ({"mask_area"} if iou_type == "segm" else set())
        if backend != "faster_coco_eval":
            assert pooled_ap(gt, cols, "bbox", backend) == pooled_ap(gt, results, "bbox", backend)
    assert results == untouched
    with pytest.raises(ValueError, match="category id"):
        check_results(DetectionColumns([dict(results[0], category_id=99)]), gt)


# ------------------------------------------------------------------------------------------
# AP_pool
# ------------------------------------------------------------------------------------------
def test_pooled_ap_of_one_category_is_its_official_ap(tmp_path):
    gt_json, results = edge_case_dataset(tmp_path)
    ref, ev = official(gt_json, results, "bbox", max_dets=-1)
    p = ev.eval["precision"][..., 0]
    data = json.loads(open(gt_json).read())
    for cid in (1, 5, 9):  # one r, c, f category each, pooled alone
        sub = dict(data, categories=[dict(c, frequency="r" if c["id"] == cid else "f")
                                     for c in data["categories"]])
        path = tmp_path / f"one_{cid}.json"
        path.write_text(json.dumps(sub))
        pooled = pooled_ap(LVISGroundTruth(str(path)), results, "bbox", "lvis", -1, -1)
        s = p[:, :, cid - 1]
        assert abs(pooled["APr_pool"] - s[s > -1].mean()) <= 1e-12


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_pooled_ap_is_the_same_with_every_backend(mini_val_json, iou_type):
    results = perturbed_results(mini_val_json, seed=1)
    gt = LVISGroundTruth(mini_val_json)
    ref = pooled_ap(gt, results, iou_type, "lvis")
    assert 0 < ref["AP_pool"] < 1 and all(ref[k] >= 0 for k in ("APr_pool", "APc_pool", "APf_pool"))
    # pooling ranks every class together: it differs from the mean of per-class APs
    fixed = evaluate_detections(gt, results, iou_type, "lvis", -1, 10000)
    assert abs(ref["AP_pool"] - fixed.summary["AP"]) > 1e-3
    for backend in FAST:
        got = pooled_ap(gt, results, iou_type, backend)
        for k, v in ref.items():
            assert abs(got[k] - v) <= TOL, (backend, k, got[k], v)


# ------------------------------------------------------------------------------------------
# Backend selection and bad input
# ------------------------------------------------------------------------------------------
def test_results_file_is_written_in_slices_with_the_same_text(tmp_path):
    import io

    from longtail.evaluation import write_json_list

    items = [{"image_id": i, "bbox": [i, 0.5, 2, 3], "score": i / 7} for i in range(10)]
    for n in (0, 1, 3, 10):
        for chunk in (1, 3, 4, 10, 100):
            f = io.StringIO()
            write_json_list(f, items[:n], chunk)
            assert f.getvalue() == json.dumps(items[:n]), (n, chunk)


def test_backend_resolution():
    assert resolve_backend("auto") in available_backends()
    assert resolve_backend("lvis") == "lvis"
    with pytest.raises(ValueError, match="not one of"):
        resolve_backend("pycocotools")
    assert set(available_backends()) <= set(BACKENDS)


def test_invalid_json_names_the_file(tmp_path):
    bad = tmp_path / "broken_results.json"
    bad.write_text('[{"image_id": 1, ')
    with pytest.raises(ValueError, match="broken_results.json.*not valid JSON"):
        load_results_json(str(bad))
    obj = tmp_path / "object.json"
    obj.write_text('{"image_id": 1}')
    with pytest.raises(ValueError, match="object.json.*JSON list"):
        load_results_json(str(obj))


def test_unknown_category_ids_are_named(mini_val_json):
    gt = LVISGroundTruth(mini_val_json)
    results = perturbed_results(mini_val_json)[:50]
    results[3] = dict(results[3], category_id=0)
    results[7] = dict(results[7], category_id=4242)
    with pytest.raises(ValueError, match=r"my_results.json.*2 category id.*0, 4242"):
        check_results(results, gt, source="my_results.json")
    results[3] = dict(results[3], category_id=1, image_id=99999)
    results[7] = dict(results[7], category_id=1)
    with pytest.raises(ValueError, match="image id.*99999"):
        check_results(results, gt, source="r.json")


# ------------------------------------------------------------------------------------------
# The evaluator (detectron2 inputs), its files, and rank safety
# ------------------------------------------------------------------------------------------
def _fake_outputs(dataset_name, seed=0):
    """(inputs, outputs) pairs as a model would give them: GT-derived Instances with masks."""
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks

    rng = np.random.default_rng(seed)
    pairs = []
    for d in DatasetCatalog.get(dataset_name):
        h, w = d["height"], d["width"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]]
        polys = [a["segmentation"] for a in d["annotations"]]
        cls = [a["category_id"] for a in d["annotations"]]
        n = len(boxes)
        inst = Instances((h, w))
        b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        inst.pred_boxes = Boxes(b + torch.tensor(rng.normal(0, 2, (n, 4)), dtype=torch.float32))
        inst.scores = torch.tensor(rng.random(n), dtype=torch.float32)
        flip = rng.random(n) < 0.3
        inst.pred_classes = torch.tensor(np.where(flip, rng.integers(0, 48, n), cls), dtype=torch.long)
        inst.pred_masks = BitMasks.from_polygon_masks(PolygonMasks(polys), h, w).tensor if n else \
            torch.zeros((0, h, w), dtype=torch.bool)
        pairs.append(({"image_id": d["image_id"], "height": h, "width": w}, {"instances": inst}))
    return pairs


def test_evaluator_writes_per_category_files(mini_val_json, tmp_path):
    from detectron2.data import MetadataCatalog

    out = str(tmp_path / "inference")
    ev = LongTailLVISEvaluator(MINI_VAL, output_dir=out, fixed_ap=True, pooled_ap=True,
                               distributed=False)
    ev.reset()
    for inp, outp in _fake_outputs(MINI_VAL):
        ev.process([inp], [outp])
    results = ev.evaluate()
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        r = results[task]
        assert set(METRICS) <= set(r) and {"AP_fixed", "APr_fixed", "AP_pool", "APf_pool"} <= set(r)
        assert 0 < r["AP"] <= 100
        rows = json.load(open(os.path.join(out, f"per_category_{task}.json")))
        meta = MetadataCatalog.get(MINI_VAL)
        assert [row["category_id"] for row in rows] == list(range(1, 49))
        assert [row["name"] for row in rows] == list(meta.thing_classes)
        assert [row["frequency"] for row in rows] == list(meta.get(FREQUENCY))
        assert [row["train_instance_count"] for row in rows] == list(meta.get(INSTANCE_COUNT))
        assert [row["train_image_count"] for row in rows] == list(meta.get(IMAGE_COUNT))
        # APr (the backend's) = mean of the per-category AP of the rare categories
        rare = [row["AP"] for row in rows if row["frequency"] == "r" and row["AP"] is not None]
        assert abs(np.mean(rare) - r["APr"]) < 1e-6
        with open(os.path.join(out, f"per_category_{task}.csv")) as f:
            table = list(csv.DictReader(f))
        assert len(table) == 48 and {"category_id", "name", "frequency", "train_image_count",
                                     "train_instance_count", "AP", "AP50", "AP75"} <= set(table[0])
    summary = json.load(open(os.path.join(out, "summary_by_frequency.json")))
    assert [row["frequency"] for row in summary["bbox"]] == ["r", "c", "f", "all"]
    assert abs(summary["bbox"][3]["AP"] - results["bbox"]["AP"]) < 1e-6
    assert os.path.exists(os.path.join(out, "lvis_instances_results.json"))


def _two_process_worker(out_dir, backend):
    from detectron2.utils import comm

    prepare_datasets([MINI_VAL])
    rank = comm.get_rank()
    ev = LongTailLVISEvaluator(MINI_VAL, output_dir=os.path.join(out_dir, "inference"),
                               backend=backend)
    ev.reset()
    pairs = _fake_outputs(MINI_VAL)
    for inp, outp in pairs[rank::2]:  # each process sees half of the images
        ev.process([inp], [outp])
    results = ev.evaluate()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.dist
def test_every_process_gets_the_results(tmp_path, mini_val_json):
    from longtail.launch import launch

    launch(_two_process_worker, 2, args=(str(tmp_path), "auto"))
    r0 = json.load(open(tmp_path / "rank0.json"))
    r1 = json.load(open(tmp_path / "rank1.json"))
    assert r0 == r1 and set(r0) == {"bbox", "segm"}
    # the same predictions in one process give the same numbers (all images were gathered)
    single = LongTailLVISEvaluator(MINI_VAL, distributed=False, per_category=False)
    single.reset()
    for inp, outp in _fake_outputs(MINI_VAL):
        single.process([inp], [outp])
    ref = single.evaluate()
    for task in ("bbox", "segm"):
        for k in METRICS:
            assert r0[task][k] == pytest.approx(ref[task][k], abs=1e-9, nan_ok=True)


def test_config_keys_build_the_evaluator(mini_val_json, tmp_path):
    from detectron2.config import get_cfg

    from longtail import add_longtail_config
    from longtail.engine import Trainer

    cfg = get_cfg()
    add_longtail_config(cfg)
    e = cfg.LONGTAIL.EVAL
    assert (e.BACKEND, e.MAX_DETS_PER_IMAGE, e.FIXED_AP, e.POOLED_AP, e.MAX_DETS_PER_CLASS,
            e.PER_CATEGORY, cfg.LONGTAIL.TEST_TOPK_PER_CLASS) == ("auto", 300, False, False, 10000,
                                                                  True, 0)
    cfg.merge_from_list(["LONGTAIL.EVAL.BACKEND", "lvis", "LONGTAIL.EVAL.FIXED_AP", "True",
                         "LONGTAIL.EVAL.MAX_DETS_PER_CLASS", "77", "OUTPUT_DIR", str(tmp_path)])
    (ev,) = Trainer.build_evaluator(cfg, MINI_VAL)._evaluators
    assert isinstance(ev, LongTailLVISEvaluator)
    assert (ev._backend, ev._fixed_ap, ev._pooled_ap, ev._max_dets_per_class) == ("lvis", True, False, 77)
    assert ev._output_dir == os.path.join(str(tmp_path), "inference", MINI_VAL)
    cfg.LONGTAIL.EVAL.BACKEND = "nope"
    with pytest.raises(ValueError, match="LONGTAIL.EVAL.BACKEND 'nope'"):
        Trainer.build_evaluator(cfg, MINI_VAL)


def test_evaluate_results_command(tmp_path, capsys):
    from longtail.evaluation import main

    gt_json, results = edge_case_dataset(tmp_path)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = main([str(path), "--gt-json", gt_json, "--tasks", "bbox", "--fixed",
                "--dets-per-class", "25", "--backend", "lvis"])
    ref_fixed, _ = official(gt_json, results, "bbox", max_dets=-1, dets_per_class=25)
    assert out["bbox"]["AP_fixed"] == pytest.approx(ref_fixed["AP"] * 100, abs=1e-8)
    assert "AP_fixed" in capsys.readouterr().out
    path.write_text(json.dumps([dict(results[0], category_id=13)] + results[1:]))
    with pytest.raises(ValueError, match=r"results.json: predictions for 1 category id.*: 13 "):
        main([str(path), "--gt-json", gt_json])
