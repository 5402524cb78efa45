"""Dataset registration and the per-class metadata the long-tail methods need.

Registered on import:

* ``longtail_synth_train`` / ``longtail_synth_val``: the embedded synthetic long-tailed dataset
  (LVIS v1 format, generated on first use under ``$DETECTRON2_DATASETS/longtail_synth``, see
  :mod:`longtail.synthetic`), and ``longtail_synth_mini_{train,val}``, a small copy for tests.
* detectron2 registers LVIS v0.5 / v1 itself (``lvis_v1_train`` ...); this module only tells it
  where their class statistics come from (the train json of the same version).

:func:`prepare_datasets` is called before the model is built. For each dataset it checks that the
files exist (failing with a message that names the path and how to get the data), generates the
synthetic data if needed, and attaches to ``MetadataCatalog`` (``C`` = number of classes, index =
contiguous class id = LVIS category id - 1):

* ``thing_classes``: [C] names;
* ``class_image_count``: [C] number of training images containing the class;
* ``class_instance_count``: [C] number of training instances;
* ``class_frequency``: [C] "r" / "c" / "f" (LVIS: 1-10 / 11-100 / >100 training images);
* ``num_train_images``: number of training images; ``evaluator_type = "lvis"``.
"""
import json
import logging
import os
from functools import lru_cache
from typing import Dict, Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json

from . import synthetic

__all__ = [
    "SYNTHETIC_DATASETS",
    "validate_lvis_json",
    "clean_records",
    "load_checked",
    "register_synthetic",
    "prepare_datasets",
    "class_stats_from_json",
]

logger = logging.getLogger(__name__)

# name prefix -> generator configuration
SYNTHETIC_DATASETS: Dict[str, synthetic.SyntheticConfig] = {
    "longtail_synth": synthetic.SyntheticConfig(),
    "longtail_synth_mini": synthetic.SyntheticConfig(
        num_train_images=300, num_val_images=80, min_val_images_per_class=2
    ),
    # the benchmark's GPU size (tools/benchmark_all.py --size gpu): twice the categories (96:
    # a second attribute set per family), 4x the images, twice the image side, larger objects;
    # rare and common image counts unchanged (LVIS's absolute buckets), frequent classes 2x
    # (twice as many of them in 4x the images: as many frequent objects per image)
    "longtail_synth_large": synthetic.SyntheticConfig(
        num_train_images=8000, num_val_images=1000, min_side=192, max_side=320,
        min_object_size=12.0, max_object_size=100.0, reference_train_images=8000,
        frequent_image_range=(240, 1400), attribute_sets=2,
    ),
}

LVIS_HELP = (
    "Download LVIS (https://www.lvisdataset.org/dataset): put the annotation jsons in "
    "$DETECTRON2_DATASETS/lvis/ and the COCO 2017 train/val images in "
    "$DETECTRON2_DATASETS/coco/{train2017,val2017}/, or point DETECTRON2_DATASETS (now {root!r}) "
    "at the directory that holds them. See README.md, 'LVIS set-up'."
)


def _datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


@lru_cache(maxsize=16)
def validate_lvis_json(json_file: str) -> int:
    """
    Check that every annotation's ``category_id`` is among the json's ``categories`` and that the
    category ids are contiguous ``1..C`` (the LVIS convention the label mapping relies on).
    Raises ValueError naming the file and the offending ids; returns C.
    """
    with open(json_file) as f:
        data = json.load(f)
    return _check_category_ids(data, json_file)


def _check_category_ids(data: Dict, json_file: str) -> int:
    ids = sorted(c["id"] for c in data.get("categories", []))
    known = set(ids)
    used = {a["category_id"] for a in data.get("annotations", [])}
    missing = sorted(used - known)
    if missing:
        raise ValueError(
            f"{json_file}: annotations use category ids {missing[:20]}"
            + (f" (and {len(missing) - 20} more)" if len(missing) > 20 else "")
            + f" that are not in its 'categories' ({len(ids)} categories). Fix the json, or drop "
            "those annotations."
        )
    if ids != list(range(1, len(ids) + 1)):
        gaps = sorted(set(range(1, (ids[-1] if ids else 0) + 1)) - known)[:20]
        raise ValueError(
            f"{json_file}: category ids must be contiguous 1..C (LVIS convention); ids "
            f"{gaps} are missing from its 'categories'."
        )
    return len(ids)


def clean_records(records, dataset_name: str):
    """
    Drop annotations with a degenerate box (width or height <= 0) and log how many; detectron2
    would otherwise carry them to the mapper, which silently removes the empty boxes later.
    """
    dropped = 0
    for record in records:
        anns = record.get("annotations", [])
        keep = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        dropped += len(anns) - len(keep)
        if len(keep) != len(anns):
            record["annotations"] = keep
    if dropped:
        logger.warning(
            "Dataset %s: dropped %d annotation(s) with a degenerate box (width or height <= 0).",
            dataset_name, dropped,
        )
    return records


def load_checked(json_file: str, image_root: str, dataset_name: str):
    """``load_lvis_json`` after :func:`validate_lvis_json`, then :func:`clean_records`."""
    validate_lvis_json(json_file)
    # detectron2 attaches its built-in LVIS metadata when given an LVIS dataset name
    lvis_name = dataset_name if dataset_name.startswith("lvis_") else None
    return clean_records(load_lvis_json(json_file, image_root, lvis_name), dataset_name)


def _load_synthetic(name: str, split: str, root: str, gen_cfg: synthetic.SyntheticConfig):
    paths = synthetic.ensure_dataset(root, gen_cfg)
    return load_checked(paths[f"{split}_json"], paths["image_root"], f"{name}_{split}")


def register_synthetic(name: str, gen_cfg: synthetic.SyntheticConfig, root: str) -> None:
    """Register ``{name}_train`` and ``{name}_val`` for a synthetic dataset generated in ``root``."""
    for split in ("train", "val"):
        dataset_name = f"{name}_{split}"
        DatasetCatalog.register(
            dataset_name,
            lambda split=split: _load_synthetic(name, split, root, gen_cfg),
        )
        MetadataCatalog.get(dataset_name).set(
            json_file=os.path.join(root, "annotations", f"lvis_synth_{split}.json"),
            image_root=root + "/",
            evaluator_type="lvis",
            synthetic_root=root,
            class_stats_source=f"{name}_train",
        )


def _register_all_synthetic() -> None:
    for name, gen_cfg in SYNTHETIC_DATASETS.items():
        register_synthetic(name, gen_cfg, os.path.join(_datasets_root(), name))


def _link_lvis_stats_sources() -> None:
    # Val and test splits of LVIS take their class statistics from the train split, and every
    # LVIS dataset is loaded through the same checks as the synthetic one (load_checked).
    for name in list(DatasetCatalog.list()):
        for version in ("lvis_v1", "lvis_v0.5"):
            if name.startswith(version + "_"):
                meta = MetadataCatalog.get(name)
                meta.set(class_stats_source=version + "_train")
                json_file, image_root = meta.get("json_file", None), meta.get("image_root", None)
                if json_file and image_root:
                    DatasetCatalog.remove(name)
                    DatasetCatalog.register(
                        name, lambda j=json_file, r=image_root, n=name: load_checked(j, r, n)
                    )


@lru_cache(maxsize=8)
def class_stats_from_json(json_file: str) -> Dict:
    """
    Per-class statistics of an LVIS-format training json (categories sorted by id, contiguous
    ids 1..C required). Counts come from the annotations; ``frequency`` from the json when it has
    one, else from the image counts.
    """
    with open(json_file) as f:
        data = json.load(f)
    _check_category_ids(data, json_file)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    num_classes = len(cats)
    image_sets = [set() for _ in range(num_classes)]
    instance_count = [0] * num_classes
    for ann in data["annotations"]:
        c = ann["category_id"] - 1
        if not 0 <= c < num_classes:
            raise ValueError(
                f"{json_file}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                f"which is not among the {num_classes} categories."
            )
        image_sets[c].add(ann["image_id"])
        instance_count[c] += 1
    image_count = [len(s) for s in image_sets]
    frequency = [
        c.get("frequency") or synthetic.lvis_frequency(n) for c, n in zip(cats, image_count)
    ]
    return {
        "thing_classes": [c["name"] for c in cats],
        "class_image_count": image_count,
        "class_instance_count": instance_count,
        "class_frequency": frequency,
        "num_train_images": len({a["image_id"] for a in data["annotations"]}),
    }


def _check_exists(dataset_name: str, what: str, path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Dataset {dataset_name!r}: {what} {path!r} does not exist. "
            + LVIS_HELP.replace("{root!r}", repr(_datasets_root()))
        )


def _prepare_files(dataset_name: str) -> None:
    meta = MetadataCatalog.get(dataset_name)
    root = meta.get("synthetic_root", None)
    if root is not None:
        prefix = meta.class_stats_source[: -len("_train")]
        synthetic.ensure_dataset(root, SYNTHETIC_DATASETS.get(prefix, synthetic.SyntheticConfig()))
        return
    json_file = meta.get("json_file", None)
    if json_file is not None:
        _check_exists(dataset_name, "annotation file", json_file)
    image_root = meta.get("image_root", None)
    if image_root is not None:
        _check_exists(dataset_name, "image directory", image_root)


def prepare_datasets(dataset_names: Iterable[str], num_classes: int = None) -> None:
    """
    Make the datasets usable (see module docstring) and attach their class statistics.

    Args:
        dataset_names: registered dataset names (train and test).
        num_classes: if given, ``MODEL.ROI_HEADS.NUM_CLASSES``; it must equal the datasets'
            number of classes.
    """
    registered = set(DatasetCatalog.list())
    for name in dataset_names:
        if name not in registered:
            lt = sorted(n for n in registered if n.startswith(("longtail_", "lvis_")))
            raise KeyError(
                f"Dataset {name!r} (DATASETS.TRAIN / DATASETS.TEST) is not registered. "
                f"Long-tail datasets available: {', '.join(lt)}."
            )
        _prepare_files(name)
        meta = MetadataCatalog.get(name)
        source = meta.get("class_stats_source", None)
        if source is None:
            continue
        if source != name:
            _prepare_files(source)
        stats_json = MetadataCatalog.get(source).json_file
        stats = class_stats_from_json(stats_json)
        if meta.get("class_image_count", None) is None:
            values = dict(stats)
            if meta.get("thing_classes", None) is not None:
                values.pop("thing_classes")
            meta.set(**values)
        if num_classes is not None and num_classes != len(stats["thing_classes"]):
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but dataset {name!r} has "
                f"{len(stats['thing_classes'])} classes (from {stats_json}). Set "
                f"MODEL.ROI_HEADS.NUM_CLASSES {len(stats['thing_classes'])}."
            )
        logger.info(
            "Dataset %s: %d classes (r/c/f = %d/%d/%d) from %s",
            name,
            len(stats["class_frequency"]),
            *(stats["class_frequency"].count(b) for b in "rcf"),
            stats_json,
        )


_register_all_synthetic()
_link_lvis_stats_sources()
