#!/usr/bin/env python
"""
LVIS rehearsal: every LVIS config of the project, built at the real class count (1203 / 1230)
and the real per-process memory sizes, trained a few iterations on CPU with several processes
(gloo), checkpointed, resumed and evaluated, on the LVIS rehearsal data (:mod:`longtail.rehearsal`:
LVIS's real categories and frequency buckets, generated tiny images). It checks that the LVIS
code paths run end to end; it measures nothing about accuracy.

For each config of ``configs/LVISv1/`` and ``configs/LVISv0.5/`` (``--configs`` filters; the
stage-1 config of a selected stage 2 and the RFS baseline of its version are added) and each
detectron2 version (``--d2 v0.6``: this environment; ``main``: upstream main's sources first on
``PYTHONPATH`` through ``--d2-main-wrapper``; ``both``):

1. **train**: ``train_net.py``'s ``main`` under the project launcher (``--num-gpus``, default 2
   CPU processes), ``--iters`` iterations (default 4), checkpointed at the end;
2. **resume**: ``--resume`` from that checkpoint to ``--iters + --extra-iters`` iterations;
3. **eval**: ``--eval-only MODEL.WEIGHTS <OUTPUT_DIR>/model_final.pth`` on the validation split
   (every class has validation objects there), LVIS evaluation at the real class count;
4. the run's checkpoints are deleted (a LOCE stage-2 process state alone is 2.3 GiB), except
   the ``model_final.pth`` of a stage 1, which its stage 2 starts from (``--keep-checkpoints``
   keeps them all).

Overrides of every config (reported in the docs section): ``DATASETS.TRAIN/TEST`` ->
``rehearsal_lvis_<version>_{train,val}`` (``--real-names``: the configs' own ``lvis_*`` names,
with ``DETECTRON2_DATASETS`` pointing at the rehearsal root, so that detectron2's built-in
registrations and metadata load it), ``INPUT`` 64 px short side / 96 px long side,
``SOLVER.IMS_PER_BATCH`` 2 per process (the per-GPU batch of the configs' 8 x 2 layout, so the
per-process memories have their real size), ``MAX_ITER`` as above, ``DATALOADER.NUM_WORKERS 0``,
``SEED 0``, no evaluation during training (``DATASETS.TEST ()`` in the training phases), and:

* ``SOLVER.BASE_LR`` x ``--lr-scale`` (default 0.01): detectron2 stretches a config's 500-1000
  iteration warmup over ``MAX_ITER``, so a 4-iteration run would reach the full rate at its third
  iteration, from random heads; 1 % keeps the rate near a real run's first iterations;
* ``MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS`` ``--mfs-init-images`` (default 1; LOCE's is 5): the
  initialisation pass forwards this many images per class (1203 / 1230) and process before the
  first iteration; 1 image per class took 33 min per process on 2 shared CPU cores;
* ``TEST.DETECTIONS_PER_IMAGE`` ``--dets-per-image`` (default 20; the configs' 300) in the
  evaluation: the mask head predicts all 1203 class masks of every kept detection;
* ``MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE`` ``--rois-per-image`` (default: the config's 512),
  to make the box and mask heads cheaper on CPU when needed;
* ``--eval-split minival``: evaluate on the first 24 validation images only;
* ``LONGTAIL.NUM_THREADS``: ``--threads``, default the cores divided among the processes;
* trailing ``KEY VALUE`` pairs go to every ``train_net`` call (e.g.
  ``MODEL.RPN.POST_NMS_TOPK_TEST 100`` for a faster evaluation).

Stage-1 configs start from the calibrated random initialisation below instead of ImageNet / COCO
weights; stage-2 configs from their stage-1 config's rehearsal ``model_final.pth`` (the stage-1
config is the one whose ``OUTPUT_DIR`` holds the stage 2's ``MODEL.WEIGHTS``).

**Calibrated frozen-BN initialisation (rehearsal only).** A randomly initialised ResNet with
FrozenBatchNorm2d at its identity statistics roughly doubles the activation variance in every
residual block (largest backbone output on rehearsal images: 3.8e3 for R50, 2.4e6 for R101).
Measured without calibration (LVIS v1, 1 process, learning rate as below): R50 reaches a total
loss of 422 at iteration 3 (classification 305: saturated logits), R101 1.5e5 at iteration 2 and
then stops with "Predicted boxes or scores contain Inf/NaN"; at the configs' full learning rate
R50 diverges within 4 iterations too. Before the first stage-1 run of a config, this tool builds
the config's backbone
(seed 0), runs 16 rehearsal training images through it and sets every FrozenBatchNorm2d of the
ResNet, in forward order, to standardise its input on those images (``weight = 1 / sqrt(var +
eps)``, ``bias = -mean * weight``, the folded form of MSRA's Caffe2 weights), and saves the
ResNet's weights (``backbone.bottom_up.*``; FPN and heads stay at their random init, as with
ImageNet weights) as ``calibration/<version>/<config>.pth``, the stage-1 ``MODEL.WEIGHTS``. It
only bounds the activations of the initial weights: training is unchanged, every loss is checked
(the project's non-finite guard raises, and this tool fails a run whose logged loss is not
finite), so a real divergence still fails. With it, every stage 1 starts near the chance level
of its classifier (total loss about 10, classification about ln(1204) = 7.1); it is applied to
every stage-1 config (R50 and R101) for uniformity.

Measured per run (``rehearsal_result.json`` in its output directory; the docs table): pass/fail
with the first error line; seconds from starting the ``train`` process to the start of its first
iteration (after data loading, model building and LOCE's initialisation pass); step time (median
over the training iterations of both phases, each phase's first iteration excluded) and its ratio
to ``mask_rcnn_R_50_FPN_1x_rfs.yaml`` of the same version, d2 version and mode in the same
output tree; peak resident memory of each training process (``getrusage(RUSAGE_SELF).ru_maxrss``
read in that process when it ends: the kernel's high-water mark of its RSS, shared pages
included); the bytes of long-tail state each process logs ("Long-tail state:" lines: object
memories, LOCE mean scores) when the model is built. A probe hook added to the trainer records
the iteration times and losses; ``train_net.py``'s ``setup`` / ``main`` / ``report`` run unchanged.

Runs are resumable: a run whose ``rehearsal_result.json`` exists is skipped (``--force`` reruns
everything, ``--rerun-failed`` the failed ones). The docs section (``docs/benchmarks.md``, "LVIS
rehearsal") and ``docs/lvis_rehearsal_results.json`` are rendered from every result found under
``--output``, so separate invocations (v0.6, main, ``--real-names``) fill one table.

    python tools/lvis_rehearsal.py [--configs GLOB ...] [--d2 v0.6|main|both] [--real-names]
        [--iters 4] [--extra-iters 2] [--num-gpus 2] [--jobs 1] [--output output/lvis_rehearsal]
        [--force | --rerun-failed] [--no-write] [--mfs-init-images 1] [--lr-scale 0.01]
        [--dets-per-image 20] [--rois-per-image N] [--timeout 3600] [KEY VALUE ...]
"""
import argparse
import fnmatch
import glob
import json
import logging
import math
import os
import re
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SECTION = "LVIS rehearsal"
CONFIG_DIRS = ("configs/LVISv1", "configs/LVISv0.5")
VERSION_OF_DIR = {"LVISv1": "v1", "LVISv0.5": "v0.5"}
BASELINE = "mask_rcnn_R_50_FPN_1x_rfs.yaml"
PHASES = ("train", "resume", "eval")
RESULT_FILE = "rehearsal_result.json"
DEFAULT_WRAPPER = os.path.join(os.path.dirname(ROOT), "shared", "vendor",
                               "with-detectron2-main.sh")
INPUT_OPTS = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
              "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96"]
IMS_PER_PROCESS = 2
CALIBRATION_IMAGES = 16
_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?(B|KiB|MiB|GiB)\b(?! available)")
_UNITS = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt|Exit)\b.*")


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
@dataclass
class ConfigInfo:
    """One LVIS config: ``path`` relative to the repository root, LVIS ``version`` ("v1" /
    "v0.5"), its stage-1 config's path (``parent``, stage 2 only) and a few facts for reports."""

    path: str
    version: str
    parent: Optional[str] = None
    output_dir: str = ""
    weights: str = ""
    facts: Dict[str, object] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        return os.path.basename(os.path.dirname(self.path))

    @property
    def stem(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def stage(self) -> int:
        return 2 if self.parent else 1


def load_config(path: str):
    """The merged CfgNode of a project config file (detectron2 defaults + project keys)."""
    from detectron2.config import get_cfg

    from longtail.config import add_longtail_config

    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, path))
    return cfg


def describe_config(cfg) -> Dict[str, object]:
    """Facts of a config that the report lists: depth, mask, loss, memory, images per VGPU."""
    return {
        "depth": cfg.MODEL.RESNETS.DEPTH,
        "mask": bool(cfg.MODEL.MASK_ON),
        "cls_loss": cfg.MODEL.LONGTAIL.CLS_LOSS,
        "memory": cfg.MODEL.MEMORY.POLICY,
        "mfs_init_images": cfg.MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "ims_per_vgpu": cfg.MODEL.LONGTAIL.IMS_PER_VGPU,
        "sampler": cfg.DATALOADER.SAMPLER_TRAIN,
        "base_lr": cfg.SOLVER.BASE_LR,
        "rois_per_image": cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
        "dets_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
        "train": list(cfg.DATASETS.TRAIN),
        "test": list(cfg.DATASETS.TEST),
    }


def all_configs() -> Dict[str, ConfigInfo]:
    """Every LVIS config by path, stage-2 configs linked to their stage-1 config."""
    infos: Dict[str, ConfigInfo] = {}
    for folder in CONFIG_DIRS:
        for path in sorted(glob.glob(os.path.join(ROOT, folder, "*.yaml"))):
            rel = os.path.relpath(path, ROOT)
            cfg = load_config(rel)
            infos[rel] = ConfigInfo(rel, VERSION_OF_DIR[os.path.basename(folder)],
                                    output_dir=os.path.normpath(cfg.OUTPUT_DIR),
                                    weights=cfg.MODEL.WEIGHTS, facts=describe_config(cfg))
    by_output = {}
    for info in infos.values():
        by_output.setdefault((info.folder, info.output_dir), []).append(info.path)
    for info in infos.values():
        if info.weights.startswith("output/"):
            key = (info.folder, os.path.normpath(os.path.dirname(info.weights)))
            parents = by_output.get(key, [])
            if len(parents) != 1:
                raise ValueError(
                    f"{info.path}: MODEL.WEIGHTS {info.weights!r} should be the model_final.pth "
                    f"of exactly one stage-1 config of {info.folder} (OUTPUT_DIR {key[1]!r}); "
                    f"found {parents or 'none'}. Fix its MODEL.WEIGHTS or the stage-1 OUTPUT_DIR.")
            info.parent = parents[0]
    return infos


def select_configs(patterns: Sequence[str], infos: Dict[str, ConfigInfo],
                   with_baseline: bool = True) -> List[ConfigInfo]:
    """
    Configs matching any of ``patterns`` (fnmatch on the repository-relative path and on the
    file name), plus the stage-1 config of every selected stage 2 and (``with_baseline``) the
    RFS baseline of every selected version; ordered baseline first, then stage 1s, then stage 2s.
    """
    chosen = {p for p, i in infos.items() for pat in patterns
              if fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(os.path.basename(p), pat)}
    if not chosen:
        raise ValueError(f"--configs {list(patterns)} matches none of: {', '.join(infos)}")
    for p in list(chosen):
        if infos[p].parent:
            chosen.add(infos[p].parent)
    if with_baseline:
        for folder in {infos[p].folder for p in chosen}:
            chosen.add(f"configs/{folder}/{BASELINE}")

    def order(p):
        return (infos[p].folder != "LVISv1", not p.endswith(BASELINE), infos[p].stage, p)

    return [infos[p] for p in sorted(chosen, key=order)]


# ------------------------------------------------------------------------------------------------
# Worker side: train_net.main with a probe, and the frozen-BN calibration
# ------------------------------------------------------------------------------------------------
class _StateLines(logging.Handler):
    """Collects the "Long-tail state:" log messages of this process."""

    def __init__(self, sink: list):
        super().__init__(logging.INFO)
        self.sink = sink

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("Long-tail state:"):
            self.sink.append(msg)


def state_bytes(message: str) -> int:
    """Bytes named by a "Long-tail state:" message: its first size (``N B|KiB|MiB|GiB``) that is
    not an "available" figure; 0 when it names none."""
    m = _SIZE.search(message)
    return int(round(float(m.group(1)) * _UNITS[m.group(2)])) if m else 0


def process_state_bytes(messages: Sequence[str]) -> int:
    """
    Long-tail state of one process from its "Long-tail state:" messages. Several messages may
    describe the same state (e.g. an object memory when it is built and when it is allocated):
    messages are grouped by their subject (the first two words after the prefix, e.g. "object
    memory", "LOCE mean"), each subject counts once with its largest size, subjects add up.
    """
    largest: Dict[str, int] = {}
    for message in messages:
        subject = " ".join(message[len("Long-tail state:"):].replace(",", " ").split()[:2])
        largest[subject] = max(largest.get(subject, 0), state_bytes(message))
    return sum(largest.values())


def _process_start_time() -> float:
    """Epoch seconds at which this process started (from /proc; ``time.time()`` elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


def _probed_main(args, probe_prefix: str):
    """``train_net.main(args)`` in one (launched) process, recording the probe of this process."""
    record = {"pid": os.getpid(), "process_start": _process_start_time(), "iter_times": [],
              "losses": [], "state_lines": [], "first_iter_start": None, "error": None}
    handler = _StateLines(record["state_lines"])
    logging.getLogger("longtail").addHandler(handler)
    try:
        return _run_probed(args, record)
    except BaseException as e:
        text = str(e).strip()
        record["error"] = f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".strip()
        raise
    finally:
        logging.getLogger("longtail").removeHandler(handler)
        record["end"] = time.time()
        record["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rank = 0
        try:
            from detectron2.utils import comm

            rank = comm.get_rank()
        except Exception:  # the import itself failed: the record still says why
            rank = int(os.environ.get("RANK", 0))
        record["rank"] = rank
        with open(f"{probe_prefix}.rank{rank}.json", "w") as f:
            json.dump(record, f)


def _run_probed(args, record: Dict):
    import train_net
    from detectron2.engine import HookBase

    import longtail

    class Probe(HookBase):
        """
        Wall time of every iteration (first hook: from before the other hooks' ``before_step``
        to right after ``run_step``, so checkpoint writing is not counted) and the logged total
        loss (main process). The first ``before_step`` follows every ``before_train``, LOCE's
        initialisation pass included.
        """

        def before_train(self):
            record["before_train"] = time.time()

        def before_step(self):
            if record["first_iter_start"] is None:
                record["first_iter_start"] = time.time()
            self._start = time.perf_counter()

        def after_step(self):
            record["iter_times"].append(time.perf_counter() - self._start)
            history = self.trainer.storage.histories().get("total_loss")
            if history is not None:
                record["losses"].append(float(history.latest()))

    build_hooks = longtail.Trainer.build_hooks

    def build_hooks_with_probe(trainer):
        return [Probe(), *build_hooks(trainer)]

    longtail.Trainer.build_hooks = build_hooks_with_probe
    return train_net.main(args)


def worker_train_net(argv: Sequence[str]) -> None:
    """``_train_net --probe PREFIX <train_net.py arguments>``: train_net's argument parsing and
    launch (``longtail.launch``), each process running :func:`_probed_main`."""
    from detectron2.engine import default_argument_parser

    from longtail import launch
    from longtail.launch import resolve_dist_url

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--probe", required=True)
    known, rest = pre.parse_known_args(argv)
    args = default_argument_parser().parse_args(rest)
    print("Command Line Args:", args, flush=True)
    launch(_probed_main, args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank,
           dist_url=resolve_dist_url(args.dist_url, args.num_machines, rest),
           args=(args, known.probe))


def calibrate_frozen_bn(backbone, images) -> Dict[str, float]:
    """
    Set every FrozenBatchNorm2d of ``backbone.bottom_up`` (in forward order, one pass) so that it
    standardises its input over ``images`` (``[N, 3, H, W]``, normalised pixels): per channel
    ``weight = 1 / sqrt(var + eps)``, ``bias = -mean * weight`` (running statistics left at the
    identity, as detectron2 loads MSRA weights). Returns the largest absolute backbone output
    before and after, and the number of layers set.
    """
    import torch
    from detectron2.layers import FrozenBatchNorm2d

    layers = [m for m in backbone.bottom_up.modules() if isinstance(m, FrozenBatchNorm2d)]

    def standardise(module, inputs):
        x = inputs[0].detach().double()
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        scale = (var + module.eps).rsqrt()
        module.weight.copy_(scale.to(module.weight.dtype))
        module.bias.copy_((-mean * scale).to(module.bias.dtype))
        module.running_mean.zero_()
        module.running_var.fill_(1.0 - module.eps)

    with torch.no_grad():
        before = max(float(v.abs().max()) for v in backbone(images).values())
        handles = [m.register_forward_pre_hook(standardise) for m in layers]
        try:
            backbone(images)
        finally:
            for h in handles:
                h.remove()
        after = max(float(v.abs().max()) for v in backbone(images).values())
    return {"layers": len(layers), "max_abs_output_identity_bn": before,
            "max_abs_output_calibrated": after}


def worker_calibrate(argv: Sequence[str]) -> None:
    """``_calibrate --config-file F --output PTH --version V [KEY VALUE ...]``: see module doc."""
    import numpy as np
    import torch
    from detectron2.data import detection_utils
    from detectron2.data import transforms as T
    from detectron2.modeling import build_backbone
    from detectron2.structures import ImageList

    from longtail import rehearsal

    parser = argparse.ArgumentParser(prog="lvis_rehearsal.py _calibrate")
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--version", required=True, choices=sorted(rehearsal.VERSIONS))
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = "cpu"
    rehearsal.ensure_rehearsal()
    image_root = rehearsal.rehearsal_paths(rehearsal.default_root(), args.version)["image_root"]
    first = rehearsal.IMAGE_ID_OFFSETS[args.version, "train"] + 1
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1)
    tensors = []
    for image_id in range(first, first + CALIBRATION_IMAGES):
        path = os.path.join(image_root, "train2017", f"{image_id:012d}.jpg")
        image = detection_utils.read_image(path, format=cfg.INPUT.FORMAT)
        image = resize.get_transform(image).apply_image(image)
        chw = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)), dtype=torch.float32)
        tensors.append((chw - mean) / std)
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    backbone.eval()
    batch = ImageList.from_tensors(tensors, backbone.size_divisibility).tensor
    stats = calibrate_frozen_bn(backbone, batch)
    state = {f"backbone.bottom_up.{k}": v for k, v in backbone.bottom_up.state_dict().items()}
    tmp = args.output + ".tmp"
    torch.save({"model": state, "__author__": "tools/lvis_rehearsal.py (calibrated frozen BN, "
                "rehearsal only)", "calibration": stats}, tmp)
    os.replace(tmp, args.output)
    print(json.dumps(stats), flush=True)


# ------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Options of one invocation (see ``main``'s arguments)."""

    d2: str = "v0.6"
    mode: str = "rehearsal"  # or "real-names"
    iters: int = 4
    extra_iters: int = 2
    num_gpus: int = 2
    jobs: int = 1
    output: str = os.path.join(ROOT, "output", "lvis_rehearsal")
    force: bool = False
    rerun_failed: bool = False
    keep_checkpoints: bool = False  # False: prune a run's checkpoints once its phases ran
    mfs_init_images: int = 1
    lr_scale: float = 0.01
    rois_per_image: int = 0  # 0: the config's MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    dets_per_image: int = 20  # TEST.DETECTIONS_PER_IMAGE of the evaluation (0: the config's)
    eval_split: str = "val"  # or "minival" (rehearsal mode; real-names evaluates the config's)
    threads: int = 0  # torch threads per process; 0: cores // (jobs x num_gpus), at least 1
    timeout: float = 3600.0
    wrapper: str = DEFAULT_WRAPPER
    rehearsal_root: str = ""
    opts: List[str] = field(default_factory=list)
    # config path -> the phases to run (a subset of PHASES, in order); default: all three
    phases: Dict[str, Sequence[str]] = field(default_factory=dict)


def command_prefix(settings: Settings) -> List[str]:
    """The interpreter command of a d2 version: this Python, through the wrapper for "main"."""
    if settings.d2 == "v0.6":
        return [sys.executable]
    if settings.d2 == "main":
        if not os.path.isfile(settings.wrapper):
            raise FileNotFoundError(
                f"--d2 main needs the script that puts detectron2 main first on PYTHONPATH; "
                f"{settings.wrapper!r} does not exist. Pass --d2-main-wrapper PATH.")
        return ["bash", settings.wrapper, sys.executable]
    raise ValueError(f"--d2 {settings.d2!r}: choose v0.6, main or both.")


def _environment(settings: Settings) -> Dict[str, str]:
    """The children's environment: the rehearsal root, and for ``--d2 v0.6`` no ``PYTHONPATH``
    entry that provides another detectron2 (e.g. when this tool runs under the main wrapper)."""
    env = dict(os.environ)
    if settings.d2 == "v0.6" and env.get("PYTHONPATH"):
        entries = env["PYTHONPATH"].split(os.pathsep)
        kept = [e for e in entries if not os.path.isfile(os.path.join(e, "detectron2",
                                                                       "__init__.py"))]
        env["PYTHONPATH"] = os.pathsep.join(kept)
    env["LONGTAIL_REHEARSAL_ROOT"] = settings.rehearsal_root
    if settings.mode == "real-names":
        env["DETECTRON2_DATASETS"] = settings.rehearsal_root
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_dir(settings: Settings, info: ConfigInfo) -> str:
    """``<output>/<d2>/<mode>/<LVIS folder>/<config stem>``."""
    return os.path.join(settings.output, settings.d2, settings.mode, info.folder, info.stem)


def _run_process(cmd: List[str], log_path: str, env: Dict[str, str], timeout: float) -> Dict:
    """Run ``cmd`` (own process group) with its output in ``log_path``; rc, wall and timeout."""
    start = time.time()
    with open(log_path, "w") as log:
        log.write("+ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    return {"rc": rc, "launched": start, "wall_s": time.time() - start, "timed_out": timed_out}


def first_error_line(log_path: str, probes: Sequence[Dict], outcome: Dict) -> str:
    """
    The first error of a failed phase: the exception of the process that failed first (the
    others usually fail afterwards, e.g. on a closed connection), else the first exception line
    of the log, else how the process ended.
    """
    failed = [p for p in probes if p.get("error")]
    if failed:
        return min(failed, key=lambda p: p.get("end", math.inf))["error"]
    if outcome.get("timed_out"):
        return f"timed out after {outcome['wall_s']:.0f} s"
    found = _first_exception(log_path)
    if found:
        return found
    rc = outcome.get("rc")
    if rc is not None and rc < 0:
        return f"killed by signal {-rc}" + (" (out of memory?)" if rc == -9 else "")
    return f"exit status {rc}"


def _first_exception(log_path: str) -> Optional[str]:
    """The exception line that ends the first traceback of a log (its first unindented line after
    "Traceback (most recent call last):"), else the first line that looks like one."""
    in_traceback, loose = False, None
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                text = line.rstrip("\n")
                if text.startswith("Traceback (most recent call last):"):
                    in_traceback = True
                elif in_traceback and text and not text[0].isspace():
                    if not text.startswith("torch.multiprocessing.spawn."):
                        return text.strip()
                    # the launcher's wrapper around a worker's error: the worker's traceback follows
                    in_traceback, loose = False, loose or text.strip()
                elif loose is None and _ERROR_LINE.match(text.strip()):
                    loose = text.strip()
    except OSError:
        return None
    return loose


def _read_probes(prefix: str) -> List[Dict]:
    out = []
    for path in sorted(glob.glob(glob.escape(prefix) + ".rank*.json")):
        with open(path) as f:
            out.append(json.load(f))
    return sorted(out, key=lambda p: p.get("rank", 0))


def calibration_weights(settings: Settings, info: ConfigInfo) -> str:
    """The calibrated stage-1 initialisation of ``info`` (built once per d2 version)."""
    path = os.path.join(settings.output, settings.d2, "calibration", info.folder,
                        info.stem + ".pth")
    if os.path.exists(path) and not settings.force:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = [*command_prefix(settings), os.path.abspath(__file__), "_calibrate",
           "--config-file", info.path, "--output", path, "--version", info.version, *INPUT_OPTS]
    outcome = _run_process(cmd, path[:-4] + ".log", _environment(settings), settings.timeout)
    if outcome["rc"] != 0:
        raise RuntimeError("calibration failed: " + first_error_line(path[:-4] + ".log", [],
                                                                        outcome))
    return path


def phase_options(settings: Settings, info: ConfigInfo, phase: str, out: str,
                  weights: str) -> List[str]:
    """``train_net.py`` arguments of one phase (see module docstring)."""
    if settings.mode == "real-names":
        train_name, test_name = info.facts["train"][0], info.facts["test"][0]
    else:
        train_name = f"rehearsal_lvis_{info.version}_train"
        test_name = f"rehearsal_lvis_{info.version}_{settings.eval_split}"
    ims = IMS_PER_PROCESS * settings.num_gpus
    opts = [*INPUT_OPTS, "SOLVER.IMS_PER_BATCH", str(ims), "DATALOADER.NUM_WORKERS", "0",
            "SEED", "0",
            "DATASETS.TRAIN", f"('{train_name}',)", "OUTPUT_DIR", out,
            "SOLVER.BASE_LR", repr(info.facts["base_lr"] * settings.lr_scale)]
    if info.facts["memory"] == "mfs":  # other configs refuse memory keys
        opts += ["MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS", str(settings.mfs_init_images)]
    if settings.rois_per_image > 0:
        opts += ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", str(settings.rois_per_image)]
    if phase == "eval":
        if settings.dets_per_image > 0:
            opts += ["TEST.DETECTIONS_PER_IMAGE", str(settings.dets_per_image)]
        return ["--eval-only", *opts, "DATASETS.TEST", f"('{test_name}',)",
                "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), *settings.opts]
    max_iter = settings.iters + (settings.extra_iters if phase == "resume" else 0)
    opts += ["DATASETS.TEST", "()", "SOLVER.MAX_ITER", str(max_iter),
             # only model_final.pth (and its per-process state): the resume starts from it
             "SOLVER.CHECKPOINT_PERIOD", str(10 ** 9), "MODEL.WEIGHTS", weights]
    return (["--resume"] if phase == "resume" else []) + opts + list(settings.opts)


def reductions(settings: Settings, info: ConfigInfo) -> List[str]:
    """What this rehearsal reduces relative to the config, in words."""
    facts = info.facts
    out = [f"IMS_PER_BATCH {facts['ims_per_batch']} -> {IMS_PER_PROCESS * settings.num_gpus}"]
    if settings.lr_scale != 1.0:
        out.append(f"BASE_LR {facts['base_lr']:g} -> {facts['base_lr'] * settings.lr_scale:g}")
    if 0 < settings.rois_per_image != facts["rois_per_image"]:
        out.append(f"RoIs/image {facts['rois_per_image']} -> {settings.rois_per_image}")
    if 0 < settings.dets_per_image != facts["dets_per_image"]:
        out.append(f"eval detections/image {facts['dets_per_image']} -> {settings.dets_per_image}")
    if settings.mode == "rehearsal" and settings.eval_split != "val":
        out.append(f"evaluated on {settings.eval_split}")
    if facts["memory"] == "mfs" and facts["mfs_init_images"] != settings.mfs_init_images:
        out.append(f"MFS init {facts['mfs_init_images']} -> {settings.mfs_init_images} img/class")
    return out


def summarise_phases(phases: Dict[str, Dict]) -> Dict:
    """Headline figures of a run from its phases (see module docstring)."""
    train = phases.get("train", {})
    steps = [t for name in ("train", "resume") for t in phases.get(name, {}).get("iter_times",
                                                                                  [])[1:]]
    rss = {}
    for phase in phases.values():
        for rank, mib in enumerate(phase.get("peak_rss_mib", [])):
            rss[rank] = max(rss.get(rank, 0.0), mib)
    return {
        "to_first_iter_s": train.get("to_first_iter_s"),
        "step_s": statistics.median(steps) if steps else None,
        "peak_rss_mib": [rss[r] for r in sorted(rss)],
        "state_bytes": train.get("state_bytes", []),
        "eval_s": phases.get("eval", {}).get("wall_s"),
    }


def run_phase(settings: Settings, info: ConfigInfo, phase: str, out: str, weights: str) -> Dict:
    """One train_net invocation with the probe; returns what it measured."""
    prefix = os.path.join(out, f"probe_{phase}")
    for stale in glob.glob(glob.escape(prefix) + ".rank*.json"):
        os.remove(stale)
    cmd = [*command_prefix(settings), os.path.abspath(__file__), "_train_net", "--probe", prefix,
           "--config-file", info.path, "--num-gpus", str(settings.num_gpus),
           *phase_options(settings, info, phase, out, weights)]
    log_path = os.path.join(out, f"{phase}.log")
    outcome = _run_process(cmd, log_path, _environment(settings), settings.timeout)
    probes = _read_probes(prefix)
    main_probe = probes[0] if probes else {}
    result = {
        "command": " ".join(cmd),
        "rc": outcome["rc"],
        "wall_s": outcome["wall_s"],
        "iter_times": main_probe.get("iter_times", []),
        "losses": main_probe.get("losses", []),
        "peak_rss_mib": [p["maxrss_kib"] / 1024 for p in probes],
        "state_lines": [p.get("state_lines", []) for p in probes],
        "state_bytes": [process_state_bytes(p.get("state_lines", [])) for p in probes],
        "processes": len(probes),
    }
    if main_probe.get("first_iter_start"):
        result["to_first_iter_s"] = main_probe["first_iter_start"] - outcome["launched"]
    ok = outcome["rc"] == 0 and len(probes) == settings.num_gpus
    if ok and phase != "eval" and not result["iter_times"]:
        ok, result["error"] = False, "no training iteration ran"
    bad = [x for x in result["losses"] if not math.isfinite(x)]
    if ok and bad:
        ok, result["error"] = False, f"non-finite total loss logged: {bad[:3]}"
    if ok and phase == "eval":
        path = os.path.join(out, "eval_results.json")
        if os.path.exists(path):
            with open(path) as f:
                result["metrics"] = json.load(f)
        else:
            ok, result["error"] = False, "no eval_results.json was written"
    if not ok and "error" not in result:
        result["error"] = first_error_line(log_path, probes, outcome)
    result["ok"] = ok
    return result


def _shown(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it, else absolute."""
    path = os.path.abspath(path)
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


def prune_checkpoints(out: str, keep_final: bool) -> float:
    """
    Delete the checkpoints of a finished run in ``out`` (a LOCE stage-2 run's per-process
    state alone is 2.3 GiB): every ``*.pth`` except ``model_final.pth`` when ``keep_final`` (a
    stage 1 whose model a stage 2 starts from), and ``last_checkpoint``. Returns the MiB freed.
    """
    freed = 0
    for path in glob.glob(os.path.join(glob.escape(out), "*.pth")):
        if keep_final and os.path.basename(path) == "model_final.pth":
            continue
        freed += os.path.getsize(path)
        os.remove(path)
    if not keep_final and os.path.exists(os.path.join(out, "last_checkpoint")):
        os.remove(os.path.join(out, "last_checkpoint"))
    return freed / 2 ** 20


def run_config(settings: Settings, info: ConfigInfo, parent: Optional[Future] = None,
               keep_final: bool = True) -> Dict:
    """
    Calibrate (stage 1) or take the stage-1 model (stage 2), then train, resume and evaluate;
    writes and returns ``rehearsal_result.json`` (reused unless ``--force`` / ``--rerun-failed``).
    Unless ``settings.keep_checkpoints``, the run's checkpoints are deleted afterwards, all but
    ``model_final.pth`` when ``keep_final`` (see :func:`prune_checkpoints`).
    """
    out = run_dir(settings, info)
    result_path = os.path.join(out, RESULT_FILE)
    if os.path.exists(result_path) and not settings.force:
        with open(result_path) as f:
            previous = json.load(f)
        if previous["status"] == "pass" or not settings.rerun_failed:
            return previous
    result = {"config": info.path, "version": info.version, "stage": info.stage,
              "d2": settings.d2, "mode": settings.mode, "facts": info.facts,
              "iters": [settings.iters, settings.iters + settings.extra_iters],
              "num_gpus": settings.num_gpus, "reduced": reductions(settings, info),
              "output_dir": _shown(out), "phases": {}}
    parent_result = parent.result() if parent is not None else None
    if parent_result is not None and parent_result["status"] != "pass":
        result.update(status="skipped", error=f"stage 1 {parent_result['config']} did not pass")
        print(f"[lvis_rehearsal] {settings.d2} {settings.mode} {info.path}: skipped, "
              f"{result['error']}", flush=True)
        return result  # not written: rerun once stage 1 passes
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    print(f"[lvis_rehearsal] {settings.d2} {settings.mode} {info.path}: start", flush=True)
    start = time.time()
    try:
        if parent_result is not None:
            weights = os.path.join(ROOT, parent_result["output_dir"], "model_final.pth")
            result["init"] = "stage-1 rehearsal model_final.pth"
        else:
            weights = calibration_weights(settings, info)
            result["init"] = "calibrated frozen-BN random init"
        result["weights"] = _shown(weights)
        status, error = "pass", None
        phases = settings.phases.get(info.path, PHASES)
        if not phases or phases[0] != "train" or not set(phases) <= set(PHASES):
            raise ValueError(f"phases {phases!r} of {info.path}: start with 'train', from {PHASES}")
        result["phases_run"] = list(phases)
        for phase in phases:
            measured = run_phase(settings, info, phase, out, weights)
            result["phases"][phase] = measured
            if not measured["ok"]:
                status, error = f"fail ({phase})", measured["error"]
                break
    except (RuntimeError, OSError) as e:
        status, error = "fail (set-up)", str(e).splitlines()[0]
    result.update(status=status, error=error, wall_s=time.time() - start,
                  **summarise_phases(result["phases"]))
    if not settings.keep_checkpoints:
        result["pruned_mib"] = prune_checkpoints(out, keep_final=keep_final)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"[lvis_rehearsal] {settings.d2} {settings.mode} {info.path}: {status}"
          + (f": {error}" if error else "") + f" ({result['wall_s']:.0f} s)", flush=True)
    return result


def run_configs(settings: Settings, configs: Sequence[ConfigInfo]) -> List[Dict]:
    """Run ``configs`` (ordered by :func:`select_configs`), ``settings.jobs`` at a time, every
    stage 2 after its stage 1; returns their results in the same order."""
    from longtail import rehearsal

    settings.rehearsal_root = os.path.abspath(settings.rehearsal_root or rehearsal.default_root())
    rehearsal.ensure_rehearsal(settings.rehearsal_root)
    if "LONGTAIL.NUM_THREADS" not in settings.opts:
        # always set: a process with more threads than its share of the cores slows down
        # several-fold as soon as anything else runs (OpenMP threads waiting on each other)
        threads = settings.threads or max(
            1, (os.cpu_count() or 1) // (settings.jobs * settings.num_gpus))
        settings.opts = [*settings.opts, "LONGTAIL.NUM_THREADS", str(threads)]
    # a stage 1's model_final.pth is kept for its stage 2s (this call's or a later one's)
    parents = {i.parent for i in all_configs().values() if i.parent}
    futures: Dict[str, Future] = {}
    with ThreadPoolExecutor(max_workers=settings.jobs) as pool:
        for info in configs:
            futures[info.path] = pool.submit(run_config, settings, info,
                                             futures.get(info.parent) if info.parent else None,
                                             info.path in parents)
    return [futures[info.path].result() for info in configs]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def collect_results(output: str) -> List[Dict]:
    """Every ``rehearsal_result.json`` under ``output`` (long-tail state bytes recomputed from
    the stored log lines with the current :func:`process_state_bytes`)."""
    found = []
    for path in sorted(glob.glob(os.path.join(output, "*", "*", "*", "*", RESULT_FILE))):
        with open(path) as f:
            result = json.load(f)
        lines = result.get("phases", {}).get("train", {}).get("state_lines")
        if lines is not None:
            result["state_bytes"] = [process_state_bytes(per) for per in lines]
        found.append(result)
    return found


def _num(value: Optional[float], digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n:,.0f}"


def _state(values: Sequence[int]) -> str:
    if not values:
        return "n/a"
    if not any(values):
        return "0"
    return " / ".join(f"{v / 2 ** 20:,.1f} MiB" if v >= 2 ** 20 else f"{v / 2 ** 10:.1f} KiB"
                      for v in values)


def render(results: Sequence[Dict], machine: str, total_configs: int = 32,
           commands: Sequence[str] = ()) -> str:
    """The docs section: what was run and how it was measured, then one table per mode
    (``total_configs``: the number of LVIS configs, for the coverage line; ``commands``: the
    tool commands that produced the results, default the make target's)."""
    commands = list(commands) or ["python tools/lvis_rehearsal.py --d2 both",
                                  "python tools/lvis_rehearsal.py --d2 both --real-names"]
    baseline = {}
    for r in results:
        if r["config"].endswith(BASELINE) and r.get("step_s"):
            baseline[r["d2"], r["mode"], r["version"]] = r["step_s"]
    lines = [
        f"Machine: {machine}. Commands (repository root, one after the other): "
        + "; ".join(f"`{c}`" for c in commands)
        + " (`make lvis-rehearsal` runs the first with the defaults); machine-readable: "
        "`docs/lvis_rehearsal_results.json`.",
        "",
        "Every LVIS config at its real class count on the LVIS **rehearsal** data "
        "(`longtail.rehearsal`: LVIS v1's / v0.5's real categories and r/c/f buckets, generated "
        "40-64 px images; code paths only, no accuracy). Per config and detectron2 version: "
        "train a few iterations on CPU with the project launcher (gloo), checkpoint, `--resume` "
        "a few more, then `--eval-only` on the 120 validation images (every class has "
        "validation objects), or on their first 24 (`minival`) where the last column says so. "
        "Reduced for every config: 64 / 96 px input, 2 images per process "
        "(the configs' per-GPU batch, so per-process memories have their real size), no "
        "data-loader workers, no evaluation during training, the learning rate scaled to a real "
        "run's first iterations (detectron2 stretches the warmup over a short run's MAX_ITER); "
        "stage 1 starts from a calibrated random initialisation (frozen BN standardised on 16 "
        "rehearsal images; ImageNet / COCO weights are not available here), stage 2 from its "
        "stage 1's rehearsal model. The values per config are in the last column; the tool's "
        "docstring says why each is reduced.",
        "",
        "Columns: *start* = seconds from starting the training process to its first iteration "
        "(data, model, LOCE's initialisation pass); *step* = median iteration time (s) over both "
        "training phases, first iteration of each excluded, and its ratio to "
        f"`{BASELINE}` of the same version and run; *peak RSS* = each process's "
        "`ru_maxrss` (MiB; largest over the three phases); *long-tail state* = bytes per "
        "process named by the \"Long-tail state:\" log lines of the training phase (object "
        "memory, LOCE mean scores); *eval* = wall time of the `--eval-only` process (start-up, "
        "inference, LVIS evaluation).",
    ]
    modes = sorted({r["mode"] for r in results})
    for mode in modes:
        rows = [r for r in results if r["mode"] == mode]
        coverage = ", ".join(
            f"{d2}: {sum(r['d2'] == d2 for r in rows)} of {total_configs} configs"
            f" ({sum(r['d2'] == d2 and r['status'] == 'pass' for r in rows)} pass)"
            for d2 in sorted({r["d2"] for r in rows}))
        lines += ["", f"**{mode}** ("
                  + ("`DATASETS` = `rehearsal_lvis_<version>_{train,val,minival}`"
                     if mode == "rehearsal"
                     else "the configs' own `lvis_*` names, `DETECTRON2_DATASETS` = rehearsal "
                          "root, detectron2's built-in registrations") + f"; {coverage}):", "",
                  "| config | d2 | result | start (s) | step (s) | step vs RFS | peak RSS per "
                  "process (MiB) | long-tail state per process | eval (s) | reduced vs config |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        rows.sort(key=lambda r: (r["version"] != "v1", r["config"], r["d2"]))
        for r in rows:
            base = baseline.get((r["d2"], r["mode"], r["version"]))
            ratio = f"{r['step_s'] / base:.2f}x" if base and r.get("step_s") else "n/a"
            status = r["status"] + (f": `{r['error'][:160]}`" if r.get("error") else "")
            lines.append(
                f"| `{r['config'][len('configs/'):]}` | {r['d2']} | {status} | "
                f"{_num(r.get('to_first_iter_s'), 0)} | {_num(r.get('step_s'), 2)} | {ratio} | "
                f"{' / '.join(_mib(m) for m in r.get('peak_rss_mib', [])) or 'n/a'} | "
                f"{_state(r.get('state_bytes', []))} | {_num(r.get('eval_s'), 0)} | "
                f"{'; '.join(r.get('reduced', []))} |")
    return "\n".join(lines)


def write_report(output: str, docs: str, note: str = "", commands: Sequence[str] = ()) -> str:
    """Render every result under ``output`` into docs/benchmarks.md and the results json
    (``note``: appended to the machine description, e.g. what else ran on it; ``commands``:
    the runs' tool commands, see :func:`render`)."""
    from tools.benchmarks_md import machine
    from tools.benchmarks_md import replace_section

    results = collect_results(output)
    where = machine() + (f" ({note})" if note else "")
    text = render(results, where, len(all_configs()), commands)
    with open(os.path.join(docs, "lvis_rehearsal_results.json"), "w") as f:
        json.dump({"machine": where, "commands": list(commands), "results": results}, f,
                  indent=1)
    replace_section(os.path.join(docs, "benchmarks.md"), SECTION, text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_train_net":
        worker_train_net(argv[1:])
        return 0
    if argv and argv[0] == "_calibrate":
        worker_calibrate(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["*"],
                        help="fnmatch patterns on config paths or file names (default: all)")
    parser.add_argument("--d2", choices=("v0.6", "main", "both"), default="v0.6")
    parser.add_argument("--real-names", action="store_true",
                        help="the configs' own lvis_* dataset names with DETECTRON2_DATASETS at "
                             "the rehearsal root")
    parser.add_argument("--iters", type=int, default=4, help="iterations of the first phase")
    parser.add_argument("--extra-iters", type=int, default=2, help="iterations after --resume")
    parser.add_argument("--num-gpus", type=int, default=2,
                        help="processes per run (CPU: gloo), 2 images each")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "lvis_rehearsal"))
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs"))
    parser.add_argument("--force", action="store_true", help="rerun runs that have a result")
    parser.add_argument("--rerun-failed", action="store_true", help="rerun failed runs")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep every run's checkpoints (default: only the model_final.pth "
                        "of stage 1s, which their stage 2s start from)")
    parser.add_argument("--no-write", action="store_true", help="leave docs/ unchanged")
    parser.add_argument("--note", default="",
                        help="added to the machine description in the docs (e.g. shared cores)")
    parser.add_argument("--report-command", action="append", default=[],
                        help="with --report-only: a tool command that produced the results, "
                        "shown in the docs (repeat for each; default: the make target's)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: render the results found under --output")
    parser.add_argument("--mfs-init-images", type=int, default=1,
                        help="MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS (LOCE's: 5)")
    parser.add_argument("--lr-scale", type=float, default=0.01,
                        help="SOLVER.BASE_LR factor (see the module docstring)")
    parser.add_argument("--rois-per-image", type=int, default=0,
                        help="MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE (0: the config's)")
    parser.add_argument("--dets-per-image", type=int, default=20,
                        help="TEST.DETECTIONS_PER_IMAGE of the evaluation (0: the config's)")
    parser.add_argument("--eval-split", choices=("val", "minival"), default="val",
                        help="rehearsal split of the evaluation (minival: its first 24 images)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: cores / (jobs x num-gpus))")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per phase")
    parser.add_argument("--d2-main-wrapper", default=DEFAULT_WRAPPER)
    parser.add_argument("--rehearsal-root", default="",
                        help="rehearsal data root (default: longtail.rehearsal.default_root())")
    parser.add_argument("opts", nargs=argparse.REMAINDER,
                        help="KEY VALUE pairs passed to every train_net call")
    args = parser.parse_args(argv)
    if len(args.opts) % 2:
        parser.error(f"trailing options must be KEY VALUE pairs, got {args.opts}")
    if min(args.iters, args.num_gpus, args.jobs) < 1 or args.extra_iters < 1:
        parser.error("--iters, --extra-iters, --num-gpus and --jobs must be >= 1")
    configs = select_configs(args.configs, all_configs())
    start = time.time()
    if not args.report_only:
        print("[lvis_rehearsal] configs: " + ", ".join(c.path for c in configs), flush=True)
    for d2 in (() if args.report_only else ("v0.6", "main") if args.d2 == "both" else (args.d2,)):
        settings = Settings(
            d2=d2, mode="real-names" if args.real_names else "rehearsal", iters=args.iters,
            extra_iters=args.extra_iters, num_gpus=args.num_gpus, jobs=args.jobs,
            output=os.path.abspath(args.output), force=args.force,
            rerun_failed=args.rerun_failed, keep_checkpoints=args.keep_checkpoints,
            mfs_init_images=args.mfs_init_images,
            lr_scale=args.lr_scale, rois_per_image=args.rois_per_image,
            dets_per_image=args.dets_per_image, eval_split=args.eval_split,
            threads=args.threads,
            timeout=args.timeout, wrapper=args.d2_main_wrapper,
            rehearsal_root=args.rehearsal_root, opts=list(args.opts))
        run_configs(settings, configs)
    print(f"[lvis_rehearsal] done in {time.time() - start:.0f} s", flush=True)
    if args.no_write:
        print(render(collect_results(os.path.abspath(args.output)), "this machine"))
    else:
        ran = [] if args.report_only else ["python tools/lvis_rehearsal.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))]
        print(write_report(os.path.abspath(args.output), args.docs, args.note,
                           args.report_command or ran))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
