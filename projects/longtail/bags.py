"""Balanced Group Softmax (BAGS; Li et al., CVPR 2020): group tables, loss and score merge.

Pure tensor functions; :class:`longtail.cls_losses.BalancedGroupSoftmax` wires them into the
box predictor.

Label convention (detectron2): foreground labels are ``0..C-1`` (LVIS category id - 1) and the
background label is ``C`` = ``num_classes``.

Groups and logit layout
-----------------------
Classes are binned by their number of *training instances* ``n`` with strict half-open bins over
``bin_edges = (e_0, ..., e_{B-1})``: bin 0 holds ``n < e_0``, bin ``b`` holds
``e_{b-1} <= n < e_b`` and the last bin ``n >= e_{B-1}`` (a class with ``n = 0`` is in bin 0).
**Empty bins are dropped**: every foreground group ``1..G`` is a non-empty bin, in increasing bin
order, so ``G`` can be smaller than ``len(bin_edges) + 1`` (e.g. a dataset without any class of
``>= 1000`` instances has ``G = 3`` with the default edges). A group without classes would only
hold "others", a one-way softmax whose loss and merged scores are constant.

Group 0 is the two-way {background, foreground} softmax (index 0 = background, 1 = foreground).
Foreground group ``g >= 1`` is ``{others} + classes``: index 0 = "others", indices ``1..n_g`` = its
classes in ascending class id. The raw classifier output of length ``L = C + 2 + G`` (``C + 6``
with four groups) is the concatenation of the group slices ``G0, G1, ..., GG``.

Vectorisation
-------------
All per-group computations are segment reductions over the ``[N, L]`` logits with the
``column_group [L]`` table (group of every logit column): a within-group log-softmax is
``x - lse[:, column_group]`` with the per-group log-sum-exp ``lse [N, G+1]`` built by
``scatter_reduce`` / ``index_add``, so no Python loop runs over RoIs, classes or groups in the loss,
the selection or the merge, and no padded copy of the logits is made.
"""
import dataclasses
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BagsTables",
    "build_group_tables",
    "map_group_labels",
    "select_others",
    "bags_loss",
    "bags_merge",
    "mmdet_v1_to_d2_labels",
    "d2_to_mmdet_v1_labels",
    "bags_classifier_init_",
]


@dataclasses.dataclass(frozen=True)
class BagsTables:
    """
    Lookup tables of a BAGS group layout; built by :func:`build_group_tables`.

    ``G`` = number of foreground groups, ``C`` = number of foreground classes,
    ``L = C + 2 + G`` = number of raw logits.

    Attributes:
        num_classes: C.
        num_groups: G (foreground groups; group 0 = bg/fg is not counted).
        num_logits: L = C + 2 + G.
        bin_edges: the bin edges the tables were built with.
        slices: [G+1, 2] long, (start, length) of each group's slice in the logit vector;
            contiguous, ``slices[0] = (0, 2)``, lengths ``n_g + 1`` for g >= 1.
        column_group: [L] long, group (0..G) of every logit column (non-decreasing).
        label_table: [G+1, C+1] long, ``t_g(y)``: ``t_0(y) = 0 if y == C else 1``; for g >= 1,
            ``t_g(y) = 1 + rank of y in G_g`` if ``y`` is in ``G_g``, else 0 ("others";
            background is 0 in every foreground group).
        class_group: [C] long, group ``g(k)`` in ``1..G`` of each foreground class.
        class_index: [C] long, in-group index ``j(k)`` in ``1..n_g`` of each foreground class.
        class_column: [C] long, column of class ``k`` in the logit vector
            (``slices[g(k), 0] + j(k)``).
        group_bins: [G] long, bin index (0..len(bin_edges)) each foreground group came from.
    """

    num_classes: int
    num_groups: int
    num_logits: int
    bin_edges: Tuple[float, ...]
    slices: torch.Tensor
    column_group: torch.Tensor
    label_table: torch.Tensor
    class_group: torch.Tensor
    class_index: torch.Tensor
    class_column: torch.Tensor
    group_bins: torch.Tensor

    def tensors(self) -> Dict[str, torch.Tensor]:
        """All tensor fields by name (the BAGS loss registers them as persistent buffers, so a
        checkpoint carries the groups its model was trained with)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }

    def to(self, device: Union[str, torch.device]) -> "BagsTables":
        """A copy with every tensor field on ``device``."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def device(self) -> torch.device:
        return self.label_table.device

    @property
    def group_sizes(self) -> torch.Tensor:
        """[G] long, number of classes ``n_g`` of each foreground group."""
        return self.slices[1:, 1] - 1


def _as_count_tensor(instance_counts) -> torch.Tensor:
    counts = torch.as_tensor(instance_counts)
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"instance_counts must be a non-empty 1-d sequence [C], got shape {tuple(counts.shape)}"
        )
    if counts.dtype == torch.bool or counts.is_complex():
        raise ValueError(f"instance_counts must be integers, got dtype {counts.dtype}")
    if counts.is_floating_point():
        if not torch.isfinite(counts).all() or (counts != counts.round()).any():
            raise ValueError("instance_counts must be integers (finite, no fractional part)")
    counts = counts.to(device="cpu", dtype=torch.int64)
    if (counts < 0).any():
        bad = torch.nonzero(counts < 0).flatten()[:5].tolist()
        raise ValueError(f"instance_counts must be >= 0; negative at classes {bad}")
    return counts


def _check_edges(bin_edges: Sequence[float]) -> Tuple[float, ...]:
    try:
        edges = tuple(float(e) for e in bin_edges)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bin_edges must be a sequence of numbers, got {bin_edges!r}") from e
    if any(not math.isfinite(e) or e <= 0 for e in edges):
        raise ValueError(f"bin_edges must be finite and > 0, got {tuple(bin_edges)}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin_edges must be strictly increasing, got {tuple(bin_edges)}")
    return edges


def build_group_tables(instance_counts, bin_edges: Sequence[float] = (10, 100, 1000)) -> BagsTables:
    """
    Build the BAGS group layout from per-class training instance counts.

    Args:
        instance_counts: [C] non-negative integers (list or tensor), number of training
            instances (annotations) of each foreground class ``0..C-1``.
        bin_edges: strictly increasing positive edges ``(e_0, ..., e_{B-1})``; bins are
            ``n < e_0``, ``e_{b-1} <= n < e_b``, ..., ``n >= e_{B-1}``. An empty tuple puts every
            class into one group.

    Returns:
        :class:`BagsTables` on the CPU. Empty bins are dropped, so ``num_groups`` = number of
        non-empty bins (<= ``len(bin_edges) + 1``) and ``num_logits = C + 2 + num_groups``.

    Raises:
        ValueError: on non-integer, negative or non-1-d counts, or bad edges.
    """
    counts = _as_count_tensor(instance_counts)
    edges = _check_edges(bin_edges)
    C = counts.numel()

    # bin of each class = number of edges it reaches (strict half-open bins).
    edge_t = torch.tensor(edges, dtype=torch.float64)
    bins = (counts.to(torch.float64)[:, None] >= edge_t[None, :]).sum(dim=1)
    group_bins = torch.unique(bins)  # sorted; only non-empty bins survive
    G = group_bins.numel()

    # group id 1..G of each class; in-group index by ascending class id.
    class_group = torch.searchsorted(group_bins, bins) + 1
    members = [torch.nonzero(class_group == g).flatten() for g in range(1, G + 1)]
    lengths = torch.tensor([2] + [m.numel() + 1 for m in members], dtype=torch.int64)
    starts = torch.cumsum(lengths, 0) - lengths
    slices = torch.stack([starts, lengths], dim=1)
    L = int(lengths.sum())
    assert L == C + 2 + G

    class_index = torch.empty(C, dtype=torch.int64)
    for m in members:
        class_index[m] = torch.arange(1, m.numel() + 1)
    class_column = starts[class_group] + class_index

    column_group = torch.repeat_interleave(torch.arange(G + 1), lengths)

    label_table = torch.zeros(G + 1, C + 1, dtype=torch.int64)
    label_table[0, :C] = 1
    label_table[class_group, torch.arange(C)] = class_index

    return BagsTables(
        num_classes=C,
        num_groups=G,
        num_logits=L,
        bin_edges=edges,
        slices=slices,
        column_group=column_group,
        label_table=label_table,
        class_group=class_group,
        class_index=class_index,
        class_column=class_column,
        group_bins=group_bins,
    )


def map_group_labels(labels: torch.Tensor, tables: BagsTables) -> torch.Tensor:
    """
    Args:
        labels: [R] long, detectron2 labels in ``0..C`` (background = C).

    Returns:
        [R, G+1] long, ``t_g(labels[r])`` for every group.
    """
    return tables.label_table.to(labels.device)[:, labels.long()].t()


def _check_chunks(chunk_index: Optional[torch.Tensor], num_chunks: int, R: int, device):
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if chunk_index is None:
        if num_chunks != 1:
            raise ValueError("num_chunks > 1 requires chunk_index")
        return torch.zeros(R, dtype=torch.int64, device=device)
    if chunk_index.shape != (R,):
        raise ValueError(f"chunk_index must have shape [{R}], got {tuple(chunk_index.shape)}")
    return chunk_index.to(device=device, dtype=torch.int64)


def select_others(
    group_labels: torch.Tensor,
    ratio: float,
    generator: Optional[torch.Generator] = None,
    chunk_index: Optional[torch.Tensor] = None,
    num_chunks: int = 1,
) -> torch.Tensor:
    """
    Draw the BAGS selection mask ``w``.

    Group 0 selects every row. For a foreground group ``g``, within each chunk:
    ``P`` = rows with ``t_g > 0``, ``O`` = rows with ``t_g = 0``; if ``|P| = 0`` nothing is
    selected; else with ``k = floor(ratio * |P|)``, all rows if ``k >= |O|``, otherwise ``P``
    plus a uniform random ``k``-subset of ``O`` (without replacement).

    The subset is drawn with one uniform key per (row, group) from ``torch.rand(...,
    generator=generator)``: the ``k`` others with the smallest keys in their (chunk, group) are
    kept, which is the same distribution as the first ``k`` of a random permutation.

    Args:
        group_labels: [R, G+1] long, ``t_g(y_r)`` (see :func:`map_group_labels`).
        ratio: others per positive (``OTHERS_SAMPLE_RATIO``, official 8.0), >= 0.
        generator: optional ``torch.Generator``; keys are drawn on its device and moved.
        chunk_index: optional [R] long in ``0..num_chunks-1``, the VGPU chunk of each row;
            everything above is then done independently per chunk.
        num_chunks: number of chunks.

    Returns:
        [R, G+1] bool selection mask ``w``.
    """
    if group_labels.dim() != 2:
        raise ValueError(f"group_labels must be [R, G+1], got {tuple(group_labels.shape)}")
    if not (math.isfinite(ratio) and ratio >= 0):
        raise ValueError(f"ratio must be finite and >= 0, got {ratio}")
    R, H = group_labels.shape
    device = group_labels.device
    chunk = _check_chunks(chunk_index, num_chunks, R, device)

    pos = group_labels[:, 1:] > 0  # [R, G]
    num_pos = torch.zeros(num_chunks, H - 1, dtype=torch.int64, device=device)
    num_pos.index_add_(0, chunk, pos.long())
    # index_add instead of bincount: no host read of the max (a sync on GPUs)
    rows_per_chunk = torch.zeros(num_chunks, dtype=torch.int64, device=device).index_add_(
        0, chunk, torch.ones_like(chunk)
    )  # [K]
    k = torch.floor(num_pos.double() * ratio).long()  # [K, G]

    key_device = generator.device if generator is not None else device
    keys = torch.rand(
        (R, H - 1), generator=generator, dtype=torch.float64, device=key_device
    ).to(device)
    # Sort every column by (chunk, positive-after-others, key): a sort by key followed by a
    # stable sort by the integer (chunk, is_pos) key.
    order = keys.argsort(dim=0)
    secondary = (chunk[:, None] * 2 + pos.long()).gather(0, order)
    order = order.gather(0, torch.sort(secondary, dim=0, stable=True).indices)
    position = torch.arange(R, device=device)[:, None].expand(R, H - 1)
    rank = torch.empty_like(order).scatter_(0, order, position)
    # others come first within their chunk's block, so this is the rank among the chunk's others.
    chunk_start = torch.cumsum(rows_per_chunk, 0) - rows_per_chunk
    other_rank = rank - chunk_start[chunk][:, None]

    fg_sel = pos | (other_rank < k[chunk])  # |P| = 0 -> k = 0 -> nothing selected
    return torch.cat([torch.ones(R, 1, dtype=torch.bool, device=device), fg_sel], dim=1)


def _group_log_normalizers(logits: torch.Tensor, tables: BagsTables):
    """
    Per-group log-sum-exp of the logits, as segment reductions over the logit columns.

    Returns ``(x, lse)``: ``x`` = [N, L] float32 logits and ``lse`` = [N, G+1] with
    ``lse[:, g] = log sum_{columns c of group g} exp(x[:, c])``, so that
    ``x[:, c] - lse[:, group(c)]`` is the within-group log-softmax. Works on the [N, L] logits
    directly (no padded copy), with no host synchronisation.
    """
    if logits.dim() != 2 or logits.shape[1] != tables.num_logits:
        raise ValueError(
            f"logits must be [N, {tables.num_logits}] (C + 2 + G), got {tuple(logits.shape)}"
        )
    H = tables.num_groups + 1
    x = logits.float()
    column_group = tables.column_group.to(logits.device)
    # per-group maximum for stability; it cancels in the log-softmax, so no gradient through it
    gmax = x.new_full((x.shape[0], H), float("-inf")).scatter_reduce(
        1, column_group.expand_as(x), x.detach(), reduce="amax"
    )
    gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    sums = x.new_zeros(x.shape[0], H).index_add_(1, column_group, torch.exp(x - gmax[:, column_group]))
    return x, gmax + sums.log(), column_group


def bags_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    tables: BagsTables,
    ratio: float = 8.0,
    generator: Optional[torch.Generator] = None,
    chunk_index: Optional[torch.Tensor] = None,
    num_chunks: int = 1,
    selection: Optional[torch.Tensor] = None,
    return_terms: bool = False,
):
    """
    BAGS classification loss (sum of group softmax cross-entropies).

    For each chunk and group: ``L_g = sum_r w_gr * CE_g(r) / max(sum_r w_gr, 1)`` where
    ``CE_g(r) = -log softmax(logits[r, slice_g])[t_g(y_r)]``. The chunk loss is ``sum_g L_g``
    and the result is the mean of the ``num_chunks`` chunk losses (a chunk without rows counts
    as 0). A group with no selected row contributes exactly 0 loss and 0 gradient. With one
    chunk, the gradient on a selected row's slice is ``(softmax - onehot) / sum_r w_gr``.
    Computed in float32 whatever the dtype of ``logits``.

    Args:
        logits: [R, L] raw group logits.
        labels: [R] long, detectron2 labels in ``0..C`` (background = C).
        tables: :class:`BagsTables`.
        ratio, generator, chunk_index, num_chunks: see :func:`select_others`.
        selection: optional [R, G+1] mask ``w`` (bool or 0/1) used instead of drawing one.
        return_terms: also return the per-group terms.

    Returns:
        scalar float32 loss; with ``return_terms`` a tuple ``(loss, terms)`` where ``terms`` is
        ``{"loss_cls_g0": ..., ..., "loss_cls_gG": ...}`` (each averaged over chunks, not
        detached; they sum to ``loss``).
    """
    R = logits.shape[0]
    if labels.shape != (R,):
        raise ValueError(f"labels must have shape [{R}], got {tuple(labels.shape)}")
    device = logits.device
    H = tables.num_groups + 1
    chunk = _check_chunks(chunk_index, num_chunks, R, device)
    targets = map_group_labels(labels.to(device), tables)  # [R, G+1]

    if selection is None:
        selection = select_others(targets, ratio, generator, chunk, num_chunks)
    elif selection.shape != (R, H):
        raise ValueError(f"selection must have shape [{R}, {H}], got {tuple(selection.shape)}")
    w = selection.to(device=device, dtype=torch.float32)

    x, lse, _ = _group_log_normalizers(logits, tables)  # [R, L], [R, G+1]
    target_col = tables.slices[:, 0].to(device)[None, :] + targets  # [R, G+1] logit columns
    nll = lse - x.gather(1, target_col)  # -log softmax within each group at its target
    # where() rather than a product: unselected rows get exactly zero gradient even if non-finite
    weighted = torch.where(w > 0, nll * w, torch.zeros_like(nll))

    if chunk_index is None:
        numer = weighted.sum(dim=0, keepdim=True)
        denom = w.sum(dim=0, keepdim=True)
    else:
        numer = weighted.new_zeros(num_chunks, H).index_add_(0, chunk, weighted)
        denom = w.new_zeros(num_chunks, H).index_add_(0, chunk, w)
    per_group = (numer / denom.clamp(min=1.0)).mean(dim=0)  # [G+1], mean over chunks
    loss = per_group.sum()
    if not return_terms:
        return loss
    terms = {f"loss_cls_g{g}": per_group[g] for g in range(H)}
    return loss, terms


def bags_merge(logits: torch.Tensor, tables: BagsTables) -> torch.Tensor:
    """
    Merge group logits into detectron2 class probabilities.

    ``p^g = softmax(logits[:, slice_g])``; ``s_k = p^{g(k)}_{j(k)} * p^0_1`` for foreground
    class ``k`` and ``s_C = p^0_0``. Each group's "others" probability is dropped and nothing is
    renormalised, so a row sums to a value in ``[p^0_0, p^0_0 + G * p^0_1]``.

    Args:
        logits: [N, L] raw group logits (N may be 0).

    Returns:
        [N, C+1] float32 scores, background last.
    """
    x, lse, column_group = _group_log_normalizers(logits, tables)
    p = torch.exp(x - lse[:, column_group])  # [N, L] probabilities within each group
    p0 = F.softmax(x[:, 0:2], dim=1)  # group 0 (background, foreground), exactly its softmax
    fg = p[:, tables.class_column.to(logits.device)] * p0[:, 1:2]  # p^{g(k)}_{j(k)} * p^0_1
    return torch.cat([fg, p0[:, 0:1]], dim=1)


def _check_label_range(labels: torch.Tensor, num_classes: int):
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}]")


def mmdet_v1_to_d2_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """mmdet v1 labels (0 = background, ``1..C`` = category id) -> detectron2 (``0..C-1``, bg C)."""
    _check_label_range(labels, num_classes)
    return torch.where(labels == 0, torch.full_like(labels, num_classes), labels - 1)


def d2_to_mmdet_v1_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """detectron2 labels (``0..C-1``, bg C) -> mmdet v1 (0 = background, ``1..C``)."""
    _check_label_range(labels, num_classes)
    return torch.where(labels == num_classes, torch.zeros_like(labels), labels + 1)


def bags_classifier_init_(linear: nn.Linear, std: float = 0.01) -> nn.Linear:
    """Re-initialise a (stage-2) group classifier in place: weight ~ N(0, std^2), bias 0."""
    nn.init.normal_(linear.weight, mean=0.0, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear
