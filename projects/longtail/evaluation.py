"""LVIS evaluation for long-tail research: a fast backend, per-category results, AP_fixed and AP_pool.

:class:`LongTailLVISEvaluator` extends detectron2's ``LVISEvaluator`` (same inputs; works with
``--eval-only`` and during training) and:

* evaluates with a selectable backend (``LONGTAIL.EVAL.BACKEND``): ``"lvis"`` (the official
  ``lvis`` package), ``"faster_coco_eval"`` (``COCOeval_faster(..., lvis_style=True)``) or
  ``"hotcoco"`` (``hotcoco.LVISeval``); ``"auto"`` picks the first installed of
  :data:`AUTO_ORDER` (the fastest that reproduces the official numbers, see docs/benchmarks.md);
* writes per-category AP (bbox and segm) as json and csv, with the category's id, name, r/c/f
  bucket, training image and instance counts and validation instance count, and the summary
  table by frequency bucket (``summary_by_frequency.{json,csv}``);
* optionally adds the fixed-AP protocol of Dave et al. (2021) (``AP_fixed``: the top
  ``MAX_DETS_PER_CLASS`` detections of every class over the whole dataset, no per-image cap)
  and their pooled AP (``AP_pool``) to the result dict;
* is rank-safe: predictions are gathered to the main process, which evaluates, and every process
  returns the same result dict (an evaluation error on the main process is raised everywhere).

Every backend gets the same, already selected, detections: :func:`select_detections` applies
the official package's result-side rules itself (the per-image cap, ties in input order, then
dropping detections whose area is not positive, which ``lvis`` does in ``get_ann_ids``), and the
ground truth the libraries load follows the official semantics (``iscrowd`` is ignored,
annotations with non-positive area are dropped). The backends then only match and accumulate.
The selection works on columns read once from the detection dicts (:class:`DetectionColumns`,
shared by the bbox, segm, AP_fixed and AP_pool evaluations of one set), and ``hotcoco`` gets the
selected detections as one array (plus the masks' RLEs for segm) instead of a dict each.

Optional libraries are imported lazily: importing this module needs only ``lvis``.
"""
import contextlib
import copy
import csv
import importlib.util
import io
import itertools
import json
import logging
import os
import time
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from .datasets import FREQUENCY, IMAGE_COUNT, INSTANCE_COUNT
from .detection_columns import DetectionColumns, as_columns, max_per_group_pair, ranks_within

__all__ = [
    "BACKENDS",
    "AUTO_ORDER",
    "METRICS",
    "LVISGroundTruth",
    "TaskResult",
    "DetectionColumns",
    "available_backends",
    "resolve_backend",
    "select_detections",
    "evaluate_detections",
    "pooled_ap",
    "load_results_json",
    "check_results",
    "per_category_rows",
    "frequency_summary",
    "LongTailLVISEvaluator",
    "build_lvis_evaluator",
]

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
BACKENDS = ("lvis", "faster_coco_eval", "hotcoco")
# "auto" takes the first installed one. Order = measured speed (tools/benchmark_eval.py); each
# reproduces the official numbers (tests/test_evaluation.py).
AUTO_ORDER = ("hotcoco", "faster_coco_eval", "lvis")
_MODULES = {"lvis": "lvis", "faster_coco_eval": "faster_coco_eval", "hotcoco": "hotcoco"}
FREQUENCIES = ("r", "c", "f")
# Recall grid and IoU thresholds of the official evaluation (lvis.eval.Params).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)


# ------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------
def available_backends() -> List[str]:
    """Backends whose library is importable here."""
    return [b for b in BACKENDS if importlib.util.find_spec(_MODULES[b]) is not None]


def resolve_backend(name: str) -> str:
    """``"auto"`` -> the first installed backend of :data:`AUTO_ORDER`; else check ``name``."""
    name = (name or "auto").lower()
    if name == "auto":
        installed = available_backends()
        for b in AUTO_ORDER:
            if b in installed:
                return b
        raise ImportError("No LVIS evaluation library is installed (pip install lvis).")
    if name not in BACKENDS:
        raise ValueError(
            f"LONGTAIL.EVAL.BACKEND {name!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}."
        )
    if importlib.util.find_spec(_MODULES[name]) is None:
        raise ImportError(
            f"LONGTAIL.EVAL.BACKEND {name!r} needs the {_MODULES[name]!r} package "
            f"(pip install {name.replace('_', '-')}); installed: {available_backends()}."
        )
    return name


class LVISGroundTruth:
    """
    An LVIS-format ground truth, loaded once and shared by the backends.

    Args:
        json_file: path of the LVIS-format annotation json.
        lvis_api: an already loaded ``lvis.LVIS`` of the same file (detectron2's evaluator has
            one); loaded on first use otherwise.
    """

    def __init__(self, json_file: str, lvis_api=None):
        self.json_file = json_file
        self._lvis_api = lvis_api
        self._data = None
        self._apis: Dict[str, object] = {}

    @property
    def data(self) -> Dict:
        """The json as a dict (the official package's data when it is already loaded)."""
        if self._data is None:
            if self._lvis_api is not None:
                self._data = self._lvis_api.dataset
            else:
                with PathManager.open(self.json_file) as f:
                    self._data = json.load(f)
        return self._data

    @property
    def categories(self) -> List[Dict]:
        return sorted(self.data["categories"], key=lambda c: c["id"])

    @property
    def category_ids(self) -> List[int]:
        return [c["id"] for c in self.categories]

    @property
    def image_ids(self) -> List[int]:
        return [im["id"] for im in self.data["images"]]

    def num_instances(self) -> Dict[int, int]:
        """Ground-truth instances per category id (those the official evaluation counts)."""
        counts = {c: 0 for c in self.category_ids}
        for a in self.data["annotations"]:
            if a.get("area", 1) > 0:
                counts[a["category_id"]] = counts.get(a["category_id"], 0) + 1
        return counts

    def _library_dict(self) -> Dict:
        # The official package ignores ``iscrowd`` and skips annotations with area <= 0 (its
        # get_ann_ids keeps 0 < area < inf); the libraries get exactly those annotations.
        # Read from the file: the official package rewrites the annotations it evaluates in place
        # (segm turns polygons into RLEs), so its loaded copy is not used here.
        with PathManager.open(self.json_file) as f:
            data = json.load(f)
        anns = []
        for a in data["annotations"]:
            if not a.get("area", 0) > 0:
                continue
            if "iscrowd" in a:
                a = {k: v for k, v in a.items() if k != "iscrowd"}
            anns.append(a)
        out = {k: v for k, v in data.items() if k != "annotations"}
        out["annotations"] = anns
        return out

    def api(self, backend: str):
        """The backend's ground-truth object (cached)."""
        if backend not in self._apis:
            if backend == "lvis":
                if self._lvis_api is None:
                    from lvis import LVIS

                    self._lvis_api = LVIS(self.json_file)
                self._apis[backend] = self._lvis_api
            elif backend == "hotcoco":
                import hotcoco

                self._apis[backend] = hotcoco.COCO(self._library_dict())
            elif backend == "faster_coco_eval":
                from faster_coco_eval import COCO

                self._apis[backend] = COCO(self._library_dict())
            else:
                raise ValueError(backend)
        return self._apis[backend]


class TaskResult:
    """
    Result of one evaluation (one task, one protocol).

    Attributes:
        summary (dict): METRICS -> value in [0, 1] as the backend reports it (-1: undefined).
        category_ids (list[int]): sorted category ids of the ground truth.
        precision (ndarray): [T, R, K, A] interpolated precision (official layout, -1: absent).
        num_detections (int): detections evaluated (after the caps).
        eval_imgs (list[dict] or None): per image/category/area matching records in the official
            package's format (only when requested, for AP_pool).
        backend (str): the backend that produced it.
        timings (dict): wall seconds of the phases: "select" (reading the detections' fields,
            caps, area rule), "mask_area" (segm: the library's RLE decoding for the masks'
            areas), "convert" (the selected detections to the backend's input: an
            array, or dict copies), "load" (the library's result loading and evaluator set-up),
            "match" (the library's per image and category IoU and greedy matching),
            "accumulate" (the library's precision/recall and summary), "results" (reading the
            summary, precision and matches back).
    """

    def __init__(self, summary, category_ids, precision, num_detections, backend, eval_imgs=None,
                 timings=None):
        self.summary = summary
        self.category_ids = list(category_ids)
        self.precision = precision
        self.num_detections = num_detections
        self.backend = backend
        self.eval_imgs = eval_imgs
        self.timings = dict(timings or {})

    def per_category(self, iou: Optional[float] = None, area: int = 0) -> np.ndarray:
        """[K] AP per category (NaN where the category has no ground truth)."""
        p = self.precision[..., area]
        if iou is not None:
            p = p[int(np.argmin(np.abs(IOU_THRESHOLDS - iou)))][None]
        valid = p > -1
        total = np.where(valid, p, 0.0).sum(axis=(0, 1))
        count = valid.sum(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------
def load_results_json(path: str) -> List[Dict]:
    """Read an LVIS results json (a list of detections); errors name the file."""
    try:
        with PathManager.open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"Results file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(
            f"Results file {path} must hold a JSON list of detections "
            f"(LVIS results format), got {type(data).__name__}."
        )
    return data


def check_results(results, gt: LVISGroundTruth, source: str = "results") -> None:
    """Raise a ValueError naming ``source`` and the offending ids when detections (a list of
    dicts or :class:`DetectionColumns`) refer to categories or images the dataset lacks."""
    if isinstance(results, DetectionColumns):
        result_cats = np.unique(results.category_id).tolist()
        result_imgs = np.unique(results.image_id).tolist()
    else:
        result_cats = {r["category_id"] for r in results}
        result_imgs = {r["image_id"] for r in results}
    cats = set(gt.category_ids)
    bad_cats = sorted(set(result_cats) - cats)
    if bad_cats:
        shown = ", ".join(map(str, bad_cats[:20])) + (" ..." if len(bad_cats) > 20 else "")
        raise ValueError(
            f"{source}: predictions for {len(bad_cats)} category id(s) that {gt.json_file} "
            f"lacks: {shown} (dataset category ids: {min(cats)}..{max(cats)}, {len(cats)} "
            "categories). LVIS category ids are 1-based; detectron2's contiguous ids are 0-based."
        )
    imgs = set(gt.image_ids)
    bad_imgs = sorted(set(result_imgs) - imgs)
    if bad_imgs:
        shown = ", ".join(map(str, bad_imgs[:20])) + (" ..." if len(bad_imgs) > 20 else "")
        raise ValueError(
            f"{source}: predictions for {len(bad_imgs)} image id(s) that {gt.json_file} "
            f"lacks: {shown}."
        )


# ------------------------------------------------------------------------------------------
# Detection selection (the official result-side rules, shared by every backend)
# ------------------------------------------------------------------------------------------
_ranks_within = ranks_within  # the former name


def select_detections(
    results,
    iou_type: str,
    max_dets_per_image: int = 300,
    max_dets_per_class: int = -1,
) -> List[Dict]:
    """
    The detections an evaluation sees, in input order (shallow copies).

    1. ``max_dets_per_class > 0``: keep each class's top-k by score over the whole set (AP_fixed);
    2. ``max_dets_per_image > 0``: keep each image's top-k by score (the standard LVIS cap, 300);
    3. drop detections whose area is not positive (box w*h for bbox, mask area for segm), as the
       official package does; for segm the box is removed so the area is the mask's (as in
       detectron2). Ties are broken by input order, as in the official package and Dave et al.

    ``results``: a list of detection dicts or :class:`DetectionColumns` of one. The rules run on
    the columns (:meth:`DetectionColumns.select`); :func:`evaluate_detections` uses the indices
    directly and copies no dict for ``hotcoco``.
    """
    cols = as_columns(results)
    return cols.dicts(cols.select(iou_type, max_dets_per_image, max_dets_per_class), iou_type)


# ------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------
class _Stopwatch:
    """Wall seconds of consecutive phases: ``lap(name)`` ends the current phase."""

    def __init__(self):
        self.t = time.perf_counter()
        self.laps: Dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.t
        self.t = now


def _lvis_eval_imgs(ev) -> List[Dict]:
    return [e for e in ev.eval_imgs if e is not None]


def _run_lvis(gt: LVISGroundTruth, cols: DetectionColumns, idx: np.ndarray, iou_type: str,
              keep_eval_imgs: bool, watch: _Stopwatch):
    from lvis import LVISEval, LVISResults

    api = gt.api("lvis")
    dets = cols.dicts(idx, iou_type)
    watch.lap("convert")
    dt = LVISResults(api, dets, max_dets=-1)
    ev = LVISEval(api, dt, iou_type)
    ev.params.max_dets = -1  # already capped by the selection
    watch.lap("load")
    ev.evaluate()
    watch.lap("match")
    ev.accumulate()
    ev.summarize()
    watch.lap("accumulate")
    summary = {k: float(ev.results[k]) for k in METRICS}
    eval_imgs = _lvis_eval_imgs(ev) if keep_eval_imgs else None
    return summary, np.asarray(ev.eval["precision"]), eval_imgs


def _max_per_image_category(dets: List[Dict]) -> int:
    """Most detections any (image, category) pair has: a per-pair cap that removes nothing."""
    cols = as_columns(dets)
    return max(max_per_group_pair(cols.image_id, cols.category_id), 1)


def _hotcoco_eval_imgs(ev) -> List[Dict]:
    out = []
    for e in ev.eval_imgs:
        if e is None:
            continue
        out.append({
            "image_id": e["image_id"],
            "category_id": e["category_id"],
            "area_rng": list(e["aRng"]),
            "dt_scores": e["dtScores"],
            "dt_matches": np.asarray(e["dtMatches"]),
            "dt_ignore": np.asarray(e["dtIgnore"]),
            "gt_ignore": np.asarray(e["gtIgnore"]),
        })
    return out


# hotcoco's matching does not read a segm detection's box (it matches masks; area is set from
# the mask below): the rows carry this one (tests/test_evaluation.py checks the segm numbers
# against the official package, which sees the masks' own boxes).
_UNUSED_BOX = (0.0, 0.0, 1.0, 1.0)


def _hotcoco_rows(cols: DetectionColumns, idx: np.ndarray, iou_type: str):
    """The selected detections as hotcoco's array input: [N, 7] rows (image_id, x, y, w, h,
    score, category_id; hotcoco numbers them 1..N in this order, as ``LVISResults`` numbers
    dicts), and for segm the RLEs and the masks' areas."""
    rows = np.empty((len(idx), 7), dtype=np.float64)
    rows[:, 0] = cols.take(cols.image_id, idx)
    rows[:, 1:5] = cols.take(cols.bbox(), idx) if iou_type == "bbox" else _UNUSED_BOX
    rows[:, 5] = cols.take(cols.score, idx)
    rows[:, 6] = cols.take(cols.category_id, idx)
    if iou_type == "bbox":
        return rows, None, None
    return rows, cols.take(cols.segmentation(), idx), cols.take(cols.mask_area(), idx)


def _run_hotcoco(gt: LVISGroundTruth, cols: DetectionColumns, idx: np.ndarray, iou_type: str,
                 keep_eval_imgs: bool, watch: _Stopwatch):
    import hotcoco

    api = gt.api("hotcoco")
    rows, segms, areas = _hotcoco_rows(cols, idx, iou_type)
    watch.lap("convert")
    # its summarize() prints the table, and warns that AR is labelled with a non-default cap
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dt = api.load_res(rows) if segms is None else api.load_res(rows, segmentation=segms)
        dt = dt.cap_detections_per_image(None)  # as LVISResults(..., max_dets=-1): no cap
        if areas is not None:  # a row's area is its box's: the mask's instead
            dt.update_anns(ids=np.arange(1, len(idx) + 1), area=areas)
        del rows, segms, areas  # hotcoco holds its own copy
        ev = hotcoco.LVISeval(api, dt, iou_type)
        # the per (image, category) cap of its COCO-style core: one that removes nothing (it
        # sizes nothing by it)
        ev.params.max_dets = [max(len(idx), 1)]
        watch.lap("load")
        ev.evaluate()
        watch.lap("match")
        ev.accumulate()
        ev.summarize()
        watch.lap("accumulate")
    res = ev.get_results()
    summary = {k: float(res[k]) for k in METRICS}
    precision = np.asarray(ev.eval["precision"])[..., -1]
    eval_imgs = _hotcoco_eval_imgs(ev) if keep_eval_imgs else None
    return summary, precision, eval_imgs


_FCE_KEYS = {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small",
             "APm": "AP_medium", "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf"}


def _run_faster_coco_eval(gt: LVISGroundTruth, cols: DetectionColumns, idx: np.ndarray,
                          iou_type: str, keep_eval_imgs: bool, watch: _Stopwatch):
    from faster_coco_eval import COCOeval_faster

    if keep_eval_imgs:
        raise NotImplementedError("faster_coco_eval does not expose per-image matches (AP_pool)")
    api = gt.api("faster_coco_eval")
    dets = cols.dicts(idx, iou_type)  # copies: loadRes writes area/id/iscrowd into them
    # pycocotools-style cap per image and category: as large as needed, no larger (it sizes
    # buffers by it)
    max_dets = max(max_per_group_pair(cols.image_id[idx], cols.category_id[idx]), 1)
    watch.lap("convert")
    dt = api.loadRes(dets)
    ev = COCOeval_faster(api, dt, iou_type, lvis_style=True, print_function=lambda *a, **k: None)
    ev.params.maxDets = [max_dets]
    watch.lap("load")
    ev.evaluate()
    watch.lap("match")
    ev.accumulate()
    ev.summarize()
    watch.lap("accumulate")
    stats = ev.stats_as_dict
    summary = {k: float(stats[v]) for k, v in _FCE_KEYS.items()}
    precision = np.asarray(ev.eval["precision"])[..., -1]
    return summary, precision, None


_RUNNERS = {"lvis": _run_lvis, "hotcoco": _run_hotcoco, "faster_coco_eval": _run_faster_coco_eval}


def evaluate_detections(
    gt: LVISGroundTruth,
    results,
    iou_type: str,
    backend: str = "auto",
    max_dets_per_image: int = 300,
    max_dets_per_class: int = -1,
    keep_eval_imgs: bool = False,
) -> TaskResult:
    """
    Evaluate LVIS-format detections (1-based category ids) for ``iou_type`` ("bbox"/"segm").

    ``results``: a list of detection dicts, or :class:`DetectionColumns` of one (build it once
    when evaluating the same detections several times: the fields are then read once).
    The standard LVIS AP is ``max_dets_per_image=300, max_dets_per_class=-1``; AP_fixed is
    ``max_dets_per_image=-1, max_dets_per_class=10000``. Returns a :class:`TaskResult` whose
    summary is in [0, 1] (the backend's own numbers) or NaN everywhere when nothing is left
    to evaluate (as detectron2 does for empty results).
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    backend = resolve_backend(backend)
    watch = _Stopwatch()
    cols = as_columns(results)
    if iou_type == "segm":  # the library's RLE decoding, timed apart from our selection
        cols.segmentation()
        watch.lap("select")
        cols.mask_area()
        watch.lap("mask_area")
    idx = cols.select(iou_type, max_dets_per_image, max_dets_per_class)
    watch.lap("select")
    cat_ids = gt.category_ids
    if len(idx) == 0:
        precision = -np.ones((len(IOU_THRESHOLDS), len(RECALL_THRESHOLDS), len(cat_ids), 4))
        return TaskResult({k: float("nan") for k in METRICS}, cat_ids, precision, 0, backend,
                          [] if keep_eval_imgs else None, watch.laps)
    summary, precision, eval_imgs = _RUNNERS[backend](gt, cols, idx, iou_type, keep_eval_imgs,
                                                      watch)
    watch.lap("results")
    return TaskResult(summary, cat_ids, precision, len(idx), backend, eval_imgs, watch.laps)


def _pooled_precision(records: List[Dict]) -> float:
    """Official LVIS accumulation (interpolated precision at 101 recall points, averaged over
    the IoU thresholds) over all the records' detections together. -1 without ground truth."""
    num_gt = sum(int(np.count_nonzero(np.asarray(e["gt_ignore"]) == 0)) for e in records)
    if num_gt == 0:
        return -1.0
    scores = np.concatenate([np.asarray(e["dt_scores"], dtype=np.float64) for e in records])
    num_thrs = len(IOU_THRESHOLDS)
    if scores.size == 0:
        return 0.0
    matches = np.concatenate(
        [np.asarray(e["dt_matches"]).reshape(num_thrs, -1) for e in records], axis=1) != 0
    ignore = np.concatenate(
        [np.asarray(e["dt_ignore"]).reshape(num_thrs, -1) for e in records], axis=1) != 0
    order = np.argsort(-scores, kind="mergesort")
    matches, ignore = matches[:, order], ignore[:, order]
    tp = np.cumsum(matches & ~ignore, axis=1).astype(np.float64)
    fp = np.cumsum(~matches & ~ignore, axis=1).astype(np.float64)
    recall = tp / num_gt
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    q = np.zeros((num_thrs, len(RECALL_THRESHOLDS)))
    for t in range(num_thrs):  # 10 IoU thresholds
        idx = np.searchsorted(recall[t], RECALL_THRESHOLDS, side="left")
        ok = idx < precision.shape[1]
        q[t, ok] = precision[t, idx[ok]]
    return float(q.mean())


def pooled_ap(
    gt: LVISGroundTruth,
    results: Sequence[Dict],
    iou_type: str,
    backend: str = "auto",
    max_dets_per_class: int = 10000,
    max_dets_per_image: int = -1,
) -> Dict[str, float]:
    """
    AP_pool of Dave et al. (2021): detections are matched per category exactly as in the
    standard evaluation, but precision and recall are accumulated over all categories of a pool
    together (one ranking of every class's detections), so scores must be comparable across
    classes. Pools: all, r, c, f. Same detections as AP_fixed (top ``max_dets_per_class`` per
    class, no per-image cap). Needs per-image matches, which ``lvis`` and ``hotcoco`` expose
    (``faster_coco_eval`` does not: ``hotcoco``, else ``lvis``, is used then).

    Returns {"AP_pool", "APr_pool", "APc_pool", "APf_pool"} in [0, 1] (-1: no ground truth).
    """
    backend = resolve_backend(backend)
    if backend == "faster_coco_eval":
        backend = "hotcoco" if "hotcoco" in available_backends() else "lvis"
    res = evaluate_detections(gt, results, iou_type, backend, max_dets_per_image,
                              max_dets_per_class, keep_eval_imgs=True)
    all_range = [r for r in res.eval_imgs if r["area_rng"][0] == 0 and r["area_rng"][1] >= 1e10]
    freq = {c["id"]: c.get("frequency") for c in gt.categories}
    out = {"AP_pool": _pooled_precision(all_range) if all_range else float("nan")}
    for f in FREQUENCIES:
        recs = [r for r in all_range if freq.get(r["category_id"]) == f]
        out[f"AP{f}_pool"] = _pooled_precision(recs) if recs else -1.0
    return out


# ------------------------------------------------------------------------------------------
# Per-category tables
# ------------------------------------------------------------------------------------------
def _category_metadata(metadata, gt: LVISGroundTruth):
    """Per category id: name, frequency, training image and instance counts. From detectron2's
    metadata (longtail.datasets.prepare_datasets) where present, else the json's fields."""
    cats = gt.categories
    out = {}
    names = metadata.get("thing_classes", None) if metadata is not None else None
    freq = metadata.get(FREQUENCY, None) if metadata is not None else None
    img_count = metadata.get(IMAGE_COUNT, None) if metadata is not None else None
    inst_count = metadata.get(INSTANCE_COUNT, None) if metadata is not None else None
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None) if metadata is not None else None
    for i, c in enumerate(cats):
        j = id_map[c["id"]] if id_map else c["id"] - 1
        def pick(values, key):
            if values is not None and 0 <= j < len(values):
                return values[j]
            return c.get(key)
        out[c["id"]] = {
            "name": pick(names, "name"),
            "frequency": pick(freq, "frequency"),
            "train_image_count": pick(img_count, "image_count"),
            "train_instance_count": pick(inst_count, "instance_count"),
        }
    return out


def _pct(x) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else float(x) * 100.0


def per_category_rows(
    result: TaskResult, gt: LVISGroundTruth, metadata=None, fixed: Optional[TaskResult] = None
) -> List[Dict]:
    """One row per category: id, name, frequency, training image/instance counts, validation
    instances, detections evaluated, AP, AP50, AP75 (percent; None = no validation instances),
    and AP_fixed when ``fixed`` is given."""
    meta = _category_metadata(metadata, gt)
    ap, ap50, ap75 = result.per_category(), result.per_category(0.5), result.per_category(0.75)
    apf = fixed.per_category() if fixed is not None else None
    num_gt = gt.num_instances()
    rows = []
    for k, cid in enumerate(result.category_ids):
        row = OrderedDict(category_id=cid, **meta[cid])
        row["val_instance_count"] = num_gt.get(cid, 0)
        row["AP"], row["AP50"], row["AP75"] = _pct(ap[k]), _pct(ap50[k]), _pct(ap75[k])
        if apf is not None:
            row["AP_fixed"] = _pct(apf[k])
        rows.append(row)
    return rows


def frequency_summary(rows: List[Dict]) -> List[Dict]:
    """Rows r, c, f, all: categories, categories with validation instances, training
    instances, and the mean over those categories of AP, AP50, AP75 (and AP_fixed)."""
    keys = [k for k in ("AP", "AP50", "AP75", "AP_fixed") if rows and k in rows[0]]
    out = []
    for bucket in FREQUENCIES + ("all",):
        sel = [r for r in rows if bucket == "all" or r["frequency"] == bucket]
        evaluated = [r for r in sel if r["AP"] is not None]
        entry = OrderedDict(
            frequency=bucket,
            categories=len(sel),
            evaluated=len(evaluated),
            train_instances=int(sum(r["train_instance_count"] or 0 for r in sel)),
        )
        for k in keys:
            vals = [r[k] for r in evaluated if r[k] is not None]
            entry[k] = float(np.mean(vals)) if vals else None
        out.append(entry)
    return out


def write_json_list(f, items: Sequence, chunk: int = 65536) -> None:
    """Write ``json.dumps(items)`` to the text file ``f`` one slice of ``chunk`` items at a time:
    the same text (C encoder), without the whole string in memory (GBs at LVIS v1 val scale)."""
    f.write("[")
    for start in range(0, len(items), chunk):
        if start:
            f.write(", ")
        f.write(json.dumps(items[start:start + chunk])[1:-1])
    f.write("]")


def _write_csv(path: str, rows: List[Dict]) -> None:
    with PathManager.open(path, "w") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v))
                        for k, v in r.items()})


def format_frequency_table(summary: Dict[str, List[Dict]]) -> str:
    """Markdown table of :func:`frequency_summary` rows for each task."""
    lines = []
    for task, rows in summary.items():
        keys = [k for k in ("AP", "AP50", "AP75", "AP_fixed") if rows and k in rows[0]]
        lines.append(f"| {task} | categories (evaluated) | train instances | "
                     + " | ".join(keys) + " |")
        lines.append("|---|---|---|" + "---|" * len(keys))
        for r in rows:
            vals = " | ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in keys)
            lines.append(f"| {r['frequency']} | {r['categories']} ({r['evaluated']}) | "
                         f"{r['train_instances']} | {vals} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


# ------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------
class LongTailLVISEvaluator(LVISEvaluator):
    """detectron2's ``LVISEvaluator`` with a selectable backend, per-category outputs, AP_fixed,
    AP_pool and results on every process (see the module docstring)."""

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        backend: str = "auto",
        max_dets_per_image: int = 300,
        fixed_ap: bool = False,
        pooled_ap: bool = False,
        max_dets_per_class: int = 10000,
        per_category: bool = True,
    ):
        super().__init__(dataset_name, tasks, distributed, output_dir)
        self._backend = resolve_backend(backend)
        self._max_dets_per_image = max_dets_per_image
        self._fixed_ap = fixed_ap
        self._pooled_ap = pooled_ap
        self._max_dets_per_class = max_dets_per_class
        self._per_category = per_category
        self._gt = LVISGroundTruth(self._metadata.json_file, self._lvis_api)
        self._logger.info(f"LVIS evaluation backend: {self._backend}")

    def evaluate(self):
        """Gather to the main process, evaluate there, and give every process the results."""
        payload = None
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if comm.is_main_process():
                payload = self._evaluate_safely(predictions)
            if comm.get_world_size() > 1:
                payload = comm.all_gather(payload)[0]
        else:
            payload = self._evaluate_safely(self._predictions)
        status, value = payload
        if status == "error":
            raise RuntimeError(f"LVIS evaluation failed on the main process: {value}")
        return value

    def _evaluate_safely(self, predictions):
        try:
            return ("ok", self._evaluate_predictions(predictions))
        except Exception as e:  # re-raised on every process by evaluate()
            if self._distributed and comm.get_world_size() > 1:
                self._logger.exception("LVIS evaluation failed")
                return ("error", f"{type(e).__name__}: {e}")
            raise

    def _evaluate_predictions(self, predictions):
        if len(predictions) == 0:
            self._logger.warning("[LongTailLVISEvaluator] Did not receive valid predictions.")
            return {}
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "instances_predictions.pth"), "wb") as f:
                torch.save(predictions, f)
        self._results = OrderedDict()
        if "proposals" in predictions[0]:
            self._eval_box_proposals(predictions)
        if "instances" in predictions[0]:
            self._eval_instances(predictions)
        return copy.deepcopy(self._results)

    def _to_lvis_ids(self, lvis_results):
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            reverse = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
            bad = sorted({r["category_id"] for r in lvis_results} - set(reverse))
            if bad:
                raise ValueError(f"predictions have contiguous class ids {bad} that "
                                 f"{self._metadata.name} lacks")
            for r in lvis_results:
                r["category_id"] = reverse[r["category_id"]]
        else:  # LVIS: contiguous 0-based -> 1-based
            for r in lvis_results:
                r["category_id"] += 1

    def _eval_instances(self, predictions):
        lvis_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(lvis_results)
        self._to_lvis_ids(lvis_results)
        results_file = None
        if self._output_dir:
            results_file = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info(f"Saving results to {results_file}")
            with PathManager.open(results_file, "w") as f:
                write_json_list(f, lvis_results)
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        # the detections' fields, read once for every evaluation below
        columns = DetectionColumns(lvis_results)
        check_results(columns, self._gt, source=results_file or "predictions")
        per_cat_summary = OrderedDict()
        for task in sorted(tasks):
            self._logger.info(f"Evaluating {task} with {self._backend} ...")
            std = evaluate_detections(self._gt, columns, task, self._backend,
                                      self._max_dets_per_image, -1)
            self._logger.info(f"{task}: {std.num_detections} detections evaluated in "
                              f"{sum(std.timings.values()):.1f} s (" + ", ".join(
                                  f"{k} {v:.1f}" for k, v in std.timings.items()) + ")")
            res = OrderedDict((k, float(std.summary[k]) * 100.0) for k in METRICS)
            fixed = None
            if self._fixed_ap:
                fixed = evaluate_detections(self._gt, columns, task, self._backend, -1,
                                            self._max_dets_per_class)
                for k in ("AP", "APr", "APc", "APf"):
                    res[f"{k}_fixed"] = float(fixed.summary[k]) * 100.0
            if self._pooled_ap:
                pooled = pooled_ap(self._gt, columns, task, self._backend,
                                   self._max_dets_per_class, -1)
                for k, v in pooled.items():
                    res[k] = float(v) * 100.0
            self._logger.info(f"Evaluation results for {task}: \n" + create_small_table(res))
            self._results[task] = res
            if self._per_category:
                rows = per_category_rows(std, self._gt, self._metadata, fixed)
                per_cat_summary[task] = frequency_summary(rows)
                if self._output_dir:
                    base = os.path.join(self._output_dir, f"per_category_{task}")
                    with PathManager.open(base + ".json", "w") as f:
                        json.dump(rows, f, indent=1)
                    _write_csv(base + ".csv", rows)
        if per_cat_summary:
            self._logger.info("AP by frequency bucket (mean over categories with validation "
                              "instances):\n" + format_frequency_table(per_cat_summary))
            if self._output_dir:
                path = os.path.join(self._output_dir, "summary_by_frequency")
                with PathManager.open(path + ".json", "w") as f:
                    json.dump(per_cat_summary, f, indent=1)
                _write_csv(path + ".csv", [dict(task=t, **r) for t, rs in per_cat_summary.items()
                                           for r in rs])


def build_lvis_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """:class:`LongTailLVISEvaluator` configured from ``cfg.LONGTAIL.EVAL``."""
    e = cfg.LONGTAIL.EVAL
    return LongTailLVISEvaluator(
        dataset_name,
        output_dir=output_folder,
        backend=e.BACKEND,
        max_dets_per_image=e.MAX_DETS_PER_IMAGE,
        fixed_ap=e.FIXED_AP,
        pooled_ap=e.POOLED_AP,
        max_dets_per_class=e.MAX_DETS_PER_CLASS,
        per_category=e.PER_CATEGORY,
    )


# ------------------------------------------------------------------------------------------
# Command line: evaluate a results file
# ------------------------------------------------------------------------------------------
def main(argv=None) -> Dict[str, Dict[str, float]]:
    """``python tools/evaluate_results.py RESULTS.json (--dataset NAME | --gt-json PATH)
    [--tasks bbox segm] [--backend auto] [--fixed] [--pooled] [--dets-per-class 10000]``:
    evaluate an LVIS results file and print AP (and AP_fixed / AP_pool), percent."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", help="LVIS-format results json (list of detections)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", help="registered dataset name (e.g. longtail_synth_val)")
    g.add_argument("--gt-json", help="LVIS-format ground-truth json")
    p.add_argument("--tasks", nargs="+", default=None, choices=["bbox", "segm"],
                   help="default: bbox, and segm when the results have masks")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    p.add_argument("--max-dets-per-image", type=int, default=300)
    p.add_argument("--fixed", action="store_true", help="also AP_fixed")
    p.add_argument("--pooled", action="store_true", help="also AP_pool")
    p.add_argument("--dets-per-class", type=int, default=10000)
    args = p.parse_args(argv)

    if args.dataset:
        from . import datasets

        datasets.prepare_datasets([args.dataset])
        json_file = MetadataCatalog.get(args.dataset).json_file
    else:
        json_file = args.gt_json
    results = DetectionColumns(load_results_json(args.results))  # fields read once
    gt = LVISGroundTruth(json_file)
    check_results(results, gt, source=args.results)
    tasks = args.tasks or (["bbox", "segm"] if results.has("segmentation") else ["bbox"])
    out = OrderedDict()
    for task in tasks:
        std = evaluate_detections(gt, results, task, args.backend, args.max_dets_per_image, -1)
        res = OrderedDict((k, std.summary[k] * 100.0) for k in METRICS)
        if args.fixed:
            fixed = evaluate_detections(gt, results, task, args.backend, -1, args.dets_per_class)
            res.update((f"{k}_fixed", fixed.summary[k] * 100.0) for k in ("AP", "APr", "APc", "APf"))
        if args.pooled:
            res.update((k, v * 100.0) for k, v in
                       pooled_ap(gt, results, task, args.backend, args.dets_per_class).items())
        out[task] = res
        print(f"{task} ({std.backend}, {std.num_detections} detections)\n" + create_small_table(res))
    return out

