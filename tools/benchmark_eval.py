#!/usr/bin/env python
"""
LVIS evaluation at LVIS v1 val scale: wall time and peak RAM of the official ``lvis`` package and
of ``longtail.evaluation.evaluate_detections`` (each installed backend), side by side in one run,
whether their numbers agree, and where our path spends its time. Writes the section "LVIS
evaluation speed" of docs/benchmarks.md. Run from the repository root:

    python tools/benchmark_eval.py                       # 19,809 images (LVIS v1 val) and 5,000
    python tools/benchmark_eval.py --images 300 --no-write   # a quick look

docs/benchmarks.md's section came from these runs, one after the other (about 2 h on 2 busy
cores, then 45 min), written by the last command:

    python tools/benchmark_eval.py --images 19809 7500 5000 --before ef37dc8
        --before-images 19809 7500 --other-backends-images 5000 --shards 16 --shard-check
    cp output/bench_eval/last_run.json output/bench_eval/run_main.json
    python tools/benchmark_eval.py --images 11000 --tasks bbox --backends hotcoco
        --run-json output/bench_eval/run_fit_bbox.json --no-write
    python tools/benchmark_eval.py --images 8500 --tasks segm --backends hotcoco
        --run-json output/bench_eval/run_fit_segm.json --no-write
    python tools/benchmark_eval.py --images 9500 --tasks bbox --backends hotcoco
        --run-json output/bench_eval/run_fit_bbox2.json --no-write
    python tools/benchmark_eval.py --render output/bench_eval/run_main.json
        output/bench_eval/run_fit_bbox.json output/bench_eval/run_fit_bbox2.json
        output/bench_eval/run_fit_segm.json

(each command on one line). The largest size at which the official call fits was searched by
hand: 11,000 images did not fit for bbox, 9,500 did; 8,500 did for segm.

Data. A generated LVIS v1-like federated val set (1,203 categories with r/c/f buckets in LVIS v1's
proportions, about 12 objects per 640x480 image, polygon masks, negative and not-exhaustive
category lists) and ``--dets`` detections per image with boxes and RLE masks (jittered copies of
the image's objects, some with a wrong class, plus random boxes; random scores), in the format
detectron2's ``instances_to_coco_json`` gives. The detections are generated with numpy (the masks
with pycocotools, image by image, on up to 2 processes) and cached under ``--workdir``.

Measurement. Every evaluation runs in its own process, which loads the ground truth as the
evaluator holds it, builds the list of detection dicts, and then runs one evaluation:

* ``lvis (official)``: what detectron2's ``_evaluate_predictions_on_lvis`` does (for segm a
  deep copy of the results without boxes, then ``LVISResults(gt, results, max_dets=300)`` and
  ``LVISEval(...).run()``), with the official ``LVIS`` ground truth;
* ``lvis (official, K category shards)``: where the above does not fit in ``--ram-limit-gb``, the
  reference numbers come from the same package on the same ``LVISResults`` (the per-image cap
  applied over all classes), evaluated ``K`` category subsets at a time and summarised over the
  joined precision array (per-category AP does not depend on the other categories, so the
  numbers are the official ones; time and RAM are not those of detectron2's call);
* ``<backend>``: ``evaluate_detections(gt, results, task, backend)`` with detectron2's ``LVIS``
  ground truth and the backend's own, loaded before the timing (as ``LongTailLVISEvaluator``
  holds them);
* ``<backend>, before``: the same with ``projects/longtail/evaluation.py`` as of ``--before``
  (a git revision), for the profile split before the fixes.

"seconds" is the wall time of the evaluation (ground truth and detection list already in
memory), "CPU seconds" its process CPU time. "peak RSS" is the process's peak resident memory during the evaluation (VmHWM, reset
with /proc/self/clear_refs just before it), which includes the inputs; "inputs" is the resident
memory just before the evaluation (ground truth + detection list); "added" = peak - inputs. A
process whose resident memory passes ``--ram-limit-gb`` is killed and reported as such.
"identical": every one of AP, AP50, AP75, APs/m/l, APr/c/f within 1e-4 of the official value.
The profile split of our path (``TaskResult.timings``; for the 'before' revision the same
boundaries timed from outside): select (reading the detections' fields, caps, area rule), mask
area (segm: the library's RLE decoding), convert (the selected detections to the backend's
input), load (the library's result loading and evaluator set-up), match (the library's per image
and category IoU + greedy matching), accumulate (precision/recall, summary), results.
"""
import argparse
import contextlib
import copy
import gc
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TITLE = "LVIS evaluation speed"
TOL = 1e-4
LVIS_V1_VAL_IMAGES = 19809
PHASES = ("select", "mask_area", "convert", "load", "match", "accumulate", "results")


# ------------------------------------------------------------------------------------------
# Generated data
# ------------------------------------------------------------------------------------------
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


def _encode_masks(job):
    """RLE strings (concatenated) and their lengths for the diamond masks of some images."""
    import pycocotools.mask as mask_util

    boxes, sizes = job  # boxes: [n_images, D, 4]; sizes: [n_images, 2] (h, w)
    chunks, lengths = [], []
    for b, (h, w) in zip(boxes, sizes):
        x, y, bw, bh = b.T
        polys = np.stack([x, y + bh / 2, x + bw / 2, y, x + bw, y + bh / 2, x + bw / 2, y + bh], 1)
        rles = mask_util.frPyObjects(polys.tolist(), int(h), int(w))
        counts = [r["counts"] for r in rles]
        chunks.append(b"".join(counts))
        lengths.append(np.fromiter(map(len, counts), np.int32, len(counts)))
    return b"".join(chunks), np.concatenate(lengths)


def make_detections(data, dets_per_image, seed=1, workers=2):
    """``dets_per_image`` detections per image as arrays (see the module doc): image_id,
    category_id, bbox [N, 4] (xywh), score, mask size [N, 2] and RLE strings (one ascii blob
    + lengths)."""
    rng = np.random.default_rng(seed)
    D = dets_per_image
    num_classes = len(data["categories"])
    images = data["images"]
    n_img = len(images)
    img_ids = np.array([im["id"] for im in images], dtype=np.int64)
    img_h = np.array([im["height"] for im in images], dtype=np.int64)
    img_w = np.array([im["width"] for im in images], dtype=np.int64)
    index = {i: k for k, i in enumerate(img_ids.tolist())}
    anns = data["annotations"]
    ann_img = np.array([index[a["image_id"]] for a in anns], dtype=np.int64)
    order = np.argsort(ann_img, kind="stable")
    ann_img = ann_img[order]
    ann_box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)[order]
    ann_cat = np.array([a["category_id"] for a in anns], dtype=np.int64)[order]
    k = np.bincount(ann_img, minlength=n_img)
    first = np.cumsum(k) - k
    n_obj = np.minimum(k * 5, D // 2)

    img_of = np.repeat(np.arange(n_img), D)
    slot = np.tile(np.arange(D), n_img)
    is_obj = slot < n_obj[img_of]
    src = first[img_of] + slot % np.maximum(k[img_of], 1)
    boxes = np.zeros((n_img * D, 4))
    labels = rng.integers(1, num_classes + 1, n_img * D)
    # jittered copies of the image's objects, 70 % with their class
    o = np.flatnonzero(is_obj)
    x, y, w, h = ann_box[src[o]].T
    j = rng.normal(0, 0.1, (len(o), 4))
    boxes[o] = np.stack([x + j[:, 0] * w, y + j[:, 1] * h, w * (1 + j[:, 2]), h * (1 + j[:, 3])], 1)
    right = rng.random(len(o)) < 0.7
    labels[o[right]] = ann_cat[src[o[right]]]
    # random boxes
    r = np.flatnonzero(~is_obj)
    w = rng.uniform(8, 200, len(r))
    h = rng.uniform(8, 200, len(r))
    boxes[r] = np.stack([rng.uniform(0, img_w[img_of[r]] - w), rng.uniform(0, img_h[img_of[r]] - h),
                         w, h], 1)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
    scores = rng.random(n_img * D)

    per_image = boxes.reshape(n_img, D, 4)
    sizes = np.stack([img_h, img_w], 1)
    step = 250
    jobs = [(per_image[s:s + step], sizes[s:s + step]) for s in range(0, n_img, step)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_encode_masks, jobs, chunksize=1)
    else:
        parts = [_encode_masks(job) for job in jobs]
    blob = np.frombuffer(b"".join(p[0] for p in parts), dtype=np.uint8)
    lengths = np.concatenate([p[1] for p in parts])
    return {"image_id": img_ids[img_of], "category_id": labels, "bbox": boxes, "score": scores,
            "size": sizes[img_of].astype(np.int32), "counts": blob, "counts_len": lengths}


def prepare_data(workdir, num_images, num_classes, objects, dets, workers=2):
    """Write (once) the ground-truth json and the detection arrays; return their paths and
    the set's description."""
    os.makedirs(workdir, exist_ok=True)
    tag = f"lvisbench_{num_images}img_{num_classes}cls_{objects:g}obj_{dets}det"
    gt_path = os.path.join(workdir, tag + "_gt.json")
    det_path = os.path.join(workdir, tag + "_dets.npz")
    info_path = os.path.join(workdir, tag + "_info.json")
    if not (os.path.exists(gt_path) and os.path.exists(det_path) and os.path.exists(info_path)):
        t = time.perf_counter()
        data = make_dataset(num_images, num_classes, objects)
        arrays = make_detections(data, dets, workers=workers)
        info = {"images": num_images, "objects": len(data["annotations"]),
                "detections": int(len(arrays["score"])),
                "generation_s": None}
        with open(gt_path + ".tmp", "w") as f:
            json.dump(data, f)
        del data
        np.savez(det_path + ".tmp.npz", **arrays)
        del arrays
        info["generation_s"] = round(time.perf_counter() - t, 1)
        os.replace(gt_path + ".tmp", gt_path)
        os.replace(det_path + ".tmp.npz", det_path)
        with open(info_path, "w") as f:
            json.dump(info, f)
    with open(info_path) as f:
        return gt_path, det_path, json.load(f)


def load_detections(det_path, masks=True):
    """The detections as detectron2's ``instances_to_coco_json`` gives them: dicts with
    image_id, category_id, bbox (xywh), score and segmentation (RLE, ascii counts; with
    ``masks=False`` one shared empty list instead)."""
    z = np.load(det_path)
    cols = [z["image_id"].tolist(), z["category_id"].tolist(), z["bbox"].tolist(),
            z["score"].tolist()]
    gc.disable()  # millions of new containers: no collection passes meanwhile
    try:
        if not masks:
            empty = []
            return [{"image_id": i, "category_id": c, "bbox": b, "score": s,
                     "segmentation": empty} for i, c, b, s in zip(*cols)]
        lengths = z["counts_len"].astype(np.int64)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        blob = z["counts"].tobytes().decode("ascii")
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s,
                 "segmentation": {"size": [h, w], "counts": blob[a:e]}}
                for i, c, b, s, (h, w), a, e in zip(*cols, z["size"].tolist(), starts.tolist(),
                                                    ends.tolist())]
    finally:
        gc.enable()


# ------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------
def _status_kb(key, pid="self"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _meminfo_kb(key):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------
# One evaluation (child process)
# ------------------------------------------------------------------------------------------
class _Phases:
    """Wall time of named phases."""

    def __init__(self):
        self.t = {}

    @contextlib.contextmanager
    def __call__(self, name):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t


def _official(api, results, task, phases):
    """detectron2's _evaluate_predictions_on_lvis, phase by phase."""
    from lvis import LVISEval, LVISResults

    from longtail.evaluation import METRICS

    if task == "segm":
        with phases("copy"):
            results = copy.deepcopy(results)
            for c in results:
                c.pop("bbox", None)
    with phases("load"):
        dt = LVISResults(api, results, max_dets=300)
        ev = LVISEval(api, dt, task)
    with phases("match"):
        ev.evaluate()
    with phases("accumulate"):
        ev.accumulate()
        ev.summarize()
    return {k: float(ev.results[k]) for k in METRICS}


def _official_sharded(api, results, task, phases, shards):
    """The official package on ``shards`` category subsets of the same LVISResults."""
    from lvis import LVISEval, LVISResults

    from longtail.evaluation import METRICS

    if task == "segm":
        for c in results:  # in place: this process owns the list
            c.pop("bbox", None)
    with phases("load"):
        dt = LVISResults(api, results, max_dets=300)
    cat_ids = sorted(api.get_cat_ids())
    precision, recall = [], []
    for part in np.array_split(np.asarray(cat_ids), shards):
        with phases("load"):
            ev = LVISEval(api, dt, task)
            ev.params.cat_ids = [int(c) for c in part]
        with phases("match"):
            ev.evaluate()
        with phases("accumulate"):
            ev.accumulate()
        precision.append(ev.eval["precision"])
        recall.append(ev.eval["recall"])
        del ev
        gc.collect()
    with phases("accumulate"):
        ev = LVISEval(api, dt, task)
        ev.freq_groups = ev._prepare_freq_group()
        ev.eval = {"precision": np.concatenate(precision, axis=2),
                   "recall": np.concatenate(recall, axis=1)}
        ev.summarize()
    return {k: float(ev.results[k]) for k in METRICS}


def _load_revision(rev):
    """The evaluation code of git revision ``rev`` (``projects/longtail/evaluation.py`` and, where
    the revision has them, the modules it was split into and ``detection_columns.py``), loaded
    as modules of the package under private names; the rest of the package is the current one."""
    import importlib.util

    listing = subprocess.run(["git", "ls-tree", "--name-only", rev, "projects/longtail/"],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout.split()
    order = [m for m in ("detection_columns", "eval_backends", "eval_protocols", "eval_tables")
             if f"projects/longtail/{m}.py" in listing] + ["evaluation"]
    tmp = tempfile.mkdtemp()
    loaded = {}
    for name in order:
        src = subprocess.run(["git", "show", f"{rev}:projects/longtail/{name}.py"], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        for dep, module_name in loaded.items():  # the revision's own modules, not the current
            src = src.replace(f"from .{dep} import", f"from {module_name} import")
        module_name = f"longtail._rev_{rev}_{name}"
        path = os.path.join(tmp, f"{name}_{rev}.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(module_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        loaded[name] = module_name
    return mod


class _Marks:
    """Time stamps and durations at the phase boundaries of one evaluation, taken from outside
    (for code that does not time itself: the 'before' revision)."""

    def __init__(self):
        self.t = {}
        self.load = 0.0
        self.mask = 0.0

    def timed(self, start, end, fn, *args, **kwargs):
        self.t.setdefault(start, time.perf_counter())
        try:
            return fn(*args, **kwargs)
        finally:
            self.t[end] = time.perf_counter()

    def loading(self, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.load += time.perf_counter() - t

    def masking(self, fn, *args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.mask += time.perf_counter() - t

    def phases(self, t0, t1):
        """The phases of :class:`longtail.evaluation.TaskResult.timings`, from the marks."""
        t = self.t
        return {"select": t["select_end"] - t0 - self.mask,
                "mask_area": self.mask,
                "convert": t["match_start"] - t["select_end"] - self.load,
                "load": self.load,
                "match": t["match_end"] - t["match_start"],
                "accumulate": t["accumulate_end"] - t["match_end"],
                "results": t1 - t["accumulate_end"]}


class _TimedEval:
    """A backend evaluator object whose evaluate/accumulate/summarize/run leave marks."""

    def __init__(self, ev, marks):
        object.__setattr__(self, "_ev", ev)
        object.__setattr__(self, "_marks", marks)

    def __getattr__(self, name):
        return getattr(self._ev, name)

    def __setattr__(self, name, value):
        setattr(self._ev, name, value)

    def evaluate(self):
        self._marks.timed("match_start", "match_end", self._ev.evaluate)

    def accumulate(self):
        self._marks.timed("accumulate_start", "accumulate_end", self._ev.accumulate)

    def summarize(self):
        self._marks.timed("accumulate_start", "accumulate_end", self._ev.summarize)

    def run(self):
        self.evaluate()
        self.accumulate()
        self.summarize()


def _instrument(mod, marks):
    """Leave marks at the phase boundaries of ``mod.evaluate_detections`` of the 'before'
    revision (hotcoco and faster_coco_eval backends): the end of mod.select_detections, the
    libraries' result loading and evaluator set-up, and their evaluate, accumulate and
    summarize."""
    import hotcoco

    sel = mod.select_detections
    mod.select_detections = lambda *a, **k: marks.timed("select_start", "select_end", sel, *a,
                                                        **k)
    import pycocotools.mask

    area = pycocotools.mask.area  # the masks' areas in its select_detections
    pycocotools.mask.area = lambda *a, **k: marks.masking(area, *a, **k)
    lvis_results, lvis_eval = hotcoco.LVISResults, hotcoco.LVISeval
    hotcoco.LVISResults = lambda *a, **k: marks.loading(lvis_results, *a, **k)
    hotcoco.LVISeval = lambda *a, **k: _TimedEval(marks.loading(lvis_eval, *a, **k), marks)
    try:
        from faster_coco_eval import COCO, COCOeval_faster
    except ImportError:
        return
    load_res, init = COCO.loadRes, COCOeval_faster.__init__
    COCO.loadRes = lambda self, *a, **k: marks.loading(load_res, self, *a, **k)
    COCOeval_faster.__init__ = lambda self, *a, **k: marks.loading(init, self, *a, **k)
    for name, start, end in (("evaluate", "match_start", "match_end"),
                             ("accumulate", "accumulate_start", "accumulate_end"),
                             ("summarize", "accumulate_start", "accumulate_end")):
        def method(self, *a, _fn=getattr(COCOeval_faster, name), _s=start, _e=end, **k):
            return marks.timed(_s, _e, _fn, self, *a, **k)

        setattr(COCOeval_faster, name, method)


def child(spec):
    """Run one evaluation as described by ``spec``; write the measurements to spec['out']."""
    import logging

    logging.disable(logging.WARNING)  # lvis warns once per LVISResults; detectron2 logs
    from lvis import LVIS

    import longtail.evaluation  # noqa: F401  (torch + detectron2: in every child's baseline)

    mode, task, backend = spec["mode"], spec["task"], spec.get("backend")
    out = {"mode": mode, "task": task, "backend": backend}
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        api = LVIS(spec["gt"])
    gt = None
    if mode in ("ours", "before"):
        if mode == "before":
            mod = _load_revision(spec["before"])
        else:
            from longtail import evaluation as mod
        gt = mod.LVISGroundTruth(spec["gt"], api)
        gt.api(backend)
        backend = mod.resolve_backend(backend)
        out["backend"] = backend
    out["gt_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    # the bbox reference never reads masks: one shared empty one saves the RLEs' memory
    results = load_detections(spec["dets"], masks=not (mode == "official_sharded"
                                                       and task == "bbox"))
    out["dets_load_s"] = time.perf_counter() - t
    gc.collect()
    out["inputs_kb"] = _status_kb("VmRSS")
    out["peak_reset"] = _reset_peak()
    phases = _Phases()
    if mode == "before":
        marks = _Marks()
        _instrument(mod, marks)
    if spec.get("cprofile"):
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    with open(spec["out"] + ".started", "w") as f:  # for the parent, should it kill this one
        json.dump({"time": time.time(), "inputs_kb": out["inputs_kb"]}, f)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if mode == "official":
        summary = _official(api, results, task, phases)
    elif mode == "official_sharded":
        summary = _official_sharded(api, results, task, phases, spec["shards"])
    else:
        res = mod.evaluate_detections(gt, results, task, backend)
        summary = {k: float(v) for k, v in res.summary.items()}
    t1 = time.perf_counter()
    out["cpu_s"] = time.process_time() - c0
    out["seconds"] = t1 - t0
    if spec.get("cprofile"):
        prof.disable()
        import pstats

        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(20)
        out["cprofile"] = s.getvalue()
    out["peak_kb"] = _status_kb("VmHWM")
    out["summary"] = summary
    if mode == "before":
        out["phases"] = marks.phases(t0, t1)
    elif mode == "ours":
        out["phases"] = dict(res.timings)
    else:
        phases.t["other"] = out["seconds"] - sum(phases.t.values())
        out["phases"] = phases.t
    with open(spec["out"], "w") as f:
        json.dump(out, f)


# ------------------------------------------------------------------------------------------
# Parent: run the children, watch their memory
# ------------------------------------------------------------------------------------------
def run_child(spec, limit_gb, tmpdir, min_available_gb=1.5):
    """Run ``spec`` in a fresh process; kill it if its RSS passes ``limit_gb`` or the machine's
    available memory falls below ``min_available_gb`` (other jobs share it). Returns the
    child's measurements plus ``maxrss_kb`` (ru_maxrss of the whole process) and ``load``
    (1-minute load average at the start), or ``{"killed": ...}``."""
    spec = dict(spec, out=os.path.join(tmpdir, f"child_{time.monotonic_ns()}.json"))
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], cwd=ROOT)
    limit_kb = limit_gb * 1024 ** 2
    killed = None
    rusage = None
    while True:
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        try:
            rss = _status_kb("VmRSS", proc.pid)
        except OSError:
            rss = 0
        available = _meminfo_kb("MemAvailable")
        if killed is None and (rss > limit_kb or available < min_available_gb * 1024 ** 2):
            killed = {"rss_kb": rss, "after_s": time.perf_counter() - t,
                      "why": "RSS limit" if rss > limit_kb else
                      f"machine memory: {_gb(available):.1f} GB available"}
            proc.kill()
            try:
                with open(spec["out"] + ".started") as f:
                    started = json.load(f)
                killed.update(eval_s=time.time() - started["time"], inputs_kb=started["inputs_kb"])
            except OSError:
                killed.update(eval_s=None, inputs_kb=None)
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if killed is not None:
        return {"killed": killed, "load": load, "maxrss_kb": rusage.ru_maxrss, **spec}
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({proc.returncode}): {spec}")
    with open(spec["out"]) as f:
        out = json.load(f)
    out.update(load=load, maxrss_kb=rusage.ru_maxrss, wall_s=time.perf_counter() - t)
    return out


def _gb(kb):
    return kb / 1024 ** 2


def _environment():
    """Machine and library versions (without importing torch into this process)."""
    code = ("import json, importlib.metadata as m, numpy\n"
            "from longtail.evaluation import METRICS, available_backends, resolve_backend\n"
            "v = {}\n"
            "for p in ('lvis', 'hotcoco', 'faster-coco-eval', 'pycocotools', 'numpy'):\n"
            "    try: v[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(json.dumps({'metrics': METRICS, 'backends': available_backends(),\n"
            "                  'auto': resolve_backend('auto'), 'versions': v}))\n")
    env = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                                    capture_output=True, text=True).stdout.splitlines()[-1])
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    env["machine"] = (f"{cpu}, {os.cpu_count()} cores, {_gb(_meminfo_kb('MemTotal')):.0f} GB RAM, "
                      "no GPU")
    return env


def _prepare_in_subprocess(args, n):
    """prepare_data in a child process (its memory is not kept by this one)."""
    spec = {"workdir": args.workdir, "images": n, "classes": args.classes,
            "objects": args.objects, "dets": args.dets, "workers": args.workers}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", json.dumps(spec)],
                         cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def _label(r):
    if r["mode"] == "official":
        return "`lvis` (official, as detectron2 calls it)"
    if r["mode"] == "official_sharded":
        return f"`lvis` (official, {r['shards']} category shards: reference numbers)"
    if r["mode"] == "before":
        return f"`{r['backend']}` via `evaluate_detections`, before (`{r['before']}`)"
    return f"`{r['backend']}` via `evaluate_detections`"


def _phase_table(records, phases):
    lines = ["| task | images | evaluator | " + " | ".join(p.replace("_", " ") for p in phases)
             + " | total | ours (select + convert + results) | library (mask area + load + "
             "match + accumulate) |", "|---|---|---|" + "---|" * (len(phases) + 3)]
    for r in records:
        if r.get("killed") or r["mode"] not in ("ours", "before"):
            continue
        p = r["phases"]
        ours = p.get("select", 0) + p.get("convert", 0) + p.get("results", 0)
        lib = sum(p.get(k, 0) for k in ("mask_area", "load", "match", "accumulate"))
        total = r["seconds"]
        lines.append(f"| {r['task']} | {r['images']:,} | {_label(r)} | "
                     + " | ".join(f"{p.get(k, 0):.1f}" for k in phases)
                     + f" | {total:.1f} | {ours:.1f} ({100 * ours / total:.0f} %) | "
                     f"{lib:.1f} ({100 * lib / total:.0f} %) |")
    return lines


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, nargs="+", default=[LVIS_V1_VAL_IMAGES, 5000],
                        help="image counts to measure (default: LVIS v1 val's 19,809, and 5,000)")
    parser.add_argument("--dets", type=int, default=300, help="detections per image")
    parser.add_argument("--classes", type=int, default=1203)
    parser.add_argument("--objects", type=float, default=12.0, help="mean objects per image")
    parser.add_argument("--backends", nargs="+", default=None,
                        help="backends to time besides the official one (default: all installed "
                        "but lvis)")
    parser.add_argument("--tasks", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    parser.add_argument("--before", default=None,
                        help="git revision of projects/longtail/evaluation.py to time as "
                        "'before' (with the 'auto' backend)")
    parser.add_argument("--before-images", type=int, nargs="+", default=None,
                        help="image counts of the 'before' runs (default: the largest --images)")
    parser.add_argument("--other-backends-images", type=int, nargs="+", default=None,
                        help="image counts at which the backends other than 'auto' run "
                        "(default: all)")
    parser.add_argument("--shards", type=int, default=8,
                        help="category shards of the official reference where the official call "
                        "does not fit (0: none)")
    parser.add_argument("--shard-check", action="store_true",
                        help="also run the sharded reference at the smallest --images, where the "
                        "official call fits, to show both give the same numbers")
    parser.add_argument("--official-max-images", type=int, default=None,
                        help="do not attempt the official call above this many images")
    parser.add_argument("--ram-limit-gb", type=float, default=13.0,
                        help="kill an evaluation process whose resident memory passes this")
    parser.add_argument("--workdir", default=os.path.join(ROOT, "output", "bench_eval"),
                        help="where the generated sets are cached")
    parser.add_argument("--workers", type=int, default=2, help="processes for the mask RLEs")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--run-json", default=None,
                        help="where to save this run's measurements (default: "
                        "<workdir>/last_run.json)")
    parser.add_argument("--render", metavar="RUN_JSON", nargs="+",
                        help="only write the section again from saved runs' measurements (one "
                        "table; e.g. a main run and a run at the official package's largest "
                        "fitting size)")
    args = parser.parse_args()
    if args.render:
        states = []
        for path in args.render:
            with open(path) as f:
                states.append(json.load(f))
        return _write(render(merge_runs(states)), args.no_write)
    if args.child:
        return child(json.loads(args.child))
    if args.prepare:
        spec = json.loads(args.prepare)
        gt_path, det_path, info = prepare_data(spec["workdir"], spec["images"], spec["classes"],
                                               spec["objects"], spec["dets"], spec["workers"])
        print(json.dumps({"gt": gt_path, "dets": det_path, "info": info}))
        return

    env = _environment()
    backends = args.backends or [b for b in env["backends"] if b != "lvis"]
    auto = env["auto"]
    sizes = sorted(set(args.images), reverse=True)
    records, loads, generated = [], [], []
    tmp = tempfile.mkdtemp()

    def run(n, task, data, **spec):
        r = run_child(dict(spec, task=task, gt=data["gt"], dets=data["dets"]), args.ram_limit_gb,
                      tmp)
        r.update(images=n, detections=data["info"]["detections"], **spec)
        loads.append(r["load"])
        records.append(r)
        if r.get("killed"):
            k = r["killed"]
            print(f"[{task} {n}] {_label(r)}: killed ({k['why']}) at {_gb(k['rss_kb']):.1f} GB "
                  f"RSS after {k['after_s']:.0f} s"
                  + (f" ({k['eval_s']:.0f} s of evaluation)" if k["eval_s"] is not None else ""),
                  flush=True)
        else:
            print(f"[{task} {n}] {_label(r)}: {r['seconds']:.1f} s, peak {_gb(r['peak_kb']):.2f} "
                  f"GB (inputs {_gb(r['inputs_kb']):.2f}), phases "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items()), flush=True)
        return r

    for n in sizes:
        data = _prepare_in_subprocess(args, n)
        generated.append((n, data["info"]))
        print(f"[{n}] {data['info']}", flush=True)
        for task in args.tasks:
            for b in backends:
                if b == auto or not args.other_backends_images or n in args.other_backends_images:
                    run(n, task, data, mode="ours", backend=b)
            if args.before and n in (args.before_images or sizes[:1]):
                run(n, task, data, mode="before", backend=auto, before=args.before)
            official = None
            if args.official_max_images is None or n <= args.official_max_images:
                official = run(n, task, data, mode="official")
            if (official is None or official.get("killed")) and args.shards > 1:
                run(n, task, data, mode="official_sharded", shards=args.shards)
            elif args.shard_check and n == sizes[-1] and args.shards > 1:
                run(n, task, data, mode="official_sharded", shards=args.shards)

    state = {"records": records, "generated": generated, "loads": loads, "env": env,
             "argv": sys.argv[1:], "ram_limit_gb": args.ram_limit_gb, "classes": args.classes,
             "objects": args.objects, "dets": args.dets}
    with open(args.run_json or os.path.join(args.workdir, "last_run.json"), "w") as f:
        json.dump(state, f, indent=1)
    _write(render(state), args.no_write)


def merge_runs(states):
    """Several runs' measurements as one (records by image count, largest first; each run's
    command is listed)."""
    if len(states) == 1:
        return states[0]
    out = dict(states[0], argvs=[st["argv"] for st in states])
    for key in ("classes", "objects", "dets", "ram_limit_gb"):
        if any(st[key] != out[key] for st in states):
            raise ValueError(f"the runs differ in {key}")
    records = [r for st in states for r in st["records"]]
    out["records"] = sorted(records, key=lambda r: (-r["images"], r["task"] != "bbox"))
    out["generated"] = sorted({n: i for st in states for n, i in st["generated"]}.items(),
                              reverse=True)
    out["loads"] = [x for st in states for x in st["loads"]]
    return out


def _write(section, no_write):
    print(section)
    if not no_write:
        from tools.benchmarks_md import replace_section

        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), TITLE, section)


def render(state):
    """The section's text from one run's measurements (``last_run.json``)."""
    records, generated, loads, env = (state["records"], state["generated"], state["loads"],
                                      state["env"])
    metrics, auto = env["metrics"], env["auto"]
    ram_limit_gb = state["ram_limit_gb"]
    # the reference of each (size, task): the official call, else its sharded run
    refs, ref_times, ref_ids = {}, {}, {}
    for r in records:
        if r["mode"].startswith("official") and not r.get("killed"):
            key = (r["images"], r["task"])
            if r["mode"] == "official" or key not in refs:
                refs[key] = r["summary"]
                ref_times[key] = ((r["seconds"], r["cpu_s"]), r["mode"])
                ref_ids[key] = id(r)

    cmds = ["`python tools/benchmark_eval.py" + "".join(
        f" {a}" for a in argv if a not in ("--no-write",)) + "`"
        for argv in state.get("argvs", [state["argv"]])]
    v = env["versions"]
    lines = [
        f"Machine: {env['machine']}. "
        + (f"Command (repository root): {cmds[0]}" if len(cmds) == 1 else
           f"Commands (repository root, one after the other): {'; '.join(cmds)}")
        + ". Versions: "
        + ", ".join(f"{k} {x}" for k, x in v.items()) + ".",
        "",
        f"Data: a generated LVIS v1-like federated val set ({state['classes']} categories, r/c/f in "
        f"LVIS v1's proportions, about {state['objects']:g} objects per 640x480 image with polygon "
        f"masks) and {state['dets']} detections per image with boxes and RLE masks, as detectron2's "
        "`instances_to_coco_json` gives them (" + "; ".join(
            f"{n:,} images: {i['objects']:,} objects, {i['detections']:,} detections, generated "
            f"in {i['generation_s']:.0f} s" for n, i in generated) + "; cached under "
        "`output/bench_eval/`).",
        "",
        "Each row is one evaluation in its own process, which first loads the ground truth as the "
        "evaluator holds it (detectron2's `LVIS`, plus the backend's own) and builds the list of "
        "detection dicts. **seconds**: wall time of the evaluation alone; **CPU seconds**: its "
        "process CPU time (user + system, all threads; less disturbed by the other jobs on the "
        "machine than wall time). **peak RSS**: the "
        "process's peak resident memory during the evaluation (VmHWM, reset through "
        "/proc/self/clear_refs just before), inputs included; **inputs**: resident memory just "
        "before it (torch + detectron2, ground truth, detection dicts); **added** = peak - inputs. "
        f"A process passing {ram_limit_gb:g} GB RSS is killed. **identical**: all of "
        + ", ".join(metrics) + f" within {TOL:g} of the official values (max abs diff, [0, 1] "
        "scale). Official = `_evaluate_predictions_on_lvis` of detectron2 step by step (segm: "
        "deep copy of the results without boxes; `LVISResults(gt, results, max_dets=300)`; "
        "`LVISEval(...).run()`). Where that does not fit, the reference numbers come from the "
        "official package on the same `LVISResults` evaluated a subset of the categories at a "
        "time (`params.cat_ids`), summarised over the joined precision array: per-category AP "
        "does not depend on the other categories, so these are the official numbers, but its time "
        "and RAM are not those of detectron2's call (the bbox reference also gets one shared "
        "empty mask instead of the RLEs, which bbox evaluation never reads).",
        "",
        "| task | images | detections | evaluator | seconds | CPU seconds | peak RSS (GB) | "
        "inputs (GB) | added (GB) | speed-up vs official (wall / CPU) | identical (max abs diff) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        key = (r["images"], r["task"])
        head = f"| {r['task']} | {r['images']:,} | {r['detections']:,} | {_label(r)} | "
        if r.get("killed"):
            k = r["killed"]
            when = (f"killed after {k['eval_s']:.0f} s of evaluation" if k["eval_s"] is not None
                    else f"killed after {k['after_s']:.0f} s, before the evaluation started")
            inputs = f"{_gb(k['inputs_kb']):.2f}" if k["inputs_kb"] else "-"
            lines.append(head + f"{when} ({k['why']}) | - | {_gb(k['rss_kb']):.2f} when killed | "
                         f"{inputs} | - | - | - |")
            continue
        speed = "-"
        if key in ref_times and r["mode"] in ("ours", "before"):
            (t_ref, c_ref), how = ref_times[key]
            speed = (f"{t_ref / r['seconds']:.1f}x / {c_ref / r['cpu_s']:.1f}x"
                     + ("" if how == "official" else " (vs sharded)"))
        ident = "reference" if ref_ids.get(key) == id(r) else "-"
        if key in refs and ref_ids.get(key) != id(r):
            diff = max(abs(r["summary"][m] - refs[key][m]) for m in metrics)
            ident = f"{'yes' if diff <= TOL else 'no'} ({diff:.1e})"
        lines.append(head + f"{r['seconds']:.1f} | {r['cpu_s']:.1f} | {_gb(r['peak_kb']):.2f} | "
                     f"{_gb(r['inputs_kb']):.2f} | {_gb(r['peak_kb'] - r['inputs_kb']):.2f} | "
                     f"{speed} | {ident} |")
    fits = []
    for task in ("bbox", "segm"):
        calls = [r for r in records if r["mode"] == "official" and r["task"] == task]
        ok = [r for r in calls if not r.get("killed")]
        bad = [r["images"] for r in calls if r.get("killed")]
        if ok or bad:
            best = max(ok, key=lambda r: r["images"]) if ok else None
            fits.append(f"{task}: " + (f"completes at {best['images']:,} images (peak "
                        f"{_gb(best['peak_kb']):.1f} GB)" if best else "completes at no measured "
                        "size") + (f", killed at {min(bad):,} images" if bad else ""))
    if fits:
        lines += ["", f"The official call as detectron2 makes it, within {ram_limit_gb:g} GB: "
                  + "; ".join(fits) + (" (sizes in between not measured)." if any(
                      "killed" in f for f in fits) else ".")]
    lines += ["", "Official numbers (reference): " + "; ".join(
        f"{task} {n:,} images: AP {ref['AP']:.4f}, APr {ref['APr']:.4f}, APc {ref['APc']:.4f}, "
        f"APf {ref['APf']:.4f}" for (n, task), ref in sorted(refs.items(), reverse=True)) + "."]
    lines += ["", "Where the time goes (seconds; TaskResult.timings, or the same boundaries timed "
              "from outside for the 'before' revision): **select** = reading the detections' "
              "fields, per-image cap, area rule (ours); **mask area** = segm: the masks' areas "
              "(the library's RLE decoding: hotcoco.mask.area now, pycocotools' before); "
              "**convert** = the selected detections to "
              "the backend's input (ours); **load** = the library's result loading and evaluator "
              "set-up; **match** = the library's per image and category IoU and greedy matching; "
              "**accumulate** = the library's precision/recall and summary; **results** = reading "
              "them back.", ""]
    lines += _phase_table(records, PHASES)
    lines += ["", f"`LONGTAIL.EVAL.BACKEND auto` resolves to `{auto}` here. 1-minute load average "
              f"of the machine when the evaluations started: {min(loads):.1f} to {max(loads):.1f} "
              f"({os.cpu_count()} cores; the benchmark itself accounts for about 1, the rest are "
              "other jobs that shared the machine)."]
    return "\n".join(lines)

if __name__ == "__main__":
    main()
