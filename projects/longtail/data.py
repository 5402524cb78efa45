"""A training data stream that a resumed run continues exactly where the interrupted one was.

detectron2's training loader restarts its sampler on every start, and the random augmentations
(resize, flip) of its worker processes depend on when the loader was created, so ``--resume``
replays the first batches again with other augmentations. :class:`ResumableBatchStream` makes the
stream a pure function of (seed, rank, batch index):

* the project sampler (``DATALOADER.SAMPLER_TRAIN``; seeded, sharded over ranks) gives the
  index stream; batches are formed from it at the *index* level, with detectron2's aspect-ratio
  grouping rule (landscape / portrait buckets, a batch is yielded when a bucket is full), from
  the ``width``/``height`` of the dataset dicts;
* image ``j`` of batch ``k`` is mapped with numpy's and Python's random generators seeded by
  ``(seed, rank, k, j)`` (detectron2's augmentations draw from them), the generators' previous
  state being restored afterwards;
* :meth:`ResumableBatchStream.skip_to` starts the stream at batch ``k`` by replaying only the
  index stream (no image is read), so a run resumed at iteration ``k`` receives the batch ``k`` of
  the uninterrupted run;
* data-loader workers take every ``W``-th batch and PyTorch's loader returns them in order, so the
  number of workers does not change the stream.

Bad images: a missing or unreadable image file raises an error naming the file
(``LONGTAIL.SKIP_BAD_IMAGES False``, the default) or, with ``True``, is left out of its batch with
a logged warning.
"""
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["ResumableBatchStream", "aspect_ratio_batches", "item_seed", "build_resumable_loader"]

logger = logging.getLogger(__name__)


def item_seed(seed: int, rank: int, batch: int, position: int) -> int:
    """Seed of the augmentations of image ``position`` of batch ``batch`` on ``rank``."""
    key = (((seed * 1_000_003 + rank) * 1_000_033 + batch) * 1_009 + position)
    return key % (2**32 - 1)


def aspect_ratio_batches(
    indices: Iterator[int], landscape: Sequence[bool], batch_size: int, grouping: bool = True
) -> Iterator[List[int]]:
    """
    Batches of dataset indices: with ``grouping``, detectron2's ``AspectRatioGroupedDataset``
    rule (two buckets, width > height or not; a batch is the first full bucket); else consecutive
    chunks of the stream.
    """
    if not grouping:
        batch: List[int] = []
        for idx in indices:
            batch.append(idx)
            if len(batch) == batch_size:
                yield batch
                batch = []
        return
    buckets: List[List[int]] = [[], []]
    for idx in indices:
        bucket = buckets[0 if landscape[idx] else 1]
        bucket.append(idx)
        if len(bucket) == batch_size:
            yield list(bucket)
            del bucket[:]


class ResumableBatchStream(IterableDataset):
    """Iterable of mapped batches, deterministic per (seed, rank, batch); see module docstring."""

    def __init__(
        self,
        dataset_dicts: List[Dict],
        mapper: Callable,
        sampler: torch.utils.data.Sampler,
        batch_size: int,
        seed: int,
        aspect_ratio_grouping: bool = True,
        skip_bad_images: bool = False,
    ):
        self.landscape = np.array(
            [d.get("width", 1) > d.get("height", 1) for d in dataset_dicts], dtype=bool
        )
        self.dataset = DatasetFromList(dataset_dicts, copy=False, serialize=True)
        self.mapper = mapper
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed
        self.rank = comm.get_rank()
        self.grouping = aspect_ratio_grouping
        self.skip_bad_images = skip_bad_images
        self.start_batch = 0

    def skip_to(self, batch: int) -> None:
        """Start at batch ``batch`` of the stream (the iteration a resumed run starts from)."""
        self.start_batch = int(batch)

    def index_batches(self) -> Iterator[List[int]]:
        """The stream's batches of dataset indices, from batch 0."""
        return aspect_ratio_batches(iter(self.sampler), self.landscape, self.batch_size, self.grouping)

    def _map(self, index: int, batch: int, position: int) -> Optional[Dict]:
        np_state, py_state = np.random.get_state(), random.getstate()
        s = item_seed(self.seed, self.rank, batch, position)
        np.random.seed(s)
        random.seed(s)
        record = self.dataset[index]
        try:
            return self.mapper(record)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for unreadable files
            path = record.get("file_name", f"index {index}")
            if not self.skip_bad_images:
                msg = (
                    f"Cannot read training image {path}: {e}. Fix or remove the file, or set "
                    "LONGTAIL.SKIP_BAD_IMAGES True to leave unreadable images out of their batch."
                )
                try:
                    err = type(e)(msg)
                except Exception:  # an exception type with another constructor
                    err = RuntimeError(msg)
                raise err from e
            logger.warning("Skipping unreadable training image %s (%s)", path, e)
            return None
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for k, indices in enumerate(self.index_batches()):
            if k < self.start_batch or (k - self.start_batch) % workers != worker:
                continue
            mapped = [self._map(i, k, j) for j, i in enumerate(indices)]
            yield [m for m in mapped if m is not None]


def build_resumable_loader(
    dataset_dicts: List[Dict],
    mapper: Callable,
    sampler: torch.utils.data.Sampler,
    total_batch_size: int,
    seed: int,
    num_workers: int = 0,
    aspect_ratio_grouping: bool = True,
    skip_bad_images: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over a :class:`ResumableBatchStream` (``loader.dataset`` is the stream)."""
    world = comm.get_world_size()
    if total_batch_size <= 0 or total_batch_size % world != 0:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={total_batch_size} must be a positive multiple of the number "
            f"of processes ({world})."
        )
    stream = ResumableBatchStream(
        dataset_dicts, mapper, sampler, total_batch_size // world, seed,
        aspect_ratio_grouping, skip_bad_images,
    )
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=num_workers, collate_fn=_identity,
        # creating an iterator draws a base seed; from its own generator, not the global one the
        # model samples proposals with (a resumed run recreates the iterator after restoring it)
        generator=torch.Generator().manual_seed(seed),
    )


def _identity(batch):
    return batch
