#!/usr/bin/env python
"""
Train and evaluate groups of models on the embedded synthetic dataset and write their table into
docs/benchmarks.md (one section per suite). A run whose eval_results.json exists is reused, so
an interrupted suite continues where it stopped. Run from the repository root:

    python tools/benchmark_runs.py sampling   # uniform vs repeat-factor sampling
    python tools/benchmark_runs.py loce       # LOCE stage 1 (normed mask head) -> stage 2 (EBL)
    python tools/benchmark_runs.py bags       # uniform baseline (stage 1) -> BAGS stage 2
    python tools/benchmark_runs.py memory     # RIO vs RFS; LOCE EBL + MFS vs EBL alone

Each row reports bbox and segm AP, AP50, APr, APc, APf and APf - APr. (Timings are measured
separately, on a quiet machine: these runs may share the cores with other jobs.)
"""
import argparse
import json
import os
import platform
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.benchmarks_md import replace_section  # noqa: E402

# suite -> (section title, [(row name, config, output dir)]); later runs may load earlier ones
SUITES = {
    "sampling": ("Image-level sampling", [
        ("repeat-factor (t=0.05, sqrt)", "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml",
         "output/bench_sampling/mask_rcnn_R18_FPN_rfs"),
        ("uniform", "configs/Synthetic/mask_rcnn_R18_FPN.yaml",
         "output/bench_sampling/mask_rcnn_R18_FPN"),
    ]),
    "loce": ("LOCE: Equilibrium Loss", [
        ("stage 1: normed mask head, softmax CE", "configs/Synthetic/loce_stage1_normed_mask.yaml",
         "output/synthetic/loce_stage1"),
        ("stage 2: EBL fine-tune", "configs/Synthetic/loce_stage2_ebl.yaml",
         "output/synthetic/loce_stage2_ebl"),
    ]),
    "memory": ("Object memory: RIO replay and LOCE MFS", [
        ("LOCE stage 1: normed mask head, softmax CE", "configs/Synthetic/loce_stage1_normed_mask.yaml",
         "output/synthetic/loce_stage1"),
        ("LOCE stage 2: EBL alone", "configs/Synthetic/loce_stage2_ebl.yaml",
         "output/synthetic/loce_stage2_ebl"),
        ("LOCE stage 2: EBL + MFS, float16 memory", "configs/Synthetic/loce_stage2_ebl_mfs.yaml",
         "output/synthetic/loce_stage2_ebl_mfs"),
        ("repeat-factor baseline", "configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml",
         "output/bench_sampling/mask_rcnn_R18_FPN_rfs"),
        ("RIO: repeat-factor + replay + cosine classifier", "configs/Synthetic/rio_R18_FPN.yaml",
         "output/synthetic/rio"),
        ("LOCE stage 2: EBL + MFS, float32 memory", "configs/Synthetic/loce_stage2_ebl_mfs.yaml",
         "output/synthetic/loce_stage2_ebl_mfs_fp32", ["MODEL.MEMORY.DTYPE", "float32"]),
        ("LOCE stage 2: EBL + MFS, int8 memory", "configs/Synthetic/loce_stage2_ebl_mfs.yaml",
         "output/synthetic/loce_stage2_ebl_mfs_int8", ["MODEL.MEMORY.DTYPE", "int8"]),
    ]),
    "bags": ("BAGS: balanced group softmax", [
        ("stage 1: uniform baseline, softmax CE", "configs/Synthetic/mask_rcnn_R18_FPN.yaml",
         "output/bench_sampling/mask_rcnn_R18_FPN"),
        ("stage 2: BAGS classifier", "configs/Synthetic/bags_stage2.yaml",
         "output/synthetic/bags_stage2"),
    ]),
}
KEYS = ("AP", "AP50", "APr", "APc", "APf")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, torch {torch.__version__}"


def run(config: str, out: str, num_gpus: int, opts, row_opts=()) -> dict:
    result_file = os.path.join(ROOT, out, "eval_results.json")
    if not os.path.exists(result_file):
        cmd = [sys.executable, "train_net.py", "--config-file", config, "--num-gpus",
               str(num_gpus), "--resume", *opts, *row_opts, "OUTPUT_DIR", out]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    with open(result_file) as f:
        return {"results": json.load(f)}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--num-gpus", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    args = parser.parse_args()
    opts = [o for o in args.opts if o != "--"]
    title, runs = SUITES[args.suite]

    rows = [(r[0], r[1], r[2], run(r[1], r[2], args.num_gpus, opts, *r[3:])) for r in runs]
    lines = [
        f"Machine: {machine()}. Command (repository root): `python tools/benchmark_runs.py "
        f"{args.suite}" + (f" --num-gpus {args.num_gpus}" if args.num_gpus != 1 else "")
        + (" " + " ".join(opts) if opts else "") + "`.",
        "",
        "| model | task | " + " | ".join(KEYS) + " | APf - APr |",
        "|---|---|" + "---|" * len(KEYS) + "---|",
    ]
    for (name, config, out, r), spec in zip(rows, runs):
        extra = " " + " ".join(spec[3]) if len(spec) > 3 else ""
        for task in ("bbox", "segm"):
            m = r["results"][task]
            vals = " | ".join(f"{m[k]:.1f}" for k in KEYS)
            lines.append(f"| {name} (`{os.path.basename(config)}`{extra}) | {task} | {vals} | "
                         f"{m['APf'] - m['APr']:.1f} |")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), title, section)


if __name__ == "__main__":
    main()
