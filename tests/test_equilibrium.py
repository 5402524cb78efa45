"""Tests of ``longtail.equilibrium``: EBL and the LOCE mean-score state (spec loce.md 2, 3, 11)."""
import io
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from longtail.equilibrium import (
    MeanScoreTracker,
    equilibrium_loss,
    global_instance_ids,
    instance_score_entries,
    memory_score_entries,
    update_mean_scores,
)

C_LVIS = 1203


def _random_ebl_inputs(seed=0, num_rows=512, num_classes=C_LVIS):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, num_classes + 1, generator=g, dtype=torch.float32) * 3.0
    labels = torch.randint(0, num_classes, (num_rows,), generator=g)
    labels[torch.rand(num_rows, generator=g) < 0.5] = num_classes  # half background
    lo, hi = math.log(1e-4), math.log(0.8)
    m = torch.exp(lo + (hi - lo) * torch.rand(num_classes + 1, generator=g))
    m[-1] = 0.01
    return logits, labels, m


# ----------------------------------------------------------------------------- EBL


def test_ebl_equals_shifted_cross_entropy():
    z, y, m = _random_ebl_inputs()
    loss = equilibrium_loss(z, y, m)
    ref = F.cross_entropy(z + m.log(), y, reduction="sum") / z.shape[0]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0.0)


def test_ebl_gradient_and_no_grad_to_m():
    z, y, m = _random_ebl_inputs(seed=1)
    z = z.clone().requires_grad_(True)
    m = m.clone().requires_grad_(True)
    equilibrium_loss(z, y, m).backward()
    p_tilde = m.detach() * z.detach().exp()
    p_tilde = p_tilde / p_tilde.sum(dim=1, keepdim=True)
    expected = (p_tilde - F.one_hot(y, z.shape[1]).float()) / z.shape[0]
    torch.testing.assert_close(z.grad, expected, rtol=0.0, atol=1e-7)
    assert m.grad is None


def test_ebl_uniform_m_is_plain_ce():
    z, y, _ = _random_ebl_inputs(seed=2)
    for value in (0.01, 0.3):
        m = torch.full((z.shape[1],), value)
        torch.testing.assert_close(
            equilibrium_loss(z, y, m), F.cross_entropy(z, y), rtol=1e-6, atol=1e-7
        )


def test_ebl_worked_example():
    z = torch.zeros(1, 3)
    y = torch.tensor([1])
    m = torch.tensor([0.5, 0.01, 0.01])
    assert equilibrium_loss(z, y, m).item() == pytest.approx(math.log(52.0), abs=1e-5)
    assert equilibrium_loss(z, y, m).item() == pytest.approx(3.95124, abs=1e-5)
    assert F.cross_entropy(z, y).item() == pytest.approx(math.log(3.0), abs=1e-6)


def test_ebl_chunks_mean_of_per_chunk_losses():
    z, y, m = _random_ebl_inputs(seed=3, num_rows=700, num_classes=50)
    sizes = [300, 400]  # chunks of unequal size: each normalised by its own row count
    chunk = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    perm = torch.randperm(700, generator=torch.Generator().manual_seed(0))
    z, y, chunk = z[perm], y[perm], chunk[perm]  # chunk ids need not be contiguous
    loss = equilibrium_loss(z, y, m, chunk_index=chunk, num_chunks=2)
    per_chunk = [equilibrium_loss(z[chunk == i], y[chunk == i], m) for i in range(2)]
    torch.testing.assert_close(loss, torch.stack(per_chunk).mean(), rtol=1e-6, atol=0.0)
    # An empty chunk contributes 0 to the mean (as a GPU without rows would).
    loss3 = equilibrium_loss(z, y, m, chunk_index=chunk, num_chunks=3)
    torch.testing.assert_close(loss3, torch.stack(per_chunk).sum() / 3, rtol=1e-6, atol=0.0)


def test_ebl_empty_batch_is_zero_with_grad():
    # an empty batch (no RoIs) still gives a loss that is part of the graph: backward runs and
    # the logits get a (0-row) gradient, and a head with rows of its own is unaffected
    z = torch.zeros(0, 5, requires_grad=True)
    loss = equilibrium_loss(z, torch.zeros(0, dtype=torch.long), torch.full((5,), 0.01))
    assert loss.requires_grad and loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and z.grad.shape == (0, 5)
    w = torch.ones(3, requires_grad=True)
    z2 = torch.zeros(0, 5, requires_grad=True)
    empty = equilibrium_loss(z2, torch.zeros(0, dtype=torch.long), torch.full((5,), 0.01))
    (empty + (w * 2).sum()).backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ebl_low_precision_logits(dtype):
    z, y, m = _random_ebl_inputs(seed=4)
    z_low = z.to(dtype).requires_grad_(True)
    loss = equilibrium_loss(z_low, y, m)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = equilibrium_loss(z_low.detach().float(), y, m)  # same rounded logits, fp32 path
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(loss, equilibrium_loss(z, y, m), rtol=2e-2, atol=0.0)
    loss.backward()
    assert z_low.grad.dtype == dtype and torch.isfinite(z_low.grad.float()).all()


# ----------------------------------------------------------------------------- mean-score update


def test_update_hand_example_and_background_reset():
    m = torch.full((4,), 0.01)  # C = 3
    m[3] = 0.7  # background gets reset whatever it held
    sums = torch.tensor([0.5 + 0.3, 0.0, 0.0, 0.0])
    counts = torch.tensor([2.0, 0.0, 0.0, 0.0])
    new = update_mean_scores(m, sums, counts, alpha=0.9, bg_score=0.01)
    assert new[0].item() == pytest.approx(0.0841, rel=1e-6)
    assert new[3].item() == pytest.approx(0.01, rel=1e-7)
    assert m[3].item() == pytest.approx(0.7)  # pure: input untouched
    assert new.dtype == torch.float32


def test_update_untouched_classes_bit_exact():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(101, generator=g)
    counts = torch.zeros(101)
    counts[[3, 17, 40]] = torch.tensor([1.0, 4.0, 2.0])
    sums = counts * 0.37
    new = update_mean_scores(m, sums, counts)
    untouched = torch.ones(101, dtype=torch.bool)
    untouched[[3, 17, 40, 100]] = False
    assert torch.equal(new[untouched], m[untouched])
    expected_17 = 0.9**4 * m[17].item() + (1 - 0.9**4) * 0.37
    assert new[17].item() == pytest.approx(expected_17, rel=1e-6)


def test_instance_with_three_positives_gives_one_entry():
    C = 4
    probs = torch.softmax(torch.randn(6, C + 1, generator=torch.Generator().manual_seed(0)), 1)
    labels = torch.tensor([2, 2, 2, C, C, 1])
    inst = torch.tensor([0, 0, 0, -1, -1, 1])
    sums, counts = instance_score_entries(probs, labels, inst, num_instances=2)
    assert counts.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    torch.testing.assert_close(sums[2], probs[:3, 2].mean())
    torch.testing.assert_close(sums[1], probs[5, 1])
    m = torch.full((C + 1,), 0.01)
    new = update_mean_scores(m, sums, counts)
    assert new[2].item() == pytest.approx(0.9 * 0.01 + 0.1 * probs[:3, 2].mean().item(), rel=1e-6)


def test_several_instances_of_one_class_count_separately():
    C = 3
    probs = torch.softmax(torch.randn(7, C + 1, generator=torch.Generator().manual_seed(1)), 1)
    labels = torch.tensor([0, 0, 0, 0, 0, C, 0])
    inst = torch.tensor([0, 0, 1, 2, 2, -1, 3])  # 4 instances of class 0; instance 4 unmatched
    sums, counts = instance_score_entries(probs, labels, inst, num_instances=5)
    assert counts.tolist() == [4.0, 0.0, 0.0, 0.0]
    entries = [probs[[0, 1], 0].mean(), probs[2, 0], probs[[3, 4], 0].mean(), probs[6, 0]]
    torch.testing.assert_close(sums[0], torch.stack(entries).sum())
    m = torch.full((C + 1,), 0.01)
    new = update_mean_scores(m, sums, counts)
    mean_entry = torch.stack(entries).mean().item()
    assert new[0].item() == pytest.approx(0.9**4 * 0.01 + (1 - 0.9**4) * mean_entry, rel=1e-6)


def test_memory_entries_one_per_distinct_class_and_chunk():
    C = 5
    probs = torch.softmax(torch.randn(8, C + 1, generator=torch.Generator().manual_seed(2)), 1)
    labels = torch.tensor([3, 3, 1, 3, 1, 1, 4, 3])  # duplicate draws of 3 and 1
    sums, counts = memory_score_entries(probs, labels)
    assert counts.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(sums[3], probs[[0, 1, 3, 7], 3].mean())
    torch.testing.assert_close(sums[1], probs[[2, 4, 5], 1].mean())
    torch.testing.assert_close(sums[4], probs[6, 4])
    # Two chunks: class 3 appears in both -> two entries; class 1 and 4 only in one chunk.
    chunk = torch.tensor([0, 0, 0, 1, 0, 0, 0, 1])
    sums2, counts2 = memory_score_entries(probs, labels, chunk, num_chunks=2)
    assert counts2.tolist() == [0.0, 1.0, 0.0, 2.0, 1.0, 0.0]
    torch.testing.assert_close(sums2[3], probs[[0, 1], 3].mean() + probs[[3, 7], 3].mean())


def test_true_per_image_offsets_300_and_512_rois():
    C = 10
    sizes = (300, 512)
    num_gt = (3, 2)
    g = torch.Generator().manual_seed(3)
    gt_classes = [torch.tensor([4, 7, 4]), torch.tensor([7, 9])]
    matched, labels = [], []
    for i, n in enumerate(sizes):
        mi = torch.randint(0, num_gt[i], (n,), generator=g)
        li = gt_classes[i][mi]
        bg = torch.rand(n, generator=g) < 0.75
        li = torch.where(bg, torch.full_like(li, C), li)
        matched.append(mi)
        labels.append(li)
    inst, n_inst = global_instance_ids(matched, labels, list(num_gt), C)
    assert n_inst == 5 and inst.shape == (812,)
    probs = torch.softmax(torch.randn(812, C + 1, generator=g), 1)
    y = torch.cat(labels)
    sums, counts = instance_score_entries(probs, y, inst, n_inst)

    # Naive reference, reading image i's rows at its true cumulative offset.
    ref_sums, ref_counts = torch.zeros(C + 1), torch.zeros(C + 1)
    start = 0
    for i, n in enumerate(sizes):
        for j in range(num_gt[i]):
            rows = [start + r for r in range(n) if labels[i][r] < C and matched[i][r] == j]
            if rows:
                c = int(gt_classes[i][j])
                ref_sums[c] += probs[rows, c].mean()
                ref_counts[c] += 1
        start += n
    torch.testing.assert_close(sums, ref_sums)
    assert torch.equal(counts, ref_counts)
    assert counts[7].item() == 2 and counts[4].item() == 2 and counts[9].item() == 1

    # The official stride 512*i would read image 1's rows from row 512 on (r -> 512 + r, only
    # r < 300 exist): a different value from the rows at its true offset 300.
    wrong_start = 512
    wrong_rows = [wrong_start + r for r in range(300) if labels[1][r] < C and matched[1][r] == 1]
    right_rows = [300 + r for r in range(512) if labels[1][r] < C and matched[1][r] == 1]
    assert not torch.allclose(probs[wrong_rows, 9].mean(), probs[right_rows, 9].mean())
    assert torch.allclose(sums[9], probs[right_rows, 9].mean())


# ----------------------------------------------------------------------------- tracker


def test_tracker_buffer_update_and_checkpoint():
    tracker = MeanScoreTracker(num_classes=6)
    assert tracker.mean_scores.dtype == torch.float32
    assert torch.equal(tracker.mean_scores, torch.full((7,), 0.01))
    assert "mean_scores" in tracker.state_dict()
    sums = torch.tensor([0.8, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0])
    counts = torch.tensor([2.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    before = tracker.mean_scores
    tracker.update(sums, counts)
    assert tracker.mean_scores is before  # in place
    assert tracker.mean_scores[0].item() == pytest.approx(0.0841, rel=1e-6)
    assert tracker.mean_scores[6].item() == pytest.approx(0.01)

    buf = io.BytesIO()
    torch.save(tracker.state_dict(), buf)
    buf.seek(0)
    restored = MeanScoreTracker(num_classes=6)
    restored.load_state_dict(torch.load(buf))
    assert torch.equal(restored.mean_scores, tracker.mean_scores)
    assert list(restored.state_dict().keys()) == ["mean_scores"]


def test_tracker_group_means():
    freq = ["r", "f", "c", "r", "f"]
    tracker = MeanScoreTracker(num_classes=5)
    tracker.mean_scores.copy_(torch.tensor([0.1, 0.5, 0.3, 0.2, 0.7, 0.01]))
    means = tracker.group_means(freq)
    assert set(means) == {"r", "c", "f"}
    assert means["r"].item() == pytest.approx(0.15)
    assert means["c"].item() == pytest.approx(0.3)
    assert means["f"].item() == pytest.approx(0.6)
    assert tracker.group_means()["f"].item() == pytest.approx(0.6)  # cached groups
    assert "_group_matrix" not in tracker.state_dict()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_stats(rank, num_classes):
    g = torch.Generator().manual_seed(100 + rank)
    n = 40
    probs = torch.softmax(torch.randn(n, num_classes + 1, generator=g), 1)
    inst = torch.randint(0, 6, (n,), generator=g)
    inst_cls = torch.randint(0, num_classes, (6,), generator=g)
    labels = inst_cls[inst]
    bg = torch.rand(n, generator=g) < 0.5
    labels = torch.where(bg, torch.full_like(labels, num_classes), labels)
    inst = torch.where(bg, torch.full_like(inst, -1), inst)
    return instance_score_entries(probs, labels, inst, 6)


def _dist_worker(rank, world, port, out_dir, num_classes):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        tracker = MeanScoreTracker(num_classes)
        for _ in range(2):  # two steps: the identical update must hold step after step
            tracker.update(*_batch_stats(rank, num_classes))
        torch.save(tracker.mean_scores, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_tracker_distributed_update_matches_union(tmp_path):
    num_classes = 8
    port = _free_port()
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path), num_classes), nprocs=2, join=True)
    m0 = torch.load(tmp_path / "rank0.pt")
    m1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(m0, m1)

    single = MeanScoreTracker(num_classes)
    for _ in range(2):
        s0, n0 = _batch_stats(0, num_classes)
        s1, n1 = _batch_stats(1, num_classes)
        single.update(s0 + s1, n0 + n1)
    torch.testing.assert_close(m0, single.mean_scores, rtol=1e-6, atol=0.0)
    assert not torch.equal(m0, torch.full_like(m0, 0.01))
