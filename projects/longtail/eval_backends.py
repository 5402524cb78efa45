"""LVIS AP backends: the ground truth, the official result-side selection, and the three libraries.

:func:`evaluate_detections` evaluates detections with a selectable library: ``"lvis"`` (the
official ``lvis`` package), ``"faster_coco_eval"`` (``COCOeval_faster(..., lvis_style=True)``) or
``"hotcoco"`` (``hotcoco.LVISeval``); ``"auto"`` picks the first installed of :data:`AUTO_ORDER`
(the fastest that reproduces the official numbers, see docs/benchmarks.md).

Every backend gets the same, already selected, detections: :func:`select_detections` applies
the official package's result-side rules itself (the per-image cap, ties in input order, then
dropping detections whose area is not positive, which ``lvis`` does in ``get_ann_ids``; with
``max_dets_per_class`` the per-class cap of AP_fixed, Dave et al. 2021), and the ground truth the
libraries load follows the official semantics (``iscrowd`` is ignored, annotations with
non-positive area are dropped). The backends then only match and accumulate. The selection works
on columns read once from the detection dicts (:class:`DetectionColumns`), and ``hotcoco`` gets
the selected detections as one array (plus the masks' RLEs for segm) instead of a dict each.

Optional libraries are imported lazily: importing this module needs only ``lvis``.
"""
import contextlib
import importlib.util
import io
import json
import logging
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
from detectron2.utils.file_io import PathManager

from .detection_columns import DetectionColumns, as_columns, max_per_group_pair

__all__ = [
    "BACKENDS",
    "AUTO_ORDER",
    "METRICS",
    "FREQUENCIES",
    "LVISGroundTruth",
    "TaskResult",
    "DetectionColumns",
    "available_backends",
    "resolve_backend",
    "select_detections",
    "evaluate_detections",
    "load_results_json",
    "check_results",
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
