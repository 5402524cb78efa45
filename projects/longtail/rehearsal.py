"""
The LVIS rehearsal dataset: LVIS v1's and v0.5's real category lists and frequency buckets on
generated tiny images, so that every LVIS code path (class statistics, repeat-factor sampling,
BAGS groups, RIO / LOCE memories, federated evaluation) runs at the real class count (1203 /
1230) on a machine without LVIS. It exercises code, it is not meant to be learnt.

What it holds (per version, everything a deterministic function of :class:`RehearsalConfig`):

* categories: detectron2's ``LVIS_CATEGORIES`` of the version (ids, names, synonyms, synsets,
  definitions), in json order, with ``frequency``, ``image_count`` and ``instance_count``
  computed from the generated training annotations;
* training images per category inside the category's *real* LVIS bucket (LVIS's rule on
  training images: r 1-10, c 11-100, f > 100): rare ones uniform in ``rare_image_range``, common
  ones log-uniform in ``common_image_range``, frequent ones uniform in ``frequent_image_range``
  (101-130, just above the edge). The frequency recomputed from the train json therefore equals
  the real bucket for every category; about as many common categories have <= 30 images (RIO's
  cache) as in real LVIS v1 (209 vs 216 for the default seed);
* ``categories_per_image`` categories per training image (the number of images follows from
  the counts: 5,623 for v1, 4,743 for v0.5), sometimes two instances of one category
  (``extra_instance_prob``); ``num_val_images`` validation images holding every category
  (``val_images_per_category`` by bucket: 1 r, 1 c, 2 f), so that evaluation covers every class;
* images of ``min_side``-``max_side`` px: a flat background and one convex polygon per object
  inside its own grid cell (no occlusion), painted in a colour fixed per category; annotations
  are that polygon (segmentation), its tight box and its area;
* LVIS's federated fields: ``neg_category_ids`` (absent categories drawn per image) and
  ``not_exhaustive_category_ids`` (a present category, for a ``not_exhaustive_prob`` fraction of
  images) on every image.

Layout on disk: a real-LVIS-shaped tree, so that ``DETECTRON2_DATASETS=<root>`` makes
detectron2's *own* ``lvis_v1_train`` / ``lvis_v1_val`` / ``lvis_v0.5_train`` / ``lvis_v0.5_val``
registrations (``builtin.py``: json ``lvis/<name>.json``, image root ``coco/``) load it::

    root/lvis/lvis_v1_train.json    root/lvis/lvis_v1_val.json    root/lvis/lvis_v1_minival.json
    root/lvis/lvis_v0.5_train.json  root/lvis/lvis_v0.5_val.json  root/lvis/lvis_v0.5_minival.json
    root/coco/train2017/000000000001.jpg ...   root/coco/val2017/000000100001.jpg ...
    root/REHEARSAL.json             (config, fingerprint, summary; written last)

Each image's ``coco_url`` is ``http://images.cocodataset.org/<split>2017/<id:012d>.jpg`` and
its ``file_name`` the same base name (COCO 2017's convention): detectron2 v0.6 and main build
the path from ``coco_url`` (``image_root + split folder + base name``). The versions share
``coco/`` as real LVIS does, with disjoint image ids (:data:`IMAGE_ID_OFFSETS`); ids are
unique across all four splits.

Registered on ``import longtail``: ``rehearsal_lvis_v1_{train,val,minival}`` and
``rehearsal_lvis_v0.5_{train,val,minival}`` (``minival``: the first ``num_minival_images`` = 24
validation images, for quick evaluations; not ``lvis_*`` names, which
:mod:`longtail.datasets` treats as the real dataset), rooted at :func:`default_root` as read
at import: ``$LONGTAIL_REHEARSAL_ROOT`` if set, else ``$DETECTRON2_DATASETS/longtail_rehearsal``
(``DETECTRON2_DATASETS`` defaults to ``datasets``). Nothing is generated at import: the data is
generated on first use (the datasets' ``longtail_prepare`` metadata hook, called by
:func:`longtail.datasets.prepare_datasets`, or the loaders), once, under an exclusive lock, into a
temporary directory beside the root that is renamed into place; ``REHEARSAL.json`` carries the
fingerprint of the config and :data:`GENERATOR_VERSION`, and a root whose fingerprint differs is
regenerated. A killed generation leaves only a temporary directory, removed by the next one.

Command line: ``python -m longtail.rehearsal [--root R] [--version v1|v0.5|all] [--force]``
generates (if needed) and prints the r / c / f counts, image and annotation numbers and sizes.

Measured (2 CPU cores, Intel Xeon, default config, both versions): generation takes 14-19 s
(19 s while other jobs shared the cores; ``REHEARSAL.json``'s ``seconds``) for 10,606 images and
146,822 annotations; the tree holds 47 MB of files (jpgs 20 MB, jsons 27 MB), 68 MB allocated on
disk (``du``, 4 KiB blocks).
"""
from __future__ import annotations

import argparse
import colorsys
import contextlib
import dataclasses
import fcntl
import functools
import glob
import hashlib
import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .synthetic import publish_directory

__all__ = [
    "GENERATOR_VERSION",
    "VERSIONS",
    "IMAGE_ID_OFFSETS",
    "RehearsalConfig",
    "lvis_categories",
    "lvis_frequency",
    "target_image_counts",
    "spread_over_images",
    "rehearsal_paths",
    "default_root",
    "generate",
    "ensure_rehearsal",
    "register_rehearsal",
]

logger = logging.getLogger(__name__)

# Bump whenever the generated files change for an unchanged config.
GENERATOR_VERSION = 1

# version -> the detectron2 module that holds its LVIS_CATEGORIES
VERSIONS: Dict[str, str] = {
    "v1": "detectron2.data.datasets.lvis_v1_categories",
    "v0.5": "detectron2.data.datasets.lvis_v0_5_categories",
}
SPLITS: Tuple[str, ...] = ("train", "val")
# registered splits: ``minival`` is the first ``num_minival_images`` images of ``val`` (their
# files, a json of its own), for quick evaluations
REGISTERED_SPLITS: Tuple[str, ...] = ("train", "val", "minival")
# (version, split) -> first image id - 1; every split has fewer than 100,000 images
IMAGE_ID_OFFSETS: Dict[Tuple[str, str], int] = {
    ("v1", "train"): 0, ("v1", "val"): 100_000,
    ("v0.5", "train"): 200_000, ("v0.5", "val"): 300_000,
}
_MAX_IMAGES_PER_SPLIT = 100_000
# LVIS's frequency rule on training image counts: r <= 10 < c <= 100 < f
_BUCKET_LIMITS = {"r": (1, 10), "c": (11, 100), "f": (101, None)}
_SPLIT_CODES = {"train": 1, "val": 2}
_VERSION_CODES = {"v1": 1, "v0.5": 5}
_MAX_VERTICES = 6

STAMP_FILE = "REHEARSAL.json"
DEFAULT_DIRNAME = "longtail_rehearsal"


@dataclass(frozen=True)
class RehearsalConfig:
    """
    All knobs of the generator; every field enters :meth:`fingerprint`.

    Image-count ranges are inclusive ``(lo, hi)`` training image counts per category and must lie
    inside their LVIS bucket (checked). ``num_categories`` > 0 keeps only the first categories of
    each version (for fast tests; 0 = all, the rehearsal proper).
    """

    seed: int = 0
    versions: Tuple[str, ...] = ("v1", "v0.5")
    rare_image_range: Tuple[int, int] = (1, 10)
    common_image_range: Tuple[int, int] = (11, 100)
    frequent_image_range: Tuple[int, int] = (101, 130)
    categories_per_image: int = 12  # training images: distinct categories per image
    extra_instance_prob: float = 0.15  # P(an image's category gets a second instance)
    num_val_images: int = 120
    num_minival_images: int = 24  # the minival split: the first images of val
    # validation images per category, by bucket (r, c, f)
    val_images_per_category: Tuple[int, int, int] = (1, 1, 2)
    min_side: int = 40  # image width and height drawn in [min_side, max_side]
    max_side: int = 64
    neg_categories_per_image: int = 6
    not_exhaustive_prob: float = 0.05
    jpeg_quality: int = 90
    num_categories: int = 0

    def __post_init__(self):
        unknown = [v for v in self.versions if v not in VERSIONS]
        if unknown or not self.versions:
            raise ValueError(f"RehearsalConfig.versions {self.versions!r}: choose from "
                             f"{sorted(VERSIONS)}.")
        for bucket, (lo, hi) in zip("rcf", (self.rare_image_range, self.common_image_range,
                                            self.frequent_image_range)):
            low, high = _BUCKET_LIMITS[bucket]
            if not (low <= lo <= hi and (high is None or hi <= high)):
                raise ValueError(
                    f"RehearsalConfig: the {bucket!r} image range ({lo}, {hi}) must lie in LVIS's "
                    f"bucket [{low}, {high if high is not None else 'inf'}] so that the generated "
                    "frequencies equal the real ones.")
        if self.frequent_image_range[1] >= _MAX_IMAGES_PER_SPLIT:
            raise ValueError("RehearsalConfig.frequent_image_range: at most 99,999 images.")
        if not 1 <= self.categories_per_image or not 0.0 <= self.extra_instance_prob <= 1.0:
            raise ValueError("RehearsalConfig: need categories_per_image >= 1 and "
                             "0 <= extra_instance_prob <= 1.")
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError("RehearsalConfig: need 8 <= min_side <= max_side.")
        if self.num_val_images < 1 or min(self.val_images_per_category) < 1:
            raise ValueError("RehearsalConfig: need num_val_images >= 1 and every "
                             "val_images_per_category >= 1.")
        if max(self.val_images_per_category) > self.num_val_images:
            raise ValueError("RehearsalConfig: val_images_per_category exceeds num_val_images.")
        if not 1 <= self.num_minival_images <= self.num_val_images:
            raise ValueError("RehearsalConfig: need 1 <= num_minival_images <= num_val_images.")

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of all fields and :data:`GENERATOR_VERSION`."""
        payload = {"generator_version": GENERATOR_VERSION, "config": dataclasses.asdict(self)}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Categories and image counts
# ------------------------------------------------------------------------------------------------
def lvis_frequency(image_count: int) -> str:
    """LVIS frequency bucket of a category seen in ``image_count`` training images."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


@functools.lru_cache(maxsize=None)
def _categories(version: str) -> Tuple[dict, ...]:
    if version not in VERSIONS:
        raise ValueError(f"LVIS version {version!r}: choose from {sorted(VERSIONS)}.")
    cats = importlib.import_module(VERSIONS[version]).LVIS_CATEGORIES
    return tuple(sorted((dict(c) for c in cats), key=lambda c: c["id"]))


def lvis_categories(version: str) -> List[dict]:
    """
    detectron2's ``LVIS_CATEGORIES`` of ``version`` ("v1": 1203, "v0.5": 1230 categories), sorted
    by id (ids are 1..C), as new dicts with keys ``id, name, synonyms, synset, def, frequency``
    (``frequency``: the real LVIS bucket, "r" / "c" / "f").
    """
    return [dict(c) for c in _categories(version)]


def _rng(cfg: RehearsalConfig, version: str, split: str, stream: int) -> np.random.Generator:
    """An independent random stream per (seed, version, split, purpose)."""
    seq = np.random.SeedSequence(
        [cfg.seed, _VERSION_CODES[version], _SPLIT_CODES[split], stream])
    return np.random.Generator(np.random.PCG64(seq))


def target_image_counts(frequency: Sequence[str], cfg: RehearsalConfig,
                        rng: np.random.Generator) -> np.ndarray:
    """
    Training images per category: ``[C]`` int64, category ``i`` drawn inside the image range of
    its bucket ``frequency[i]`` (rare and frequent uniform, common log-uniform, so that small
    counts, e.g. RIO's <= 30-image cache, are as common as in real LVIS).
    """
    frequency = np.asarray(frequency)
    counts = np.zeros(len(frequency), dtype=np.int64)
    for bucket, (lo, hi) in (("r", cfg.rare_image_range), ("f", cfg.frequent_image_range)):
        idx = np.flatnonzero(frequency == bucket)
        counts[idx] = rng.integers(lo, hi + 1, size=len(idx))
    idx = np.flatnonzero(frequency == "c")
    lo, hi = cfg.common_image_range
    draws = np.exp(rng.uniform(math.log(lo), math.log(hi + 1), size=len(idx)))
    counts[idx] = np.clip(np.floor(draws), lo, hi).astype(np.int64)
    bad = sorted(set(frequency.tolist()) - set("rcf"))
    if bad:
        raise ValueError(f"unknown LVIS frequency values {bad}; expected 'r', 'c' or 'f'.")
    return counts


def spread_over_images(counts: np.ndarray, num_images: int,
                       rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """
    Place category ``c`` in exactly ``counts[c]`` distinct images of ``num_images``.

    The categories (in random order) are laid end to end, ``counts[c]`` copies each, over
    ``sum(counts)`` slots; slot ``s`` goes to image ``perm[s % num_images]`` for a random
    permutation ``perm``. A run of ``n <= num_images`` consecutive slots covers ``n`` distinct
    residues, so every category lands in distinct images, and every image receives
    ``floor`` or ``ceil`` of ``sum(counts) / num_images`` categories.

    Returns:
        (image index, category index): two ``[sum(counts)]`` int64 arrays, one entry per
        (image, category) incidence.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size and (counts.max() > num_images or counts.min() < 0):
        raise ValueError(f"every count must be in [0, num_images={num_images}]; got "
                         f"[{counts.min()}, {counts.max()}].")
    order = rng.permutation(len(counts))
    categories = np.repeat(order, counts[order])
    perm = rng.permutation(num_images)
    images = perm[np.arange(len(categories)) % num_images]
    return images.astype(np.int64), categories.astype(np.int64)


def _category_colours(num_categories: int) -> np.ndarray:
    """``[C, 3]`` uint8 RGB, a fixed saturated colour per category (golden-ratio hue steps)."""
    out = np.zeros((num_categories, 3), dtype=np.uint8)
    for i in range(num_categories):
        hue = (i * 0.6180339887498949) % 1.0
        sat = 0.55 + 0.45 * ((i * 7) % 5) / 4.0
        val = 0.6 + 0.4 * ((i * 3) % 4) / 3.0
        out[i] = [int(round(255 * v)) for v in colorsys.hsv_to_rgb(hue, sat, val)]
    return out


# ------------------------------------------------------------------------------------------------
# Geometry and images
# ------------------------------------------------------------------------------------------------
def _object_geometry(rng: np.random.Generator, image_of_object: np.ndarray, slot: np.ndarray,
                     objects_per_image: np.ndarray, widths: np.ndarray,
                     heights: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """
    One convex polygon per object, inside grid cell ``slot`` of its image (``g x g`` cells with
    ``g = ceil(sqrt(objects in the image))``): 3-6 points at increasing angles on an ellipse
    around a jittered cell centre, radii 25-40 % of the cell: polygons stay inside their cell,
    so they never overlap and never leave the image.

    Args:
        image_of_object, slot: ``[K]`` image index and cell index of every object.
        objects_per_image, widths, heights: ``[N]`` per image.
    Returns:
        (vertices, num_vertices): ``[K, 6, 2]`` float64 (x, y) pixel coordinates, of which the
        first ``num_vertices[k]`` (``[K]`` int64, 3..6) are object ``k``'s polygon.
    """
    k = len(slot)
    grid = np.ceil(np.sqrt(objects_per_image[image_of_object])).astype(np.int64)
    cell_w = widths[image_of_object] / grid
    cell_h = heights[image_of_object] / grid
    col, row = slot % grid, slot // grid
    cx = (col + rng.uniform(0.45, 0.55, size=k)) * cell_w
    cy = (row + rng.uniform(0.45, 0.55, size=k)) * cell_h
    rx = cell_w * rng.uniform(0.25, 0.4, size=k)
    ry = cell_h * rng.uniform(0.25, 0.4, size=k)
    num_vertices = rng.integers(3, _MAX_VERTICES + 1, size=k)
    step = 2.0 * math.pi / num_vertices
    t = np.arange(_MAX_VERTICES)[None, :]
    # vertex j at phase + j * step (+- a quarter step): strictly increasing angles within one turn
    angles = (rng.uniform(0.0, 2.0 * math.pi, size=(k, 1)) + t * step[:, None]
              + rng.uniform(-0.25, 0.25, size=(k, _MAX_VERTICES)) * step[:, None])
    x = cx[:, None] + rx[:, None] * np.cos(angles)
    y = cy[:, None] + ry[:, None] * np.sin(angles)
    return np.round(np.stack([x, y], axis=2), 2), num_vertices


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area of a ``[P, 2]`` simple polygon."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _image_record(version: str, split: str, index: int, width: int, height: int,
                  neg: List[int], not_exhaustive: List[int]) -> dict:
    image_id = IMAGE_ID_OFFSETS[version, split] + index + 1
    base = f"{image_id:012d}.jpg"
    return {
        "id": image_id,
        "width": width,
        "height": height,
        "file_name": base,
        "coco_url": f"http://images.cocodataset.org/{split}2017/{base}",
        "flickr_url": "",
        "license": 0,
        "date_captured": "",
        "neg_category_ids": neg,
        "not_exhaustive_category_ids": not_exhaustive,
    }


def _generate_split(cfg: RehearsalConfig, version: str, split: str, frequency: Sequence[str],
                    train_counts: Optional[np.ndarray], out_root: str) -> Tuple[list, list]:
    """
    Images (written as jpgs under ``out_root/coco/<split>2017/``) and annotations of one split.

    Returns:
        (images, annotations) in LVIS json form; annotation ids 1..A in image order.
    """
    num_categories = len(frequency)
    if split == "train":
        counts = train_counts
        num_images = max(1, -(-int(counts.sum()) // cfg.categories_per_image))
        num_images = max(num_images, int(counts.max()))
    else:
        per_bucket = dict(zip("rcf", cfg.val_images_per_category))
        counts = np.array([per_bucket[f] for f in frequency], dtype=np.int64)
        num_images = cfg.num_val_images
    if num_images >= _MAX_IMAGES_PER_SPLIT:
        raise ValueError(f"{version} {split}: {num_images} images exceed the id range of a split "
                         f"({_MAX_IMAGES_PER_SPLIT - 1}); raise categories_per_image.")
    rng = _rng(cfg, version, split, 1)
    images_of, cats_of = spread_over_images(counts, num_images, rng)
    # second instances, then objects sorted by image (stable: slot order = incidence order)
    extra = rng.random(len(images_of)) < cfg.extra_instance_prob
    images_of = np.concatenate([images_of, images_of[extra]])
    cats_of = np.concatenate([cats_of, cats_of[extra]])
    order = np.argsort(images_of, kind="stable")
    images_of, cats_of = images_of[order], cats_of[order]
    per_image = np.bincount(images_of, minlength=num_images)
    starts = np.concatenate([[0], np.cumsum(per_image)])
    # grid cell of every object: a random permutation of 0..n-1 within each image of n objects
    by_image_then_key = np.lexsort((rng.random(len(images_of)), images_of))
    slot = np.empty(len(images_of), dtype=np.int64)
    slot[by_image_then_key] = np.arange(len(images_of)) - starts[images_of[by_image_then_key]]
    widths = rng.integers(cfg.min_side, cfg.max_side + 1, size=num_images)
    heights = rng.integers(cfg.min_side, cfg.max_side + 1, size=num_images)
    vertices, num_vertices = _object_geometry(rng, images_of, slot, per_image, widths, heights)
    backgrounds = rng.integers(90, 200, size=(num_images, 3))
    colours = _category_colours(num_categories)

    folder = os.path.join(out_root, "coco", f"{split}2017")
    os.makedirs(folder, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        lo, hi = starts[i], starts[i + 1]
        width, height = int(widths[i]), int(heights[i])
        canvas = Image.new("RGB", (width, height), tuple(int(v) for v in backgrounds[i]))
        draw = ImageDraw.Draw(canvas)
        present = sorted({int(c) + 1 for c in cats_of[lo:hi]})
        for k in range(lo, hi):
            points = vertices[k, : num_vertices[k]]
            cat = int(cats_of[k])
            draw.polygon([tuple(p) for p in points.tolist()], fill=tuple(colours[cat].tolist()))
            x0, y0 = points.min(axis=0)
            x1, y1 = points.max(axis=0)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": IMAGE_ID_OFFSETS[version, split] + i + 1,
                "category_id": cat + 1,
                "segmentation": [points.reshape(-1).tolist()],
                "bbox": [float(x0), float(y0), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
                "area": round(_polygon_area(points), 2),
            })
        # negatives: the smallest ids among the absent ones of a few random categories
        drawn = rng.choice(num_categories, replace=False,
                           size=min(num_categories, cfg.neg_categories_per_image + len(present)))
        absent = sorted(int(c) + 1 for c in drawn if int(c) + 1 not in present)
        neg = absent[: cfg.neg_categories_per_image]
        not_exhaustive = []
        if rng.random() < cfg.not_exhaustive_prob:
            not_exhaustive = [present[int(rng.integers(len(present)))]]
        record = _image_record(version, split, i, width, height, neg, not_exhaustive)
        canvas.save(os.path.join(folder, record["file_name"]), format="JPEG",
                    quality=cfg.jpeg_quality)
        images.append(record)
    return images, annotations


def _statistics(annotations: Sequence[dict], num_categories: int) -> Tuple[np.ndarray, np.ndarray]:
    """``[C]`` image counts and ``[C]`` instance counts of category ids 1..C."""
    cat = np.array([a["category_id"] for a in annotations], dtype=np.int64) - 1
    img = np.array([a["image_id"] for a in annotations], dtype=np.int64)
    instances = np.bincount(cat, minlength=num_categories)
    pairs = np.unique(cat * (1 << 32) + img)
    images = np.bincount(pairs >> 32, minlength=num_categories)
    return images, instances


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


def _build_version(cfg: RehearsalConfig, version: str, out_root: str) -> dict:
    """Generate both splits of one version into ``out_root``; returns its summary."""
    cats = lvis_categories(version)
    if cfg.num_categories > 0:
        cats = cats[: cfg.num_categories]
    frequency = [c["frequency"] for c in cats]
    counts = target_image_counts(frequency, cfg, _rng(cfg, version, "train", 0))
    split_data = {split: _generate_split(cfg, version, split, frequency, counts, out_root)
                  for split in SPLITS}
    image_count, instance_count = _statistics(split_data["train"][1], len(cats))
    if not np.array_equal(image_count, counts):  # a bug in spread_over_images, never data
        raise AssertionError(f"{version}: generated image counts differ from the targets.")
    categories = []
    for c, n_img, n_inst in zip(cats, image_count.tolist(), instance_count.tolist()):
        categories.append({
            "id": c["id"], "name": c["name"], "synonyms": list(c["synonyms"]),
            "synset": c["synset"], "def": c["def"], "frequency": lvis_frequency(n_img),
            "image_count": n_img, "instance_count": n_inst,
        })
    info = {"description": f"LVIS {version} rehearsal data (longtail.rehearsal): real categories,"
                           " generated images", "version": str(GENERATOR_VERSION),
            "fingerprint": cfg.fingerprint()}
    os.makedirs(os.path.join(out_root, "lvis"), exist_ok=True)
    summary = {"num_categories": len(cats),
               "frequency": {b: sum(c["frequency"] == b for c in categories) for b in "rcf"}}
    val_images, val_annotations = split_data["val"]
    kept = {img["id"] for img in val_images[: cfg.num_minival_images]}
    split_data["minival"] = ([img for img in val_images if img["id"] in kept],
                             [a for a in val_annotations if a["image_id"] in kept])
    for split in REGISTERED_SPLITS:
        images, annotations = split_data[split]
        _write_json(os.path.join(out_root, "lvis", f"lvis_{version}_{split}.json"), {
            "info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories})
        summary[split] = {"images": len(images), "annotations": len(annotations)}
    return summary


# ------------------------------------------------------------------------------------------------
# Paths, generation and caching
# ------------------------------------------------------------------------------------------------
def default_root() -> str:
    """
    ``$LONGTAIL_REHEARSAL_ROOT`` when set, else ``$DETECTRON2_DATASETS/longtail_rehearsal``
    (``DETECTRON2_DATASETS`` defaults to ``datasets``, as in detectron2).
    """
    explicit = os.getenv("LONGTAIL_REHEARSAL_ROOT")
    if explicit:
        return os.path.expanduser(explicit)
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
                        DEFAULT_DIRNAME)


def rehearsal_paths(root: str, version: str) -> Dict[str, str]:
    """
    Files of ``version`` under ``root``: ``train_json``, ``val_json``, ``minival_json`` and
    ``image_root`` (the ``coco/`` folder, ending with "/": detectron2 v0.6 appends the split
    folder to it), the same paths detectron2's built-in ``lvis_<version>_{train,val}`` datasets
    use for ``DETECTRON2_DATASETS=root``.
    """
    if version not in VERSIONS:
        raise ValueError(f"LVIS version {version!r}: choose from {sorted(VERSIONS)}.")
    root = os.path.abspath(root)
    return {
        "root": root,
        "train_json": os.path.join(root, "lvis", f"lvis_{version}_train.json"),
        "val_json": os.path.join(root, "lvis", f"lvis_{version}_val.json"),
        "minival_json": os.path.join(root, "lvis", f"lvis_{version}_minival.json"),
        "image_root": os.path.join(root, "coco") + "/",
    }


def _read_stamp(root: str) -> Optional[dict]:
    try:
        with open(os.path.join(root, STAMP_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _exclusive(root: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``root + ".lock"`` (created beside ``root``)."""
    os.makedirs(os.path.dirname(root) or ".", exist_ok=True)
    with open(root + ".lock", "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _disk_bytes(root: str) -> Dict[str, int]:
    sizes = {"jpg": 0, "json": 0}
    for dirpath, _, files in os.walk(root):
        for name in files:
            ext = "jpg" if name.endswith(".jpg") else "json" if name.endswith(".json") else None
            if ext:
                sizes[ext] += os.path.getsize(os.path.join(dirpath, name))
    return sizes


def _build(root: str, cfg: RehearsalConfig) -> dict:
    """Generate into a temp dir beside ``root`` and rename it into place. Caller holds the lock."""
    parent, base = os.path.split(root)
    if os.path.lexists(root) and _read_stamp(root) is None:
        if not os.path.isdir(root) or os.listdir(root):
            raise FileExistsError(
                f"{root} exists and is not a rehearsal dataset (no {STAMP_FILE}); refusing to "
                "replace it. Move it away or pass another root.")
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(base)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed build (we hold the lock)
    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        summary = {v: _build_version(cfg, v, tmp) for v in cfg.versions}
        seconds = time.perf_counter() - start
        stamp = {"generator_version": GENERATOR_VERSION, "fingerprint": cfg.fingerprint(),
                 "config": dataclasses.asdict(cfg), "seconds": round(seconds, 1),
                 "bytes": _disk_bytes(tmp), "summary": summary}
        _write_json(os.path.join(tmp, STAMP_FILE), stamp)  # last: marks the build complete
        publish_directory(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Generated the LVIS rehearsal dataset at %s in %.1f s: %s", root, seconds,
                json.dumps(summary))
    return stamp


def generate(root: str, cfg: RehearsalConfig = RehearsalConfig()) -> dict:
    """
    (Re)generate the rehearsal data for ``cfg`` at ``root`` (all of ``cfg.versions``), atomically
    (temp dir + rename, under an exclusive lock on ``root + ".lock"``). A non-empty ``root``
    without ``REHEARSAL.json`` is never replaced (FileExistsError).

    Returns:
        the contents of ``root/REHEARSAL.json``.
    """
    root = os.path.abspath(root)
    with _exclusive(root):
        return _build(root, cfg)


def ensure_rehearsal(root: Optional[str] = None, cfg: RehearsalConfig = RehearsalConfig()) -> dict:
    """
    :func:`generate` unless ``root/REHEARSAL.json`` already holds ``cfg.fingerprint()``; safe from
    several processes at once (the fingerprint is read again under the lock, one process builds).
    ``root`` defaults to :func:`default_root`. Returns the contents of ``REHEARSAL.json``.
    """
    root = os.path.abspath(root or default_root())
    stamp = _read_stamp(root)
    if stamp is not None and stamp.get("fingerprint") == cfg.fingerprint():
        return stamp
    with _exclusive(root):
        stamp = _read_stamp(root)
        if stamp is not None and stamp.get("fingerprint") == cfg.fingerprint():
            return stamp
        return _build(root, cfg)


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def dataset_name(version: str, split: str) -> str:
    """``rehearsal_lvis_<version>_<split>``."""
    return f"rehearsal_lvis_{version}_{split}"


def _load(root: str, cfg: RehearsalConfig, version: str, split: str):
    from .datasets import load_checked

    ensure_rehearsal(root, cfg)
    paths = rehearsal_paths(root, version)
    return load_checked(paths[f"{split}_json"], paths["image_root"], dataset_name(version, split))


def register_rehearsal(root: Optional[str] = None,
                       cfg: RehearsalConfig = RehearsalConfig()) -> List[str]:
    """
    Register ``rehearsal_lvis_<version>_{train,val,minival}`` for every version of ``cfg`` at
    ``root`` (default :func:`default_root`), replacing earlier registrations of those names.
    Nothing is generated here; the loaders and the ``longtail_prepare`` metadata hook generate on
    first use. Returns the registered names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    root = os.path.abspath(root or default_root())
    prepare = functools.partial(ensure_rehearsal, root, cfg)
    names = []
    for version in cfg.versions:
        paths = rehearsal_paths(root, version)
        for split in REGISTERED_SPLITS:
            name = dataset_name(version, split)
            if name in DatasetCatalog.list():
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            DatasetCatalog.register(name, functools.partial(_load, root, cfg, version, split))
            MetadataCatalog.get(name).set(
                json_file=paths[f"{split}_json"],
                image_root=paths["image_root"],
                evaluator_type="lvis",
                class_stats_source=dataset_name(version, "train"),
                longtail_prepare=prepare,
            )
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def describe(stamp: dict, version: str) -> str:
    """One paragraph of a version's summary from ``REHEARSAL.json``'s contents."""
    s = stamp["summary"][version]
    f = s["frequency"]
    return (f"LVIS {version} rehearsal: {s['num_categories']} categories (r/c/f = "
            f"{f['r']}/{f['c']}/{f['f']}), train {s['train']['images']} images / "
            f"{s['train']['annotations']} annotations, val {s['val']['images']} images / "
            f"{s['val']['annotations']} annotations")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m longtail.rehearsal [--root R] [--version v1|v0.5|all] [--seed N] [--force]``."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--root", default=None,
                        help=f"dataset root (default: $DETECTRON2_DATASETS/{DEFAULT_DIRNAME})")
    parser.add_argument("--version", default="all", choices=[*VERSIONS, "all"],
                        help="version(s) to report; the root always holds every version, which "
                             "share coco/ as real LVIS does")
    parser.add_argument("--seed", type=int, default=RehearsalConfig.seed)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dataclasses.replace(RehearsalConfig(), seed=args.seed)
    root = os.path.abspath(args.root or default_root())
    stamp = (generate if args.force else ensure_rehearsal)(root, cfg)
    for version in (cfg.versions if args.version == "all" else [args.version]):
        print(describe(stamp, version))
        paths = rehearsal_paths(root, version)
        print(f"  {paths['train_json']}\n  {paths['val_json']}\n  images: {paths['image_root']}")
    size = stamp["bytes"]
    print(f"root {root}: {(size['jpg'] + size['json']) / 1e6:.1f} MB on disk (jpg "
          f"{size['jpg'] / 1e6:.1f} MB, json {size['json'] / 1e6:.1f} MB); generated in "
          f"{stamp['seconds']:.1f} s; fingerprint {stamp['fingerprint']}")
    print(f"detectron2's own lvis_* datasets load it with DETECTRON2_DATASETS={root}")
    return 0


register_rehearsal()

if __name__ == "__main__":
    raise SystemExit(main())
