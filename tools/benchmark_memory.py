#!/usr/bin/env python
"""
Cost of the object memory at LVIS v1 scale, measured side by side in one run, and its size.

Time: Mask R-CNN R50-FPN, 1203 classes, one emulated GPU of 2 images with 512 sampled RoIs each
(official capacities: RIO 60 per cached class, 553 cached classes; LOCE MFS 80 per class for all
1203 classes, 8 classes x 4 features per step), random images and boxes. For each memory policy
the training step is timed with the memory on, and the memory's own operations within those steps
(RIO: replay + push; MFS: jitter + RoIAlign of the jittered boxes + push + sampling) are timed by
wrapping them; their share of the step is the reported ratio (target <= 5 %). The step of the same
model without memory is timed in the same loop (variants interleaved step by step, medians).

Size: bytes of the preallocated memory per emulated GPU for each storage dtype, against the
official LOCE host memory (C x 80 x 256 x 7 x 7 float32 = 4.83 GB for LVIS v1), and the
round-off of each dtype on real RoIAlign features (relative L2 error).

    python tools/benchmark_memory.py [--size 512] [--reps 5] [--device cpu]

Writes the "Object memory: cost at LVIS scale" section of docs/benchmarks.md.
"""
import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

import torch
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from longtail.datasets import IMAGE_COUNT  # noqa: E402
from longtail.freeze import freeze_except  # noqa: E402
from longtail.memory import ObjectMemory, memory_bytes  # noqa: E402
from tools.benchmark_overhead import DATASET, LOCE_STAGE2, batch, make_cfg, register_metadata, sync  # noqa: E402
from tools.benchmarks_md import machine  # noqa: E402
from tools.benchmarks_md import replace_section  # noqa: E402


def register_image_counts(seed=0):
    """LVIS-v1-like image counts: 337 rare (1-10), 216 common with 11-30 and 189 with 31-100
    images, 461 frequent; RIO caches the 553 classes with <= 30 images."""
    register_metadata(seed)
    g = torch.Generator().manual_seed(seed + 1)
    ranges = [(1, 11, 337), (11, 31, 216), (31, 101, 189), (101, 5000, 461)]
    counts = []
    for lo, hi, n in ranges:
        counts += torch.randint(lo, hi, (n,), generator=g).tolist()
    meta = MetadataCatalog.get(DATASET)
    if meta.get(IMAGE_COUNT, None) is None:
        meta.set(**{IMAGE_COUNT: counts})


def variant_cfg(name, device):
    if name == "baseline (softmax CE)":
        return make_cfg("softmax_ce", (), True, device), ()
    if name == "RIO":
        cfg = make_cfg("softmax_ce", (), True, device)
        cfg.MODEL.LONGTAIL.CLS_LAYER = "cosine"
        cfg.MODEL.MEMORY.POLICY = "rio"
        cfg.MODEL.MEMORY.CAPACITY = 60
        return cfg, ()
    if name == "EBL, LOCE stage 2":
        return make_cfg("ebl", LOCE_STAGE2, True, device), LOCE_STAGE2
    if name == "EBL + MFS (float16), LOCE stage 2":
        cfg = make_cfg("ebl", LOCE_STAGE2, True, device)
        cfg.MODEL.MEMORY.POLICY = "mfs"
        cfg.MODEL.MEMORY.CAPACITY = 80
        cfg.MODEL.MEMORY.DTYPE = "float16"
        return cfg, LOCE_STAGE2
    raise KeyError(name)


class OpTimer:
    """Accumulates the wall time of wrapped methods (synchronising the device around them)."""

    def __init__(self, device):
        self.device = device
        self.total = defaultdict(float)
        self.active = False

    def wrap(self, obj, attr, key):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.total[key] += time.perf_counter() - t0
            return out

        setattr(obj, attr, timed)


def build(name, device):
    cfg, trainable = variant_cfg(name, device)
    cfg.SOLVER.IMS_PER_BATCH = 2
    torch.manual_seed(0)
    model = build_model(cfg)
    freeze_except(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the optimizer does the same arithmetic, but the weights stay at their random init, so
    # the interleaved steps time the same model and random-init training on random data (FrozenBN,
    # no pre-training) cannot diverge mid-benchmark
    return model, torch.optim.SGD(params, lr=0.0, momentum=0.9)


def prefill(model, data, steps=3):
    """Fill the memory with a few steps' worth of entries (as after the first iterations)."""
    with EventStorage(0):
        with torch.no_grad():
            for _ in range(steps):
                model(data)


def time_steps(variants, timers, data, reps, device):
    times = {k: [] for k in variants}
    op_share = {k: [] for k in variants}
    with EventStorage(0) as storage:
        for rep in range(reps + 1):  # first round = warm-up
            for name, (model, opt) in variants.items():
                model.train()
                timer = timers.get(name)
                if timer:
                    timer.total.clear()
                    timer.active = True
                sync(device)
                t0 = time.perf_counter()
                loss = sum(model(data).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sync(device)
                dt = time.perf_counter() - t0
                if timer:
                    timer.active = False
                if rep:
                    times[name].append(dt)
                    if timer:
                        op_share[name].append(dict(timer.total))
            storage.iter += 1
    med = {k: statistics.median(v) for k, v in times.items()}
    ops = {
        k: {op: statistics.median(d[op] for d in v) for op in v[0]} for k, v in op_share.items() if v
    }
    return med, ops


def roundoff(data, device):
    """Relative L2 error of each storage dtype on real RoIAlign features of the batch."""
    cfg, _ = variant_cfg("baseline (softmax CE)", device)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        images = model.preprocess_image(data)
        feats = model.backbone(images.tensor)
        heads = model.roi_heads
        boxes = [d["instances"].gt_boxes.to(device) for d in data]
        pooled = heads.box_pooler([feats[f] for f in heads.box_in_features], boxes)
    out = {}
    for dtype in ("float16", "bfloat16", "int8"):
        mem = ObjectMemory(1, [0], 1, pooled.shape[0], pooled.shape[1:], "first", dtype, "cpu")
        n = pooled.shape[0]
        zeros = torch.zeros(n, 4)
        mem.push(pooled.cpu(), torch.zeros(n, dtype=torch.long), torch.zeros(n), zeros, zeros)
        back = mem._read(torch.arange(n), torch.zeros(n, dtype=torch.long), "cpu").features
        x = pooled.cpu().reshape(n, -1)
        err = (back.reshape(n, -1) - x).norm(dim=1) / x.norm(dim=1).clamp(min=1e-12)
        out[dtype] = float(err.mean())
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    register_image_counts()
    data = batch(args.size, args.device)
    names = ["baseline (softmax CE)", "RIO", "EBL, LOCE stage 2", "EBL + MFS (float16), LOCE stage 2"]
    variants = {n: build(n, args.device) for n in names}
    timers = {}
    for name, (model, _) in variants.items():
        heads = model.roi_heads
        if heads.memory is None:
            continue
        timer = timers[name] = OpTimer(args.device)
        if heads.memory_policy.name == "rio":
            timer.wrap(heads.memory, "replay_recent", "replay")
            timer.wrap(heads.memory, "push", "push")
        else:
            timer.wrap(heads.memory_policy, "push", "jitter + pool + push")
            timer.wrap(heads.memory, "sample_classes", "sample")
        prefill(model, data)
    med, ops = time_steps(variants, timers, data, args.reps, args.device)
    rio_mem = variants["RIO"][0].roi_heads.memory
    mfs_mem = variants["EBL + MFS (float16), LOCE stage 2"][0].roi_heads.memory

    lines = [
        f"Machine: {machine()}. Command: `python tools/benchmark_memory.py --size {args.size} "
        f"--reps {args.reps} --device {args.device}`. Mask R-CNN R50-FPN, 1203 classes, one "
        f"emulated GPU of 2 images of {args.size} x {args.size} px with 512 RoIs each, random "
        f"init and data, memories pre-filled by 3 steps; medians of {args.reps} interleaved steps "
        "after one warm-up round.",
        "",
        "| variant | training step | ratio to its reference | memory operations in the step | "
        "share of the step (target <= 5 %) |",
        "|---|---|---|---|---|",
    ]
    refs = {"RIO": "baseline (softmax CE)",
            "EBL + MFS (float16), LOCE stage 2": "EBL, LOCE stage 2"}
    for name in names:
        ratio = f"{med[name] / med[refs[name]]:.3f} (vs {refs[name]})" if name in refs else "reference"
        if name in ops:
            op_text = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in ops[name].items())
            share = f"**{sum(ops[name].values()) / med[name] * 100:.2f} %**"
        else:
            op_text, share = "", ""
        lines.append(f"| {name} | {med[name]:.3f} s | {ratio} | {op_text} | {share} |")
        print(lines[-1], flush=True)

    official = 1203 * 80 * 256 * 7 * 7 * 4
    err = roundoff(data, args.device)
    lines += [
        "",
        "Memory per emulated GPU at LVIS v1 scale (preallocated: features, per-row boxes for the "
        "regression targets, pointers; measured `ObjectMemory.nbytes()` of the built memories "
        "where marked, else `longtail.memory.memory_bytes`), against the official LOCE memory "
        f"(1203 x 80 x 256 x 7 x 7 float32 = {official / 1e9:.2f} GB per GPU, host RAM). Round-off: "
        "mean relative L2 error of a stored RoIAlign feature (256 x 7 x 7) of this batch's gt boxes.",
        "",
        "| memory | dtype | bytes | ratio to official LOCE | round-off |",
        "|---|---|---|---|---|",
    ]
    for dtype in ("float32", "float16", "bfloat16", "int8"):
        size = memory_bytes(1, 1203, 80, 256 * 49, getattr(torch, dtype))
        measured = " (measured)" if dtype == "float16" and size == mfs_mem.nbytes() else ""
        lines.append(
            f"| LOCE MFS (1203 x 80) | {dtype} | {size / 1e9:.3f} GB{measured} | "
            f"{size / official:.3f} | {err.get(dtype, 0.0):.1e} |"
        )
    lines.append(
        f"| RIO (553 cached x 60) | float32 | {rio_mem.nbytes() / 1e6:.1f} MB (measured) | "
        f"{rio_mem.nbytes() / official:.4f} | 0 |"
    )
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"),
                        "Object memory: cost at LVIS scale", section)


if __name__ == "__main__":
    main()
