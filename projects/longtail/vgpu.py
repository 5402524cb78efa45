"""Emulated GPUs ("VGPUs"): the one place that says which images and rows form a loss chunk.

The official LOCE, BAGS and RIO code runs 2, 2 and 4 images per GPU; statistics, normalisers and
random draws are per GPU. ``MODEL.LONGTAIL.IMS_PER_VGPU`` (``k``) reproduces that on any number of
processes: image ``i`` of a process batch of ``n`` images belongs to VGPU (chunk) ``i // k``;
``k = 0``, or ``n <= k``, makes the whole process batch one chunk. Every loss is normalised per
chunk and averaged over chunks; each object-memory bank serves one chunk; the repeat-factor and
class-balanced samplers fill a process batch VGPU by VGPU in this order.
"""
from typing import List

import torch

__all__ = ["num_chunks", "images_per_chunk", "chunk_of_images", "chunk_of_rows",
           "chunks_per_process"]


def num_chunks(num_images: int, ims_per_vgpu: int) -> int:
    """Number of chunks of a batch of ``num_images`` (1 when chunking is off or the batch is not
    larger than one VGPU)."""
    if ims_per_vgpu <= 0 or num_images <= ims_per_vgpu:
        return 1
    return (num_images + ims_per_vgpu - 1) // ims_per_vgpu


def images_per_chunk(num_images: int, ims_per_vgpu: int) -> int:
    """Images of every full chunk of a batch of ``num_images`` (``num_images`` for one chunk);
    at least 1."""
    per_chunk = ims_per_vgpu if num_chunks(num_images, ims_per_vgpu) > 1 else num_images
    return max(per_chunk, 1)


def chunk_of_images(image_index: torch.Tensor, num_images: int, ims_per_vgpu: int) -> torch.Tensor:
    """Chunk of each image index (any shape, long) in a batch of ``num_images``."""
    return image_index // images_per_chunk(num_images, ims_per_vgpu)


def chunk_of_rows(rows_per_image: List[int], ims_per_vgpu: int, device) -> torch.Tensor:
    """[R] chunk of every row when image ``i`` contributes ``rows_per_image[i]`` consecutive rows
    (the RoIs of a batch, image by image)."""
    per_chunk = images_per_chunk(len(rows_per_image), ims_per_vgpu)
    parts = [torch.full((n,), i // per_chunk, dtype=torch.long, device=device)
             for i, n in enumerate(rows_per_image)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=device)


def chunks_per_process(ims_per_batch: int, world_size: int, ims_per_vgpu: int) -> int:
    """Chunks of one process's batch (``SOLVER.IMS_PER_BATCH`` split over ``world_size``
    processes): the number of object-memory banks a process keeps."""
    return num_chunks(ims_per_batch // max(world_size, 1), ims_per_vgpu)
