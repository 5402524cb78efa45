"""Columns of LVIS-format detections, and the official result-side selection rules on them.

An LVIS evaluation at LVIS v1 val scale gets ~6 million detection dicts (19,809 images x 300).
Looping over them in Python once per rule (scores, image ids, per-image cap, areas, copies) cost
more than the fast backends' own matching; :class:`DetectionColumns` reads each field once into a
numpy array (``np.fromiter`` over ``operator.itemgetter``, no dict copies), and the caps, the area
rule and the per (image, category) counts are array operations. One ``DetectionColumns`` can be
shared by every evaluation of the same detections (bbox, segm, AP_fixed, AP_pool): what is read
once is cached.
"""
from itertools import chain
from operator import itemgetter
from typing import Dict, List, Sequence

import numpy as np

__all__ = ["DetectionColumns", "as_columns", "ranks_within", "max_per_group_pair"]


def ranks_within(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rank of each element within its group by descending score, ties in input order."""
    n = len(scores)
    order = np.lexsort((np.arange(n), -scores, groups))
    g = groups[order]
    start = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1]
    lengths = np.diff(np.r_[start, n])
    rank_sorted = np.arange(n) - np.repeat(start, lengths)
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = rank_sorted
    return ranks


def _bincountable(ids: np.ndarray):
    """``(index, size)`` with ``index`` in ``[0, size)`` and equal ids equal: the ids themselves
    where they are small non-negative integers (LVIS image and category ids), else their rank
    among the distinct ids (a sort)."""
    if len(ids) == 0:
        return ids.astype(np.int64), 0
    lo, hi = int(ids.min()), int(ids.max())
    if lo >= 0 and hi < max(1 << 22, 4 * len(ids)):
        return ids, hi + 1
    uniq, inv = np.unique(ids, return_inverse=True)
    return inv.reshape(-1), len(uniq)


def _keep_top_k(keep: np.ndarray, groups: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """``keep`` without the elements ranked ``>= k`` within their group among the kept ones.
    Only the groups with more than ``k`` kept elements are ranked (usually none per image)."""
    idx = np.flatnonzero(keep)
    g, size = _bincountable(groups[idx])
    counts = np.bincount(g, minlength=size)
    over = counts[g] > k
    if not over.any():
        return keep
    sub = idx[over]
    ranks = ranks_within(groups[sub], scores[sub])
    keep = keep.copy()
    keep[sub[ranks >= k]] = False
    return keep


def max_per_group_pair(a: np.ndarray, b: np.ndarray) -> int:
    """Largest number of elements sharing one ``(a, b)`` pair (0 if empty)."""
    if len(a) == 0:
        return 0
    ga, na = _bincountable(a)
    gb, nb = _bincountable(b)
    if na * nb <= 1 << 26:  # a dense count
        return int(np.bincount(ga * nb + gb).max())
    if na * nb < 1 << 62:  # one int64 key per pair
        _, counts = np.unique(ga.astype(np.int64) * nb + gb, return_counts=True)
    else:
        _, counts = np.unique(np.stack([ga, gb], 1), axis=0, return_counts=True)
    return int(counts.max())


def _mask_area(segms: List, chunk: int = 100_000) -> np.ndarray:
    """Areas of RLE masks (hotcoco's Rust decoder where installed, else pycocotools'; the same
    integers), ``chunk`` masks per call (the decoders hold a whole call's masks at once)."""
    try:
        import hotcoco

        area = hotcoco.mask.area
    except ImportError:
        import pycocotools.mask as mask_util

        area = mask_util.area
    out = np.zeros(len(segms))
    for start in range(0, len(segms), chunk):
        out[start:start + chunk] = area(segms[start:start + chunk])
    return out


class DetectionColumns:
    """
    Read-once columns of a list of LVIS-format detection dicts (``image_id``, ``category_id``,
    ``score``, ``bbox`` [x, y, w, h] and/or ``segmentation`` RLE). The dicts are not copied or
    changed; ``bbox``, ``segmentation`` and the mask areas are read on first use and cached.
    """

    def __init__(self, results: Sequence[Dict]):
        self.results = results if isinstance(results, list) else list(results)
        n = len(self.results)
        self.image_id = np.fromiter(map(itemgetter("image_id"), self.results), np.int64, n)
        self.category_id = np.fromiter(map(itemgetter("category_id"), self.results), np.int64, n)
        self.score = np.fromiter(map(itemgetter("score"), self.results), np.float64, n)
        self._bbox = None
        self._segmentation = None
        self._mask_area = None

    def __len__(self) -> int:
        return len(self.score)

    def has(self, key: str) -> bool:
        """Whether the detections carry ``key`` (judged on the first, as the official package
        does)."""
        return bool(self.results) and key in self.results[0]

    def bbox(self) -> np.ndarray:
        """[N, 4] boxes (x, y, w, h)."""
        if self._bbox is None:
            n = len(self)
            values = chain.from_iterable(map(itemgetter("bbox"), self.results))
            try:
                flat = np.fromiter(values, np.float64, 4 * n)
            except ValueError:  # too few numbers
                flat = None
            if flat is None or next(values, None) is not None:
                raise ValueError("every detection's 'bbox' must have 4 numbers (x, y, w, h)")
            self._bbox = flat.reshape(n, 4)
        return self._bbox

    def segmentation(self) -> List:
        """The RLEs (the detections' own objects)."""
        if self._segmentation is None:
            if self.results and not self.has("segmentation"):
                raise ValueError(
                    "segm evaluation needs detections with a 'segmentation' (RLE) field.")
            self._segmentation = list(map(itemgetter("segmentation"), self.results))
        return self._segmentation

    def mask_area(self) -> np.ndarray:
        """[N] mask areas (pixels)."""
        if self._mask_area is None:
            self._mask_area = _mask_area(self.segmentation())
        return self._mask_area

    def areas(self, iou_type: str) -> np.ndarray:
        """Area of each detection as the official package computes it: the mask's for segm, the
        box's w*h for bbox."""
        if iou_type == "segm":
            return self.mask_area()
        b = self.bbox()
        return b[:, 2] * b[:, 3]

    def select(self, iou_type: str, max_dets_per_image: int = 300,
               max_dets_per_class: int = -1) -> np.ndarray:
        """Indices (ascending = input order) of the detections an evaluation sees; the rules of
        :func:`longtail.evaluation.select_detections`."""
        if iou_type == "segm":
            self.segmentation()  # the error for results without masks
        n = len(self)
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        keep = np.ones(n, dtype=bool)
        if max_dets_per_class is not None and max_dets_per_class > 0:
            keep = _keep_top_k(keep, self.category_id, self.score, max_dets_per_class)
        if max_dets_per_image is not None and max_dets_per_image > 0:
            keep = _keep_top_k(keep, self.image_id, self.score, max_dets_per_image)
        idx = np.flatnonzero(keep)
        return idx[self.areas(iou_type)[idx] > 0]

    def take(self, values, idx: np.ndarray):
        """``values`` (an array or list of one entry per detection) at ``idx``, without a copy
        when ``idx`` is every detection in order (the usual case: nothing dropped)."""
        if len(idx) == len(self):  # idx is ascending and unique, so it is arange(n)
            return values
        if isinstance(values, np.ndarray):
            return values[idx]
        return [values[i] for i in idx.tolist()]

    def dicts(self, idx: np.ndarray, iou_type: str) -> List[Dict]:
        """Shallow copies of the detections ``idx``; for segm without the box (so that the
        libraries take the mask's area, as detectron2 does)."""
        res = self.results
        out = [dict(res[i]) for i in idx.tolist()]
        if iou_type == "segm":
            for det in out:
                det.pop("bbox", None)
        return out


def as_columns(results) -> DetectionColumns:
    """``results`` (a list of detection dicts, or already columns) as :class:`DetectionColumns`."""
    return results if isinstance(results, DetectionColumns) else DetectionColumns(results)
