import itertools
import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils import comm

from longtail import add_longtail_config
from longtail.samplers import (
    SAMPLER_REGISTRY,
    build_train_sampler,
    category_repeat_factors,
    image_repeat_factors,
    repeat_factors_from_dataset,
)


def _cfg(sampler="RepeatFactorTrainingSampler", threshold=0.3, sqrt=True, seed=7):
    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.DATALOADER.SAMPLER_TRAIN = sampler
    cfg.DATALOADER.REPEAT_THRESHOLD = threshold
    cfg.DATALOADER.REPEAT_SQRT = sqrt
    cfg.SEED = seed
    return cfg


def _dataset(cats_per_image):
    return [
        {"image_id": i, "annotations": [{"category_id": c} for c in cats]}
        for i, cats in enumerate(cats_per_image)
    ]


def test_category_factors_hand_computed():
    counts = torch.tensor([1, 10, 100, 0])
    # N = 1000, t = 0.01: f = (0.001, 0.01, 0.1, 0)
    r = category_repeat_factors(counts, 1000, 0.01, sqrt=True)
    assert r.tolist() == pytest.approx([math.sqrt(10.0), 1.0, 1.0, 1.0])
    r_lin = category_repeat_factors(counts, 1000, 0.01, sqrt=False)
    assert r_lin.tolist() == pytest.approx([10.0, 1.0, 1.0, 1.0])


def test_lvis_v05_one_image_class():
    # RIO spec: a 1-image class of LVIS v0.5 (N = 56,740) gets r ~ 7.53 at t = 0.001.
    r = category_repeat_factors(torch.tensor([1]), 56740, 0.001)
    assert float(r) == pytest.approx(7.53, abs=0.005)


def test_image_factor_is_max_over_present_categories():
    cat = torch.tensor([3.0, 1.0, 2.0])
    img = torch.tensor([0, 0, 1, 3, 3])
    c = torch.tensor([0, 2, 1, 2, 2])
    r = image_repeat_factors(cat, img, c, num_images=4)
    assert r.tolist() == [3.0, 1.0, 1.0, 2.0]  # image 2 has no annotation -> 1


def test_factors_from_dataset_dicts():
    # 20 images, class 0 everywhere, class 1 in images 0-1 (f = 0.1), class 2 in image 2 (0.05)
    cats = [[0] for _ in range(20)]
    cats[0] += [1, 1]
    cats[1] += [1]
    cats[2] += [2]
    r = repeat_factors_from_dataset(_dataset(cats), 0.3, sqrt=True)
    expected = [math.sqrt(3.0)] * 2 + [math.sqrt(6.0)] + [1.0] * 17
    assert r.tolist() == pytest.approx(expected)
    r_lin = repeat_factors_from_dataset(_dataset(cats), 0.3, sqrt=False)
    assert r_lin.tolist() == pytest.approx([3.0, 3.0, 6.0] + [1.0] * 17)


def test_expected_draws_match_repeat_factors():
    cats = [[0] for _ in range(20)]
    cats[0] += [1]
    cats[1] += [1]
    cats[2] += [2]
    dataset = _dataset(cats)
    factors = repeat_factors_from_dataset(dataset, 0.3)
    sampler = build_train_sampler(_cfg(), dataset)
    epochs = 2000
    n = int(epochs * float(factors.sum()))
    counts = torch.bincount(torch.tensor(list(itertools.islice(iter(sampler), n))), minlength=20)
    expected = factors * epochs
    # per-image Bernoulli std over 2000 epochs is <= sqrt(0.25 * 2000) ~ 22 draws (< 1 %)
    assert torch.allclose(counts.double(), expected, rtol=0.03)
    # non-integer factors really are rounded stochastically (not always up or down)
    assert counts[2] not in (2 * epochs, 3 * epochs)


def test_rank_shards_of_one_stream(monkeypatch):
    dataset = _dataset([[0], [1], [0, 2], [0], [1], [0]] * 5)
    for name in ("TrainingSampler", "RepeatFactorTrainingSampler"):
        cfg = _cfg(name, threshold=0.5)
        full = list(itertools.islice(iter(build_train_sampler(cfg, dataset)), 200))
        assert full == list(itertools.islice(iter(build_train_sampler(cfg, dataset)), 200))
        shards = []
        for rank in (0, 1):
            monkeypatch.setattr(comm, "get_rank", lambda r=rank: r)
            monkeypatch.setattr(comm, "get_world_size", lambda: 2)
            shards.append(list(itertools.islice(iter(build_train_sampler(cfg, dataset)), 100)))
        assert [x for pair in zip(*shards) for x in pair] == full
        monkeypatch.undo()
        other = list(itertools.islice(iter(build_train_sampler(_cfg(name, 0.5, seed=8), dataset)), 200))
        assert other != full


def test_uniform_sampler_visits_every_image_once_per_epoch():
    dataset = _dataset([[0]] * 13)
    it = iter(build_train_sampler(_cfg("TrainingSampler"), dataset))
    for _ in range(3):
        assert sorted(next(it) for _ in range(13)) == list(range(13))


def test_unknown_sampler_lists_registered():
    with pytest.raises(KeyError) as e:
        build_train_sampler(_cfg("NoSuchSampler"), _dataset([[0]]))
    msg = str(e.value)
    assert "DATALOADER.SAMPLER_TRAIN" in msg and "NoSuchSampler" in msg
    for name, _ in SAMPLER_REGISTRY:
        assert name in msg


def test_bad_threshold_rejected():
    with pytest.raises(ValueError, match="REPEAT_THRESHOLD"):
        build_train_sampler(_cfg(threshold=0.0), _dataset([[0]]))
