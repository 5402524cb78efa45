"""
A seeded generator of a small synthetic long-tailed detection and instance segmentation dataset,
written in LVIS v1 json format so that the project's LVIS code paths (loader, repeat-factor
sampling, federated evaluation with APr/APc/APf) run on it unchanged.

The dataset is built to reproduce the long-tail *problem*, not only a skewed histogram:

* 16 shape families (circle, square, ..., parallelogram) with 3 members each. Members of a family
  share the shape and differ in one subtle attribute: either a nearby hue (30 degrees apart) or a
  texture (solid / striped / dotted). ``attribute_sets`` > 1 gives every family further sets of 3
  members that differ from the first in the other attribute (48, 96 or 144 categories).
  Per-instance appearance jitter is kept small (hue +-4 deg, value +-10%) so that members stay
  separable.
* In every family one member is frequent, one common and one rare, and which attribute is rare
  rotates between families, so "rare" is never a single visual cue. Rare members frequently
  co-occur with their frequent sibling, so the two compete for the same kind of boxes.
* Images contain several objects of random size (COCO "small" and "medium"), rotation and aspect,
  painted in z-order with partial occlusion (each object keeps >= ``min_visible_fraction`` of its
  area visible), on a smooth noisy background with unannotated low-saturation clutter.

Conventions:

* Coordinates are continuous image coordinates in pixels, x to the right, y down; pixel ``(i, j)``
  covers ``[i, i + 1) x [j, j + 1)`` (the COCO/LVIS convention).
* Annotation segmentations are the *visible* part of each object: its polygon minus the union of
  the polygons painted after it. They are lists of flat ``[x1, y1, x2, y2, ...]`` polygons
  (several when occlusion splits an object); bbox is the tight ``[x, y, w, h]`` box of the visible
  part and area its polygon area.
* Category ``frequency``, ``image_count`` and ``instance_count`` are computed from the generated
  training annotations with the LVIS rule (r: 1-10 images, c: 11-100, f: > 100). The val json
  carries the same category list (train statistics), as real LVIS val does.

Layout on disk (see :func:`dataset_paths`)::

    root/train/000001.jpg ...      root/val/000001.jpg ...
    root/annotations/lvis_synth_train.json
    root/annotations/lvis_synth_val.json
    root/SPEC.json                 (config + fingerprint, written last)

With ``annotation_format="coco"`` (``--format coco``) the same images come with COCO instances
jsons instead (``annotations/instances_{train,val}.json``, :func:`coco_format`), the form in which
most users' own data arrives; ``train_net.py`` registers them through
``LONGTAIL.REGISTER_DATASETS`` (:mod:`longtail.custom_datasets`).

Everything is a deterministic function of :class:`SyntheticConfig`: every image draws from its own
random stream seeded by ``(seed, split, index)``.
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
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:  # shapely is imported where geometry is built: `import longtail` needs none
    from shapely.geometry import Polygon
    from shapely.geometry.base import BaseGeometry

__all__ = [
    "GENERATOR_VERSION",
    "FAMILIES",
    "SyntheticConfig",
    "PlacedObject",
    "category_plan",
    "category_statistics",
    "lvis_frequency",
    "shape_template",
    "visible_regions",
    "layout_image",
    "annotation_geometry",
    "assign_categories",
    "render_image",
    "dataset_paths",
    "coco_format",
    "generate",
    "ensure_dataset",
]

logger = logging.getLogger(__name__)

# Bump whenever the generated files change for an unchanged config.
GENERATOR_VERSION = 1

FAMILIES: Tuple[str, ...] = (
    "circle", "square", "triangle", "pentagon", "hexagon", "star", "cross", "diamond",
    "ellipse", "crescent", "arrow", "lshape", "tshape", "heart", "trapezoid", "parallelogram",
)
# 12 named hues, 30 degrees apart.
_PALETTE: Tuple[Tuple[str, int], ...] = (
    ("red", 0), ("orange", 30), ("yellow", 60), ("lime", 90), ("green", 120), ("spring", 150),
    ("cyan", 180), ("azure", 210), ("blue", 240), ("violet", 270), ("magenta", 300), ("rose", 330),
)
_TEXTURES: Tuple[str, ...] = ("solid", "striped", "dotted")
_BUCKETS: Tuple[str, ...] = ("f", "c", "r")
_MEMBERS_PER_FAMILY = 3
_SPLIT_CODES = {"train": 1, "val": 2}
_STREAM_ASSIGN, _STREAM_IMAGE = 11, 12

# Appearance constants (fractions of full scale). Objects are saturated, background and clutter
# are not, which keeps the masks verifiable from the pixels.
_OBJ_SATURATION = (0.72, 0.88)
_OBJ_VALUE = 0.85
_TEXTURE_DARKEN = 0.5
_SUPERSAMPLE = 4

SPEC_FILE = "SPEC.json"
_TRAIN_JSON = os.path.join("annotations", "lvis_synth_train.json")
_VAL_JSON = os.path.join("annotations", "lvis_synth_val.json")
_COCO_JSON = os.path.join("annotations", "instances_{}.json")


@dataclass(frozen=True)
class SyntheticConfig:
    """
    All knobs of the generator. Every field enters :meth:`fingerprint`.

    Image-count ranges are per-bucket training image counts for ``reference_train_images``
    training images; targets scale linearly with ``num_train_images`` (rare targets stay >= 1).
    """

    num_train_images: int = 2000
    num_val_images: int = 500
    min_side: int = 112  # each image's width and height are drawn in [min_side, max_side]
    max_side: int = 160
    seed: int = 0
    min_val_images_per_class: int = 10  # every category appears in >= this many val images
    # objects: "size" is the longer side (px) of an object's bounding box before rotation and
    # aspect jitter; sizes are drawn uniformly in area (sqrt of a uniform in [min^2, max^2])
    min_object_size: float = 10.0
    max_object_size: float = 60.0
    max_aspect_jitter: float = 0.15  # x, y scaled by a, 1/a with a in [1/(1+j), 1+j]
    max_objects_per_image: int = 10
    max_categories_per_image: int = 6
    min_visible_fraction: float = 0.4  # of an object's own area, after occlusion
    min_part_area: float = 6.0  # px^2, every visible polygon part
    min_part_thickness: float = 1.0  # px, mean thickness 2 * area / perimeter of every part
    placement_attempts: int = 40
    # long tail (training images per category, at reference_train_images)
    reference_train_images: int = 2000
    frequent_image_range: Tuple[int, int] = (120, 700)
    common_image_range: Tuple[int, int] = (14, 90)
    rare_image_range: Tuple[int, int] = (1, 9)
    sibling_cooccurrence: float = 0.5  # P(frequent sibling joins an image of a c/r category)
    multi_instance_prob: float = 0.3  # P(a frequent category has 2-3 instances in an image)
    # clutter and LVIS federated labels
    max_distractors: int = 4
    neg_sample_fraction: float = 0.25
    not_exhaustive_fraction: float = 0.02
    jpeg_quality: int = 92
    # sets of 3 members per family (1, 2 or 3): 16 x 3 x attribute_sets categories, each set with
    # one frequent, one common and one rare member (see category_plan)
    attribute_sets: int = 1
    # "lvis" (LVIS v1 jsons, the embedded dataset) or "coco": COCO instances jsons
    # (annotations/instances_{train,val}.json, file names relative to root/{train,val}, no
    # frequency / federated fields, iscrowd 0) of the same images, for "train on your own data"
    annotation_format: str = "lvis"

    def __post_init__(self):
        if not 1 <= self.min_side <= self.max_side:
            raise ValueError("need 1 <= min_side <= max_side")
        if not 2 <= self.min_object_size <= self.max_object_size <= _fitting_size(
                self.min_side, self.max_aspect_jitter):
            raise ValueError("need 2 <= min_object_size <= max_object_size <= (min_side - 2) "
                             "/ (sqrt(2) * (1 + max_aspect_jitter)) so rotated objects fit")
        if not 0.0 < self.min_visible_fraction <= 1.0:
            raise ValueError("min_visible_fraction must be in (0, 1]")
        if not 1 <= self.max_categories_per_image <= self.max_objects_per_image:
            raise ValueError("need 1 <= max_categories_per_image <= max_objects_per_image")
        if self.num_train_images < 1 or self.num_val_images < 0 or self.seed < 0:
            raise ValueError("need num_train_images >= 1, num_val_images >= 0 and seed >= 0")
        for lo, hi in (self.frequent_image_range, self.common_image_range, self.rare_image_range):
            if not 1 <= lo <= hi:
                raise ValueError("image ranges must satisfy 1 <= lo <= hi")
        if self.attribute_sets not in (1, 2, 3):
            raise ValueError("attribute_sets must be 1, 2 or 3 (48, 96 or 144 categories), got "
                             "{}".format(self.attribute_sets))
        if self.annotation_format not in ("lvis", "coco"):
            raise ValueError("annotation_format must be 'lvis' or 'coco', got "
                             "{!r}".format(self.annotation_format))

    def fingerprint(self) -> str:
        """A stable 16-hex-digit hash of all fields and :data:`GENERATOR_VERSION`.

        ``attribute_sets`` and ``annotation_format`` (added later) enter only when they are not
        1 / "lvis", so datasets generated before they existed keep their fingerprint (their
        files are unchanged).
        """
        config = dataclasses.asdict(self)
        if config["attribute_sets"] == 1:
            del config["attribute_sets"]
        if config["annotation_format"] == "lvis":
            del config["annotation_format"]
        payload = {"generator_version": GENERATOR_VERSION, "config": config}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _fitting_size(side: float, aspect_jitter: float) -> float:
    """Largest object size whose every rotation and aspect fits in a ``side`` square (1 px margin).

    Template vertices lie within sqrt(2) * size / 2 of the centre; aspect scaling adds a factor.
    """
    return (side - 2.0) / (math.sqrt(2.0) * (1.0 + aspect_jitter))


# ------------------------------------------------------------------------------------------------
# Categories
# ------------------------------------------------------------------------------------------------
def lvis_frequency(image_count: int) -> str:
    """LVIS frequency group of a category seen in ``image_count`` training images."""
    if image_count <= 10:
        return "r"
    if image_count <= 100:
        return "c"
    return "f"


def _levels(lo: int, hi: int, n: int, log: bool) -> List[float]:
    """``n`` reference image counts from ``hi`` down to ``lo`` (log or linearly spaced)."""
    values = np.geomspace(hi, lo, n) if log else np.linspace(hi, lo, n)
    return [float(v) for v in values]


def _scaled_target(level: float, num_images: int, reference: int, floor: int) -> int:
    """Round ``level * num_images / reference``, at least ``floor`` and at most ``num_images``."""
    return int(min(num_images, max(floor, round(level * num_images / reference))))


def category_plan(cfg: SyntheticConfig = SyntheticConfig()) -> List[dict]:
    """
    The design of the category set: 16 families x ``cfg.attribute_sets`` sets x 3 members,
    ids 1..48 * sets (family-major, then set, then member).

    In set 0, the members of a "colour" family are solid with hues 30 degrees apart and those of
    a "texture" family share a hue and are solid / striped / dotted. Set ``s`` > 0 changes the
    other attribute: a colour family's set ``s`` has the same three hues with texture
    ``_TEXTURES[s]``; a texture family's set ``s`` has the three textures in a hue 120 * ``s``
    degrees away. Every set has one frequent, one common and one rare member; which member is
    rare rotates with the family and the set.

    Returns:
        list of dicts, one per category, ordered by id, with keys
        ``id, name, family, set, member (0..2), kind ("colour" | "texture"), colour, hue (deg),
        texture ("solid" | "striped" | "dotted"), bucket (intended "f" | "c" | "r"),
        reference_images (target at ``cfg.reference_train_images``), target_train_images,
        target_val_images, def``.
    """
    sets = cfg.attribute_sets
    n = len(FAMILIES) * sets
    levels = {
        "f": _levels(*cfg.frequent_image_range, n, log=True),
        "c": _levels(*cfg.common_image_range, n, log=True),
        "r": _levels(*cfg.rare_image_range, n, log=False),
    }
    # fixed permutations (multipliers coprime with 16 * sets) decorrelate head/mid/tail sizes
    # per (set, family); index i = set * 16 + family
    level_index = {"f": lambda i: (7 * i) % n, "c": lambda i: (5 * i + 3) % n,
                   "r": lambda i: (11 * i + 7) % n}
    plan = []
    for fam_idx, shape in enumerate(FAMILIES):
        kind = "colour" if fam_idx % 2 == 0 else "texture"
        k = fam_idx // 2
        for aset in range(sets):
            for member in range(_MEMBERS_PER_FAMILY):
                if kind == "colour":
                    colour, hue = _PALETTE[(3 * k + k // 4 + member) % len(_PALETTE)]
                    texture = _TEXTURES[aset]
                    name = "{}_{}".format(shape, colour)
                    if aset:
                        name += "_" + texture
                    desc = "a {} {} {}".format(texture, colour, shape)
                else:
                    colour, hue = _PALETTE[(3 * k + k // 4 + 2 + 4 * aset) % len(_PALETTE)]
                    texture = _TEXTURES[member]
                    name = "{}_{}".format(shape, texture)
                    if aset:
                        name += "_" + colour
                    desc = "a {} {} with a {} surface".format(colour, shape, texture)
                bucket = _BUCKETS[(member - fam_idx - aset) % _MEMBERS_PER_FAMILY]
                level = levels[bucket][level_index[bucket](aset * len(FAMILIES) + fam_idx)]
                plan.append({
                    "id": (fam_idx * sets + aset) * _MEMBERS_PER_FAMILY + member + 1,
                    "name": name,
                    "family": shape,
                    "set": aset,
                    "member": member,
                    "kind": kind,
                    "colour": colour,
                    "hue": hue,
                    "texture": texture,
                    "bucket": bucket,
                    "reference_images": int(round(level)),
                    "target_train_images": _scaled_target(
                        level, cfg.num_train_images, cfg.reference_train_images, 1),
                    "target_val_images": _scaled_target(
                        level, cfg.num_val_images, cfg.reference_train_images,
                        cfg.min_val_images_per_class),
                    "def": desc,
                })
    return plan


# ------------------------------------------------------------------------------------------------
# Shapes and geometry
# ------------------------------------------------------------------------------------------------
def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2.0 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _crescent() -> np.ndarray:
    """Unit disk minus a disk of radius 0.8 centred at (0.45, 0), as one simple polygon."""
    d, r = 0.45, 0.8
    x_cut = (1.0 + d * d - r * r) / (2.0 * d)
    alpha = math.acos(x_cut)
    phi0 = math.acos((x_cut - d) / r)
    outer = np.linspace(alpha, 2.0 * math.pi - alpha, 17)
    inner = np.linspace(2.0 * math.pi - phi0, phi0, 13)[1:-1]
    pts_outer = np.stack([np.cos(outer), np.sin(outer)], axis=1)
    pts_inner = np.stack([d + r * np.cos(inner), r * np.sin(inner)], axis=1)
    return np.concatenate([pts_outer, pts_inner], axis=0)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 28, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _star() -> np.ndarray:
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return radii[:, None] * _regular(10)


_RAW_SHAPES = {
    "circle": lambda: _regular(24),
    "square": lambda: np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float),
    "triangle": lambda: _regular(3),
    "pentagon": lambda: _regular(5),
    "hexagon": lambda: _regular(6),
    "star": _star,
    "cross": lambda: np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3],
                               [0.3, 0.3], [0.3, 1], [-0.3, 1], [-0.3, 0.3], [-1, 0.3],
                               [-1, -0.3], [-0.3, -0.3]], float),
    "diamond": lambda: np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], float),
    "ellipse": lambda: _regular(24) * np.array([1.0, 0.55]),
    "crescent": _crescent,
    "arrow": lambda: np.array([[-1, -0.2], [0.2, -0.2], [0.2, -0.55], [1, 0], [0.2, 0.55],
                               [0.2, 0.2], [-1, 0.2]], float),
    "lshape": lambda: np.array([[-0.6, -1], [-0.1, -1], [-0.1, 0.5], [0.6, 0.5], [0.6, 1],
                                [-0.6, 1]], float),
    "tshape": lambda: np.array([[-1, -1], [1, -1], [1, -0.55], [0.25, -0.55], [0.25, 1],
                                [-0.25, 1], [-0.25, -0.55], [-1, -0.55]], float),
    "heart": _heart,
    "trapezoid": lambda: np.array([[-0.5, -0.6], [0.5, -0.6], [1, 0.6], [-1, 0.6]], float),
    "parallelogram": lambda: np.array([[-0.4, -0.5], [1, -0.5], [0.4, 0.5], [-1, 0.5]], float),
}


@functools.lru_cache(maxsize=None)
def shape_template(family: str) -> np.ndarray:
    """
    Unit outline of a family: a read-only ``(N, 2)`` float64 array of a simple polygon, centred
    on its bounding-box centre, whose bounding box has longer side 2 (so every vertex lies
    within distance sqrt(2) of the origin).
    """
    pts = np.asarray(_RAW_SHAPES[family](), dtype=np.float64)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    pts = (pts - (lo + hi) / 2.0) * (2.0 / float((hi - lo).max()))
    pts.setflags(write=False)
    return pts


def _polygon_parts(geom: BaseGeometry) -> List[Polygon]:
    """The non-empty polygons of a (multi)polygon or geometry collection; lines are dropped."""
    from shapely.geometry import Polygon

    if geom is None or geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    if hasattr(geom, "geoms"):
        return [p for g in geom.geoms for p in _polygon_parts(g)]
    return []


def visible_regions(shapes: Sequence[Polygon]) -> List[BaseGeometry]:
    """
    Args:
        shapes: polygons in painting order (bottom first).
    Returns:
        for each, the part not covered by any polygon painted after it.
    """
    out: List[BaseGeometry] = [None] * len(shapes)
    cover: Optional[BaseGeometry] = None
    for i in range(len(shapes) - 1, -1, -1):
        out[i] = shapes[i] if cover is None else shapes[i].difference(cover)
        cover = shapes[i] if cover is None else cover.union(shapes[i])
    return out


def _visible_ok(visible: BaseGeometry, full_area: float, cfg: SyntheticConfig) -> bool:
    """Enough area left, no holes, no tiny or sliver parts."""
    parts = _polygon_parts(visible)
    if not parts or sum(p.area for p in parts) < cfg.min_visible_fraction * full_area:
        return False
    for p in parts:
        if len(p.interiors) > 0 or p.area < cfg.min_part_area:
            return False
        if 2.0 * p.area / p.length < cfg.min_part_thickness:
            return False
    return True


@dataclass
class PlacedObject:
    """
    One object of an image layout.

    Attributes:
        category_id: 1-based category id.
        vertices: ``(N, 2)`` float64 outline in image coordinates.
        center: (x, y) of the placement, the origin of the texture frame.
        angle: rotation in radians (texture frame rotates with it).
        size: longer side in px of the bounding box before rotation and aspect jitter.
        z: painting key; objects are painted in increasing ``z``.
        shape: ``vertices`` as a shapely Polygon.
        visible: ``shape`` minus all objects painted later (set by :func:`layout_image`).
    """

    category_id: int
    vertices: np.ndarray
    center: Tuple[float, float]
    angle: float
    size: float
    z: float
    shape: Polygon
    visible: Optional[BaseGeometry] = None


def _sample_object(rng: np.random.Generator, category_id: int, family: str, width: int,
                   height: int, max_size: float, cfg: SyntheticConfig) -> PlacedObject:
    """Random size (uniform in area), aspect, rotation and a position inside the image."""
    max_size = min(max_size, _fitting_size(min(width, height), cfg.max_aspect_jitter))
    min_size = min(cfg.min_object_size, max_size)
    size = float(math.sqrt(rng.uniform(min_size ** 2, max_size ** 2)))
    # log-symmetric, so that both aspect and 1 / aspect are <= 1 + max_aspect_jitter
    aspect = math.exp(rng.uniform(-1.0, 1.0) * math.log1p(cfg.max_aspect_jitter))
    angle = float(rng.uniform(0.0, 2.0 * math.pi))
    c, s = math.cos(angle), math.sin(angle)
    local = shape_template(family) * (size / 2.0) * np.array([aspect, 1.0 / aspect])
    rotated = local @ np.array([[c, s], [-s, c]])  # row vectors: (x, y) -> R (x, y)
    lo, hi = rotated.min(axis=0), rotated.max(axis=0)
    cx = float(rng.uniform(0.5 - lo[0], max(0.5 - lo[0], width - 0.5 - hi[0])))
    cy = float(rng.uniform(0.5 - lo[1], max(0.5 - lo[1], height - 0.5 - hi[1])))
    vertices = rotated + np.array([cx, cy])
    z = float(rng.random())
    from shapely.geometry import Polygon

    return PlacedObject(category_id, vertices, (cx, cy), angle, size, z, Polygon(vertices))


def layout_image(rng: np.random.Generator, width: int, height: int,
                 category_ids: Sequence[int], families: Dict[int, str],
                 cfg: SyntheticConfig) -> List[PlacedObject]:
    """
    Place one object per entry of ``category_ids`` (in that order: put the rarest first, since a
    placement can fail) at a random depth, such that every object placed so far keeps its
    visibility constraints (:func:`_visible_ok`). An object that fails ``cfg.placement_attempts``
    times (the second half with smaller sizes) is skipped.

    Returns:
        placed objects sorted by painting order (bottom first), ``visible`` filled in.
    """
    placed: List[PlacedObject] = []
    small = (cfg.min_object_size + cfg.max_object_size) / 2.0
    for cid in category_ids:
        for attempt in range(cfg.placement_attempts):
            max_size = cfg.max_object_size if attempt < cfg.placement_attempts // 2 else small
            obj = _sample_object(rng, cid, families[cid], width, height, max_size, cfg)
            trial = sorted(placed + [obj], key=lambda o: o.z)
            vis = visible_regions([o.shape for o in trial])
            if all(_visible_ok(v, o.shape.area, cfg) for o, v in zip(trial, vis)):
                for o, v in zip(trial, vis):
                    o.visible = v
                placed = trial
                break
        else:
            logger.debug("could not place category %d in a %dx%d image", cid, width, height)
    return placed


def annotation_geometry(visible: BaseGeometry) -> Tuple[List[List[float]], List[float], float]:
    """
    LVIS geometry of a visible region.

    Returns:
        (segmentation, bbox, area): list of flat polygons ``[x1, y1, ...]`` (>= 3 points each,
        rounded to 0.01 px), tight ``[x, y, w, h]`` box of those polygons, and their area.
    """
    parts = _polygon_parts(visible)
    segmentation = []
    for p in parts:
        coords = np.asarray(p.exterior.coords)[:-1]
        segmentation.append([round(float(v), 2) for v in coords.reshape(-1)])
    bounds = np.array([p.bounds for p in parts])
    x0, y0 = bounds[:, 0].min(), bounds[:, 1].min()
    x1, y1 = bounds[:, 2].max(), bounds[:, 3].max()
    bbox = [round(float(x0), 2), round(float(y0), 2),
            round(float(x1 - x0), 2), round(float(y1 - y0), 2)]
    area = round(float(sum(p.area for p in parts)), 2)
    return segmentation, bbox, area


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _resize_bilinear(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Stretch a coarse ``(h, w, C)`` grid into a smooth ``(height, width, C)`` float32 field
    (PIL bilinear resampling, channel by channel)."""
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(grid[:, :, c], dtype=np.float32), mode="F")
                   .resize((width, height), resample=Image.BILINEAR))
        for c in range(grid.shape[2])
    ]
    return np.stack(channels, axis=2)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """
    Smooth low-saturation background: grey level + large-scale luminance/tint gradient +
    mid-scale blotches. Returns ``(H, W, 3)`` float32 in [0, 255].
    """
    base = rng.uniform(0.45, 0.8)
    gradient = rng.uniform(-0.08, 0.08, (3, 3, 1)) + rng.uniform(-0.03, 0.03, (3, 3, 3))
    blotches = rng.uniform(-0.04, 0.04, (height // 8 + 2, width // 8 + 2, 1))
    img = base + _resize_bilinear(gradient, height, width)
    img = img + _resize_bilinear(blotches, height, width)
    return (np.clip(img, 0.0, 1.0) * 255.0).astype(np.float32)


def _grey_colour(rng: np.random.Generator) -> Tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.25, 0.95))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_distractors(rng: np.random.Generator, image: Image.Image, max_count: int) -> None:
    """Paint unannotated low-saturation strokes and blobs (under all objects), in place."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, max_count + 1))):
        colour = _grey_colour(rng)
        if rng.random() < 0.5:
            n = int(rng.integers(2, 5))
            pts = [(float(x), float(y)) for x, y in
                   zip(rng.uniform(0, width, n), rng.uniform(0, height, n))]
            draw.line(pts, fill=colour, width=int(rng.integers(1, 4)))
        else:
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            rx, ry = rng.uniform(2, 7, 2)
            draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=colour)


def _object_colour(rng: np.random.Generator, hue: float) -> np.ndarray:
    """Base RGB (float, 0..255) of one instance: nominal hue +-4 deg, value +-10%."""
    h = ((hue + rng.uniform(-4.0, 4.0)) / 360.0) % 1.0
    s = rng.uniform(*_OBJ_SATURATION)
    v = _OBJ_VALUE * (1.0 + rng.uniform(-0.1, 0.1))
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _coverage(vertices: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """
    Fraction of each pixel of the window ``[x0, x0 + w) x [y0, y0 + h)`` inside the polygon,
    by 4x4 supersampling. Returns ``(h, w)`` float32 in [0, 1].
    """
    s = _SUPERSAMPLE
    mask = Image.new("L", (w * s, h * s), 0)
    # PIL's polygon fill uses the same pixel-area convention (sample k covers [k, k + 1)), so
    # only scaling is needed; its edge-inclusive fill grows the shape by ~0.08 px, negligible
    pts = (vertices - np.array([x0, y0])) * s
    ImageDraw.Draw(mask).polygon([(float(x), float(y)) for x, y in pts], fill=255)
    a = np.asarray(mask, dtype=np.float32).reshape(h, s, w, s).mean(axis=(1, 3))
    return a / 255.0


def _texture_mask(obj: PlacedObject, texture: str, x0: int, y0: int, w: int,
                  h: int) -> Optional[np.ndarray]:
    """Boolean ``(h, w)`` mask of darkened pixels (stripes/dots in the object frame) or None."""
    if texture == "solid":
        return None
    period = float(np.clip(obj.size / 4.5, 3.5, 7.0))
    xs = x0 + np.arange(w) + 0.5 - obj.center[0]
    ys = y0 + np.arange(h) + 0.5 - obj.center[1]
    c, s = math.cos(obj.angle), math.sin(obj.angle)
    u = c * xs[None, :] + s * ys[:, None]
    if texture == "striped":
        return (np.floor(u / period) % 2) == 1
    v = -s * xs[None, :] + c * ys[:, None]
    du = u / period - np.round(u / period)
    dv = v / period - np.round(v / period)
    return du * du + dv * dv < 0.32 ** 2


def render_image(rng: np.random.Generator, width: int, height: int,
                 objects: Sequence[PlacedObject], plan_by_id: Dict[int, dict],
                 max_distractors: int) -> np.ndarray:
    """
    Paint background, up to ``max_distractors`` clutter items, then ``objects`` in the given
    order (``plan_by_id`` gives each category's hue and texture), then sensor noise.

    Returns:
        ``(H, W, 3)`` uint8 RGB.
    """
    canvas = Image.fromarray(_background(rng, height, width).astype(np.uint8))
    _draw_distractors(rng, canvas, max_distractors)
    img = np.asarray(canvas, dtype=np.float32).copy()
    for obj in objects:
        entry = plan_by_id[obj.category_id]
        colour = _object_colour(rng, entry["hue"])
        lo = np.floor(obj.vertices.min(axis=0)).astype(int)
        hi = np.ceil(obj.vertices.max(axis=0)).astype(int)
        x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        x1, y1 = min(int(hi[0]), width), min(int(hi[1]), height)
        w, h = x1 - x0, y1 - y0
        alpha = _coverage(obj.vertices, x0, y0, w, h)[:, :, None]
        layer = np.broadcast_to(colour, (h, w, 3))
        dark = _texture_mask(obj, entry["texture"], x0, y0, w, h)
        if dark is not None:
            layer = np.where(dark[:, :, None], colour * _TEXTURE_DARKEN, layer)
        window = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = window * (1.0 - alpha) + layer * alpha
    noise = 3.0 * rng.standard_normal((height, width, 1), dtype=np.float32)
    noise = noise + 1.5 * rng.standard_normal((height, width, 3), dtype=np.float32)
    return np.clip(np.rint(img + noise), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Category assignment (which categories appear in which images)
# ------------------------------------------------------------------------------------------------
def _rng(cfg: SyntheticConfig, split: str, *keys: int) -> np.random.Generator:
    seq = np.random.SeedSequence([cfg.seed, _SPLIT_CODES[split], *keys])
    return np.random.Generator(np.random.PCG64(seq))


def assign_categories(rng: np.random.Generator, plan: Sequence[dict], targets: Dict[int, int],
                      num_images: int, cfg: SyntheticConfig) -> List[List[int]]:
    """
    Decide the objects of every image of a split.

    Categories are processed from the smallest target up; each picks images uniformly among those
    with room (< ``cfg.max_categories_per_image`` categories) until it is in ``targets[id]``
    images. A c/r category pulls its frequent sibling (same family and attribute set) into the
    same image with probability ``cfg.sibling_cooccurrence``. Images left empty get one frequent
    category (p ~ target). Frequent categories then get 2-3 instances with probability
    ``cfg.multi_instance_prob`` (common ones with a third of it), within
    ``cfg.max_objects_per_image``.

    Returns:
        per image, the category id of every object to place, rarest category first.
    """
    frequent_sibling = {(e["family"], e["set"]): e["id"] for e in plan if e["bucket"] == "f"}
    bucket = {e["id"]: e["bucket"] for e in plan}
    sibling_group = {e["id"]: (e["family"], e["set"]) for e in plan}
    order = sorted(targets, key=lambda cid: (targets[cid], cid))
    rank = {cid: r for r, cid in enumerate(order)}
    images: List[Set[int]] = [set() for _ in range(num_images)]
    count = {cid: 0 for cid in targets}
    cap = cfg.max_categories_per_image

    def add(i: int, cid: int) -> None:
        images[i].add(cid)
        count[cid] += 1

    for cid in order:
        need = targets[cid] - count[cid]
        if need <= 0:
            continue
        eligible = [i for i in range(num_images) if len(images[i]) < cap and cid not in images[i]]
        picks = rng.choice(len(eligible), size=min(need, len(eligible)), replace=False)
        for i in sorted(eligible[int(p)] for p in picks):
            add(i, cid)
            if bucket[cid] != "f" and rng.random() < cfg.sibling_cooccurrence:
                sib = frequent_sibling[sibling_group[cid]]
                if sib not in images[i] and len(images[i]) < cap:
                    add(i, sib)

    frequent = [cid for cid in order if bucket[cid] == "f"]
    weights = np.array([targets[cid] for cid in frequent], dtype=np.float64)
    for i in range(num_images):
        if not images[i]:
            add(i, frequent[int(rng.choice(len(frequent), p=weights / weights.sum()))])

    requests = []
    for cats in images:
        objs = sorted(cats, key=lambda cid: rank[cid])
        extra = []
        for cid in objs:
            p = {"f": cfg.multi_instance_prob, "c": cfg.multi_instance_prob / 3.0}.get(bucket[cid])
            if p and rng.random() < p:
                n = 1 + int(rng.random() < 0.35)
                extra.extend([cid] * min(n, cfg.max_objects_per_image - len(objs) - len(extra)))
        requests.append(sorted(objs + extra, key=lambda cid: rank[cid]))
    return requests


# ------------------------------------------------------------------------------------------------
# Splits, statistics and json
# ------------------------------------------------------------------------------------------------
def _negative_ids(rng: np.random.Generator, present: Set[int], plan: Sequence[dict],
                  fraction: float) -> List[int]:
    """Absent family siblings of present categories + a random ``fraction`` of other absent ones."""
    family_of = {e["id"]: e["family"] for e in plan}
    present_families = {family_of[c] for c in present}
    neg = {e["id"] for e in plan if e["family"] in present_families and e["id"] not in present}
    others = [e["id"] for e in plan if e["id"] not in present and e["id"] not in neg]
    keep = rng.random(len(others)) < fraction
    neg.update(c for c, k in zip(others, keep) if k)
    return sorted(neg)


def _make_image(cfg: SyntheticConfig, split: str, index: int, request: Sequence[int],
                plan: Sequence[dict], out_dir: str) -> Tuple[dict, List[dict]]:
    """
    Lay out, render and save image ``index`` (0-based) of ``split`` into ``out_dir/split``.

    Returns:
        (image record, annotations) without annotation ids.
    """
    rng = _rng(cfg, split, _STREAM_IMAGE, index)
    width = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    height = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    families = {e["id"]: e["family"] for e in plan}
    objects = layout_image(rng, width, height, request, families, cfg)
    pixels = render_image(rng, width, height, objects, {e["id"]: e for e in plan},
                          cfg.max_distractors)

    name = "{:06d}".format(index + 1)
    file_name = "{}/{}.jpg".format(split, name)
    Image.fromarray(pixels).save(os.path.join(out_dir, file_name), format="JPEG",
                                 quality=cfg.jpeg_quality, subsampling=0)
    annotations = []
    for obj in objects:
        segmentation, bbox, area = annotation_geometry(obj.visible)
        annotations.append({"image_id": index + 1, "category_id": obj.category_id,
                            "bbox": bbox, "area": area, "segmentation": segmentation})
    present = {a["category_id"] for a in annotations}
    neg = _negative_ids(rng, present, plan, cfg.neg_sample_fraction)
    not_exhaustive = []
    if present and rng.random() < cfg.not_exhaustive_fraction:
        ordered = sorted(present)
        not_exhaustive = [ordered[int(rng.integers(len(ordered)))]]
    record = {
        "id": index + 1,
        "width": width,
        "height": height,
        "file_name": file_name,
        "coco_url": "http://synthetic.invalid/{}/{}.jpg".format(split, name),
        "neg_category_ids": neg,
        "not_exhaustive_category_ids": not_exhaustive,
    }
    return record, annotations


def _generate_split(cfg: SyntheticConfig, split: str, plan: Sequence[dict],
                    out_dir: str) -> Tuple[List[dict], List[dict]]:
    num_images = cfg.num_train_images if split == "train" else cfg.num_val_images
    key = "target_{}_images".format(split)
    targets = {e["id"]: e[key] for e in plan}
    requests = assign_categories(_rng(cfg, split, _STREAM_ASSIGN), plan, targets, num_images, cfg)
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    images, annotations = [], []
    for index, request in enumerate(requests):
        record, anns = _make_image(cfg, split, index, request, plan, out_dir)
        images.append(record)
        annotations.extend(anns)
    for ann_id, ann in enumerate(annotations, start=1):
        ann["id"] = ann_id
    return images, annotations


def category_statistics(annotations: Sequence[dict],
                        category_ids: Sequence[int]) -> Dict[int, dict]:
    """Per category id: ``image_count``, ``instance_count`` and LVIS ``frequency``."""
    images: Dict[int, Set[int]] = {cid: set() for cid in category_ids}
    instances = {cid: 0 for cid in category_ids}
    for ann in annotations:
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    return {cid: {"image_count": len(images[cid]), "instance_count": instances[cid],
                  "frequency": lvis_frequency(len(images[cid]))} for cid in category_ids}


def _lvis_categories(plan: Sequence[dict], stats: Dict[int, dict]) -> List[dict]:
    return [{
        "id": e["id"],
        "name": e["name"],
        "synonyms": [e["name"]],
        "synset": "{}.n.01".format(e["name"]),
        "def": e["def"],
        "family": e["family"],
        "image_count": stats[e["id"]]["image_count"],
        "instance_count": stats[e["id"]]["instance_count"],
        "frequency": stats[e["id"]]["frequency"],
    } for e in plan]


def _summary(plan: Sequence[dict], stats: Dict[int, dict], split_data: dict) -> dict:
    """Headline numbers stored in SPEC.json (and logged)."""
    buckets = {b: sum(1 for s in stats.values() if s["frequency"] == b) for b in _BUCKETS}
    inst = [s["instance_count"] for s in stats.values()]
    out = {"num_categories": len(plan), "train_frequency_buckets": buckets,
           "train_instance_count_min": min(inst), "train_instance_count_max": max(inst)}
    for split, (images, anns) in split_data.items():
        ids = np.asarray([a["image_id"] for a in anns], dtype=np.int64)
        per_image = np.bincount(ids, minlength=len(images) + 1)[1:]
        out[split] = {"images": len(images), "annotations": len(anns),
                      "objects_per_image_mean": round(float(per_image.mean()), 3)
                      if len(images) else 0.0,
                      "objects_per_image_max": int(per_image.max()) if len(images) else 0}
    return out


def coco_format(images: Sequence[dict], annotations: Sequence[dict], plan: Sequence[dict],
                split: str) -> dict:
    """
    One split in COCO instances format: file names relative to the split's image folder, no
    LVIS fields (``neg_category_ids``, ``not_exhaustive_category_ids``, ``frequency``,
    ``coco_url``), ``iscrowd`` 0 and ``supercategory`` = the shape family. Every object of the
    generator is annotated, so the COCO reading (exhaustive annotation) is true of this data.
    """
    prefix = split + "/"
    out_images = []
    for im in images:
        name = im["file_name"]
        if not name.startswith(prefix):
            raise ValueError("unexpected file name {!r} in split {}".format(name, split))
        out_images.append({"id": im["id"], "width": im["width"], "height": im["height"],
                           "file_name": name[len(prefix):]})
    out_annotations = [dict(a, iscrowd=0) for a in annotations]
    categories = [{"id": e["id"], "name": e["name"], "supercategory": e["family"]} for e in plan]
    return {"images": out_images, "annotations": out_annotations, "categories": categories}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------
def dataset_paths(root: str, annotation_format: str = "lvis") -> Dict[str, str]:
    """
    Paths of a dataset rooted at ``root``. LVIS format: ``train_json``, ``val_json`` and one
    ``image_root`` (ends with "/" because detectron2 0.6 joins it with the split folder taken from
    ``coco_url``). COCO format: ``train_json``, ``val_json``, ``train_images``, ``val_images``.
    """
    root = os.path.abspath(root)
    if annotation_format == "coco":
        return {
            "root": root,
            "train_json": os.path.join(root, _COCO_JSON.format("train")),
            "val_json": os.path.join(root, _COCO_JSON.format("val")),
            "train_images": os.path.join(root, "train"),
            "val_images": os.path.join(root, "val"),
        }
    return {
        "root": root,
        "train_json": os.path.join(root, _TRAIN_JSON),
        "val_json": os.path.join(root, _VAL_JSON),
        "image_root": root + "/",
    }


def _read_fingerprint(root: str) -> Optional[str]:
    try:
        with open(os.path.join(root, SPEC_FILE)) as f:
            return json.load(f).get("fingerprint")
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
    """Exclusive ``flock`` on ``root + ".lock"`` (created beside ``root``)."""
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with open(root + ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build(root: str, cfg: SyntheticConfig) -> Dict[str, str]:
    """Generate into a temp dir beside ``root`` and swap it in. Caller holds the lock."""
    parent, base = os.path.split(root)
    if os.path.lexists(root) and not os.path.isfile(os.path.join(root, SPEC_FILE)):
        if not os.path.isdir(root) or os.listdir(root):
            raise FileExistsError("refusing to replace {}: not a synthetic dataset".format(root))
    for stale in glob.glob(os.path.join(parent, ".{}.tmp-*".format(glob.escape(base)))):
        shutil.rmtree(stale, ignore_errors=True)  # left by a crashed build (we hold the lock)

    start = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=".{}.tmp-".format(base), dir=parent)
    try:
        plan = category_plan(cfg)
        split_data = {}
        for split in ("train", "val"):
            split_data[split] = _generate_split(cfg, split, plan, tmp)
        stats = category_statistics(split_data["train"][1], [e["id"] for e in plan])
        categories = _lvis_categories(plan, stats)
        info = {"description": "synthetic long-tailed shapes (longtail.synthetic)",
                "version": str(GENERATOR_VERSION), "fingerprint": cfg.fingerprint()}
        os.makedirs(os.path.join(tmp, "annotations"))
        for split, rel in (("train", _TRAIN_JSON), ("val", _VAL_JSON)):
            images, annotations = split_data[split]
            if cfg.annotation_format == "coco":
                _write_json(os.path.join(tmp, _COCO_JSON.format(split)), dict(
                    info=info, licenses=[], **coco_format(images, annotations, plan, split)))
                continue
            _write_json(os.path.join(tmp, rel), {
                "info": info, "licenses": [], "images": images,
                "annotations": annotations, "categories": categories})
        spec = {"generator_version": GENERATOR_VERSION, "fingerprint": cfg.fingerprint(),
                "config": dataclasses.asdict(cfg),
                "summary": _summary(plan, stats, split_data)}
        _write_json(os.path.join(tmp, SPEC_FILE), spec)  # last: marks the build complete
        publish_directory(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Generated synthetic %s-format dataset at %s in %.1f s: %s",
                cfg.annotation_format.upper(), root, time.perf_counter() - start,
                json.dumps(spec["summary"]))
    return dataset_paths(root, cfg.annotation_format)


def generate(root: str, cfg: SyntheticConfig = SyntheticConfig()) -> Dict[str, str]:
    """
    (Re)generate the dataset for ``cfg`` at ``root``, atomically: it is built in a temp dir
    beside ``root`` under an exclusive lock on ``root + ".lock"`` and renamed into place.
    An existing non-empty ``root`` without SPEC.json is never replaced (FileExistsError).

    Returns:
        :func:`dataset_paths` of ``root``.
    """
    root = os.path.abspath(root)
    with _locked(root):
        return _build(root, cfg)


def publish_directory(tmp: str, root: str) -> None:
    """Replace ``root`` by the completely written directory ``tmp`` (same file system) with
    renames, so that a reader or a killed writer never sees a half-written ``root``."""
    if os.path.lexists(root):
        old = tmp + ".old"
        os.rename(root, old)
        os.rename(tmp, root)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, root)


def ensure_dataset(root: str, cfg: SyntheticConfig = SyntheticConfig()) -> Dict[str, str]:
    """
    Like :func:`generate`, but returns at once when ``root/SPEC.json`` already holds
    ``cfg.fingerprint()``. Safe to call from several processes at the same time: the fingerprint
    is checked again after taking the lock, so only the first caller builds.
    """
    root = os.path.abspath(root)
    fingerprint = cfg.fingerprint()
    if _read_fingerprint(root) == fingerprint:
        return dataset_paths(root, cfg.annotation_format)
    with _locked(root):
        if _read_fingerprint(root) == fingerprint:
            return dataset_paths(root, cfg.annotation_format)
        return _build(root, cfg)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (``tools/generate_dataset.py``): ``ROOT [--format coco] [--seed N] [--force] ...``."""
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("root", help="dataset directory (created or replaced atomically)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-train-images", type=int, default=defaults.num_train_images)
    parser.add_argument("--num-val-images", type=int, default=defaults.num_val_images)
    parser.add_argument("--attribute-sets", type=int, default=defaults.attribute_sets,
                        choices=(1, 2, 3), help="48, 96 or 144 categories")
    parser.add_argument("--format", dest="annotation_format", default=defaults.annotation_format,
                        choices=("lvis", "coco"),
                        help="lvis: LVIS v1 jsons (the embedded dataset); coco: COCO instances "
                             "jsons annotations/instances_{train,val}.json, images in "
                             "train/ and val/")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dataclasses.replace(defaults, seed=args.seed, num_train_images=args.num_train_images,
                              num_val_images=args.num_val_images,
                              attribute_sets=args.attribute_sets,
                              annotation_format=args.annotation_format)
    paths = (generate if args.force else ensure_dataset)(args.root, cfg)
    print(json.dumps(paths, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
