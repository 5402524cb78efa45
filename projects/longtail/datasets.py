"""Dataset registration and the per-class metadata the long-tail methods need.

Registered on import:

* ``longtail_synth_train`` / ``longtail_synth_val``: the embedded synthetic long-tailed dataset
  (LVIS v1 format, generated on first use under ``$DETECTRON2_DATASETS/longtail_synth``, see
  :mod:`longtail.synthetic`), ``longtail_synth_mini_{train,val}`` (a small copy for tests) and
  ``longtail_synth_large_{train,val}`` (the benchmark's GPU size).
* detectron2 registers LVIS v0.5 / v1 itself (``lvis_v1_train`` ...); this module only tells it
  where their class statistics come from (the train json of the same version) and loads them
  through :func:`load_checked`.

:func:`prepare_datasets` is called before the model is built. For each dataset it makes the files
exist (a dataset's metadata may carry ``longtail_prepare``, a zero-argument callable that
generates them, as the synthetic datasets do), checks that they exist (failing with a message that
names the path and how to get the data), and attaches to ``MetadataCatalog`` the statistics of
the training json named by the dataset's ``class_stats_source`` (``C`` = number of classes,
index = contiguous class id = LVIS category id - 1). The project keeps them under its own keys,
so that they never collide with what detectron2 itself puts in the metadata:

* ``thing_classes``: [C] names (left as they are when detectron2 set them);
* ``longtail_class_image_count`` (:data:`IMAGE_COUNT`): [C] training images containing the class;
* ``longtail_class_instance_count`` (:data:`INSTANCE_COUNT`): [C] training instances;
* ``longtail_class_frequency`` (:data:`FREQUENCY`): [C] "r" / "c" / "f" (the json's
  ``frequency`` when it has one, else LVIS's rule: 1-10 / 11-100 / >100 training images);
* ``longtail_num_train_images`` (:data:`NUM_TRAIN_IMAGES`): training images with annotations;
* ``class_image_count``: detectron2's own key, in upstream's format (a list of
  ``{"id": category id, "image_count": n}``; upstream's federated loss reads it). Upstream main
  pre-fills it for ``lvis_v1_*`` with the real LVIS counts and refuses another value, so it is
  only set where it is missing.

Counts are taken from the annotations that survive loading (boxes with positive width and height,
:func:`clean_records`). Every json is parsed once per process: the statistics are a by-product of
the same parse that loads the records (:func:`load_checked`), and are cached by file.
"""
import contextlib
import json
import logging
import os
import threading
from typing import Dict, Iterable, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json

from . import synthetic

__all__ = [
    "SYNTHETIC_DATASETS",
    "IMAGE_COUNT",
    "INSTANCE_COUNT",
    "FREQUENCY",
    "NUM_TRAIN_IMAGES",
    "validate_lvis_json",
    "clean_records",
    "load_checked",
    "register_synthetic",
    "prepare_files",
    "prepare_datasets",
    "class_stats_from_json",
    "train_metadata",
    "json_parse_count",
    "parse_instances_json",
    "check_category_ids",
    "class_stats_of",
    "stats_of_parsed",
    "resolve_num_classes",
    "D2_DEFAULT_NUM_CLASSES",
]

logger = logging.getLogger(__name__)

# the project's metadata keys (module docstring)
IMAGE_COUNT = "longtail_class_image_count"
INSTANCE_COUNT = "longtail_class_instance_count"
FREQUENCY = "longtail_class_frequency"
NUM_TRAIN_IMAGES = "longtail_num_train_images"

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


# ------------------------------------------------------------------------------------------------
# One parse per json and process
# ------------------------------------------------------------------------------------------------
_STATS_CACHE: Dict[Tuple, Dict] = {}
_PARSE_COUNT: Dict[str, int] = {}
_LOCK = threading.Lock()


def _file_key(json_file: str) -> Tuple:
    st = os.stat(json_file)
    return (os.path.realpath(json_file), st.st_mtime_ns, st.st_size)


def parse_instances_json(json_file: str) -> Dict:
    """Parse ``json_file`` (counted by :func:`json_parse_count`); ValueError unless it is an
    instances json."""
    with open(json_file) as f:
        data = json.load(f)
    path = os.path.realpath(json_file)
    _PARSE_COUNT[path] = _PARSE_COUNT.get(path, 0) + 1
    if not isinstance(data, dict) or "categories" not in data or "annotations" not in data:
        raise ValueError(
            f"{json_file}: not an LVIS/COCO instances json (needs 'images', 'annotations' and "
            "'categories' at the top level)."
        )
    return data


def json_parse_count(json_file: str) -> int:
    """How many times this process parsed ``json_file`` (for tests and start-up logs)."""
    return _PARSE_COUNT.get(os.path.realpath(json_file), 0)


@contextlib.contextmanager
def _lvis_api_reads(json_file: str, data: Dict):
    """
    detectron2's ``load_lvis_json`` (v0.6 and main) builds ``lvis.LVIS(json_file)``, which parses
    the file again. Within this context the LVIS API is handed ``data``, the dict this module
    already parsed from ``json_file``, instead; any other path is read from disk as usual.
    """
    from lvis import LVIS

    target = os.path.realpath(json_file)
    original = LVIS._load_json

    def load(api, path):
        return data if os.path.realpath(path) == target else original(api, path)

    with _LOCK:
        LVIS._load_json = load
        try:
            yield
        finally:
            LVIS._load_json = original


def _valid_box(ann: Dict) -> bool:
    """Annotations whose box has positive width and height (the ones loading keeps)."""
    bbox = ann.get("bbox")
    return bbox is not None and len(bbox) == 4 and bbox[2] > 0 and bbox[3] > 0


def check_category_ids(data: Dict, json_file: str) -> int:
    """Every annotation's ``category_id`` is among the ``categories``, whose ids are ``1..C``;
    ValueError naming ``json_file`` and the offending ids otherwise. Returns C."""
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


def class_stats_of(data: Dict, json_file: str) -> Dict:
    """Statistics (module docstring) of a parsed json whose category ids were checked; not
    cached."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    num_classes = len(cats)
    image_sets = [set() for _ in range(num_classes)]
    instance_count = [0] * num_classes
    images = set()
    for ann in data["annotations"]:
        if not _valid_box(ann):
            continue
        c = ann["category_id"] - 1
        image_sets[c].add(ann["image_id"])
        instance_count[c] += 1
        images.add(ann["image_id"])
    image_count = [len(s) for s in image_sets]
    frequency = [
        c.get("frequency") or synthetic.lvis_frequency(n) for c, n in zip(cats, image_count)
    ]
    return {
        "thing_classes": [c["name"] for c in cats],
        IMAGE_COUNT: image_count,
        INSTANCE_COUNT: instance_count,
        FREQUENCY: frequency,
        NUM_TRAIN_IMAGES: len(images),
    }


def stats_of_parsed(data: Dict, json_file: str) -> Dict:
    """:func:`class_stats_from_json` of the already parsed ``data`` of ``json_file`` (checked and
    cached per file)."""
    key = _file_key(json_file)
    stats = _STATS_CACHE.get(key)
    if stats is None:
        check_category_ids(data, json_file)
        stats = _STATS_CACHE[key] = class_stats_of(data, json_file)
    return stats


def validate_lvis_json(json_file: str) -> int:
    """
    Check that every annotation's ``category_id`` is among the json's ``categories`` and that the
    category ids are contiguous ``1..C`` (the LVIS convention the label mapping relies on).
    Raises ValueError naming the file and the offending ids; returns C.
    """
    return len(class_stats_from_json(json_file)["thing_classes"])


def class_stats_from_json(json_file: str) -> Dict:
    """
    Per-class statistics of an LVIS-format training json, keyed by the metadata keys they are
    stored under (module docstring). Categories sorted by id, contiguous ids 1..C required
    (ValueError naming the file otherwise). Cached per file: a json that :func:`load_checked`
    already loaded is not parsed again.
    """
    key = _file_key(json_file)
    stats = _STATS_CACHE.get(key)
    if stats is None:
        stats = stats_of_parsed(parse_instances_json(json_file), json_file)
    return stats


def clean_records(records, dataset_name: str):
    """
    Drop annotations with a degenerate box (width or height <= 0) and log how many; detectron2
    would otherwise carry them to the mapper, which silently removes the empty boxes later. The
    class statistics count the same annotations (:func:`_valid_box`).
    """
    dropped = 0
    for record in records:
        anns = record.get("annotations", [])
        keep = [a for a in anns if _valid_box(a)]
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
    """
    detectron2's ``load_lvis_json`` on one parse of ``json_file`` that also validates the category
    ids and caches the class statistics (:func:`class_stats_from_json`), then
    :func:`clean_records`.
    """
    data = parse_instances_json(json_file)
    stats_of_parsed(data, json_file)
    # detectron2 attaches its built-in LVIS metadata when given an LVIS dataset name
    lvis_name = dataset_name if dataset_name.startswith("lvis_") else None
    with _lvis_api_reads(json_file, data):
        records = load_lvis_json(json_file, image_root, lvis_name)
    del data
    return clean_records(records, dataset_name)


def train_metadata(cfg, key: str, what: str, needed_by: str):
    """
    Metadata ``key`` of the training dataset(s) ``cfg.DATASETS.TRAIN`` (all of them must agree),
    or a ValueError that names ``needed_by`` (the config key that needs it) and how to provide it.
    """
    names = cfg.DATASETS.TRAIN
    values = [MetadataCatalog.get(n).get(key, None) for n in names]
    missing = [n for n, v in zip(names, values) if v is None]
    if missing or not names:
        raise ValueError(
            f"{needed_by} needs {what} (metadata '{key}') of the training dataset(s) "
            f"DATASETS.TRAIN={tuple(names)}; missing for {missing or names}. LVIS-format datasets "
            "get it from longtail.datasets.prepare_datasets (run by the Trainer) when their "
            "metadata names the training json ('class_stats_source', see "
            f"longtail/datasets.py); otherwise set MetadataCatalog.get(name).{key} = [...] (one "
            "entry per class) before building."
        )
    if len(values) > 1 and any(v != values[0] for v in values[1:]):
        raise ValueError(f"DATASETS.TRAIN {tuple(names)} disagree on metadata '{key}'.")
    return values[0]


# ------------------------------------------------------------------------------------------------
# Registration
# ------------------------------------------------------------------------------------------------
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
            class_stats_source=f"{name}_train",
            longtail_prepare=lambda: synthetic.ensure_dataset(root, gen_cfg),
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


# ------------------------------------------------------------------------------------------------
# Preparation before the model is built
# ------------------------------------------------------------------------------------------------
def _check_exists(dataset_name: str, what: str, path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Dataset {dataset_name!r}: {what} {path!r} does not exist. "
            + LVIS_HELP.replace("{root!r}", repr(_datasets_root()))
        )


def _prepare_files(dataset_name: str) -> None:
    meta = MetadataCatalog.get(dataset_name)
    prepare = meta.get("longtail_prepare", None)
    if prepare is not None:
        prepare()  # also checks the files of datasets it owns (custom_datasets)
    json_file = meta.get("json_file", None)
    if json_file is not None:
        _check_exists(dataset_name, "annotation file", json_file)
    image_root = meta.get("image_root", None)
    if image_root is not None:
        _check_exists(dataset_name, "image directory", image_root)


def prepare_files(dataset_names: Iterable[str]) -> None:
    """Make the datasets' files exist (generating them where the metadata says how) and check
    them, without reading any json (:func:`prepare_datasets` also attaches the statistics)."""
    for name in dataset_names:
        _prepare_files(name)


def _attach(meta, stats: Dict) -> None:
    values = {k: v for k, v in stats.items() if k != "thing_classes"}
    if meta.get("thing_classes", None) is None:
        values["thing_classes"] = stats["thing_classes"]
    if meta.get("class_image_count", None) is None:
        # detectron2 main's format (its federated loss reads it); ids are 1..C
        values["class_image_count"] = [
            {"id": i + 1, "image_count": n} for i, n in enumerate(stats[IMAGE_COUNT])
        ]
    for key, value in values.items():
        if meta.get(key, None) is None:
            meta.set(**{key: value})
        elif meta.get(key) != value and key != "class_image_count":
            raise ValueError(
                f"Dataset {meta.name!r}: metadata '{key}' was already set to other values than "
                "its training json gives; remove the earlier MetadataCatalog.set."
            )


def prepare_datasets(dataset_names: Iterable[str], num_classes: Optional[int] = None) -> None:
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
            lt = sorted(n for n in registered if n.startswith(("longtail_", "lvis_", "rehearsal_")))
            raise KeyError(
                f"Dataset {name!r} (DATASETS.TRAIN / DATASETS.TEST) is not registered. "
                f"Long-tail datasets available: {', '.join(lt)}. Your own LVIS- or COCO-format "
                "json: declare it in LONGTAIL.REGISTER_DATASETS (README, 'Train on your own "
                "data')."
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
        _attach(meta, stats)
        if num_classes is not None and num_classes != len(stats["thing_classes"]):
            raise ValueError(
                f"MODEL.ROI_HEADS.NUM_CLASSES is {num_classes} but dataset {name!r} has "
                f"{len(stats['thing_classes'])} classes (from {stats_json}). Set "
                f"MODEL.ROI_HEADS.NUM_CLASSES {len(stats['thing_classes'])}."
            )
        logger.info(
            "Dataset %s: %d classes (r/c/f = %d/%d/%d) from %s",
            name,
            len(stats[FREQUENCY]),
            *(stats[FREQUENCY].count(b) for b in "rcf"),
            stats_json,
        )


# detectron2's default of MODEL.ROI_HEADS.NUM_CLASSES (COCO's 80): "left at its default"
D2_DEFAULT_NUM_CLASSES = 80


def resolve_num_classes(cfg) -> Optional[int]:
    """
    ``MODEL.ROI_HEADS.NUM_CLASSES`` left at detectron2's default (80) becomes the number of
    categories of the training dataset (else the first test dataset) when the project knows it
    (datasets with class statistics: the embedded ones, LVIS, ``LONGTAIL.REGISTER_DATASETS``);
    ``cfg`` must not be frozen. Any other value is kept, and :func:`prepare_datasets` refuses it
    with the number to set if it is wrong. Returns the number set, or None.
    """
    names = list(cfg.DATASETS.TRAIN) or list(cfg.DATASETS.TEST)
    if cfg.MODEL.ROI_HEADS.NUM_CLASSES != D2_DEFAULT_NUM_CLASSES or not names:
        return None
    if names[0] not in DatasetCatalog.list():
        return None  # prepare_datasets says what is available
    source = MetadataCatalog.get(names[0]).get("class_stats_source", None)
    if source is None:
        return None
    prepare_files([source])
    stats_json = MetadataCatalog.get(source).json_file
    n = len(class_stats_from_json(stats_json)["thing_classes"])
    if n != cfg.MODEL.ROI_HEADS.NUM_CLASSES:
        logger.info("MODEL.ROI_HEADS.NUM_CLASSES was left at detectron2's default (%d): set to "
                    "%d, the categories of %s (%s).", D2_DEFAULT_NUM_CLASSES, n, names[0],
                    stats_json)
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = n
    return n


_register_all_synthetic()
_link_lvis_stats_sources()
