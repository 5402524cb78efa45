"""Pooled AP (Dave et al., "Evaluating Large-Vocabulary Object Detectors: The Devil is in the
Details", 2021): precision and recall pooled over the classes of all / r / c / f, on the detections
of AP_fixed (each class's top ``max_dets_per_class`` over the whole dataset, no per-image cap;
:func:`longtail.eval_backends.select_detections`).
"""
from typing import Dict, List, Sequence

import numpy as np

from .eval_backends import (
    FREQUENCIES,
    IOU_THRESHOLDS,
    RECALL_THRESHOLDS,
    LVISGroundTruth,
    available_backends,
    evaluate_detections,
    resolve_backend,
)

__all__ = ["pooled_ap"]


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
