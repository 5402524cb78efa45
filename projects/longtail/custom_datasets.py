"""Datasets declared in the config: LVIS- and COCO-format instance jsons, no Python needed.

``LONGTAIL.REGISTER_DATASETS`` lists ``[name, json_file, image_root]`` (optionally a fourth element,
the format: ``"auto"``, ``"lvis"`` or ``"coco"``); :func:`register_from_config` registers each under
``name`` for ``DATASETS.TRAIN`` / ``DATASETS.TEST``, before the model is built (``train_net.py``'s
setup, ``longtail.Trainer``, ``tools/predict.py``). In a yaml::

    LONGTAIL:
      REGISTER_DATASETS:
        - [shapes_train, datasets/shapes/annotations/instances_train.json, datasets/shapes/train]
        - [shapes_val, datasets/shapes/annotations/instances_val.json, datasets/shapes/val]
    DATASETS:
      TRAIN: ("shapes_train",)
      TEST: ("shapes_val",)

or on the command line:
``LONGTAIL.REGISTER_DATASETS "[('shapes_train','a/train.json','a/train'), ...]"``.

Formats (``"auto"`` tells them apart by the images' LVIS fields, and refuses a mix):

* LVIS: images carry ``neg_category_ids`` and ``not_exhaustive_category_ids`` (federated
  annotation); categories may carry ``frequency``.
* COCO: exhaustive annotation: every category absent from an image is a verified negative of it.
  ``iscrowd`` annotations are not trained on (as in detectron2) and their category is "not
  exhaustively annotated" in that image for evaluation (detections there are not counted as false
  positives, as COCO's crowd regions are ignored).

Both are evaluated under the LVIS protocol (per-category AP, APr/APc/APf): each dataset is
rewritten once into a normalised LVIS json (:func:`normalize`) under
``OUTPUT_DIR/datasets/<name>.lvis.json`` (redone when the source json or the training statistics
change) that the loader, the class statistics and the evaluator read. Category ids must be
``1..C``; r/c/f are the training json's ``frequency`` when it has one, else LVIS's rule on the
training image counts (:mod:`longtail.datasets`); every registered dataset takes its class
statistics from the training dataset (the dataset itself when it is in ``DATASETS.TRAIN``, else the
one entry of ``DATASETS.TRAIN``), and a test json must list the same categories.

A json that is not an instances json, category ids that are not ``1..C``, annotations of unknown
images, images without a file name, masks the config cannot use and missing image files fail at
load with a message naming the file (training images are checked as ``LONGTAIL.CHECK_IMAGES``
says; images of evaluation datasets always).
"""
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from itertools import zip_longest
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from . import datasets
from .checkpoint import atomic_write, atomic_write_text
from .data import check_image_files

__all__ = [
    "REGISTER_KEY",
    "DatasetSpec",
    "parse_register_entries",
    "check_instances_json",
    "detect_format",
    "normalize",
    "records_from_normalized",
    "check_masks",
    "register_from_config",
]

logger = logging.getLogger(__name__)

REGISTER_KEY = "LONGTAIL.REGISTER_DATASETS"
FORMATS = ("auto", "lvis", "coco")
# bump when normalize() changes, so that cached normalised jsons are rewritten
NORMALIZE_VERSION = 1
_SPEC_KEY = "longtail_register_spec"  # metadata key marking datasets this module registered


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of ``LONGTAIL.REGISTER_DATASETS``, paths made absolute."""

    name: str
    json_file: str
    image_root: str
    fmt: str = "auto"


def parse_register_entries(entries) -> List[DatasetSpec]:
    """
    ``LONGTAIL.REGISTER_DATASETS`` as :class:`DatasetSpec` s (relative paths resolved against the
    working directory). Raises ValueError naming the key, the bad entry and the expected form.
    """
    form = ("each entry must be [name, json_file, image_root] or [name, json_file, image_root, "
            "format] with format one of " + ", ".join(FORMATS))
    specs, names = [], set()
    for entry in entries:
        ok = (isinstance(entry, (list, tuple)) and len(entry) in (3, 4)
              and all(isinstance(x, str) and x for x in entry)
              and (len(entry) == 3 or entry[3] in FORMATS))
        if not ok:
            raise ValueError(f"{REGISTER_KEY}: bad entry {entry!r}; {form}. Example: "
                             f"{REGISTER_KEY} \"[('mine_train','train.json','images/')]\".")
        if entry[0] in names:
            raise ValueError(f"{REGISTER_KEY}: dataset name {entry[0]!r} is declared twice.")
        names.add(entry[0])
        specs.append(DatasetSpec(entry[0], os.path.abspath(entry[1]), os.path.abspath(entry[2]),
                                 entry[3] if len(entry) == 4 else "auto"))
    return specs


# ------------------------------------------------------------------------------------------------
# Pure functions on parsed jsons
# ------------------------------------------------------------------------------------------------
def _ids_text(ids: Sequence, what: str) -> str:
    ids = list(ids)
    return f"{what} {ids[:10]}" + (f" (and {len(ids) - 10} more)" if len(ids) > 10 else "")


def check_instances_json(data, json_file: str) -> None:
    """
    Structural checks of a COCO/LVIS instances json: top-level ``images``, ``annotations`` and
    ``categories`` lists; every image with a unique ``id``, ``width``, ``height`` and a
    ``file_name`` or ``coco_url``; every annotation with an ``image_id`` among the images and a
    ``bbox`` of 4 numbers; category ids ``1..C`` (:func:`longtail.datasets.check_category_ids`).
    Raises ValueError naming ``json_file``.
    """
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
        raise ValueError(
            f"{json_file}: not an instances json: a COCO/LVIS instances json has 'images', "
            "'annotations' and 'categories' lists at the top level (caption, keypoint-only and "
            "panoptic jsons do not). Point the entry of " + REGISTER_KEY + " at the instances "
            "json.")
    bad_images, seen, duplicates = [], set(), []
    for index, im in enumerate(data["images"]):
        if not isinstance(im, dict) or any(k not in im for k in ("id", "width", "height")) or (
                "file_name" not in im and "coco_url" not in im):
            bad_images.append(index)
        elif im["id"] in seen:
            duplicates.append(im["id"])
        else:
            seen.add(im["id"])
    if bad_images:
        raise ValueError(f"{json_file}: images need 'id', 'width', 'height' and 'file_name' (or "
                         f"LVIS's 'coco_url'); {_ids_text(bad_images, 'images at positions')} "
                         "lack some.")
    if duplicates:
        raise ValueError(f"{json_file}: {_ids_text(sorted(set(duplicates)), 'image ids')} "
                         "occur more than once in 'images'.")
    unknown, bad_boxes = set(), []
    for ann in data["annotations"]:
        if ann.get("image_id") not in seen:
            unknown.add(ann.get("image_id"))
        box = ann.get("bbox")
        if not (isinstance(box, (list, tuple)) and len(box) == 4
                and all(isinstance(v, (int, float)) for v in box)):
            bad_boxes.append(ann.get("id"))
    if unknown:
        raise ValueError(f"{json_file}: annotations refer to "
                         f"{_ids_text(sorted(unknown, key=str), 'image ids')} that are not in "
                         "its 'images'.")
    if bad_boxes:
        raise ValueError(f"{json_file}: {_ids_text(bad_boxes, 'annotations (ids)')} have no "
                         "'bbox' [x, y, width, height].")
    datasets.check_category_ids(data, json_file)


def detect_format(data: Dict, json_file: str) -> str:
    """
    ``"lvis"`` when every image carries ``neg_category_ids`` and ``not_exhaustive_category_ids``,
    ``"coco"`` when none carries either; a mix raises ValueError naming the file.
    """
    keys = ("neg_category_ids", "not_exhaustive_category_ids")
    full = sum(all(k in im for k in keys) for im in data["images"])
    none = sum(not any(k in im for k in keys) for im in data["images"])
    if full == len(data["images"]):
        return "lvis"
    if none == len(data["images"]):
        return "coco"
    raise ValueError(
        f"{json_file}: {full} images carry LVIS's neg_category_ids and "
        f"not_exhaustive_category_ids, {len(data['images']) - full} do not. Give every image both "
        "(LVIS format) or neither (COCO format, exhaustive annotation), or name the format as "
        f"the fourth element of its {REGISTER_KEY} entry ('lvis': missing lists are empty).")


def _relative_file_name(im: Dict) -> str:
    """An image's path relative to the image root: ``file_name``, else LVIS v1's ``coco_url``
    split folder and file name (``train2017/000000391895.jpg``, as detectron2 reads it)."""
    if "file_name" in im:
        return im["file_name"]
    return "/".join(im["coco_url"].split("/")[-2:])


def normalize(data: Dict, fmt: str, frequency: Optional[Sequence[str]],
              negatives: bool = True) -> Dict:
    """
    The normalised LVIS json of a checked (:func:`check_instances_json`) instances json.

    Args:
        data: the parsed json (not modified).
        fmt: ``"lvis"`` or ``"coco"`` (module docstring).
        frequency: [C] "r"/"c"/"f" of the training json for categories 1..C, or None to keep
            the json's own ``frequency`` (a training json; its statistics fill it in later).
        negatives: COCO format: list every absent category as a verified negative of each image
            (needed for evaluation; images x categories ids). False leaves them empty (a dataset
            that is only trained on).

    Returns:
        ``images`` (id, width, height, ``file_name`` relative to the image root,
        ``neg_category_ids``, ``not_exhaustive_category_ids``), ``annotations`` (id, image_id,
        category_id, bbox, area, segmentation when present; crowd annotations removed), and
        ``categories`` (id, name, frequency where known) sorted by id.
    """
    cats = sorted(data["categories"], key=lambda c: c["id"])
    categories = []
    for i, c in enumerate(cats):
        out = {"id": c["id"], "name": c["name"]}
        f = frequency[i] if frequency is not None else c.get("frequency")
        if f is not None:
            out["frequency"] = f
        categories.append(out)
    all_ids = [c["id"] for c in cats]

    annotations, present, crowd = [], {}, {}
    for index, ann in enumerate(data["annotations"]):
        target = crowd if ann.get("iscrowd", 0) else present
        target.setdefault(ann["image_id"], set()).add(ann["category_id"])
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        out = {"id": ann.get("id", index + 1), "image_id": ann["image_id"],
               "category_id": ann["category_id"], "bbox": [x, y, w, h],
               "area": ann.get("area", w * h)}
        if "segmentation" in ann:
            out["segmentation"] = ann["segmentation"]
        annotations.append(out)

    images = []
    for im in data["images"]:
        rec = {"id": im["id"], "width": im["width"], "height": im["height"],
               "file_name": _relative_file_name(im)}
        if fmt == "lvis":
            rec["neg_category_ids"] = list(im.get("neg_category_ids", []))
            rec["not_exhaustive_category_ids"] = list(im.get("not_exhaustive_category_ids", []))
        else:
            seen = present.get(im["id"], set()) | crowd.get(im["id"], set())
            rec["neg_category_ids"] = [c for c in all_ids if c not in seen] if negatives else []
            rec["not_exhaustive_category_ids"] = sorted(crowd.get(im["id"], set()))
        images.append(rec)
    return {"info": {"description": f"normalised from {fmt.upper()} format by "
                                    "longtail.custom_datasets"},
            "images": images, "annotations": annotations, "categories": categories}


def records_from_normalized(data: Dict, image_root: str) -> List[Dict]:
    """detectron2 dataset dicts of a normalised json: ``file_name`` under ``image_root``, boxes
    XYWH_ABS, ``category_id`` = json id - 1 (contiguous), segmentation as stored (polygons or
    RLE), the LVIS per-image lists carried as detectron2's LVIS loader carries them."""
    per_image: Dict[int, List[Dict]] = {}
    for ann in data["annotations"]:
        obj = {"bbox": ann["bbox"], "bbox_mode": BoxMode.XYWH_ABS,
               "category_id": ann["category_id"] - 1}
        if "segmentation" in ann:
            obj["segmentation"] = ann["segmentation"]
        per_image.setdefault(ann["image_id"], []).append(obj)
    return [{
        "file_name": os.path.join(image_root, im["file_name"]),
        "height": im["height"],
        "width": im["width"],
        "image_id": im["id"],
        "neg_category_ids": im["neg_category_ids"],
        "not_exhaustive_category_ids": im["not_exhaustive_category_ids"],
        "annotations": per_image.get(im["id"], []),
    } for im in data["images"]]


def check_masks(records: Sequence[Dict], source: str, mask_format: str) -> None:
    """
    With masks trained (``MODEL.MASK_ON``): every annotation needs a segmentation, and RLE
    segmentations need ``INPUT.MASK_FORMAT bitmask``. Raises ValueError naming ``source``.
    """
    missing = rle = 0
    for r in records:
        for a in r["annotations"]:
            segm = a.get("segmentation")
            if not segm:
                missing += 1
            elif isinstance(segm, dict):
                rle += 1
    if missing:
        raise ValueError(f"{source}: MODEL.MASK_ON is True but {missing} annotation(s) have no "
                         "segmentation. Add masks, or set MODEL.MASK_ON False (boxes only).")
    if rle and mask_format != "bitmask":
        raise ValueError(f"{source}: {rle} annotation(s) have RLE segmentations, which "
                         f"INPUT.MASK_FORMAT {mask_format!r} cannot read; set INPUT.MASK_FORMAT "
                         "bitmask.")


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_state(path: str) -> List:
    st = os.stat(path)
    return [os.path.realpath(path), st.st_mtime_ns, st.st_size]


@dataclass(frozen=True)
class _Registration:
    """What one registered dataset needs at prepare and load time; equal registrations (the same
    config registering again) are recognised by value."""

    spec: DatasetSpec
    out_json: str
    stats_source: Optional[str]
    source_error: Optional[str]
    evaluated: bool
    check_images: bool
    max_images: int
    mask_format: Optional[str]  # None: masks not trained

    def _train_frequency(self) -> Optional[List[str]]:
        if self.stats_source == self.spec.name:
            return None
        datasets.prepare_files([self.stats_source])
        return datasets.class_stats_from_json(MetadataCatalog.get(self.stats_source).json_file)[
            datasets.FREQUENCY]

    def prepare(self) -> None:
        """Write the normalised json unless it is up to date."""
        if self.source_error:
            raise ValueError(self.source_error)
        spec = self.spec
        for what, path in (("annotation file", spec.json_file), ("image directory",
                                                                 spec.image_root)):
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"Dataset {spec.name!r} ({REGISTER_KEY}): {what} {path!r} does not exist; "
                    f"fix the path (relative paths are taken from the working directory "
                    f"{os.getcwd()!r}).")
        frequency = self._train_frequency()
        stamp = _fingerprint(NORMALIZE_VERSION, _file_state(spec.json_file), spec.fmt,
                             self.evaluated, frequency)
        stamp_file = self.out_json + ".source"
        try:
            with open(stamp_file) as f:
                if f.read() == stamp and os.path.isfile(self.out_json):
                    return
        except OSError:
            pass
        with open(spec.json_file) as f:
            data = json.load(f)
        check_instances_json(data, spec.json_file)
        fmt = detect_format(data, spec.json_file) if spec.fmt == "auto" else spec.fmt
        if frequency is not None:
            names = [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
            train_json = MetadataCatalog.get(self.stats_source).json_file
            train_names = list(datasets.class_stats_from_json(train_json)["thing_classes"])
            if names != train_names:
                diff = next(i for i, (a, b) in enumerate(zip_longest(names, train_names))
                            if a != b)
                raise ValueError(
                    f"{spec.json_file}: its categories differ from those of the training dataset "
                    f"{self.stats_source!r} ({train_json}): {len(names)} vs {len(train_names)} "
                    f"categories, first difference at id {diff + 1}. A dataset evaluated with a "
                    "model needs the training json's category list (ids 1..C, same names).")
        normalized = normalize(data, fmt, frequency, negatives=self.evaluated)
        del data
        if frequency is None:
            # a training json: r/c/f from its own statistics (its 'frequency' where it has one)
            stats = datasets.class_stats_of(normalized, spec.json_file)
            for c, f in zip(normalized["categories"], stats[datasets.FREQUENCY]):
                c["frequency"] = f
        os.makedirs(os.path.dirname(self.out_json), exist_ok=True)
        atomic_write(self.out_json, lambda f: json.dump(normalized, f, separators=(",", ":")))
        atomic_write_text(stamp_file, stamp)  # after the json: marks it complete
        logger.info("Dataset %s: %s-format %s normalised to %s (%d images, %d annotations)",
                    spec.name, fmt.upper(), spec.json_file, self.out_json,
                    len(normalized["images"]), len(normalized["annotations"]))

    def load(self) -> List[Dict]:
        self.prepare()
        data = datasets.parse_instances_json(self.out_json)
        datasets.stats_of_parsed(data, self.out_json)
        records = records_from_normalized(data, self.spec.image_root)
        del data
        records = datasets.clean_records(records, self.spec.name)
        if self.mask_format is not None:
            check_masks(records, self.spec.json_file, self.mask_format)
        if self.check_images:
            check_image_files(records, self.spec.name, False, self.max_images, role="evaluation")
        return records


def _stats_source(name: str, train: Sequence[str]):
    if name in train:
        return name, None
    if len(train) == 1:
        return train[0], None
    return None, (
        f"Dataset {name!r} ({REGISTER_KEY}) takes its class statistics (r/c/f, category names) "
        f"from the training dataset, but DATASETS.TRAIN is {tuple(train)}: name exactly one "
        "training dataset (merge several into one json).")


def register_from_config(cfg) -> List[str]:
    """
    Register the datasets of ``LONGTAIL.REGISTER_DATASETS`` (module docstring); returns their
    names. Idempotent for the same config; a name already registered otherwise (by detectron2,
    this project, or user code) is refused with a message.
    """
    specs = parse_register_entries(cfg.LONGTAIL.REGISTER_DATASETS)
    train, test = list(cfg.DATASETS.TRAIN), list(cfg.DATASETS.TEST)
    mask_format = cfg.INPUT.MASK_FORMAT if cfg.MODEL.MASK_ON else None
    registered = set(DatasetCatalog.list())
    for spec in specs:
        source, error = _stats_source(spec.name, train)
        entry = _Registration(
            spec, os.path.join(os.path.abspath(cfg.OUTPUT_DIR), "datasets",
                               spec.name + ".lvis.json"),
            source, error, evaluated=spec.name in test,
            check_images=spec.name not in train,  # training images: LONGTAIL.CHECK_IMAGES
            max_images=cfg.LONGTAIL.CHECK_IMAGES_MAX_IMAGES, mask_format=mask_format)
        if spec.name in registered:
            previous = MetadataCatalog.get(spec.name).get(_SPEC_KEY, None)
            if previous is None:
                raise ValueError(
                    f"{REGISTER_KEY}: {spec.name!r} is already a registered dataset (by "
                    "detectron2, this project or your code); choose another name.")
            if previous == entry:
                continue
            DatasetCatalog.remove(spec.name)
            MetadataCatalog.remove(spec.name)
        DatasetCatalog.register(spec.name, entry.load)
        MetadataCatalog.get(spec.name).set(
            json_file=entry.out_json,
            image_root=spec.image_root,
            evaluator_type="lvis",
            longtail_prepare=entry.prepare,
            longtail_source_json=spec.json_file,
            **{_SPEC_KEY: entry},
            **({"class_stats_source": source} if source else {}),
        )
        logger.info("Registered dataset %s: %s, images in %s", spec.name, spec.json_file,
                    spec.image_root)
    return [s.name for s in specs]
