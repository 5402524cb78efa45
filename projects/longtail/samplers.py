"""Training samplers, selected by ``DATALOADER.SAMPLER_TRAIN`` from :data:`SAMPLER_REGISTRY`.

The repeat-factor math of the LVIS paper (Gupta et al., 2019, Sec. 4.1) lives in pure tensor
functions; the index streams come from detectron2's own samplers, which already implement the
per-epoch stochastic rounding, the shuffling and the sharding over ranks:

* the full index stream depends only on the seed, and rank ``r`` of ``W`` takes the elements
  ``r, r + W, r + 2W, ...`` of it, so for a given seed every rank sees a shard of the same stream;
* ``cfg.SEED >= 0`` seeds the stream; ``cfg.SEED < 0`` draws one seed that all ranks share
  (detectron2's ``shared_random_seed``).
"""
import logging
from typing import Dict, List, Sequence

import torch
from detectron2.data import samplers as d2_samplers
from detectron2.utils.registry import Registry

__all__ = [
    "SAMPLER_REGISTRY",
    "build_train_sampler",
    "category_repeat_factors",
    "image_repeat_factors",
    "repeat_factors_from_dataset",
]

logger = logging.getLogger(__name__)

SAMPLER_REGISTRY = Registry("LONGTAIL_SAMPLER")
SAMPLER_REGISTRY.__doc__ = """
Registry of training samplers. A registered object is called as ``obj(cfg, dataset_dicts)`` and
returns a ``torch.utils.data.Sampler`` yielding an infinite stream of indices into
``dataset_dicts`` (this process's shard of it).
"""


def category_repeat_factors(
    image_count: torch.Tensor, num_images: int, threshold: float, sqrt: bool = True
) -> torch.Tensor:
    """
    Per-category repeat factors of repeat-factor sampling.

    Args:
        image_count: [C] number of training images that contain each category.
        num_images: number of training images N (the denominator of the frequency f(c)).
        threshold: t; categories with f(c) = image_count / N below t are repeated.
        sqrt: r(c) = max(1, sqrt(t / f(c))) when True (LVIS), max(1, t / f(c)) when False.

    Returns:
        [C] float64 tensor r(c) >= 1; categories in no image get 1.
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    if threshold <= 0:
        raise ValueError(f"DATALOADER.REPEAT_THRESHOLD must be positive, got {threshold}")
    freq = image_count.to(torch.float64) / num_images
    ratio = threshold / freq.clamp(min=torch.finfo(torch.float64).tiny)
    factor = ratio.sqrt() if sqrt else ratio
    factor = factor.clamp(min=1.0)
    return torch.where(image_count > 0, factor, torch.ones_like(factor))


def image_repeat_factors(
    category_factors: torch.Tensor,
    image_index: torch.Tensor,
    category_index: torch.Tensor,
    num_images: int,
) -> torch.Tensor:
    """
    Image repeat factors r(I) = max over the categories c present in I of r(c); 1 for images
    without annotations.

    Args:
        category_factors: [C] r(c).
        image_index, category_index: [K] int64, the (image, category) pairs present (duplicates
            allowed).
        num_images: N.

    Returns:
        [N] float64 tensor.
    """
    out = torch.ones(num_images, dtype=torch.float64)
    return out.scatter_reduce(
        0, image_index, category_factors.to(torch.float64)[category_index], reduce="amax"
    )


def _image_category_pairs(dataset_dicts: Sequence[Dict]):
    image_index: List[int] = []
    category_index: List[int] = []
    for i, record in enumerate(dataset_dicts):
        cats = {ann["category_id"] for ann in record.get("annotations", [])}
        image_index.extend([i] * len(cats))
        category_index.extend(cats)
    return (
        torch.tensor(image_index, dtype=torch.int64),
        torch.tensor(category_index, dtype=torch.int64),
    )


def repeat_factors_from_dataset(
    dataset_dicts: Sequence[Dict], threshold: float, sqrt: bool = True
) -> torch.Tensor:
    """
    Image repeat factors [N] for detectron2 dataset dicts (contiguous ``category_id``), with
    f(c) = fraction of these images that contain c.
    """
    image_index, category_index = _image_category_pairs(dataset_dicts)
    num_images = len(dataset_dicts)
    num_categories = int(category_index.max()) + 1 if category_index.numel() else 0
    image_count = torch.bincount(category_index, minlength=num_categories)
    cat_factors = category_repeat_factors(image_count, num_images, threshold, sqrt)
    return image_repeat_factors(cat_factors, image_index, category_index, num_images)


def _seed(cfg):
    return cfg.SEED if cfg.SEED >= 0 else None


@SAMPLER_REGISTRY.register()
def TrainingSampler(cfg, dataset_dicts):
    """Uniform sampling: every image once per epoch, shuffled (detectron2's TrainingSampler)."""
    return d2_samplers.TrainingSampler(len(dataset_dicts), seed=_seed(cfg))


@SAMPLER_REGISTRY.register()
def RepeatFactorTrainingSampler(cfg, dataset_dicts):
    """
    Repeat-factor sampling (LVIS): image I appears floor(r(I)) + Bernoulli(frac(r(I))) times per
    epoch, with threshold ``DATALOADER.REPEAT_THRESHOLD`` and ``DATALOADER.REPEAT_SQRT``.
    """
    factors = repeat_factors_from_dataset(
        dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT
    )
    logger.info(
        "Repeat-factor sampling: t=%g sqrt=%s, %d of %d images repeated, %.1f draws per epoch",
        cfg.DATALOADER.REPEAT_THRESHOLD,
        cfg.DATALOADER.REPEAT_SQRT,
        int((factors > 1).sum()),
        len(factors),
        float(factors.sum()),
    )
    return d2_samplers.RepeatFactorTrainingSampler(factors.float(), seed=_seed(cfg))


def registered_samplers() -> List[str]:
    return sorted(name for name, _ in SAMPLER_REGISTRY)


def build_train_sampler(cfg, dataset_dicts):
    """Build the sampler named by ``cfg.DATALOADER.SAMPLER_TRAIN`` for ``dataset_dicts``."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in SAMPLER_REGISTRY:
        raise KeyError(
            f"DATALOADER.SAMPLER_TRAIN={name!r} is not a registered training sampler. "
            f"Registered: {', '.join(registered_samplers())}. "
            "Add one with @longtail.samplers.SAMPLER_REGISTRY.register()."
        )
    logger.info("Using training sampler %s", name)
    return SAMPLER_REGISTRY.get(name)(cfg, dataset_dicts)
