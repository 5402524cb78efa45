#!/usr/bin/env python
"""
Step-time overhead of the long-tail classification losses (EBL, BAGS, Seesaw, EQLv2, sigmoid CE,
federated loss) over plain softmax CE, and inference overhead of the BAGS merge and of NorCal, measured side by side in one run (variants interleaved step by step,
median of the repetitions), at LVIS v1 scale: R50-FPN, 1203 classes, 2 images per step, 512 RoIs
per image, random images and boxes (the cost does not depend on the pixels). Class counts are
LVIS-v1-like (337 / 461 / 405 rare / common / frequent classes with instance counts drawn per
bucket). Writes the "Overhead of the long-tail losses" section of docs/benchmarks.md.

    python tools/benchmark_overhead.py [--size 512] [--reps 5] [--device cpu]
"""
import argparse
import os
import statistics
import sys
import time

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from longtail import add_longtail_config  # noqa: E402
from longtail.datasets import FREQUENCY, IMAGE_COUNT, INSTANCE_COUNT  # noqa: E402
from longtail.freeze import freeze_except  # noqa: E402
from tools.benchmarks_md import machine  # noqa: E402
from tools.benchmarks_md import replace_section  # noqa: E402

DATASET = "longtail_bench_lvis_v1_like"
LOCE_STAGE2 = ["proposal_generator.", "roi_heads.box_predictor.", "roi_heads.mask_head."]
BAGS_STAGE2 = ["roi_heads.box_predictor.cls_score."]


def register_metadata(seed=0):
    g = torch.Generator().manual_seed(seed)
    freq = ["r"] * 337 + ["c"] * 461 + ["f"] * 405
    lo = {"r": 1, "c": 11, "f": 101}
    hi = {"r": 30, "c": 600, "f": 50000}
    counts = [int(torch.randint(lo[f], hi[f], (1,), generator=g)) for f in freq]
    meta = MetadataCatalog.get(DATASET)
    if meta.get(INSTANCE_COUNT, None) is None:
        images = [max(1, c // 3) for c in counts]  # image counts for the fed loss and NorCal
        meta.set(**{FREQUENCY: freq, INSTANCE_COUNT: counts, IMAGE_COUNT: images},
                 evaluator_type="lvis")


# classifier layer of a variant (the official one where it is not detectron2's linear layer)
LAYERS = {"seesaw": "normed_linear"}
# variant name -> (loss, calibration gamma)
VARIANTS = {"norcal": ("softmax_ce", 0.5)}


def make_cfg(cls_loss, trainable, mask_on, device):
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-LongTail-RCNN-FPN.yaml"))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.MASK_ON = mask_on
    cfg.MODEL.ROI_HEADS.NAME = "LongTailROIHeads"
    cfg.MODEL.LONGTAIL.CLS_LOSS, gamma = VARIANTS.get(cls_loss, (cls_loss, 0.0))
    cfg.TEST.CALIBRATION.GAMMA = gamma
    cfg.MODEL.LONGTAIL.CLS_LAYER = LAYERS.get(cls_loss, "linear")
    cfg.MODEL.LONGTAIL.IMS_PER_VGPU = 2
    cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES = list(trainable)
    cfg.DATASETS.TRAIN = (DATASET,)
    return cfg


def make_model(cls_loss, trainable, mask_on, device):
    torch.manual_seed(0)
    model = build_model(make_cfg(cls_loss, trainable, mask_on, device))
    freeze_except(model, trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    # lr 0: the optimizer does the same arithmetic, but the weights stay at their random init, so
    # the interleaved steps time the same model and random-init training on random data (FrozenBN,
    # no pre-training) cannot diverge mid-benchmark
    return model, torch.optim.SGD(params, lr=0.0, momentum=0.9)


def batch(size, device, n_img=2, n_gt=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_img):
        xy = torch.rand(n_gt, 2, generator=g) * (size - 80)
        wh = 16 + torch.rand(n_gt, 2, generator=g) * 64
        boxes = torch.cat([xy, xy + wh], 1)
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, 1203, (n_gt,), generator=g)
        inst.gt_masks = PolygonMasks(
            [[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes.tolist()])
        img = torch.randint(0, 256, (3, size, size), generator=g).float()
        out.append({"image": img.to(device), "instances": inst.to(device), "height": size,
                    "width": size})
    return out


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_train_steps(variants, data, reps, device):
    times = {k: [] for k in variants}
    with EventStorage(0) as storage:
        for rep in range(reps + 1):  # first round = warm-up
            for name, (model, opt) in variants.items():
                model.train()
                sync(device)
                t0 = time.perf_counter()
                loss = sum(model(data).values())
                opt.zero_grad()
                loss.backward()
                opt.step()
                sync(device)
                if rep:
                    times[name].append(time.perf_counter() - t0)
            storage.iter += 1
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def time_inference(models, data, reps, device, num_proposals=1000):
    """
    Median full inference time of the plain model on one image, and median ``predict_probs``
    time (softmax vs BAGS merge) on the same box-head features of ``num_proposals`` RoIs: a
    random-init detector passes ~all 1203 x 1000 candidates to NMS, so the end-to-end time of two
    random models measures their untrained score distributions, not the merge. The full pass is
    timed without post-processing (score threshold 1), which makes the reported ratio an upper
    bound.
    """
    plain = models["softmax_ce"]
    plain.eval()
    # No candidate survives a threshold of 1: the full pass then excludes NMS/post-processing,
    # the smallest denominator, so the ratio below is an upper bound of the merge's overhead.
    plain.roi_heads.box_predictor.test_score_thresh = 1.0
    inputs = [{"image": d["image"], "height": d["height"], "width": d["width"]} for d in data[:1]]
    feats = torch.randn(num_proposals, plain.roi_heads.box_predictor.cls_score.in_features,
                        device=device).relu()
    props = Instances((data[0]["height"], data[0]["width"]))
    props.proposal_boxes = Boxes(torch.tensor([[10.0, 10, 60, 60]], device=device).repeat(
        num_proposals, 1))
    full, probs = [], {k: [] for k in models}
    for rep in range(reps + 1):
        sync(device)
        t0 = time.perf_counter()
        plain(inputs)
        sync(device)
        if rep:
            full.append(time.perf_counter() - t0)
        for name, model in models.items():
            pred = model.roi_heads.box_predictor
            predictions = pred(feats)
            sync(device)
            t0 = time.perf_counter()
            pred.predict_probs(predictions, [props])
            sync(device)
            if rep:
                probs[name].append(time.perf_counter() - t0)
    return statistics.median(full), {k: statistics.median(v) for k, v in probs.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    register_metadata()
    data = batch(args.size, args.device)
    lines = [
        f"Machine: {machine()}. Command: `python tools/benchmark_overhead.py --size {args.size} "
        f"--reps {args.reps} --device {args.device}`. Median of {args.reps} interleaved steps "
        f"per variant after one warm-up round; Mask R-CNN R50-FPN, 1203 classes, 2 images of "
        f"{args.size} x {args.size} px, 512 RoIs per image, 2 images per VGPU, random init.",
        "",
        "| setting | variant | time | ratio to softmax CE | target |",
        "|---|---|---|---|---|",
    ]
    settings = [
        ("training step, all parameters trainable", (),
         ("softmax_ce", "ebl", "bags", "seesaw", "eqlv2", "sigmoid_ce", "fed_loss")),
        ("training step, LOCE stage-2 trainable set", LOCE_STAGE2, ("softmax_ce", "ebl")),
        ("training step, BAGS stage-2 trainable set (classifier only)", BAGS_STAGE2,
         ("softmax_ce", "bags")),
    ]
    targets = {"ebl": "<= 1.03", "bags": "<= 1.03"}
    for title, trainable, losses in settings:
        variants = {l: make_model(l, trainable, True, args.device) for l in losses}
        t = time_train_steps(variants, data, args.reps, args.device)
        for l in losses:
            lines.append(f"| {title} | {l} | {t[l]:.3f} s | {t[l] / t['softmax_ce']:.4f} | "
                         f"{targets.get(l, '')} |")
        print("\n".join(lines[-len(losses):]), flush=True)
        del variants
    # inference: Faster R-CNN (no mask head); the BAGS merge replaces the softmax
    models = {l: make_model(l, (), False, args.device)[0] for l in ("softmax_ce", "bags", "norcal")}
    full, probs = time_inference(models, data, args.reps * 4, args.device)
    ratio = 1 + (probs["bags"] - probs["softmax_ce"]) / full
    norcal = 1 + (probs["norcal"] - probs["softmax_ce"]) / full
    lines += [
        "",
        f"Inference (Faster R-CNN R50-FPN, 1 image): full pass without post-processing "
        f"{full:.3f} s; class probabilities "
        f"of 1000 RoIs x 1203 classes: softmax {probs['softmax_ce'] * 1e3:.2f} ms, BAGS merge "
        f"{probs['bags'] * 1e3:.2f} ms; inference time ratio BAGS / softmax = 1 + (merge - "
        f"softmax) / full pass = **{ratio:.4f}** (target <= 1.05). NorCal (gamma 0.5) "
        f"{probs['norcal'] * 1e3:.2f} ms: ratio **{norcal:.4f}**. Medians of {args.reps * 4}.",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"),
                        "Overhead of the long-tail losses", section)


if __name__ == "__main__":
    main()
