#!/usr/bin/env python
"""
Uniform vs repeat-factor sampling on the embedded synthetic dataset.

Trains (or reuses, when its model_final.pth exists) both Synthetic configs with the same seed and
schedule, evaluates them, and writes the "Image-level sampling" section of docs/benchmarks.md:
bbox and segm AP, APr, APc, APf, the APf - APr gap, wall-clock training time, the machine and the
command. Run from the repository root:

    python tools/benchmark_sampling.py [--output output/bench_sampling] [--num-gpus 1] [-- OPTS...]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.benchmarks_md import replace_section  # noqa: E402

RUNS = [
    ("repeat-factor (t=0.05, sqrt)", "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml"),
    ("uniform", "configs/Synthetic/mask_rcnn_R18_FPN.yaml"),
]
KEYS = ("AP", "AP50", "APr", "APc", "APf")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, no GPU" if not torch.cuda.is_available() else torch.cuda.get_device_name()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="output/bench_sampling")
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for both runs")
    args = parser.parse_args()
    opts = [o for o in args.opts if o != "--"]

    rows = []
    for name, config in RUNS:
        out = os.path.join(args.output, os.path.splitext(os.path.basename(config))[0])
        cmd = [sys.executable, "train_net.py", "--config-file", config, "--num-gpus", str(args.num_gpus),
               "--resume", *opts, "OUTPUT_DIR", out]
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True)
        seconds = time.time() - start
        with open(os.path.join(ROOT, out, "eval_results.json")) as f:
            res = json.load(f)
        timing_file = os.path.join(ROOT, out, "train_seconds.txt")
        if not os.path.exists(timing_file):  # first run trained: record its duration
            with open(timing_file, "w") as f:
                f.write(f"{seconds:.0f}\n")
        with open(timing_file) as f:
            seconds = float(f.read())
        rows.append((name, config, res, seconds))

    lines = [
        f"Machine: {machine()}. Command (from the repository root): "
        f"`python tools/benchmark_sampling.py --output {args.output} --num-gpus {args.num_gpus}"
        + (" " + " ".join(opts) if opts else "") + "`; same seed and schedule for both runs.",
        "",
        "| sampling | task | " + " | ".join(KEYS) + " | APf - APr | train time |",
        "|---|---|" + "---|" * len(KEYS) + "---|---|",
    ]
    for name, config, res, seconds in rows:
        for task in ("bbox", "segm"):
            m = res[task]
            vals = " | ".join(f"{m[k]:.1f}" for k in KEYS)
            lines.append(f"| {name} (`{os.path.basename(config)}`) | {task} | {vals} | "
                         f"{m['APf'] - m['APr']:.1f} | {seconds / 60:.1f} min |")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), "Image-level sampling", section)


if __name__ == "__main__":
    main()
