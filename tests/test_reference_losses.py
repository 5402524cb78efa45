"""The reference losses (Seesaw, EQLv2, sigmoid CE / federated loss) and the normalised linear
classifier: pure functions against closed forms computed here element by element (plain Python /
explicit loops, independent of the vectorised code), the specs' worked properties, state and its
resume, 2-process statistics (gloo), bfloat16."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

from longtail.cls_losses import LossBatch
from longtail.eqlv2 import (
    EQLv2Loss,
    eqlv2_gradient_stats,
    eqlv2_loss,
    eqlv2_probabilities,
    eqlv2_weights,
)
from longtail.fed_loss import (
    FederatedLoss,
    SigmoidCE,
    fed_loss_class_weights,
    federated_class_mask,
    sigmoid_ce_loss,
)
from longtail.layers import NormedLinear, normed_linear
from longtail.seesaw import (
    SeesawLoss,
    seesaw_log_factors,
    seesaw_loss,
    seesaw_probabilities,
    update_class_counts,
)


def _batch(labels, chunk=None, num_chunks=1, weights=None):
    chunk = torch.zeros_like(labels) if chunk is None else chunk
    return LossBatch(proposals=[], chunk=chunk, num_chunks=num_chunks, weights=weights)


# ------------------------------------------------------------------------------------------------
# Seesaw
# ------------------------------------------------------------------------------------------------
def _seesaw_reference(z, y, counts, p=0.8, q=2.0, eps=0.01):
    """Element-by-element Seesaw of one chunk (counts already updated): (L_cls, L_obj)."""
    r, k = z.shape
    c = k - 2
    total_cls, total_obj = 0.0, 0.0
    for i in range(r):
        row = [float(v) for v in z[i]]
        yi = int(y[i])
        obj = row[c:]
        target_obj = 1 if yi == c else 0
        m = max(obj)
        total_obj += -(obj[target_obj] - m - math.log(sum(math.exp(v - m) for v in obj)))
        if yi == c:
            continue
        cls = row[:c]
        mx = max(cls)
        sig = [math.exp(v - mx) for v in cls]
        s = sum(sig)
        sig = [v / s for v in sig]
        ny = max(float(counts[yi]), 1.0)
        adjusted = []
        for j in range(c):
            if j == yi:
                adjusted.append(cls[j])
                continue
            nj = max(float(counts[j]), 1.0)
            mit = (nj / ny) ** p if nj < ny else 1.0
            ratio = sig[j] / max(sig[yi], eps)
            comp = ratio ** q if ratio > 1 else 1.0
            adjusted.append(cls[j] + math.log(mit * comp))
        mx = max(adjusted)
        lse = mx + math.log(sum(math.exp(v - mx) for v in adjusted))
        total_cls += lse - adjusted[yi]
    return total_cls / max(r, 1), total_obj / max(r, 1)


def test_seesaw_matches_element_by_element_reference_over_a_stream():
    torch.manual_seed(0)
    c = 7
    counts = torch.zeros(1, c + 1)
    for step in range(4):
        y = torch.randint(0, c + 1, (20,))
        y[:3] = c  # background rows
        y[3:8] = 0  # a head class
        z = torch.randn(20, c + 2) * 3
        counts = update_class_counts(counts, y, torch.zeros_like(y))
        expected = torch.bincount(y, minlength=c + 1).float()
        if step == 0:
            assert torch.equal(counts[0], expected)
        lc, lo = seesaw_loss(z, y, counts, torch.zeros_like(y), 1)
        rc, ro = _seesaw_reference(z, y, counts[0])
        assert lc.item() == pytest.approx(rc, rel=1e-5)
        assert lo.item() == pytest.approx(ro, rel=1e-5)


def test_seesaw_order_counts_include_the_batch_itself():
    """N = 0 and a batch of only class 3: the mitigation uses the batch's own counts."""
    c = 5
    y = torch.full((4,), 3)
    counts = update_class_counts(torch.zeros(1, c + 1), y, torch.zeros_like(y))
    z = torch.zeros(4, c)
    log_s = seesaw_log_factors(z, y, counts[0, :c].expand(4, c), p=0.8, q=0.0)
    # other classes: max(0, 1) / 4 -> (1/4)^0.8
    assert torch.allclose(log_s[:, [0, 1, 2, 4]], torch.full((4, 4), 0.8 * math.log(0.25)))
    assert torch.all(log_s[:, 3] == 0)


def test_seesaw_mitigation_only_for_rarer_classes_and_zero_counts_clamped():
    counts = torch.tensor([[10.0, 0.0, 40.0, 10.0]])  # class 1 never seen
    y = torch.tensor([0])
    log_s = seesaw_log_factors(torch.zeros(1, 4), y, counts, p=0.8, q=0.0)
    assert log_s[0, 1].item() == pytest.approx(0.8 * math.log(1 / 10))  # max(N, 1)
    assert log_s[0, 2].item() == 0.0  # more frequent: factor 1
    assert log_s[0, 3].item() == 0.0  # equal: factor 1


def test_seesaw_compensation_one_below_true_score_and_eps_clamp():
    # true class 0 with score < 0.01: the ratio uses 0.01
    z = torch.tensor([[-10.0, 2.0, 0.0]])
    sig = F.softmax(z, dim=1)[0]
    assert sig[0] < 0.01
    log_s = seesaw_log_factors(z, torch.tensor([0]), torch.ones(1, 3), p=0.0, q=2.0)
    assert log_s[0, 1].item() == pytest.approx(2 * math.log(sig[1].item() / 0.01), rel=1e-5)
    assert log_s[0, 2].item() == pytest.approx(2 * math.log(sig[2].item() / 0.01), rel=1e-5)
    # a class scoring below the true class gets factor 1
    z = torch.tensor([[3.0, 2.0, -1.0]])
    log_s = seesaw_log_factors(z, torch.tensor([0]), torch.ones(1, 3), p=0.0, q=2.0)
    assert torch.all(log_s == 0)


def test_seesaw_p_q_zero_is_plain_softmax_on_foreground():
    torch.manual_seed(1)
    z = torch.randn(10, 6)
    y = torch.tensor([0, 1, 2, 3, 4, 4, 4, 0, 1, 2])
    counts = update_class_counts(torch.zeros(1, 5), y, torch.zeros_like(y))
    lc, lo = seesaw_loss(z, y, counts, torch.zeros_like(y), 1, p=0.0, q=0.0)
    fg = y < 4
    expected = F.cross_entropy(z[fg, :4], y[fg], reduction="sum") / 10
    assert lc.item() == pytest.approx(expected.item(), rel=1e-6)


def test_seesaw_normaliser_counts_background_rows():
    """Doubling the background rows halves the class term."""
    torch.manual_seed(2)
    c = 4
    z_fg = torch.randn(3, c + 2)
    z_bg = torch.randn(3, c + 2)
    y_fg = torch.tensor([0, 1, 2])
    y_bg = torch.full((3,), c)
    counts = torch.tensor([[5.0, 3.0, 1.0, 2.0, 50.0]])
    z1, y1 = torch.cat([z_fg, z_bg]), torch.cat([y_fg, y_bg])
    z2, y2 = torch.cat([z_fg, z_bg, z_bg, z_bg]), torch.cat([y_fg, y_bg, y_bg, y_bg])
    l1, _ = seesaw_loss(z1, y1, counts, torch.zeros_like(y1), 1)
    l2, _ = seesaw_loss(z2, y2, counts, torch.zeros_like(y2), 1)
    assert l2.item() == pytest.approx(l1.item() * 6 / 12, rel=1e-6)


def test_seesaw_gradient_is_softmax_of_adjusted_logits():
    torch.manual_seed(3)
    c = 5
    z = torch.randn(8, c + 2, requires_grad=True)
    y = torch.tensor([0, 1, 2, 5, 5, 3, 4, 0])
    counts = update_class_counts(torch.zeros(1, c + 1), y, torch.zeros_like(y))
    lc, lo = seesaw_loss(z, y, counts, torch.zeros_like(y), 1)
    (lc + lo).backward()
    log_s = seesaw_log_factors(z.detach()[:, :c], y.clamp(max=c - 1),
                               counts[0, :c].expand(8, c))
    fg = y < c
    expected = torch.zeros(8, c + 2)
    adj = F.softmax(z.detach()[:, :c] + log_s, dim=1)
    expected[fg, :c] = (adj - F.one_hot(y.clamp(max=c - 1), c).float())[fg] / 8
    obj_t = F.one_hot((y == c).long(), 2).float()
    expected[:, c:] = (F.softmax(z.detach()[:, c:], dim=1) - obj_t) / 8
    assert torch.allclose(z.grad, expected, atol=1e-6)


def test_seesaw_empty_foreground_and_empty_batch():
    z = torch.randn(3, 6, requires_grad=True)
    y = torch.full((3,), 4)
    counts = update_class_counts(torch.zeros(1, 5), y, torch.zeros_like(y))
    lc, lo = seesaw_loss(z, y, counts, torch.zeros_like(y), 1)
    assert lc.item() == 0.0 and lo.item() > 0
    (lc + lo).backward()  # graph-connected
    z0 = torch.zeros(0, 6, requires_grad=True)
    y0 = torch.zeros(0, dtype=torch.long)
    lc, lo = seesaw_loss(z0, y0, counts, y0, 1)
    assert lc.item() == 0.0 and lo.item() == 0.0


def test_seesaw_probabilities_rows_sum_to_one_and_background_is_objectness():
    torch.manual_seed(4)
    z = torch.randn(6, 9) * 4
    p = seesaw_probabilities(z)
    assert p.shape == (6, 8)
    assert torch.allclose(p.sum(1), torch.ones(6), atol=1e-6)
    obj = F.softmax(z[:, 7:], dim=1)
    assert torch.allclose(p[:, 7], obj[:, 1], atol=1e-7)
    assert torch.allclose(p[:, :7], F.softmax(z[:, :7], dim=1) * obj[:, :1], atol=1e-7)


def test_seesaw_counts_per_chunk_independent_and_process_state_round_trip():
    loss = SeesawLoss(num_classes=3, num_chunks=2)
    y = torch.tensor([0, 0, 1, 3, 2, 2])
    chunk = torch.tensor([0, 0, 0, 1, 1, 1])
    loss(torch.randn(6, 5), y, _batch(y, chunk, 2))
    assert loss.class_counts.tolist() == [[2, 1, 0, 0], [0, 0, 2, 1]]
    state = loss.process_state()
    other = SeesawLoss(num_classes=3, num_chunks=2)
    other.load_process_state(state)
    assert torch.equal(other.class_counts, loss.class_counts)
    assert "class_counts" not in loss.state_dict()  # per process, not rank 0's for everyone
    with pytest.raises(ValueError, match="IMS_PER_VGPU"):
        SeesawLoss(num_classes=3, num_chunks=3).load_process_state(state)


def test_seesaw_chunks_each_use_their_own_counts():
    """Two chunks in one call equal two separate single-chunk losses, averaged."""
    torch.manual_seed(5)
    c = 4
    z = torch.randn(10, c + 2)
    y = torch.tensor([0, 0, 0, 1, 4, 2, 3, 3, 4, 4])
    chunk = torch.tensor([0] * 5 + [1] * 5)
    counts = update_class_counts(torch.zeros(2, c + 1), y, chunk)
    lc, lo = seesaw_loss(z, y, counts, chunk, 2)
    parts = [seesaw_loss(z[k * 5:(k + 1) * 5], y[k * 5:(k + 1) * 5], counts[k:k + 1],
                         torch.zeros(5, dtype=torch.long), 1) for k in range(2)]
    assert lc.item() == pytest.approx((parts[0][0] + parts[1][0]).item() / 2, rel=1e-6)
    assert lo.item() == pytest.approx((parts[0][1] + parts[1][1]).item() / 2, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# NormedLinear
# ------------------------------------------------------------------------------------------------
def test_normed_linear_closed_form_invariances_and_zero_input():
    torch.manual_seed(6)
    layer = NormedLinear(5, 3, scale=20.0)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    x = torch.rand(4, 5)
    z = layer(x)
    w = layer.weight.detach()
    for i in range(4):
        for k in range(3):
            xn = math.sqrt(sum(float(v) ** 2 for v in x[i])) + 1e-6
            wn = math.sqrt(sum(float(v) ** 2 for v in w[k])) + 1e-6
            dot = sum(float(a) * float(b) for a, b in zip(x[i], w[k]))
            assert z[i, k].detach().item() == pytest.approx(20 * dot / (xn * wn) + float(layer.bias.detach()[k]),
                                                   rel=1e-5, abs=1e-5)
    assert torch.allclose(layer(3.0 * x), z, atol=1e-4)  # invariant to scaling x
    assert torch.equal(layer(torch.zeros(2, 5)), layer.bias.detach().expand(2, 3))
    scaled_w = normed_linear(x, w * torch.tensor([[2.0], [5.0], [10.0]]), layer.bias.detach(), 20.0)
    assert torch.allclose(scaled_w, z.detach(), atol=2e-3)  # and each W_k (eps ~1e-4 of |W_k|)
    assert abs(layer.weight.std().item() - 0.01) < 0.01 and torch.all(NormedLinear(5, 3).bias == 0)


# ------------------------------------------------------------------------------------------------
# EQLv2
# ------------------------------------------------------------------------------------------------
def _sigmoid(v):
    return 1 / (1 + math.exp(-v))


def _bce(z, t):
    return -(t * math.log(_sigmoid(z)) + (1 - t) * math.log(1 - _sigmoid(z)))


def test_eqlv2_first_call_is_plain_sigmoid_bce_over_all_columns():
    torch.manual_seed(7)
    z = torch.randn(6, 5)
    y = torch.tensor([0, 1, 4, 4, 3, 2])
    loss = EQLv2Loss(num_classes=4)
    out = loss(z, y, _batch(y))["loss_cls"]
    expected = sum(_bce(float(z[i, j]), float(j == y[i])) for i in range(6) for j in range(5)) / 6
    assert out.item() == pytest.approx(expected, rel=1e-5)


def test_eqlv2_weights_statistics_and_order_against_element_by_element_reference():
    torch.manual_seed(8)
    c = 4
    gamma, mu, alpha = 12.0, 0.8, 4.0
    loss = EQLv2Loss(num_classes=c, gamma=gamma, mu=mu, alpha=alpha)
    pos, neg = [0.0] * c, [0.0] * c
    ratio = [100.0] * c
    for step in range(3):
        z = torch.randn(7, c + 1) * 2
        y = torch.tensor([0, 0, 1, 4, 4, 2, 0]) if step != 1 else torch.tensor([0, 4, 4, 4, 0, 0, 4])
        # weights of this step from the statistics up to the previous one
        qs = [_sigmoid(gamma * (g - mu)) for g in ratio] + [1.0]
        rs = [1 + alpha * (1 - v) for v in qs]
        total = 0.0
        new_pos, new_neg = list(pos), list(neg)
        for i in range(7):
            for j in range(c + 1):
                t = float(j == y[i])
                w = rs[j] * t + qs[j] * (1 - t)
                total += w * _bce(float(z[i, j]), t)
                if j < c:
                    d = abs(_sigmoid(float(z[i, j])) - t) * w
                    if t:
                        new_pos[j] += d
                    else:
                        new_neg[j] += d
        out = loss(z, y, _batch(y))["loss_cls"]
        assert out.item() == pytest.approx(total / 7, rel=1e-5)
        pos, neg = new_pos, new_neg
        ratio = [p / (n + 1e-10) for p, n in zip(pos, neg)]
        assert loss.pos_grad.tolist() == pytest.approx(pos, rel=1e-5)
        assert loss.neg_grad.tolist() == pytest.approx(neg, rel=1e-5)
        assert loss.pos_neg.tolist() == pytest.approx(ratio, rel=1e-5)
    # class 3 has never been a positive: its negatives are suppressed to sigmoid(-9.6)
    w_pos, w_neg = eqlv2_weights(loss.pos_neg, gamma, mu, alpha)
    assert w_neg[3].item() == pytest.approx(_sigmoid(-gamma * mu), rel=1e-5)
    assert w_pos[3].item() == pytest.approx(1 + alpha * (1 - _sigmoid(-gamma * mu)), rel=1e-5)
    assert w_pos[c].item() == 1.0 and w_neg[c].item() == 1.0


def test_eqlv2_gradient_is_weighted_sigmoid_residual():
    torch.manual_seed(9)
    z = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1, 2, 3])
    pos_w, neg_w = eqlv2_weights(torch.tensor([0.1, 1.0, 3.0]))
    loss, w = eqlv2_loss(z, y, pos_w, neg_w)
    loss.backward()
    t = F.one_hot(y, 4).float()
    assert torch.allclose(z.grad, w * (torch.sigmoid(z.detach()) - t) / 5, atol=1e-7)
    stats = eqlv2_gradient_stats(z, y, w)
    assert torch.allclose(stats[0], ((torch.sigmoid(z.detach()) - t).abs() * w * t).sum(0)[:3])


def test_eqlv2_init_bias_and_inference():
    from torch import nn

    loss = EQLv2Loss(num_classes=3, prior_prob=0.001)
    layer = nn.Linear(4, 4)
    loss.init_classifier(layer)
    assert torch.allclose(layer.bias, torch.full((4,), -6.906755), atol=1e-5)
    z = torch.tensor([[0.0, 1.0, -1.0, 2.0]])
    p = eqlv2_probabilities(z)
    s = torch.sigmoid(z)
    assert torch.allclose(p[0, :3], s[0, :3] * (1 - s[0, 3]))
    assert p[0, 3] == s[0, 3]
    assert torch.equal(eqlv2_probabilities(z, test_with_obj=False), s)


def test_eqlv2_statistics_checkpointed_and_resume_exact():
    torch.manual_seed(10)
    batches = [(torch.randn(6, 4), torch.randint(0, 4, (6,))) for _ in range(4)]
    straight = EQLv2Loss(num_classes=3)
    outs = [straight(z, y, _batch(y))["loss_cls"] for z, y in batches]
    first = EQLv2Loss(num_classes=3)
    for z, y in batches[:3]:
        first(z, y, _batch(y))
    resumed = EQLv2Loss(num_classes=3)
    resumed.load_state_dict(first.state_dict())
    z, y = batches[3]
    assert torch.equal(resumed(z, y, _batch(y))["loss_cls"], outs[3])
    assert torch.equal(resumed.pos_neg, straight.pos_neg)


def _eqlv2_worker(rank, world, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.manual_seed(100 + rank)
    loss = EQLv2Loss(num_classes=5)
    results = []
    for _ in range(2):
        z = torch.randn(8, 6)
        y = torch.randint(0, 6, (8,))
        out = loss(z, y, _batch(y))["loss_cls"]
        results.append((z, y, out))
    torch.save({"batches": results, "pos": loss.pos_grad, "neg": loss.neg_grad},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eqlv2_statistics_all_reduced_over_two_processes(tmp_path):
    mp.spawn(_eqlv2_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(saved[0]["pos"], saved[1]["pos"])
    assert torch.equal(saved[0]["neg"], saved[1]["neg"])
    # replay in one process: the statistics after each step are the sum of both ranks' increments
    ratio = torch.full((5,), 100.0)
    pos = torch.zeros(5)
    neg = torch.zeros(5)
    for step in range(2):
        pos_w, neg_w = eqlv2_weights(ratio)
        for r in range(2):
            z, y, out = saved[r]["batches"][step]
            loss, w = eqlv2_loss(z, y, pos_w, neg_w)
            assert torch.allclose(loss, out, rtol=1e-6)  # each rank's own loss and normaliser
            inc = eqlv2_gradient_stats(z, y, w)
            pos, neg = pos + inc[0], neg + inc[1]
        ratio = pos / (neg + 1e-10)
    assert torch.allclose(saved[0]["pos"], pos, rtol=1e-5)
    assert torch.allclose(saved[0]["neg"], neg, rtol=1e-5)
    assert not torch.equal(saved[0]["batches"][0][2], saved[1]["batches"][0][2])


# ------------------------------------------------------------------------------------------------
# Sigmoid CE and federated loss
# ------------------------------------------------------------------------------------------------
def test_sigmoid_ce_sums_foreground_columns_over_rows_and_ignores_background_column():
    torch.manual_seed(11)
    z = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 3, 2, 1])
    out = sigmoid_ce_loss(z, y)
    expected = sum(_bce(float(z[i, j]), float(j == y[i])) for i in range(5) for j in range(3)) / 5
    assert out.item() == pytest.approx(expected, rel=1e-5)
    out.backward()
    assert torch.all(z.grad[:, 3] == 0)


def test_federated_set_contains_labels_and_k_minus_u_draws():
    c, k = 30, 8
    weights = torch.ones(c)
    y = torch.tensor([2, 2, 5, 30, 30, 7])  # U = {2, 5, 7, bg}
    g = torch.Generator().manual_seed(0)
    mask = federated_class_mask(y, torch.zeros_like(y), 1, weights, k, g)
    assert mask.shape == (1, c)
    assert mask[0, [2, 5, 7]].all()
    assert int(mask.sum()) == k - 1  # background counts in U: 7 foreground classes
    # all background: K - 1 sampled negatives; |U| >= K: nothing drawn
    y_bg = torch.full((4,), c)
    assert int(federated_class_mask(y_bg, torch.zeros_like(y_bg), 1, weights, k, g).sum()) == k - 1
    many = torch.arange(10)
    m = federated_class_mask(many, torch.zeros_like(many), 1, weights, k, g)
    assert m[0].nonzero().flatten().tolist() == list(range(10))


def test_federated_draw_distribution_matches_sequential_weighted_sampling():
    """Inclusion frequencies of the Gumbel-top-k draw equal those of torch.multinomial without
    replacement (the official draw), within 4 sigma, and zero-weight classes are never drawn."""
    c, k = 6, 3
    weights = torch.tensor([1.0, 2.0, 4.0, 8.0, 0.0, 16.0])
    y = torch.tensor([c])  # background only: K - 1 = 2 draws
    trials = 20000
    g = torch.Generator().manual_seed(1)
    ours = torch.zeros(c)
    for _ in range(trials // 500):
        labels = y.repeat(500)
        chunk = torch.arange(500)
        ours += federated_class_mask(labels, chunk, 500, weights, k, g).float().sum(0)
    ref = torch.zeros(c)
    torch.manual_seed(2)
    for _ in range(trials):
        ref[torch.multinomial(weights, k - 1, replacement=False)] += 1
    freq_o, freq_r = ours / trials, ref / trials
    sigma = (freq_r * (1 - freq_r) / trials).sqrt().clamp(min=1e-3)
    assert torch.all((freq_o - freq_r).abs() < 4 * sigma * math.sqrt(2))
    assert ours[4] == 0


def test_federated_loss_zero_outside_the_set_and_per_chunk_sets():
    torch.manual_seed(12)
    c = 10
    z = torch.randn(6, c + 1, requires_grad=True)
    y = torch.tensor([1, 10, 10, 4, 10, 4])
    chunk = torch.tensor([0, 0, 0, 1, 1, 1])
    mask = federated_class_mask(y, chunk, 2, torch.ones(c), 4, torch.Generator().manual_seed(3))
    assert mask[0, 1] and mask[1, 4] and int(mask[0].sum()) == 3 and int(mask[1].sum()) == 3
    out = sigmoid_ce_loss(z, y, mask, chunk, 2)
    out.backward()
    for i in range(6):
        row_mask = mask[chunk[i]]
        assert torch.all(z.grad[i, :c][~row_mask] == 0)
        assert torch.all(z.grad[i, :c][row_mask] != 0)
    assert torch.all(z.grad[:, c] == 0)
    expected = 0.0
    for k in range(2):
        rows = [i for i in range(6) if chunk[i] == k]
        expected += sum(_bce(float(z[i, j]), float(j == y[i])) for i in rows for j in range(c)
                        if mask[k, j]) / len(rows)
    assert out.item() == pytest.approx(expected / 2, rel=1e-5)


def test_federated_loss_module_weights_errors_and_resume_reproducible_draws():
    counts = [1, 4, 9, 16, 25]
    assert torch.allclose(fed_loss_class_weights(counts, 0.5), torch.tensor([1.0, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="FED_LOSS_NUM_CLASSES=50 exceeds the 5 classes"):
        FederatedLoss(5, counts, num_fed_classes=50)
    loss = FederatedLoss(5, counts, num_fed_classes=3)
    y = torch.tensor([0, 5, 5])
    z = torch.randn(3, 6)
    b = LossBatch([], torch.zeros_like(y), 1, seed=7, iteration=42)
    a1 = loss(z, y, b)["loss_cls"]
    a2 = FederatedLoss(5, counts, num_fed_classes=3)(z, y, b)["loss_cls"]
    assert torch.equal(a1, a2)  # draws depend on (seed, iteration, rank) only: resume-exact
    assert "fed_loss_cls_weights" in loss.state_dict()
    empty = torch.zeros(0, dtype=torch.long)
    assert loss(torch.zeros(0, 6), empty, LossBatch([], empty, 1))["loss_cls"].item() == 0.0


def test_sigmoid_prior_probability_bias():
    from torch import nn

    layer = nn.Linear(3, 5)
    torch.nn.init.zeros_(layer.bias)
    SigmoidCE(4).init_classifier(layer)
    assert torch.all(layer.bias == 0)  # detectron2's bias 0 by default
    SigmoidCE(4, prior_prob=0.01).init_classifier(layer)
    assert torch.allclose(layer.bias, torch.full((5,), -math.log(99.0)))


# ------------------------------------------------------------------------------------------------
# bfloat16
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["seesaw", "eqlv2", "fed_loss"])
def test_losses_under_bfloat16_autocast_are_finite_and_close_to_float32(name):
    torch.manual_seed(13)
    c = 8
    y = torch.tensor([0, 1, 8, 8, 3, 8, 2, 8])
    x = torch.randn(8, 16)
    lin = torch.nn.Linear(16, c + 2 if name == "seesaw" else c + 1)

    def make():
        if name == "seesaw":
            return SeesawLoss(c, 1)
        if name == "eqlv2":
            return EQLv2Loss(c)
        return FederatedLoss(c, [1, 2, 3, 4, 5, 6, 7, 8], num_fed_classes=5)

    ref = make()(lin(x), y, _batch(y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)
        assert z.dtype == torch.bfloat16
        out = make()(z, y, _batch(y))
    for key in ref:
        assert torch.isfinite(out[key]) and out[key].dtype == torch.float32
        assert out[key].item() == pytest.approx(ref[key].item(), rel=0.05, abs=0.02)
    sum(out.values()).backward()
    assert torch.isfinite(lin.weight.grad).all()


# ------------------------------------------------------------------------------------------------
# composition with the other methods (built and trained a few steps in process)
# ------------------------------------------------------------------------------------------------
def _mini_cfg(config, **extra):
    from detectron2.config import get_cfg

    from longtail import add_longtail_config

    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.DATASETS.TRAIN = ("longtail_synth_mini_train",)
    cfg.DATASETS.TEST = ()
    cfg.SOLVER.IMS_PER_BATCH = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.merge_from_list([str(x) for kv in extra.items() for x in kv])
    return cfg


@pytest.mark.parametrize("loss,layer", [("seesaw", "cosine"), ("seesaw", "normed_linear"),
                                        ("eqlv2", "linear"), ("fed_loss", "linear")])
def test_rio_replay_composes_with_the_reference_losses(loss, layer):
    """RIO's replayed features are ordinary rows of the new losses: a training step with replay
    gives finite losses with the memory rows in them, and Seesaw counts them."""
    from detectron2.utils.events import EventStorage

    from longtail import Trainer

    fed = {"MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": 16} if loss == "fed_loss" else {}
    cfg = _mini_cfg("configs/Synthetic/rio_R18_FPN.yaml", **{
        "MODEL.LONGTAIL.CLS_LOSS": loss, "MODEL.LONGTAIL.CLS_LAYER": layer,
        "MODEL.LONGTAIL.IMS_PER_VGPU": 2, **fed})
    model = Trainer.build_model(cfg)
    data = next(iter(Trainer.build_train_loader(cfg)))
    model.train()
    heads = model.roi_heads
    seen = []
    original = heads.box_predictor.losses

    def spy(predictions, proposals, memory_rows=None):
        seen.append((sum(len(p) for p in proposals), 0 if memory_rows is None else len(memory_rows)))
        return original(predictions, proposals, memory_rows)

    heads.box_predictor.losses = spy
    with EventStorage(0) as storage:
        for it in range(2):
            storage.iter = it
            losses = model(data)
            assert all(torch.isfinite(v) for v in losses.values())
    assert seen[1][1] > 0  # the second step replayed
    if loss == "seesaw":
        counted = heads.box_predictor.cls_loss.class_counts.sum().item()
        assert counted == sum(r + m for r, m in seen)


def test_reference_losses_refuse_what_cannot_take_effect():
    from detectron2.modeling import build_model

    from longtail.datasets import prepare_datasets

    prepare_datasets(["longtail_synth_mini_train"])
    with pytest.raises(ValueError, match="EQLV2.PRIOR_PROB 0.001 sets the classifier bias"):
        build_model(_mini_cfg("configs/Synthetic/eqlv2_R18_FPN.yaml",
                              **{"MODEL.LONGTAIL.CLS_LAYER": "cosine"}))
    with pytest.raises(ValueError, match="SIGMOID_PRIOR_PROB 0.01 sets the classifier bias"):
        build_model(_mini_cfg("configs/Synthetic/fed_loss_R18_FPN.yaml", **{
            "MODEL.LONGTAIL.CLS_LAYER": "cosine", "MODEL.LONGTAIL.SIGMOID_PRIOR_PROB": 0.01}))
    with pytest.raises(ValueError, match="FED_LOSS_NUM_CLASSES=50 exceeds the 48 classes"):
        build_model(_mini_cfg("configs/Synthetic/fed_loss_R18_FPN.yaml",
                              **{"MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": 50}))
    with pytest.raises(ValueError, match="ebl"):  # LOCE's MFS needs EBL's mean scores
        from longtail import Trainer

        Trainer.build_model(_mini_cfg("configs/Synthetic/loce_stage2_ebl_mfs.yaml", **{
            "MODEL.LONGTAIL.CLS_LOSS": "seesaw", "MODEL.WEIGHTS": ""}))


def test_seesaw_normed_mask_predictor_adds_eps_and_uses_kaiming_init():
    from longtail.mask_head import NormedConvMaskPredictor

    torch.manual_seed(14)
    pred = NormedConvMaskPredictor(8, 300, scale=20.0)
    # kaiming normal, fan-out of a 1x1 conv with 300 outputs: std sqrt(2 / 300)
    assert pred.weight.std().item() == pytest.approx(math.sqrt(2 / 300), rel=0.05)
    assert torch.all(pred.bias == 0)
    with torch.no_grad():
        pred.bias.uniform_(-1, 1)
    x = torch.rand(2, 8, 3, 3)
    out = pred(x)
    w = pred.weight.detach().flatten(1)
    for n, i, j, k in ((0, 0, 0, 5), (1, 2, 1, 299)):
        v = x[n, :, i, j]
        expected = 20 * float(v @ w[k]) / ((v.norm().item() + 1e-6) * (w[k].norm().item() + 1e-6))
        assert out[n, k, i, j].item() == pytest.approx(expected + pred.bias[k].item(), rel=1e-5)
    zero = pred(torch.zeros(1, 8, 2, 2))
    assert torch.equal(zero[0, :, 0, 0], pred.bias.detach())


def test_fed_loss_weights_from_the_lvis_v05_training_json():
    """LVIS v0.5 (1230 classes; upstream registers no image counts for it): the weights come
    from the training json's images, here the LVIS-shaped rehearsal json, counted in the test."""
    import json
    from collections import defaultdict

    from detectron2.data import MetadataCatalog

    from longtail import rehearsal
    from longtail.datasets import prepare_datasets

    root = rehearsal.default_root()
    rehearsal.ensure_rehearsal(root)
    name = "rehearsal_lvis_v0.5_train"
    prepare_datasets([name])
    with open(MetadataCatalog.get(name).json_file) as f:
        data = json.load(f)
    images = defaultdict(set)
    for a in data["annotations"]:
        images[a["category_id"]].add(a["image_id"])
    ids = sorted(c["id"] for c in data["categories"])
    expected = torch.tensor([float(len(images[i])) for i in ids]).sqrt()
    cfg = _mini_cfg("configs/LVISv0.5/fed_loss_mask_rcnn_R_50_FPN_1x_rfs.yaml",
                    **{"DATASETS.TRAIN": f"('{name}',)"})
    loss = FederatedLoss.from_config(cfg, 1230)
    assert loss.fed_loss_cls_weights.shape == (1230,)
    assert torch.allclose(loss.fed_loss_cls_weights, expected)


@pytest.mark.parametrize("config", ["configs/Synthetic/seesaw_R18_FPN.yaml",
                                    "configs/Synthetic/eqlv2_R18_FPN.yaml",
                                    "configs/Synthetic/fed_loss_R18_FPN.yaml"])
def test_model_training_steps_under_bfloat16_autocast(config):
    """Whole-model bfloat16 autocast steps (the AMP trainer): finite losses, float32 state."""
    import numpy as np
    from detectron2.utils.events import EventStorage

    from longtail import Trainer
    from longtail.engine import AutocastTrainer
    from longtail.state import install_nonfinite_guard

    cfg = _mini_cfg(config, **{"SOLVER.AMP.ENABLED": True})
    model = Trainer.build_model(cfg)
    opt = Trainer.build_optimizer(cfg, model)
    install_nonfinite_guard(model, opt)
    trainer = AutocastTrainer(model, Trainer.build_train_loader(cfg), opt)
    loss = model.roi_heads.box_predictor.cls_loss
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(3):
            storage.iter = trainer.iter = it
            trainer.run_step()
    latest = storage.latest()
    assert all(np.isfinite(latest[k][0]) for k in latest if k.startswith("loss"))
    for name, buf in loss.named_buffers():
        assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name
    if hasattr(loss, "class_counts"):
        assert loss.class_counts.sum() > 0
    if hasattr(loss, "pos_grad"):
        assert loss.neg_grad.sum() > 0
