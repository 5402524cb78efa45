import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from longtail.datasets import (
    FREQUENCY, IMAGE_COUNT, INSTANCE_COUNT, NUM_TRAIN_IMAGES, class_stats_from_json,
    prepare_datasets,
)
from longtail.synthetic import lvis_frequency


def test_frequency_buckets_follow_lvis():
    assert [lvis_frequency(n) for n in (1, 10, 11, 100, 101)] == list("rrccf")


def test_synthetic_metadata_attached():
    prepare_datasets(["longtail_synth_mini_train", "longtail_synth_mini_val"])
    train = MetadataCatalog.get("longtail_synth_mini_train")
    val = MetadataCatalog.get("longtail_synth_mini_val")
    with open(train.json_file) as f:
        data = json.load(f)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    assert train.thing_classes == [c["name"] for c in cats]
    assert train.get(IMAGE_COUNT) == [c["image_count"] for c in cats]
    assert train.get(INSTANCE_COUNT) == [c["instance_count"] for c in cats]
    assert train.get(FREQUENCY) == [c["frequency"] for c in cats]
    # detectron2 main's format of its own key (its federated loss reads it)
    assert train.class_image_count == [{"id": c["id"], "image_count": c["image_count"]} for c in cats]
    assert train.evaluator_type == "lvis"
    # val carries the *training* statistics, as LVIS val does
    assert val.get(IMAGE_COUNT) == train.get(IMAGE_COUNT)
    dicts = DatasetCatalog.get("longtail_synth_mini_train")
    assert len(dicts) == train.get(NUM_TRAIN_IMAGES)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(len(cats)))


def test_num_classes_mismatch_names_the_key():
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES"):
        prepare_datasets(["longtail_synth_mini_train"], num_classes=1203)


def test_missing_lvis_files_explain_how_to_get_them():
    # detectron2 registers lvis_v1_train at datasets/lvis/lvis_v1_train.json, absent here
    with pytest.raises(FileNotFoundError) as e:
        prepare_datasets(["lvis_v1_train"])
    msg = str(e.value)
    assert "lvis_v1_train.json" in msg and "DETECTRON2_DATASETS" in msg and "lvisdataset.org" in msg


def test_unknown_dataset_lists_available():
    with pytest.raises(KeyError, match="longtail_synth_train"):
        prepare_datasets(["no_such_dataset"])


def test_class_stats_reject_non_contiguous_ids(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"categories": [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}],
                                "annotations": [], "images": []}))
    with pytest.raises(ValueError, match="contiguous"):
        class_stats_from_json(str(path))


def test_class_stats_count_only_the_annotations_loading_keeps(tmp_path):
    """Degenerate boxes (width or height <= 0) are dropped by the loader; the statistics the
    methods use (image and instance counts, r/c/f, training images) must not count them."""
    from longtail.datasets import load_checked

    images = [{"id": i, "height": 20, "width": 20, "coco_url": f"http://x/train/{i}.jpg",
               "neg_category_ids": [], "not_exhaustive_category_ids": []} for i in (1, 2, 3)]
    anns = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"image_id": 2, "category_id": 1, "bbox": [1, 1, 0, 5]},   # dropped
        {"image_id": 2, "category_id": 2, "bbox": [1, 1, 4, 4]},
        {"image_id": 3, "category_id": 2, "bbox": [1, 1, 3, -2]},  # dropped
        {"image_id": 3, "category_id": 3, "bbox": [2, 2, 0, 0]},   # dropped: class 3 has none
    ]
    for k, a in enumerate(anns, start=1):
        a.update(id=k, area=max(a["bbox"][2] * a["bbox"][3], 0),
                 segmentation=[[1, 1, 4, 1, 4, 4, 1, 4]])
    data = {"images": images, "annotations": anns,
            "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    stats = class_stats_from_json(str(path))
    assert stats[INSTANCE_COUNT] == [1, 1, 0]
    assert stats[IMAGE_COUNT] == [1, 1, 0]
    assert stats[NUM_TRAIN_IMAGES] == 2
    records = load_checked(str(path), str(tmp_path), "stats_test_train")
    kept = [a["category_id"] for r in records for a in r["annotations"]]
    # the loader's surviving annotations, per class (contiguous ids 0..C-1)
    assert [kept.count(c) for c in range(3)] == stats[INSTANCE_COUNT]
