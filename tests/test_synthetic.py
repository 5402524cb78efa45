"""
Tests of :mod:`longtail.synthetic`.

Most checks use a small config (300 train / 100 val images). One module-scoped fixture builds the
DEFAULT config, on which the acceptance criteria of the long-tail design are asserted.
"""
import collections
import concurrent.futures
import copy
import dataclasses
import json
import os
import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from shapely.geometry import Polygon

from longtail import synthetic as syn
from longtail.synthetic import SyntheticConfig, category_plan, ensure_dataset, generate

SMALL = SyntheticConfig(num_train_images=300, num_val_images=100, min_val_images_per_class=5,
                        seed=7)
TINY = SyntheticConfig(num_train_images=24, num_val_images=12, min_val_images_per_class=2, seed=3)

IMAGE_KEYS = {"id", "width", "height", "file_name", "coco_url", "neg_category_ids",
              "not_exhaustive_category_ids"}
ANN_KEYS = {"id", "image_id", "category_id", "bbox", "area", "segmentation"}
CAT_KEYS = {"id", "name", "synonyms", "synset", "def", "family", "image_count",
            "instance_count", "frequency"}


def _load(path):
    with open(path) as f:
        return json.load(f)


def _build(tmp_path_factory, name, cfg):
    paths = generate(str(tmp_path_factory.mktemp(name) / "ds"), cfg)
    return paths, _load(paths["train_json"]), _load(paths["val_json"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _build(tmp_path_factory, "small", SMALL)


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    return _build(tmp_path_factory, "default", SyntheticConfig())


# ------------------------------------------------------------------------------------------------
# helpers (independent re-implementations, deliberately not the module's own)
# ------------------------------------------------------------------------------------------------
def _frequency(image_count):
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


def _images_per_category(dataset):
    out = collections.defaultdict(set)
    for a in dataset["annotations"]:
        out[a["category_id"]].add(a["image_id"])
    return out


def _present(dataset):
    out = collections.defaultdict(set)
    for a in dataset["annotations"]:
        out[a["image_id"]].add(a["category_id"])
    return out


def _sibling_hit_rate(plan, dataset, buckets):
    """Share of the images of the ``buckets`` categories that also hold their frequent sibling
    (same family and attribute set)."""
    frequent_of = {(e["family"], e["set"]): e["id"] for e in plan if e["bucket"] == "f"}
    hits = total = 0
    for cats in _present(dataset).values():
        for e in plan:
            if e["bucket"] in buckets and e["id"] in cats:
                total += 1
                hits += frequent_of[e["family"], e["set"]] in cats
    return hits / total


def _shoelace(flat):
    x, y = np.asarray(flat[0::2]), np.asarray(flat[1::2])
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _rasterise(polygons, width, height, supersample=4):
    """
    (H, W) bool mask of the pixels at least half covered by the polygons (pixel (i, j) covers
    [i, i + 1) x [j, j + 1)), from a 4x supersampled PIL rasterisation.
    """
    s = supersample
    mask = Image.new("L", (width * s, height * s), 0)
    draw = ImageDraw.Draw(mask)
    for p in polygons:
        draw.polygon([(p[i] * s, p[i + 1] * s) for i in range(0, len(p), 2)], fill=255)
    cover = np.asarray(mask, dtype=np.float32).reshape(height, s, width, s).mean(axis=(1, 3))
    return cover >= 127.5


def _erode(mask, radius):
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MinFilter(2 * radius + 1))) > 0


def _dilate(mask, radius):
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(ImageFilter.MaxFilter(2 * radius + 1))) > 0


def _hue_saturation(rgb):
    """(H, W, 3) uint8 -> hue in degrees [0, 360) and HSV saturation in [0, 1]."""
    x = rgb.astype(np.float64) / 255.0
    mx, mn = x.max(axis=2), x.min(axis=2)
    delta = np.where(mx > mn, mx - mn, 1.0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    hue = np.where(mx == r, ((g - b) / delta) % 6.0,
                   np.where(mx == g, (b - r) / delta + 2.0, (r - g) / delta + 4.0)) * 60.0
    sat = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0)
    return hue % 360.0, sat


# ------------------------------------------------------------------------------------------------
# config and design
# ------------------------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_covers_fields():
    a, b = SyntheticConfig(), SyntheticConfig()
    assert a.fingerprint() == b.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    seen = {a.fingerprint()}
    for changed in (dataclasses.replace(a, seed=1), dataclasses.replace(a, jpeg_quality=90),
                    dataclasses.replace(a, num_val_images=499),
                    dataclasses.replace(a, rare_image_range=(1, 8))):
        seen.add(changed.fingerprint())
    assert len(seen) == 5
    with pytest.raises(ValueError):
        SyntheticConfig(min_object_size=30, max_object_size=20)
    with pytest.raises(ValueError):
        SyntheticConfig(max_object_size=100)  # would not fit a 112 px image when rotated


def test_category_plan_design():
    plan = category_plan(SyntheticConfig())
    assert [e["id"] for e in plan] == list(range(1, len(plan) + 1))
    assert len(plan) >= 48
    assert len({e["name"] for e in plan}) == len(plan)
    families = collections.defaultdict(list)
    for e in plan:
        families[e["family"]].append(e)
    rare_member, rare_texture, rare_colour = set(), set(), set()
    for members in families.values():
        assert sorted(m["bucket"] for m in members) == ["c", "f", "r"]
        kinds = {m["kind"] for m in members}
        assert len(kinds) == 1
        if kinds == {"colour"}:  # same texture, hues 30 degrees apart
            assert {m["texture"] for m in members} == {"solid"}
            hues = [m["hue"] for m in sorted(members, key=lambda m: m["member"])]
            gaps = [abs(b - a) % 360 for a, b in zip(hues, hues[1:])]
            assert all(25 <= min(g, 360 - g) <= 35 for g in gaps)
            assert len({m["colour"] for m in members}) == 3
        else:  # same hue, different textures
            assert len({m["hue"] for m in members}) == 1
            assert {m["texture"] for m in members} == {"solid", "striped", "dotted"}
        rare = next(m for m in members if m["bucket"] == "r")
        rare_member.add(rare["member"])
        (rare_colour if rare["kind"] == "colour" else rare_texture).add(
            rare["colour"] if rare["kind"] == "colour" else rare["texture"])
    # "rare" is not always the same visual attribute
    assert rare_member == {0, 1, 2}
    assert rare_texture == {"solid", "striped", "dotted"}
    assert len(rare_colour) >= 3
    targets = {b: [e["target_train_images"] for e in plan if e["bucket"] == b] for b in "fcr"}
    assert min(targets["f"]) >= 120 and max(targets["f"]) <= 700
    assert min(targets["c"]) >= 14 and max(targets["c"]) <= 90
    assert min(targets["r"]) >= 1 and max(targets["r"]) <= 9
    assert all(e["target_val_images"] >= 10 for e in plan)
    # targets scale with the training set; rare ones never drop to 0
    half = category_plan(SyntheticConfig(num_train_images=1000))
    assert max(e["target_train_images"] for e in half) == 350
    assert min(e["target_train_images"] for e in half) == 1


def test_default_fingerprint_is_unchanged():
    """Datasets generated before ``attribute_sets`` existed stay valid (no silent regeneration)."""
    assert SyntheticConfig().fingerprint() == "20370810a3392373"
    assert SyntheticConfig(attribute_sets=2).fingerprint() != SyntheticConfig().fingerprint()
    with pytest.raises(ValueError, match="attribute_sets"):
        SyntheticConfig(attribute_sets=4)


@pytest.mark.parametrize("sets", [2, 3])
def test_category_plan_with_more_attribute_sets(sets):
    cfg = SyntheticConfig(attribute_sets=sets)
    plan = category_plan(cfg)
    assert [e["id"] for e in plan] == list(range(1, 48 * sets + 1))
    assert len({e["name"] for e in plan}) == len(plan)
    # every category is a distinct (shape, hue, texture): separable from the pixels
    assert len({(e["family"], e["hue"], e["texture"]) for e in plan}) == len(plan)
    groups = collections.defaultdict(list)
    for e in plan:
        groups[e["family"], e["set"]].append(e)
    assert len(groups) == 16 * sets
    for (family, aset), members in groups.items():
        assert sorted(m["bucket"] for m in members) == ["c", "f", "r"]
        if members[0]["kind"] == "colour":  # same hues as set 0, another texture
            assert {m["texture"] for m in members} == {syn._TEXTURES[aset]}
            assert [m["hue"] for m in members] == [m["hue"] for m in groups[family, 0]]
        else:  # the three textures in a hue 120 degrees per set away from set 0's
            assert len({m["hue"] for m in members}) == 1
            gap = (members[0]["hue"] - groups[family, 0][0]["hue"]) % 360
            assert gap == 120 * aset
    # the first set is the 48-category dataset's categories (names, descriptions)
    base = category_plan(SyntheticConfig())
    first = [e for e in plan if e["set"] == 0]
    assert [(e["name"], e["def"]) for e in first] == [(e["name"], e["def"]) for e in base]
    # buckets stay balanced and their targets span the configured ranges
    for b, (lo, hi) in (("f", cfg.frequent_image_range), ("c", cfg.common_image_range),
                        ("r", cfg.rare_image_range)):
        targets = [e["target_train_images"] for e in plan if e["bucket"] == b]
        assert len(targets) == 16 * sets
        assert min(targets) == lo and max(targets) == hi


def test_generated_dataset_with_two_attribute_sets(tmp_path):
    cfg = dataclasses.replace(SMALL, attribute_sets=2)
    paths = generate(str(tmp_path / "ds"), cfg)
    train, val = _load(paths["train_json"]), _load(paths["val_json"])
    assert len(train["categories"]) == 96 and val["categories"] == train["categories"]
    images = _images_per_category(train)
    # every category is annotated, with the frequency the LVIS rule gives its image count
    assert set(images) == set(range(1, 97))
    for c in train["categories"]:
        assert c["frequency"] == _frequency(len(images[c["id"]]))
    assert collections.Counter(c["frequency"] for c in train["categories"])["r"] >= 28
    # rare/common members meet their frequent sibling of the same attribute set
    assert _sibling_hit_rate(category_plan(cfg), train, "rc") >= 0.35


def test_shape_templates_are_simple_polygons():
    for family in syn.FAMILIES:
        pts = syn.shape_template(family)
        poly = Polygon(pts)
        assert poly.is_valid and poly.area > 0.3, family
        extent = pts.max(axis=0) - pts.min(axis=0)
        assert abs(extent.max() - 2.0) < 1e-9
        assert np.allclose(pts.max(axis=0) + pts.min(axis=0), 0.0)
    assert len(syn.shape_template("circle")) == 24 and len(syn.shape_template("ellipse")) == 24


def test_layout_visibility_constraints():
    cfg = SyntheticConfig()
    families = {e["id"]: e["family"] for e in category_plan(cfg)}
    for seed in range(15):
        rng = np.random.default_rng(seed)
        objects = syn.layout_image(rng, 120, 140, [1 + (3 * seed + k) % 48 for k in range(9)],
                                   families, cfg)
        assert len(objects) >= 6
        assert [o.z for o in objects] == sorted(o.z for o in objects)
        for i, o in enumerate(objects):
            x0, y0, x1, y1 = o.shape.bounds
            assert x0 >= 0 and y0 >= 0 and x1 <= 120 and y1 <= 140
            assert o.visible.area >= cfg.min_visible_fraction * o.shape.area - 1e-6
            parts = syn._polygon_parts(o.visible)
            assert all(len(p.interiors) == 0 for p in parts)
            later = [q.shape for q in objects[i + 1:]]
            for q in later:  # the visible part is never covered by a later object
                assert o.visible.intersection(q).area < 1e-6
        union_visible = sum(o.visible.area for o in objects)
        union_shapes = objects[0].shape
        for o in objects[1:]:
            union_shapes = union_shapes.union(o.shape)
        assert abs(union_visible - union_shapes.area) < 1e-4


# ------------------------------------------------------------------------------------------------
# format (small config)
# ------------------------------------------------------------------------------------------------
def test_files_and_schema(small):
    paths, train, val = small
    root = paths["root"]
    assert paths["image_root"] == root + "/"
    assert paths["train_json"] == os.path.join(root, "annotations", "lvis_synth_train.json")
    assert paths["val_json"] == os.path.join(root, "annotations", "lvis_synth_val.json")
    assert _load(os.path.join(root, "SPEC.json"))["fingerprint"] == SMALL.fingerprint()
    assert train["categories"] == val["categories"]
    for split, data, n in (("train", train, SMALL.num_train_images),
                           ("val", val, SMALL.num_val_images)):
        assert set(data) == {"info", "licenses", "images", "annotations", "categories"}
        assert [im["id"] for im in data["images"]] == list(range(1, n + 1))
        cat_ids = {c["id"] for c in data["categories"]}
        for im in data["images"]:
            assert set(im) == IMAGE_KEYS
            name = "{:06d}.jpg".format(im["id"])
            assert im["file_name"] == "{}/{}".format(split, name)
            assert im["coco_url"] == "http://synthetic.invalid/{}/{}".format(split, name)
            # detectron2 0.6: image_root + the last two components of coco_url
            path = paths["image_root"] + "/".join(im["coco_url"].split("/")[-2:])
            with Image.open(path) as f:
                assert f.size == (im["width"], im["height"]) and f.mode == "RGB"
                assert f.format == "JPEG"
            assert SMALL.min_side <= im["width"] <= SMALL.max_side
            assert SMALL.min_side <= im["height"] <= SMALL.max_side
            assert set(im["neg_category_ids"]) <= cat_ids
            assert set(im["not_exhaustive_category_ids"]) <= cat_ids
        sizes = {im["id"]: (im["width"], im["height"]) for im in data["images"]}
        ann_ids = [a["id"] for a in data["annotations"]]
        assert ann_ids == list(range(1, len(ann_ids) + 1))
        for a in data["annotations"]:
            assert set(a) == ANN_KEYS and a["category_id"] in cat_ids
            assert all(len(p) % 2 == 0 and len(p) >= 6 for p in a["segmentation"])
            xs = [v for p in a["segmentation"] for v in p[0::2]]
            ys = [v for p in a["segmentation"] for v in p[1::2]]
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert abs(x - min(xs)) < 0.02 and abs(y - min(ys)) < 0.02
            assert abs(x + w - max(xs)) < 0.02 and abs(y + h - max(ys)) < 0.02
            width, height = sizes[a["image_id"]]
            assert x >= 0 and y >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01
            polygon_area = sum(_shoelace(p) for p in a["segmentation"])
            assert a["area"] > 0 and abs(a["area"] - polygon_area) <= 0.01 * polygon_area + 0.5
    for c in train["categories"]:
        assert set(c) == CAT_KEYS
        assert c["synonyms"] == [c["name"]] and c["synset"] == c["name"] + ".n.01"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # lvis uses np.float, logger.warn
def test_lvis_api_perfect_detections_score_ap_one(small):
    lvis = pytest.importorskip("lvis")
    paths, train, val = small
    lvis.LVIS(paths["train_json"])
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                   "segmentation": a["segmentation"], "score": 1.0} for a in val["annotations"]]
    for iou_type in ("bbox", "segm"):
        gt = lvis.LVIS(paths["val_json"])
        evaluator = lvis.LVISEval(gt, copy.deepcopy(detections), iou_type=iou_type)
        evaluator.run()
        results = evaluator.get_results()
        assert abs(results["AP"] - 1.0) < 1e-6, (iou_type, results)
        for key in ("APr", "APc", "APf"):
            assert results[key] == -1 or abs(results[key] - 1.0) < 1e-6, (iou_type, key)


def test_polygons_match_rendered_pixels(small):
    """
    Objects are saturated and the background/clutter is not, so "object-coloured" pixels (hue
    within 15 deg of a category's nominal hue, saturation > 0.45) can be read off the JPEG:

    * inside every annotation (eroded by 2 px, away from anti-aliased and JPEG-blurred edges)
      > 90% of the pixels have the annotation's hue: the polygon lies on its own visible pixels;
    * away from all annotations (dilated by 3 px) < 2% of the pixels are saturated: no visible
      object part is left unannotated;
    * per image and hue, the union of the annotation masks and the object-coloured pixels have
      IoU > 0.7 (mean > 0.94, which fails for polygons shifted by half a pixel).
    """
    paths, train, _ = small
    hue_of = {e["id"]: e["hue"] for e in category_plan(SMALL)}
    anns = collections.defaultdict(list)
    for a in train["annotations"]:
        anns[a["image_id"]].append(a)
    checked, inside_scores, ious = 0, [], []
    for im in train["images"][:60]:
        with Image.open(paths["image_root"] + im["file_name"]) as f:
            hue, sat = _hue_saturation(np.asarray(f.convert("RGB")))

        def coloured(h):
            diff = np.abs(hue - h) % 360.0
            return (np.minimum(diff, 360.0 - diff) < 15.0) & (sat > 0.45)

        union = np.zeros((im["height"], im["width"]), dtype=bool)
        by_hue = collections.defaultdict(lambda: np.zeros_like(union))
        for a in anns[im["id"]]:
            mask = _rasterise(a["segmentation"], im["width"], im["height"])
            union |= mask
            by_hue[hue_of[a["category_id"]]] |= mask
            interior = _erode(mask, 2)
            if interior.sum() < 10:
                continue
            score = coloured(hue_of[a["category_id"]])[interior].mean()
            assert score > 0.9, (im["file_name"], a["id"], score)
            inside_scores.append(score)
            checked += 1
        outside = ~_dilate(union, 3)
        assert (sat[outside] > 0.45).mean() < 0.02, im["file_name"]
        for h, mask in by_hue.items():
            if mask.sum() >= 30:
                col = coloured(h)
                ious.append((mask & col).sum() / (mask | col).sum())
                assert ious[-1] > 0.7, (im["file_name"], h, ious[-1])
    assert checked >= 150 and len(ious) >= 150
    assert np.mean(inside_scores) > 0.98
    assert np.mean(ious) > 0.94


# ------------------------------------------------------------------------------------------------
# acceptance criteria on the default config
# ------------------------------------------------------------------------------------------------
def test_default_long_tail_statistics(default):
    paths, train, val = default
    cfg = SyntheticConfig()
    cats = {c["id"]: c for c in train["categories"]}
    assert len(cats) >= 48 and sorted(cats) == list(range(1, len(cats) + 1))
    assert val["categories"] == train["categories"]
    per_cat = _images_per_category(train)
    instances = collections.Counter(a["category_id"] for a in train["annotations"])
    for cid, c in cats.items():  # statistics are those of the train annotations
        assert c["image_count"] == len(per_cat[cid]) >= 1
        assert c["instance_count"] == instances[cid]
        assert c["frequency"] == _frequency(len(per_cat[cid]))
    buckets = collections.Counter(c["frequency"] for c in cats.values())
    assert all(buckets[b] >= 12 for b in "rcf"), buckets
    plan = {e["id"]: e for e in category_plan(cfg)}
    assert all(cats[cid]["frequency"] == plan[cid]["bucket"] for cid in cats)
    counts = [c["instance_count"] for c in cats.values()]
    assert max(counts) / min(counts) >= 100

    present = _present(train)
    assert len(present) == len(train["images"])  # no empty training image
    categories_per_image = np.array([len(cats) for cats in present.values()])
    objects = collections.Counter(a["image_id"] for a in train["annotations"])
    n_obj = np.array([objects[im["id"]] for im in train["images"]])
    assert 3.0 <= n_obj.mean() <= 5.0 and n_obj.max() <= cfg.max_objects_per_image
    assert categories_per_image.max() <= cfg.max_categories_per_image
    repeats = collections.Counter((a["image_id"], a["category_id"]) for a in train["annotations"])
    assert sum(1 for v in repeats.values() if v >= 2) >= 100  # several instances of a class
    areas = np.array([a["area"] for a in train["annotations"]])
    assert (areas < 32 ** 2).mean() > 0.3 and ((areas >= 32 ** 2) & (areas < 96 ** 2)).mean() > 0.1

    val_per_cat = _images_per_category(val)
    assert all(len(val_per_cat[cid]) >= cfg.min_val_images_per_class for cid in cats)
    assert len(val["images"]) == cfg.num_val_images
    assert len(_present(val)) == len(val["images"])

    spec = _load(os.path.join(paths["root"], "SPEC.json"))
    assert spec["fingerprint"] == cfg.fingerprint()
    assert spec["config"] == json.loads(json.dumps(dataclasses.asdict(cfg)))


def test_default_rare_members_meet_their_frequent_sibling(default):
    """Rare/common objects share images (and thus training boxes) with the frequent sibling."""
    _, train, _ = default
    plan = category_plan(SyntheticConfig())
    for bucket in "rc":
        assert _sibling_hit_rate(plan, train, bucket) >= 0.35, bucket


def test_default_federated_labels(default):
    _, train, val = default
    plan = category_plan(SyntheticConfig())
    family = {e["id"]: e["family"] for e in plan}
    for data in (train, val):
        present = _present(data)
        marked, sampled, other_absent = 0, 0, 0
        for im in data["images"]:
            cats = present[im["id"]]
            neg = im["neg_category_ids"]
            assert neg == sorted(set(neg))
            assert not set(neg) & cats
            siblings = {cid for cid in family if family[cid] in {family[c] for c in cats}}
            assert siblings - cats <= set(neg)
            others = set(family) - cats - siblings
            sampled += len(set(neg) & others)
            other_absent += len(others)
            ne = im["not_exhaustive_category_ids"]
            assert len(ne) <= 1 and set(ne) <= cats
            marked += bool(ne)
        assert 0.15 <= sampled / other_absent <= 0.35
        assert 0 < marked <= 0.06 * len(data["images"])


# ------------------------------------------------------------------------------------------------
# determinism and caching
# ------------------------------------------------------------------------------------------------
def _all_files(root):
    out = {}
    for d, _, files in os.walk(root):
        for name in files:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_generation_is_deterministic(tmp_path):
    a = generate(str(tmp_path / "a"), TINY)
    b = generate(str(tmp_path / "b"), TINY)
    files_a, files_b = _all_files(a["root"]), _all_files(b["root"])
    assert len(files_a) == TINY.num_train_images + TINY.num_val_images + 3
    assert files_a == files_b
    c = generate(str(tmp_path / "c"), dataclasses.replace(TINY, seed=TINY.seed + 1))
    files_c = _all_files(c["root"])
    assert files_c["annotations/lvis_synth_train.json"] != files_a[
        "annotations/lvis_synth_train.json"]
    assert files_c["train/000001.jpg"] != files_a["train/000001.jpg"]


def test_ensure_dataset_caches_and_regenerates(tmp_path):
    root = str(tmp_path / "cache" / "ds")
    paths = ensure_dataset(root, TINY)
    assert paths == syn.dataset_paths(root)
    spec = os.path.join(root, "SPEC.json")
    mtime = os.stat(spec).st_mtime_ns
    train_mtime = os.stat(paths["train_json"]).st_mtime_ns
    assert ensure_dataset(root, TINY) == paths
    assert os.stat(spec).st_mtime_ns == mtime
    assert os.stat(paths["train_json"]).st_mtime_ns == train_mtime

    other = dataclasses.replace(TINY, seed=TINY.seed + 1)
    assert ensure_dataset(root, other) == paths
    assert _load(spec)["fingerprint"] == other.fingerprint() != TINY.fingerprint()
    assert _load(paths["train_json"])["info"]["fingerprint"] == other.fingerprint()
    # only the dataset and its lock file are left beside it: no temp or old dirs
    assert sorted(os.listdir(tmp_path / "cache")) == ["ds", "ds.lock"]


def test_ensure_dataset_concurrent_callers_build_once(tmp_path, monkeypatch):
    builds = []
    real_build = syn._build
    lock = threading.Lock()

    def counting_build(root, cfg):
        with lock:
            builds.append(root)
        return real_build(root, cfg)

    monkeypatch.setattr(syn, "_build", counting_build)
    root = str(tmp_path / "ds")
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: ensure_dataset(root, TINY), range(3)))
    assert len(builds) == 1
    assert all(r == results[0] for r in results)
    assert _load(os.path.join(root, "SPEC.json"))["fingerprint"] == TINY.fingerprint()
    assert sorted(os.listdir(tmp_path)) == ["ds", "ds.lock"]


def test_generate_refuses_to_replace_foreign_directory(tmp_path):
    root = tmp_path / "not_a_dataset"
    root.mkdir()
    (root / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(str(root), TINY)
    assert (root / "precious.txt").read_text() == "keep me"
