#!/usr/bin/env python
"""
GPU check: every method's LVIS v1 R50 config trained for a few iterations on one device, in one
process, in fp32 and with AMP, then timed at inference. Meant for the first GPU this project gets
(it fits in the default 480 s budget on one H100 / H200; an estimate, see ``estimate_seconds``):

    python tools/gpu_check.py --device cuda --write-docs        # the check (docs/benchmarks.md)
    python tools/gpu_check.py --device cpu --tiny               # the smoke version (test suite)

For each config (``METHODS``; the RFS baseline first):

* the config as written (full image size: ResizeShortestEdge 640-800 / 800 of the config) on the
  LVIS rehearsal data (``rehearsal_lvis_v1_{train,val}``, LVIS v1's 1,203 categories), with
  ``SOLVER.IMS_PER_BATCH 2`` (one device, 2 images per GPU), no data-loader workers;
* ``MODEL.WEIGHTS`` is not loaded: the model starts from its random initialisation (stage-2
  configs name stage-1 checkpoints that do not exist here, the others pre-trained files that need
  a download). ``MODEL.LONGTAIL.TRAINABLE_PREFIXES`` still freezes what the stage-2 configs
  freeze. Because no pre-trained backbone normalises the activations, the frozen BatchNorm
  statistics of the backbone are calibrated on the first training images before anything runs
  (:func:`calibrate_frozen_bn`; a check-only initialisation, not part of any method);
* the batches are read and mapped once, before any timing; the fp32 run and the AMP run (AMP:
  ``SOLVER.AMP.ENABLED``, i.e. detectron2's ``AMPTrainer``, float16 with a GradScaler, on CUDA;
  on CPU the project's bfloat16 ``AutocastTrainer``, labelled ``bf16``) start from the same
  weights (one state dict), the same batches and the same random state, and step with the
  project's step trainer (``longtail.engine.build_step_trainer``), optimizer, gradient clipping
  and LR schedule (warm-up included), with the project's non-finite-loss guard;
* ``--warmup`` untimed iterations, then ``--iters`` timed ones (device synchronised around each);
  s/iter is the median of the timed iterations and the ratio is against the RFS baseline of the
  same precision in the same run;
* peak memory: ``torch.cuda.max_memory_allocated`` (reset before each run; the weights, optimizer
  state and object memory count, they are allocated); on CPU the process's peak resident set
  (``VmHWM``, reset before each run through ``/proc/self/clear_refs``);
* checks: every training loss finite, and the total loss of the first iteration in AMP within
  ``--tolerance`` (relative) of the fp32 one (same weights, same images, same random state; see
  ``TOLERANCE`` for the values);
* eval-only throughput: the fp32 model after its run, in eval mode without gradients (as
  ``--eval-only``), on ``--eval-images`` validation images mapped beforehand, images per second
  of model time (``--eval-warmup`` untimed images first).

What the numbers are not: the model is random, so the proposals and detections are those of an
untrained detector (the eval time includes NMS over almost every candidate box: a random
classifier scores every class about 1/1204, above ``SCORE_THRESH_TEST`` 1e-4), and LOCE's MFS
initialisation pass (a one-off pass over 5 images per class before training) is not run, so its
memory starts empty (the sampled rows still go through the box head, masked; the step does the
same work). The rehearsal images are tiny images resized up to the configs' sizes.

A time budget (``--budget-s``) is checked before every run, iteration and evaluation; when the
next one would not fit, the check stops, reports what ran and exits with status 2. Exit status:
0 everything ran and passed, 1 a check failed (non-finite loss, disagreement, an error), 2 the
budget stopped the check before everything ran (and what ran passed).

Measured: ``--device cpu --tiny`` (all six configs, fp32 and bf16, 2 iterations each, one eval
image) passes in 5.5-7 min on 2 CPU cores (Intel Xeon) that other jobs were sharing (load
average 4-7), with detectron2 v0.6 and with upstream main; its CPU step times say nothing about
a GPU. The GPU run has not been measured: ``estimate_seconds`` gives about 4 min.
"""
import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# datasets (the rehearsal data is generated on first use) live in the checkout, as in the tests
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))

import torch  # noqa: E402
import detectron2  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, DatasetMapper  # noqa: E402
from detectron2.data.build import get_detection_dataset_dicts  # noqa: E402
from detectron2.evaluation.evaluator import inference_context  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import longtail  # noqa: E402,F401  (registers the datasets)
from longtail import Trainer, add_longtail_config  # noqa: E402
from longtail.engine import build_step_trainer, load_train_dicts  # noqa: E402
from longtail.memory import object_memories  # noqa: E402
from longtail.roi_heads import check_trainable_for_memory  # noqa: E402
from longtail.state import install_nonfinite_guard  # noqa: E402
from tools.benchmarks_md import machine  # noqa: E402
from tools.benchmarks_md import replace_section  # noqa: E402
from tools.lvis_rehearsal import calibrate_frozen_bn as standardise_frozen_bn  # noqa: E402

SECTION = "GPU check"
GPU_COMMAND = "python tools/gpu_check.py --device cuda --write-docs"
# (key, label, config under configs/LVISv1); the first one is the baseline of the ratios
METHODS = [
    ("rfs", "RFS (Mask R-CNN baseline)", "mask_rcnn_R_50_FPN_1x_rfs.yaml"),
    ("bags_stage1", "BAGS stage 1", "bags_mask_rcnn_R_50_FPN_1x_stage1.yaml"),
    ("bags_stage2", "BAGS stage 2", "bags_mask_rcnn_R_50_FPN_1x_stage2.yaml"),
    ("loce_stage1", "LOCE stage 1 (normed mask)",
     "loce_mask_rcnn_R_50_FPN_normed_mask_stage1.yaml"),
    ("loce_stage2", "LOCE stage 2 (EBL + MFS)", "loce_mask_rcnn_R_50_FPN_stage2.yaml"),
    ("rio", "RIO", "rio_mask_rcnn_R_50_FPN_1x.yaml"),
]
BASELINE = METHODS[0][0]
# Relative tolerance of |loss_amp - loss_fp32| / |loss_fp32| at the first iteration. The unit
# roundoff is 2^-11 = 4.9e-4 for float16 and 2^-8 = 3.9e-3 for bfloat16; the loss passes ~60
# layers, and a rounding difference can also swap which proposals make the top-k / the sampled
# RoIs (same random state, but another score order), which moves a sum of sampled losses by a few
# percent at most. A wrong cast (an overflow, a loss computed in half precision, a different
# input) moves it by far more. bfloat16's tolerance is 2x float16's (8x coarser rounding).
TOLERANCE = {"fp16": 5e-2, "bf16": 1e-1}
# --tiny: small inputs and few RoIs/proposals/memory entries, for the CPU smoke test
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 96,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 50, "MODEL.RPN.POST_NMS_TOPK_TEST", 10,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64, "TEST.DETECTIONS_PER_IMAGE", 20,
]
# --tiny, configs with an object memory only (other configs refuse memory keys)
TINY_MEMORY_OPTS = ["MODEL.MEMORY.CAPACITY", 4]


def estimate_seconds(num_configs, warmup, iters, eval_images, eval_warmup):
    """
    Estimated wall time of the check on one H100 / H200, from assumed (not measured) costs:
    60 s of start-up (imports, CUDA context, reading / generating the rehearsal data), 10 s per
    config for reading and mapping the batches and building, calibrating and loading two models,
    0.30 s per fp32 iteration and 0.20 s per AMP iteration (Mask R-CNN R50-FPN, 2 images of about
    800 x 800 px, 1,203 classes, per-class mask logits of 512 RoIs), 0.25 s per evaluated image
    (a random model sends ~1,000 x 1,203 boxes to NMS).
    """
    steps = warmup + iters
    per_config = 10.0 + steps * (0.30 + 0.20) + (eval_images + eval_warmup) * 0.25
    return 60.0 + num_configs * per_config


class Budget:
    """Wall-clock budget of the whole check, with progress messages."""

    def __init__(self, seconds):
        self.seconds = float(seconds)
        self.start = time.perf_counter()
        self.stopped = None  # why the check stopped early, if it did

    def elapsed(self):
        return time.perf_counter() - self.start

    def allows(self, estimate, what):
        """Whether ``what`` (about ``estimate`` s) fits; if not, records the stop and says so."""
        if self.elapsed() + estimate <= self.seconds:
            return True
        self.stopped = (
            f"time budget: {what} (about {estimate:.1f} s) would end after the "
            f"{self.seconds:.0f} s budget ({self.elapsed():.1f} s elapsed)"
        )
        self.log("stopping, " + self.stopped)
        return False

    def log(self, message):
        print(f"[gpu_check {self.elapsed():6.1f} s / {self.seconds:.0f} s] {message}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke size: 64-96 px images, few RoIs, 1 + 1 iterations, "
                        "1 eval image")
    parser.add_argument("--methods", default=",".join(k for k, _, _ in METHODS),
                        help="comma-separated subset of " + ", ".join(k for k, _, _ in METHODS)
                        + f" ({BASELINE!r} is always run: it is the baseline of the ratios)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (20; tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (3; tiny 1)")
    parser.add_argument("--eval-images", type=int, default=None, help="timed images (20; tiny 1)")
    parser.add_argument("--eval-warmup", type=int, default=None, help="untimed images (2; tiny 0)")
    parser.add_argument("--ims-per-batch", type=int, default=2, help="images per iteration")
    parser.add_argument("--bn-calibration-images", type=int, default=2,
                        help="training images the frozen BN statistics are fitted on (0: off)")
    parser.add_argument("--train-dataset", default="rehearsal_lvis_v1_train")
    parser.add_argument("--test-dataset", default="rehearsal_lvis_v1_val")
    parser.add_argument("--num-classes", type=int, default=1203,
                        help="MODEL.ROI_HEADS.NUM_CLASSES (the datasets' number of classes)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"relative first-iteration loss tolerance (default {TOLERANCE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "gpu_check.json"))
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the {SECTION!r} section of docs/benchmarks.md (GPU runs)")
    parser.add_argument("--write-docs-pending", action="store_true",
                        help=f"only write the {SECTION!r} section saying the check has not run "
                        "on a GPU yet, and exit")
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = parser.parse_args(argv)
    defaults = {"iters": (20, 1), "warmup": (3, 1), "eval_images": (20, 1), "eval_warmup": (2, 0)}
    for name, (full, tiny) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    known = [k for k, _, _ in METHODS]
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {known}")
    args.methods = [k for k in known if k in chosen or k == BASELINE]
    if args.iters < 1 or args.warmup < 0 or args.eval_images < 0 or args.eval_warmup < 0:
        parser.error("--iters must be >= 1, --warmup / --eval-images / --eval-warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here (torch "
                     f"{torch.__version__}); use --device cpu")
    if args.write_docs and (args.tiny or not args.device.startswith("cuda")):
        parser.error("--write-docs records a GPU run: use it with --device cuda and without --tiny")
    return args


def amp_precision(device):
    """The AMP precision ``build_step_trainer`` uses on ``device``: fp16 on CUDA, bf16 on CPU."""
    return "fp16" if str(device).startswith("cuda") else "bf16"


def load_config(config_name, args):
    """The config with the check's overrides; returns (cfg, the MODEL.WEIGHTS it named)."""
    cfg = add_longtail_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, "configs", "LVISv1", config_name))
    weights = cfg.MODEL.WEIGHTS
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", args.device,
        "MODEL.ROI_HEADS.NUM_CLASSES", args.num_classes,
        "DATASETS.TRAIN", (args.train_dataset,), "DATASETS.TEST", (args.test_dataset,),
        "SOLVER.IMS_PER_BATCH", args.ims_per_batch, "SOLVER.AMP.ENABLED", False,
        "DATALOADER.NUM_WORKERS", 0, "SEED", args.seed,
    ])
    if args.tiny:
        cfg.merge_from_list(list(TINY_OPTS))
        if cfg.MODEL.MEMORY.POLICY:
            cfg.merge_from_list(list(TINY_MEMORY_OPTS))
    return cfg, weights


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak_memory(device):
    """Start a new peak: CUDA's allocator statistics, or the process's VmHWM on Linux."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (Linux >= 4.0)
    except OSError:
        pass


def peak_memory(device):
    """(bytes, what was measured) since the last :func:`reset_peak_memory`."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "peak RSS of the process (VmHWM)"
    except OSError:
        pass
    scale = 1 if platform.system() == "Darwin" else 1024
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak RSS of the process since its start (ru_maxrss, not reset per run)")


def seed_all(seed):
    """The same random state for both precisions (RoI / anchor sampling draws from it)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


_DATASET_DICTS = {}


def dataset_dicts(cfg, train):
    """The training records (as the project's Trainer loads them) or the first test dataset's,
    loaded once per process (every config of the check reads the same datasets)."""
    if train:
        key = ("train", tuple(cfg.DATASETS.TRAIN), cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    else:
        key = ("test", cfg.DATASETS.TEST[0])
    if key not in _DATASET_DICTS:
        _DATASET_DICTS[key] = (
            load_train_dicts(cfg) if train
            else get_detection_dataset_dicts([cfg.DATASETS.TEST[0]], filter_empty=False)
        )
    return _DATASET_DICTS[key]


def training_batches(cfg, count):
    """The first ``count`` batches of the project's training stream (its sampler, seed and
    augmentations), read and mapped now."""
    stream = iter(Trainer.build_train_loader(cfg, dataset_dicts(cfg, True)))
    return [next(stream) for _ in range(count)]


def eval_inputs(cfg, count):
    """``count`` mapped validation images (as the ``--eval-only`` loader maps them)."""
    if count == 0:
        return []
    dicts = dataset_dicts(cfg, False)
    if not dicts:
        raise ValueError(f"Dataset {cfg.DATASETS.TEST[0]!r} has no images to evaluate on.")
    mapper = DatasetMapper(cfg, False)
    return [mapper(copy.deepcopy(dicts[i % len(dicts)])) for i in range(count)]


def calibrate_frozen_bn(model, batched_inputs):
    """
    Check-only initialisation of a randomly initialised backbone: every ``FrozenBatchNorm2d`` of
    the ResNet standardises its input on ``batched_inputs`` (fitted in forward order, one pass;
    :func:`tools.lvis_rehearsal.calibrate_frozen_bn`, the LVIS rehearsal's initialisation), as the
    folded BatchNorm of a pre-trained backbone would.

    Without it, the MSRA-pixel configs (``PIXEL_STD`` 1) reach activations of ~1e4 in the FPN
    outputs of a random ResNet-50 on an 800-px image (measured on CPU), the box head's first
    fully connected layer sums 12,544 of them (beyond float16's 65,504) and training diverges
    within a few iterations: the check would measure the random init, not the method. Returns
    the helper's summary (layers set, largest backbone output before and after).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            images = model.preprocess_image(batched_inputs).tensor
        return standardise_frozen_bn(model.backbone, images)
    finally:
        model.train(was_training)


def build_model(cfg, seed, state=None):
    """
    The model as :class:`longtail.engine.Trainer` prepares it (datasets prepared, decoupled
    training applied and checked against the memory policy, object memories allocated), from the
    seeded random initialisation, then ``state`` (a state dict) when given.
    """
    torch.manual_seed(seed)
    model = Trainer.build_model(cfg)
    check_trainable_for_memory(cfg, model)
    for memory in object_memories(model):
        memory.allocate()
    if state is not None:
        model.load_state_dict(state)
    return model


def train_run(cfg, model, batches, precision, args, budget):
    """
    ``len(batches)`` iterations of ``model`` with the project's step trainer (AMP when
    ``precision`` is not fp32); returns the run's measurements (see module docstring).
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED = precision != "fp32"
    losses, times, terms = [], [], []
    captured = {}

    def capture(module, inputs, output):
        if module.training and isinstance(output, dict):
            captured["losses"] = {k: v.detach() for k, v in output.items()}

    handle = model.register_forward_hook(capture)
    optimizer = Trainer.build_optimizer(cfg, model)
    install_nonfinite_guard(model, optimizer)  # raises before the optimizer step
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    trainer = build_step_trainer(cfg, model, batches, optimizer)
    result = {"precision": precision, "trainer": type(trainer).__name__, "error": None,
              "stopped": None}
    seed_all(args.seed)
    gc.collect()
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
    reset_peak_memory(args.device)
    start = time.perf_counter()
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(len(batches)):
            estimate = times[-1] if times else 0.0
            if not budget.allows(estimate, f"{precision} iteration {it + 1}"):
                result["stopped"] = budget.stopped
                break
            storage.iter = trainer.iter = it
            captured.clear()
            synchronize(args.device)
            t0 = time.perf_counter()
            try:
                trainer.run_step()
            except FloatingPointError as e:
                result["error"] = f"FloatingPointError: {e}"
            synchronize(args.device)
            times.append(time.perf_counter() - t0)
            if "losses" in captured:
                step = {k: float(v.float()) for k, v in captured["losses"].items()}
                terms.append(step)
                losses.append(sum(step.values()))
            if result["error"]:
                break
            scheduler.step()
    handle.remove()
    timed = times[args.warmup:]
    mem, mem_kind = peak_memory(args.device)
    result.update(
        iterations=len(times), timed_iterations=len(timed),
        s_per_iter=statistics.median(timed) if timed else None,
        s_per_iter_mean=statistics.mean(timed) if timed else None,
        run_s=time.perf_counter() - start,
        peak_memory_bytes=mem, peak_memory_kind=mem_kind,
        losses=losses, loss_terms_first=terms[0] if terms else None,
        finite=bool(losses) and all(math.isfinite(x) for x in losses) and not result["error"],
        lr_last=optimizer.param_groups[0]["lr"],
    )
    scaler = getattr(trainer, "grad_scaler", None)
    if scaler is not None:
        result["grad_scale_last"] = float(scaler.get_scale())
    return result


@torch.no_grad()
def eval_throughput(model, inputs, warmup, device):
    """Images per second of ``model`` in inference mode on ``inputs`` (the first ``warmup``
    untimed), and the number of timed images."""
    times = []
    with inference_context(model):
        for i, image in enumerate(inputs):
            synchronize(device)
            t0 = time.perf_counter()
            model([image])
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    if not times:
        return None, 0
    return len(times) / sum(times), len(times)


def relative_difference(a, b):
    """``|a - b| / |b|`` (inf when b is 0 and a is not; None when either is missing)."""
    if a is None or b is None:
        return None
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - b) / abs(b)


def run_method(key, label, config_name, args, budget, estimate_per_config):
    """Both precisions and the evaluation of one config; returns its entry of the report."""
    entry = {"method": key, "label": label, "config": f"configs/LVISv1/{config_name}",
             "runs": {}, "eval": None, "notes": [], "error": None}
    cfg, weights = load_config(config_name, args)
    entry["weights_not_loaded"] = weights  # MODEL.WEIGHTS of the config (random init instead)
    if list(cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES):
        entry["notes"].append("trains only " + ", ".join(cfg.MODEL.LONGTAIL.TRAINABLE_PREFIXES))
    if cfg.MODEL.MEMORY.POLICY == "mfs" and cfg.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS > 0:
        entry["notes"].append("MFS initialisation pass not run (memory starts empty)")
    ims_per_vgpu = cfg.MODEL.LONGTAIL.IMS_PER_VGPU
    if ims_per_vgpu > args.ims_per_batch:
        entry["notes"].append(
            f"IMS_PER_VGPU {ims_per_vgpu} > {args.ims_per_batch} images: one chunk of "
            f"{args.ims_per_batch}")
    entry["input"] = {"min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
                      "max_size_train": cfg.INPUT.MAX_SIZE_TRAIN,
                      "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
                      "max_size_test": cfg.INPUT.MAX_SIZE_TEST}
    if estimate_per_config and not budget.allows(estimate_per_config, f"{key} (both precisions)"):
        entry["skipped"] = budget.stopped
        return entry
    timings = entry["timings_s"] = {}
    clock = time.perf_counter()

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - clock, 3)
        clock = now

    budget.log(f"{key}: reading {args.warmup + args.iters} batches of {args.ims_per_batch} "
               f"images from {args.train_dataset} ({config_name})")
    batches = training_batches(cfg, args.warmup + args.iters)
    sizes = sorted({tuple(d["image"].shape[-2:]) for b in batches for d in b})
    entry["train_image_sizes"] = [list(s) for s in sizes[:3]] + (["..."] if len(sizes) > 3 else [])
    lap("data")
    model = build_model(cfg, args.seed)
    lap("build")
    if args.bn_calibration_images > 0:
        images = [d for b in batches for d in b][: args.bn_calibration_images]
        entry["bn_calibration"] = calibrate_frozen_bn(model, images)
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    entry["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    entry["parameters"] = sum(p.numel() for p in model.parameters())
    lap("calibrate")
    amp = amp_precision(args.device)
    for precision in ("fp32", amp):
        if precision != "fp32":
            del model
            gc.collect()
            model = build_model(cfg, args.seed, initial)
            lap("build")
        budget.log(f"{key}: {precision} training, {args.warmup} + {args.iters} iterations")
        run = train_run(cfg, model, batches, precision, args, budget)
        entry["runs"][precision] = run
        lap("train")
        budget.log(
            f"{key}: {precision} {fmt(run['s_per_iter'], '.3f')} s/iter, losses "
            + " ".join(f"{x:.4g}" for x in run["losses"])
            + (f"; {run['error']}" if run["error"] else "")
        )
        if run["stopped"]:
            entry["skipped"] = run["stopped"]
            return entry
        if precision == "fp32" and args.eval_images:
            per_image = (run["s_per_iter"] or 0.0) * 0.5
            if not budget.allows(per_image * (args.eval_images + args.eval_warmup),
                                 f"{key} evaluation"):
                entry["skipped"] = budget.stopped
                return entry
            inputs = eval_inputs(cfg, args.eval_images + args.eval_warmup)
            rate, n = eval_throughput(model, inputs, args.eval_warmup, args.device)
            entry["eval"] = {"images_per_s": rate, "images": n, "warmup_images": args.eval_warmup}
            lap("eval")
            budget.log(f"{key}: eval-only {fmt(rate, '.2f')} images/s ({n} images)")
    del model
    gc.collect()
    if str(args.device).startswith("cuda"):
        torch.cuda.empty_cache()
    return entry


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def evaluate_checks(report):
    """
    Fill in the ratios against the baseline and the agreement, and decide the outcome:
    ``report["failures"]`` lists every failed check; ``report["status"]`` is "passed",
    "failed" or "incomplete" (the budget stopped it; what ran passed).
    """
    tolerance = report["tolerance"]
    amp = report["amp_precision"]
    failures = []
    base = report["methods"][0]["runs"] if report["methods"] else {}
    for entry in report["methods"]:
        if entry.get("error"):
            failures.append(f"{entry['method']}: {entry['error']}")
        for precision, run in entry["runs"].items():
            ref = base.get(precision, {}).get("s_per_iter")
            run["ratio_vs_baseline"] = (
                run["s_per_iter"] / ref if run["s_per_iter"] is not None and ref else None
            )
            if not run["finite"] and not run["stopped"]:
                failures.append(
                    f"{entry['method']} {precision}: non-finite or missing loss"
                    + (f" ({run['error']})" if run["error"] else ""))
        fp32, half = entry["runs"].get("fp32"), entry["runs"].get(amp)
        if fp32 and half and fp32["losses"] and half["losses"]:
            diff = relative_difference(half["losses"][0], fp32["losses"][0])
            entry["agreement"] = {"loss_fp32": fp32["losses"][0], f"loss_{amp}": half["losses"][0],
                                  "relative_difference": diff, "tolerance": tolerance,
                                  "passed": diff is not None and diff <= tolerance}
            if not entry["agreement"]["passed"]:
                failures.append(
                    f"{entry['method']}: first-iteration loss {amp} {half['losses'][0]:.6g} vs "
                    f"fp32 {fp32['losses'][0]:.6g}, relative difference {diff:.3g} > {tolerance}")
        else:
            entry["agreement"] = None
    report["failures"] = failures
    incomplete = report["stopped"] is not None
    report["status"] = "failed" if failures else ("incomplete" if incomplete else "passed")
    return report


def format_table(report):
    """The markdown table of the report (one row per config and precision)."""
    amp = report["amp_precision"]
    mem_header = "peak GPU memory" if report["device"].startswith("cuda") else "peak RSS"
    lines = [
        f"| config | precision | s/iter | ratio vs RFS | {mem_header} | loss first -> last | "
        f"finite | {amp}/fp32 first-loss diff | eval img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["methods"]:
        name = os.path.basename(entry["config"])
        if entry.get("skipped") and not entry["runs"]:
            lines.append(f"| {name} | not run | | | | | | | |")
        for precision, run in entry["runs"].items():
            if run["stopped"] and not run["losses"]:
                lines.append(f"| {name} | {precision} | stopped by the time budget | | | | | | |")
                continue
            first = run["losses"][0] if run["losses"] else None
            last = run["losses"][-1] if run["losses"] else None
            agreement = entry.get("agreement") if precision != "fp32" else None
            diff = "-"
            if agreement:
                diff = (f"{agreement['relative_difference']:.2e} "
                        f"({'ok' if agreement['passed'] else 'FAIL'})")
            rate = entry["eval"]["images_per_s"] if precision == "fp32" and entry["eval"] else None
            lines.append(
                f"| {name} | {precision} | {fmt(run['s_per_iter'], '.3f')} | "
                f"{fmt(run.get('ratio_vs_baseline'), '.3f')} | "
                f"{run['peak_memory_bytes'] / 2**30:.2f} GiB | {fmt(first, '.4g')} -> "
                f"{fmt(last, '.4g')} | {'yes' if run['finite'] else 'NO'} | {diff} | "
                f"{fmt(rate, '.2f')} |"
            )
    return "\n".join(lines)


def describe_device(device):
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return machine()


def docs_section(report):
    """The body of the GPU-check section of docs/benchmarks.md for a finished run."""
    status = {"passed": "all checks passed", "failed": "FAILED: " + "; ".join(report["failures"]),
              "incomplete": "stopped by the time budget: " + str(report["stopped"])}
    lines = [
        f"Device: {report['device_name']} (torch {report['torch']}, CUDA {report['cuda']}, "
        f"detectron2 {report['detectron2']} from `{report['detectron2_path']}`; TF32: cuDNN "
        f"{report['tf32']['cudnn']}, matmul "
        f"{report['tf32']['matmul']}). Command: `{report['command']}`. "
        f"Wall time {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget. "
        f"Outcome: **{status[report['status']]}**.",
        "",
        f"{report['warmup']} untimed + {report['iters']} timed iterations (median s/iter) of "
        f"{report['ims_per_batch']} images at the configs' image sizes on "
        f"`{report['train_dataset']}` "
        f"({report['num_classes']} classes), fp32 and AMP ({report['amp_precision']}, detectron2's "
        "AMPTrainer with a GradScaler) from the same weights, images and random state; "
        "ratio against the RFS baseline of the same precision in the same run; peak memory = "
        "`torch.cuda.max_memory_allocated` per run; first-iteration total loss of AMP vs fp32 "
        f"within a relative {report['tolerance']}; eval = `--eval-only`-style inference of the "
        f"fp32 model on {report['eval_images']} validation images (after {report['eval_warmup']} "
        "untimed), model time only.",
        "",
        format_table(report),
        "",
        "Random initialisation (the configs' `MODEL.WEIGHTS` are not loaded: stage-2 configs "
        "are trained from the random init, not from stage-1 models; their trainable-prefix "
        "freezing applies), frozen "
        "BatchNorm statistics calibrated on the first training images (a check-only "
        "initialisation), the LOCE MFS initialisation pass not run. The eval speed is that of an "
        "untrained detector (NMS over nearly every candidate box), a lower bound for a trained "
        "one. Per config: "
        + "; ".join(f"{os.path.basename(e['config'])}: {', '.join(e['notes'])}"
                    for e in report["methods"] if e["notes"]) + ".",
    ]
    return "\n".join(lines)


def pending_section(args):
    """The GPU-check section before any GPU run: says so, with the command and the estimate."""
    estimate = estimate_seconds(len(METHODS), 3, 20, 20, 2)
    return "\n".join([
        "**Not run on a GPU yet.** No GPU has been available to this project, so none of these "
        "numbers exist yet: step time per method in fp32 and with AMP (fp16), ratio "
        "against the RFS baseline, peak GPU memory, finite losses, fp16-vs-fp32 loss agreement "
        "and eval-only images per second, for the LVIS v1 R50 configs at full image size on the "
        "LVIS rehearsal data. On the first GPU machine, run",
        "",
        "```bash",
        f"{GPU_COMMAND}   # or: make gpu-check",
        "```",
        "",
        "which replaces this section with the measured table (device, torch / detectron2 "
        "versions and the command included) and writes `output/gpu_check.json`. Its default "
        f"budget is 480 s; the run is estimated (not measured) at about {estimate / 60:.0f} min on "
        "one H100 / H200 (assumed per-iteration costs in `tools/gpu_check.py`, "
        "`estimate_seconds`); when the budget runs out it stops and reports what ran. The test "
        "suite runs the same code on CPU at a tiny size (`python tools/gpu_check.py --device cpu "
        "--tiny`: 64-96 px images, bfloat16 instead of float16), which checks that every config "
        "builds, trains and evaluates, not the GPU numbers.",
    ])


def main(argv=None):
    args = parse_args(argv)
    if args.write_docs_pending:
        replace_section(args.docs, SECTION, pending_section(args))
        print(f"wrote the pending {SECTION!r} section of {args.docs}")
        return 0
    budget = Budget(args.budget_s)
    amp = amp_precision(args.device)
    tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[amp]
    command = "python tools/gpu_check.py " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    registered = set(DatasetCatalog.list())
    missing = [d for d in (args.train_dataset, args.test_dataset) if d not in registered]
    if missing:
        print(f"error: dataset(s) {missing} are not registered after `import longtail`; "
              "the rehearsal data comes from longtail.rehearsal. To run on the small synthetic "
              "data instead: --train-dataset longtail_synth_mini_train --test-dataset "
              "longtail_synth_mini_val --num-classes 48", file=sys.stderr)
        return 1
    selected = [m for m in METHODS if m[0] in args.methods]
    if args.device.startswith("cuda"):
        estimate = estimate_seconds(len(selected), args.warmup, args.iters, args.eval_images,
                                    args.eval_warmup)
        budget.log(f"estimated run time on one H100 / H200: about {estimate:.0f} s "
                   "(an estimate from assumed costs, not a measurement)")
    budget.log(f"{len(selected)} configs on {describe_device(args.device)}, fp32 and {amp}; "
               f"torch {torch.__version__}, detectron2 {detectron2.__version__} "
               f"({os.path.dirname(detectron2.__file__)})")
    report = {
        "command": command, "device": args.device, "device_name": describe_device(args.device),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "detectron2": detectron2.__version__,
        "detectron2_path": os.path.dirname(detectron2.__file__),
        "tf32": {"cudnn": torch.backends.cudnn.allow_tf32,
                 "matmul": torch.backends.cuda.matmul.allow_tf32},
        "tiny": args.tiny, "iters": args.iters, "warmup": args.warmup,
        "eval_images": args.eval_images, "eval_warmup": args.eval_warmup,
        "ims_per_batch": args.ims_per_batch, "train_dataset": args.train_dataset,
        "test_dataset": args.test_dataset, "num_classes": args.num_classes,
        "amp_precision": amp, "tolerance": tolerance, "seed": args.seed,
        "bn_calibration_images": args.bn_calibration_images, "budget_s": args.budget_s,
        "methods": [], "stopped": None,
    }
    durations = []
    for key, label, config_name in selected:
        started = time.perf_counter()
        estimate = max(durations) if durations else 0.0
        try:
            entry = run_method(key, label, config_name, args, budget, estimate)
        except Exception as e:  # noqa: BLE001  (an error in one config must not hide the others)
            traceback.print_exc()
            entry = {"method": key, "label": label, "config": f"configs/LVISv1/{config_name}",
                     "runs": {}, "eval": None, "notes": [], "error": f"{type(e).__name__}: {e}"}
            budget.log(f"{key}: ERROR {entry['error']}")
        report["methods"].append(entry)
        durations.append(time.perf_counter() - started)
        if entry.get("skipped"):
            report["stopped"] = entry["skipped"]
            break
    trained = {e["method"] for e in report["methods"]
               if any(run["losses"] for run in e["runs"].values())}
    report["not_run"] = [k for k, _, _ in selected if k not in trained]
    report["elapsed_s"] = budget.elapsed()
    evaluate_checks(report)
    table = format_table(report)
    print("\n" + table + "\n", flush=True)
    summary = {"passed": "all checks passed",
               "failed": "FAILED:\n  " + "\n  ".join(report["failures"]),
               "incomplete": f"incomplete ({report['stopped']}); not run: {report['not_run']}"}
    print(f"gpu_check: {summary[report['status']]} ({report['elapsed_s']:.1f} s)", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"gpu_check: wrote {args.output}", flush=True)
    if args.write_docs:
        replace_section(args.docs, SECTION, docs_section(report))
        print(f"gpu_check: wrote the {SECTION!r} section of {args.docs}", flush=True)
    return {"passed": 0, "failed": 1, "incomplete": 2}[report["status"]]


if __name__ == "__main__":
    sys.exit(main())
