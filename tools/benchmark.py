#!/usr/bin/env python
"""
The benchmarks on the embedded dataset, one tool, two subcommands, one writer of docs/benchmarks.md:

    python tools/benchmark.py table [--size cpu|gpu|smoke] [--seeds 0 1 2] [--methods ...]
                                    [--jobs N] [--docs DIR] [--no-write] [KEY VALUE ...]
    python tools/benchmark.py suite {sampling,loce,bags,memory} [--num-gpus N] [--no-write]
                                    [KEY VALUE ...]

``table`` (``make benchmark``) is the long-tail benchmark: every method side by side, several
seeds, shortened schedules. ``suite`` trains one group of models with the configs' full schedules
(one seed) and writes that group's section: ``sampling`` (uniform vs repeat-factor), ``loce``
(normed-mask stage 1 -> EBL stage 2), ``bags`` (uniform baseline -> BAGS stage 2), ``memory``
(RIO vs RFS; LOCE EBL + MFS vs EBL alone, float16 / float32 / int8 memory); each row reports bbox
and segm AP, AP50, APr, APc, APf and APf - APr. Both reuse a run whose ``eval_results.json``
exists, so an interrupted command continues where it stopped. (Earlier sections of
docs/benchmarks.md name the former ``tools/benchmark_all.py`` = ``table`` and
``tools/benchmark_runs.py SUITE`` = ``suite SUITE``.)

The table, in detail:

Trains and evaluates, for each seed, the uniform baseline, repeat-factor sampling, BAGS (stage 2
on the baseline), LOCE (normed-mask stage 1, then EBL + MFS), RIO, RIO replay + EBL, Seesaw (with
RFS), EQLv2 (uniform sampling, as the official recipe), the federated loss (with RFS) and NorCal on
the RFS runs (``tools/calibrate.py``: gamma chosen on training images, then the validation set
with and without it; no training of its own, so its cost columns are the RFS runs'), and writes

* ``docs/benchmark_results.json``: per method and seed the bbox / segm metrics, training step
  time, peak memory, training and evaluation wall time; means and standard deviations;
* the "Long-tail benchmark" section of ``docs/benchmarks.md`` (mean +- std over seeds; step time
  and peak memory as ratios to the baseline of the same seed, all measured by this one command);
* ``docs/benchmark_ap_by_frequency.png`` (APr / APc / APf per method, error bars = std) and
  ``docs/benchmark_per_category_<best>.png`` (per-category AP against training instances,
  baseline vs the method with the best mean APr).

A run whose ``eval_results.json`` exists is reused, an interrupted one resumes (``--resume``):
the command can be stopped and restarted at any time. Sizes (``--size``):

* ``cpu`` (default): the embedded dataset (2,000 training images <= 160 px) and a third of the
  synthetic configs' schedule (400 iterations of 8 images; stage 2s shortened alike): three
  seeds of the ten methods are 27 trainings of about 10 minutes each (about 2.5 hours on 2 CPU
  cores, two at a time);
* ``gpu``: ``longtail_synth_large`` (96 categories, 8,000 training / 1,000 validation images
  of 192-320 px, larger objects), 16 images per iteration and a 15x longer schedule, for a GPU
  machine.

* ``smoke``: a few iterations on the mini dataset, to check the command end to end.

``--jobs N`` trains N runs at a time (a method's stages stay in order, BAGS waits for the
baseline of its seed), each limited to cores / N torch threads: on 2 cores, ``--jobs 2`` gives
more images per second than one run on both cores. Step-time ratios stay comparable because
every run, baseline included, shares the machine the same way (they are per seed ratios).
Trailing ``KEY VALUE`` pairs are passed to every ``train_net.py`` call. ``--methods`` runs a subset;
with ``--section NAME`` its table goes to its own section of docs/benchmarks.md (and json and
plots named after it) instead of replacing the full table.

"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools.benchmarks_md import machine, replace_section  # noqa: E402

SECTION = "Long-tail benchmark"
KEYS = ("AP", "APr", "APc", "APf")

# method -> list of stages (config, stage kind); a stage-2 loads the previous stage's weights
METHODS = {
    "baseline": ("uniform sampling, softmax CE", [("configs/Synthetic/mask_rcnn_R18_FPN.yaml", "s1")]),
    "rfs": ("repeat-factor sampling", [("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", "s1")]),
    "bags": ("BAGS (stage 2 on the baseline)", [("@baseline", "s1"),
                                                ("configs/Synthetic/bags_stage2.yaml", "bags")]),
    "loce": ("LOCE: EBL + MFS (stage 2 on a normed-mask stage 1)", [
        ("configs/Synthetic/loce_stage1_normed_mask.yaml", "s1"),
        ("configs/Synthetic/loce_stage2_ebl_mfs.yaml", "loce")]),
    "rio": ("RIO: repeat-factor + replay + cosine classifier", [
        ("configs/Synthetic/rio_R18_FPN.yaml", "s1")]),
    "rio_ebl": ("RIO replay + EBL (combination)", [("configs/Synthetic/rio_ebl_R18_FPN.yaml", "s1")]),
    "seesaw": ("Seesaw loss + normalised classifier, repeat-factor sampling", [
        ("configs/Synthetic/seesaw_R18_FPN.yaml", "s1")]),
    "eqlv2": ("EQLv2 (sigmoid, gradient-guided re-weighting), uniform sampling", [
        ("configs/Synthetic/eqlv2_R18_FPN.yaml", "s1")]),
    "fed_loss": ("federated sigmoid CE, repeat-factor sampling", [
        ("configs/Synthetic/fed_loss_R18_FPN.yaml", "s1")]),
    # post-hoc: the rfs runs, evaluated with NorCal's gamma chosen by tools/calibrate.py on
    # training images; no training of its own (its cost columns are the rfs runs')
    "norcal": ("RFS + NorCal (gamma chosen on training images)", [
        ("@rfs", "s1"), ("configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml", "norcal")]),
}

SIZES = {
    "cpu": {
        "common": [],
        "s1": ["SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(300, 370)", "SOLVER.WARMUP_ITERS", "60",
               "SOLVER.CHECKPOINT_PERIOD", "200"],
        "bags": ["SOLVER.MAX_ITER", "200", "SOLVER.STEPS", "(140, 185)", "SOLVER.WARMUP_ITERS", "20",
                 "SOLVER.CHECKPOINT_PERIOD", "100"],
        "loce": ["SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(50, 85)", "SOLVER.WARMUP_ITERS", "20",
                 "SOLVER.CHECKPOINT_PERIOD", "50"],
        "norcal": [],
    },
    # a few iterations on the mini dataset: checks the command end to end in minutes
    "smoke": {
        "common": ["DATASETS.TRAIN", "('longtail_synth_mini_train',)",
                   "DATASETS.TEST", "('longtail_synth_mini_val',)", "SOLVER.IMS_PER_BATCH", "4",
                   "DATALOADER.NUM_WORKERS", "0"],
        "s1": ["SOLVER.MAX_ITER", "6", "SOLVER.WARMUP_ITERS", "2", "SOLVER.CHECKPOINT_PERIOD", "3"],
        "bags": ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1"],
        "loce": ["SOLVER.MAX_ITER", "3", "SOLVER.WARMUP_ITERS", "1",
                 "MODEL.LOCE.MFS.INIT_IMAGES_PER_CLASS", "1"],
        "norcal": [],
    },
    "gpu": {
        "common": ["DATASETS.TRAIN", "('longtail_synth_large_train',)",
                   "DATASETS.TEST", "('longtail_synth_large_val',)",
                   "MODEL.ROI_HEADS.NUM_CLASSES", "96",
                   "INPUT.MIN_SIZE_TRAIN", "(224, 256, 288)", "INPUT.MAX_SIZE_TRAIN", "384",
                   "INPUT.MIN_SIZE_TEST", "256", "INPUT.MAX_SIZE_TEST", "384",
                   "SOLVER.IMS_PER_BATCH", "16", "DATALOADER.NUM_WORKERS", "4"],
        "s1": ["SOLVER.MAX_ITER", "6000", "SOLVER.STEPS", "(4500, 5500)", "SOLVER.WARMUP_ITERS", "500",
               "SOLVER.CHECKPOINT_PERIOD", "2000"],
        "bags": ["SOLVER.MAX_ITER", "3000", "SOLVER.STEPS", "(2000, 2750)", "SOLVER.WARMUP_ITERS",
                 "100", "SOLVER.CHECKPOINT_PERIOD", "1000"],
        "loce": ["SOLVER.MAX_ITER", "1500", "SOLVER.STEPS", "(750, 1250)", "SOLVER.WARMUP_ITERS",
                 "100", "SOLVER.CHECKPOINT_PERIOD", "500"],
        "norcal": [],
    },
}

# the synthetic dataset of each size (its *_train / *_val are registered by ``import longtail``)
DATASETS = {"cpu": "longtail_synth", "smoke": "longtail_synth_mini", "gpu": "longtail_synth_large"}

# methods that add one component to another method: their effect on it is reported too
REFERENCE = {"rio": "rfs", "rio_ebl": "rio", "seesaw": "rfs", "fed_loss": "rfs", "norcal": "rfs"}

# tools/calibrate.py arguments of the norcal stage, per size
CALIBRATION = {"cpu": ["--images", "300"], "gpu": ["--images", "1000"],
               "smoke": ["--images", "10", "--gammas", "0.5,1"]}

_STAMP = re.compile(r"\[(\d\d/\d\d \d\d:\d\d:\d\d)")


def _stamp(line):
    m = _STAMP.search(line)
    return datetime.strptime(m.group(1), "%m/%d %H:%M:%S") if m else None


def eval_seconds(log_file):
    """Seconds from 'Start inference' to the last evaluation table of the run's final evaluation."""
    start = end = None
    with open(log_file) as f:
        for line in f:
            if "Start inference on" in line:
                start, end = _stamp(line), None
            elif start is not None and ("Evaluation results for" in line or "AP by frequency" in line):
                end = _stamp(line)
    return (end - start).total_seconds() if start and end else None


def iteration_times(metrics_file):
    """{iteration: detectron2's logged 'time' (median of the 20 iterations up to it)}; records
    re-logged after a resume replace the earlier ones of the same iteration."""
    by_iter = {}
    with open(metrics_file) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "time" in rec and "iteration" in rec:
                by_iter[rec["iteration"]] = rec["time"]
    return by_iter


def step_seconds(metrics_file):
    """Median over the run of the logged per-iteration times."""
    times = list(iteration_times(metrics_file).values())
    return statistics.median(times) if times else None


def train_seconds(metrics_file):
    """
    Training time of a run from its metrics: sum over the logged windows of (iterations in the
    window) x (the window's median iteration time). Unlike wall time around the process, this is
    right for a run that was interrupted and resumed.
    """
    total, prev = 0.0, -1
    for it, t in sorted(iteration_times(metrics_file).items()):
        total += (it - prev) * t
        prev = it
    return total


def train(config, out, opts, log):
    """Train + evaluate one stage (resumable); returns its measurements."""
    result = os.path.join(ROOT, out, "eval_results.json")
    cost_file = os.path.join(ROOT, out, "benchmark_cost.json")
    if os.path.exists(result) and os.path.exists(cost_file):
        with open(cost_file) as f:
            cost = json.load(f)
        if "train_seconds" not in cost:  # written by an older version of this script
            cost["train_seconds"] = train_seconds(os.path.join(ROOT, out, "metrics.json"))
        return cost
    cmd = [sys.executable, "train_net.py", "--config-file", config, "--resume", *opts,
           "OUTPUT_DIR", out]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    with open(result) as f:
        metrics = json.load(f)
    cost = {
        # a task without detections has no results (NaN, as detectron2 reports an empty one)
        "results": {t: {k: metrics.get(t, {}).get(k, float("nan"))
                        for k in ("AP", "AP50", "APr", "APc", "APf")} for t in ("bbox", "segm")},
        "wall_seconds": time.time() - t0,
        "step_seconds": step_seconds(os.path.join(ROOT, out, "metrics.json")),
        "train_seconds": train_seconds(os.path.join(ROOT, out, "metrics.json")),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "eval_seconds": eval_seconds(os.path.join(ROOT, out, "log.txt")),
    }
    with open(cost_file, "w") as f:
        json.dump(cost, f, indent=1)
    return cost


def calibrate(config, out, trained, opts, size, log):
    """NorCal on a trained run (resumable): tools/calibrate.py sweeps gamma on training images and
    evaluates the validation set with and without it; returns the calibrated results and, as
    its cost, the trained run's (NorCal trains nothing)."""
    result = os.path.join(ROOT, out, "calibration", "eval_results.json")
    report_file = os.path.join(ROOT, out, "calibration", "calibration.json")
    if not (os.path.exists(result) and os.path.exists(report_file)):
        cmd = [sys.executable, "tools/calibrate.py", "--config-file", config, *CALIBRATION[size],
               *opts, "MODEL.ROI_HEADS.NAME", "LongTailROIHeads",
               "MODEL.WEIGHTS", os.path.join(trained, "model_final.pth"), "OUTPUT_DIR", out]
        print("+", " ".join(cmd), flush=True)
        with open(log, "a") as f:
            if subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT) != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed; see {log}")
    with open(report_file) as f:
        report = json.load(f)
    with open(os.path.join(ROOT, trained, "benchmark_cost.json")) as f:
        cost = dict(json.load(f))
    (dataset, both), = report["test"].items()
    keys = ("AP", "AP50", "APr", "APc", "APf")
    # a task without detections has no results: NaN
    cost["results"], cost["uncalibrated"] = ({t: {k: both[which].get(t, {}).get(k, float("nan"))
                                                  for k in keys} for t in ("bbox", "segm")}
                                             for which in ("calibrated", "uncalibrated"))
    cost["gamma"] = report["chosen_gamma"]
    cost["per_category_dir"] = os.path.join(out, "calibration", dataset,
                                            f"gamma{report['chosen_gamma']:g}")
    cost["eval_seconds"] = None  # calibrate.py's evaluations are not timed like train_net's
    return cost


def describe_dataset(name, train_json, val_json):
    """"`name`, C classes (r / c / f), N training and M validation images", from the jsons."""
    data = {}
    for split, path in (("train", train_json), ("val", val_json)):
        with open(path) as f:
            data[split] = json.load(f)
    cats = data["train"]["categories"]
    freq = Counter(c["frequency"] for c in cats)
    return (f"`{name}`, {len(cats)} classes ({freq['r']} r / {freq['c']} c / {freq['f']} f), "
            f"{len(data['train']['images'])} training and {len(data['val']['images'])} validation "
            "images")


def dataset_description(size):
    """:func:`describe_dataset` of the synthetic dataset a size trains on."""
    import longtail  # noqa: F401  (registers the synthetic datasets)
    from detectron2.data import MetadataCatalog

    name = DATASETS[size]
    paths = [MetadataCatalog.get(f"{name}_{split}").json_file for split in ("train", "val")]
    # relative to train_net.py's working directory
    return describe_dataset(name, *(p if os.path.isabs(p) else os.path.join(ROOT, p)
                                    for p in paths))


def run_method(method, seed, size, root, log, extra_opts=(), wait_for=None):
    """Train a method's stages in order; ``wait_for``: future of a run this one loads (BAGS)."""
    if wait_for is not None:
        wait_for.result()
    stages = METHODS[method][1]
    preset = SIZES[size]
    out_prev, costs = None, []
    for config, kind in stages:
        if config.startswith("@"):  # reuse another method's run of this seed
            out_prev = os.path.join(root, config[1:], f"seed{seed}", "s1")
            continue
        out = os.path.join(root, method, f"seed{seed}", kind)
        opts = [*preset["common"], *preset[kind], "SEED", str(seed), *extra_opts]
        if kind == "norcal":
            costs.append(calibrate(config, out, out_prev, opts, size, log))
            out_prev = costs[-1].pop("per_category_dir")
            continue
        if kind != "s1":
            opts += ["MODEL.WEIGHTS", os.path.join(out_prev, "model_final.pth")]
        costs.append(train(config, out, opts, log))
        out_prev = out
    final = costs[-1]
    return {
        "results": final["results"],
        "output_dir": out_prev,
        "step_seconds": final["step_seconds"],
        "peak_rss_mib": max(c["peak_rss_mib"] for c in costs),
        "train_seconds": sum(c["train_seconds"] for c in costs),
        "eval_seconds": final["eval_seconds"],
        "stages": len(costs),
        **{k: final[k] for k in ("gamma", "uncalibrated") if k in final},
    }


def norcal_note(raw, seeds, size):
    """The gamma tools/calibrate.py chose per seed, and whether its uncalibrated evaluation of
    the rfs model reproduced the rfs row (same weights, same evaluator)."""
    gammas = ", ".join(f"seed {s}: {raw['norcal'][s]['gamma']:g}" for s in seeds)
    same = ("rfs" in raw and all(raw["norcal"][s]["uncalibrated"] == raw["rfs"][s]["results"]
                                 for s in seeds))
    return (f"NorCal: the rfs runs (no training of its own: its cost columns are the rfs runs'), "
            f"gamma chosen by `tools/calibrate.py` on {CALIBRATION[size][1]} training images by "
            f"segm AP ({gammas}); its evaluation without calibration "
            + ("reproduces the rfs row exactly." if same else
               "differs from the rfs row (see docs/benchmark_results.json)."))


def _mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(pair, digits=1):
    m, s = pair
    return "n/a" if m is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def summarise(raw, seeds):
    summary = {}
    for method, per_seed in raw.items():
        entry = {}
        for task in ("bbox", "segm"):
            for k in KEYS:
                entry[f"{task}_{k}"] = _mean_std([per_seed[s]["results"][task][k] for s in seeds])
        base = raw["baseline"]
        entry["step_ratio"] = _mean_std([per_seed[s]["step_seconds"] / base[s]["step_seconds"]
                                         for s in seeds])
        entry["memory_ratio"] = _mean_std([per_seed[s]["peak_rss_mib"] / base[s]["peak_rss_mib"]
                                           for s in seeds])
        entry["train_time_ratio"] = _mean_std(
            [per_seed[s]["train_seconds"] / base[s]["train_seconds"] for s in seeds])
        entry["eval_seconds"] = _mean_std([per_seed[s]["eval_seconds"] for s in seeds])
        # effect on the baseline, paired by seed (same seed = same initialisation and data order
        # of the first images), and on the method it extends (REFERENCE) where there is one
        entry.update(_paired(per_seed, base, seeds))
        if REFERENCE.get(method) in raw:
            entry["reference"] = REFERENCE[method]
            entry.update(_paired(per_seed, raw[REFERENCE[method]], seeds, prefix="ref_"))
        summary[method] = entry
    return summary


def _paired(runs, other, seeds, prefix=""):
    """Per-seed differences ``runs - other``: mean +- std, and in how many seeds > 0 / < 0."""
    out = {}
    for task in ("bbox", "segm"):
        for k in KEYS:
            deltas = [runs[s]["results"][task][k] - other[s]["results"][task][k] for s in seeds]
            out[f"{prefix}delta_{task}_{k}"] = _mean_std(deltas)
            out[f"{prefix}up_{task}_{k}"] = sum(d > 0 for d in deltas)
            out[f"{prefix}down_{task}_{k}"] = sum(d < 0 for d in deltas)
    return out


def verdict(entry, n_seeds, task="bbox", prefix=""):
    """Plain words for a paired effect on APr and APf: consistent only if every seed agrees.

    ``prefix``: "" for the effect on the baseline, "ref_" for the effect on the reference method.
    """
    words = []
    for k in ("APr", "APf"):
        up, down = entry[f"{prefix}up_{task}_{k}"], entry[f"{prefix}down_{task}_{k}"]
        if up == n_seeds:
            words.append(f"{k} up in all {n_seeds} seeds")
        elif down == n_seeds:
            words.append(f"{k} down in all {n_seeds} seeds")
        else:
            words.append(f"{k} not consistent ({up} up, {down} down of {n_seeds} seeds)")
    return "; ".join(words)


def plots(raw, summary, seeds, docs, suffix=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from longtail.analysis import load_per_category, plot_ap_vs_instances

    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110, sharey=True)
    width = 0.27
    colors = {"APr": "#d62728", "APc": "#ff7f0e", "APf": "#1f77b4"}
    for ax, task in zip(axes, ("bbox", "segm")):
        x = np.arange(len(methods))
        for i, k in enumerate(("APr", "APc", "APf")):
            means = [summary[m][f"{task}_{k}"][0] for m in methods]
            stds = [summary[m][f"{task}_{k}"][1] for m in methods]
            ax.bar(x + (i - 1) * width, means, width, yerr=stds, capsize=3, label=k,
                   color=colors[k])
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=20)
        ax.set_title(f"{task}: mean ± std over seeds {list(seeds)}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("AP (%)")
    axes[0].legend()
    fig.suptitle("Embedded synthetic dataset (not LVIS): AP by frequency bucket")
    fig.tight_layout()
    bar_path = os.path.join(docs, f"benchmark_ap_by_frequency{suffix}.png")
    fig.savefig(bar_path)
    plt.close(fig)
    best = max((m for m in methods if m != "baseline"), key=lambda m: summary[m]["bbox_APr"][0])
    seed = seeds[0]
    rows_base = load_per_category(raw["baseline"][seed]["output_dir"], "bbox")
    rows_best = load_per_category(raw[best][seed]["output_dir"], "bbox")
    cat_path = os.path.join(docs, f"benchmark_per_category_{best}{suffix}.png")
    plot_ap_vs_instances([("baseline", rows_base), (best, rows_best)], cat_path,
                         title=f"bbox AP per category, seed {seed}")
    return bar_path, cat_path, best


# ------------------------------------------------------------------------------------------------
# suite: groups of full-schedule runs
# ------------------------------------------------------------------------------------------------
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
SUITE_KEYS = ("AP", "AP50", "APr", "APc", "APf")


def run_suite_row(config: str, out: str, num_gpus: int, opts, row_opts=()) -> dict:
    result_file = os.path.join(ROOT, out, "eval_results.json")
    if not os.path.exists(result_file):
        cmd = [sys.executable, "train_net.py", "--config-file", config, "--num-gpus",
               str(num_gpus), "--resume", *opts, *row_opts, "OUTPUT_DIR", out]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    with open(result_file) as f:
        return json.load(f)


def suite(args):
    opts = [o for o in args.opts if o != "--"]
    title, runs = SUITES[args.suite]
    rows = [(r, run_suite_row(r[1], r[2], args.num_gpus, opts, *r[3:])) for r in runs]
    lines = [
        f"Machine: {machine()}. Command (repository root): `python tools/benchmark.py suite "
        f"{args.suite}" + (f" --num-gpus {args.num_gpus}" if args.num_gpus != 1 else "")
        + (" " + " ".join(opts) if opts else "") + "`.",
        "",
        "| model | task | " + " | ".join(SUITE_KEYS) + " | APf - APr |",
        "|---|---|" + "---|" * len(SUITE_KEYS) + "---|",
    ]
    for spec, results in rows:
        name, config = spec[0], spec[1]
        extra = " " + " ".join(spec[3]) if len(spec) > 3 else ""
        for task in ("bbox", "segm"):
            m = results[task]
            vals = " | ".join(f"{m[k]:.1f}" for k in SUITE_KEYS)
            lines.append(f"| {name} (`{os.path.basename(config)}`{extra}) | {task} | {vals} | "
                         f"{m['APf'] - m['APr']:.1f} |")
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        replace_section(os.path.join(ROOT, "docs", "benchmarks.md"), title, section)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("table", help="every method x seeds, shortened schedules (make benchmark)")
    t.add_argument("--size", choices=sorted(SIZES), default="cpu")
    t.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    t.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    t.add_argument("--jobs", type=int, default=1,
                   help="runs trained at the same time, each with cores/jobs torch threads")
    t.add_argument("--no-write", action="store_true")
    t.add_argument("--section", default=SECTION,
                   help="docs/benchmarks.md section to write (another than the default also "
                        "names the json and plots after it, so a subset of the methods does not "
                        "replace the full table)")
    t.add_argument("opts", nargs=argparse.REMAINDER,
                   help="KEY VALUE pairs passed to every train_net.py call")
    t.add_argument("--docs", default=os.path.join(ROOT, "docs"),
                   help="where the section, results json and plots go")
    s = sub.add_parser("suite", help="one group of full-schedule runs and its section")
    s.add_argument("suite", choices=sorted(SUITES))
    s.add_argument("--num-gpus", type=int, default=1)
    s.add_argument("--no-write", action="store_true", help="print the section only")
    s.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run")
    return parser


def main():
    parser = build_parser()
    args = parser.parse_args()
    if args.command == "suite":
        return suite(args)
    return table(parser, args)


def table(parser, args):
    if len(args.opts) % 2:
        parser.error(f"trailing options must be KEY VALUE pairs, got {args.opts}")
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    # METHODS order (baseline first: BAGS loads it); duplicates dropped
    args.methods = [m for m in METHODS if m == "baseline" or m in args.methods]
    suffix = "" if args.section == SECTION else "_" + re.sub(r"[^a-z0-9]+", "_",
                                                             args.section.lower()).strip("_")
    root = os.path.join("output", "benchmark", args.size)
    os.makedirs(os.path.join(ROOT, root), exist_ok=True)
    log = os.path.join(ROOT, root, "runs.log")
    start = time.time()
    extra = list(args.opts)
    if args.jobs > 1 and "LONGTAIL.NUM_THREADS" not in extra:
        extra += ["LONGTAIL.NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs))]
    raw = {m: {} for m in args.methods}
    futures = {}
    # seed-major submission order: a BAGS run only waits for a baseline that already started
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for seed in args.seeds:
            for method in args.methods:
                dep = None
                for config, _ in METHODS[method][1]:
                    if config.startswith("@"):
                        dep = futures.get((config[1:], seed))
                futures[method, seed] = pool.submit(run_method, method, seed, args.size, root,
                                                    log, extra, dep)
    for (method, seed), fut in futures.items():
        raw[method][seed] = fut.result()
    summary = summarise(raw, args.seeds)
    docs = args.docs
    os.makedirs(docs, exist_ok=True)
    report = {"machine": machine(), "size": args.size, "seeds": args.seeds,
              "command": "python tools/benchmark.py table --size " + args.size
              + " --seeds " + " ".join(map(str, args.seeds))
              + (" --methods " + " ".join(args.methods) if args.methods != list(METHODS) else "")
              + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
              + (f' --section "{args.section}"' if suffix else "")
              + "".join(f" {o}" for o in args.opts),
              "methods": {m: METHODS[m][0] for m in args.methods},
              "runs": {m: {str(s): v for s, v in per.items()} for m, per in raw.items()},
              "summary": summary, "wall_seconds_this_invocation": time.time() - start}
    lines = [
        f"Machine: {report['machine']}. Command (repository root): `{report['command']}`"
        + (" (`make benchmark`)" if not suffix else "") + f"; size `{args.size}`; "
        f"machine-readable: `docs/benchmark_results{suffix}.json`.",
        "Dataset: the embedded **synthetic** long-tailed dataset "
        f"({dataset_description(args.size)}), models from scratch; these are not LVIS numbers. "
        f"Mean ± standard deviation over seeds {args.seeds}. Step time and peak memory are ratios "
        "to the baseline of the same seed, from the same command (step: median iteration time of "
        "the method's last stage; stage 2s train only part of the model; training time: all the "
        "method's stages, summed from the logged iteration times, stage 1 included where the "
        "method trains its own). Evaluation: seconds of the final evaluation on the validation "
        "images (inference + LVIS evaluation)."
        + (f" Runs were trained {args.jobs} at a time, each with "
           f"{extra[extra.index('LONGTAIL.NUM_THREADS') + 1]} torch thread(s), baselines included."
           if args.jobs > 1 else ""),
        "",
        "| method | bbox AP | bbox APr | bbox APc | bbox APf | segm AP | segm APr | segm APc | "
        "segm APf | step time | peak memory | training time | evaluation (s) |",
        "|---|" + "---|" * 12,
    ]
    for m in args.methods:
        s = summary[m]
        cells = [_fmt(s[f"{t}_{k}"]) for t in ("bbox", "segm") for k in KEYS]
        lines.append(f"| {m}: {METHODS[m][0]} | " + " | ".join(cells) + " | "
                     f"{_fmt(s['step_ratio'], 2)}x | {_fmt(s['memory_ratio'], 2)}x | "
                     f"{_fmt(s['train_time_ratio'], 2)}x | {_fmt(s['eval_seconds'], 0)} |")
    lines += [
        "",
        "Effect of each method on the baseline, paired by seed (difference to the baseline of the "
        "same seed: mean ± std over seeds, and in how many seeds it is positive); the last column "
        "compares a method with the one it extends ("
        + ", ".join(f"{m} on {r}" for m, r in REFERENCE.items()) + "), paired by seed alike:",
        "",
        "| method | bbox ΔAP | bbox ΔAPr | bbox ΔAPf | segm ΔAPr | segm ΔAPf | bbox, in words | "
        "bbox, on the method it extends (paired by seed) |",
        "|---|" + "---|" * 7,
    ]
    n = len(args.seeds)
    for m in args.methods:
        if m == "baseline":
            continue
        s = summary[m]
        cells = [f"{_fmt(s[f'delta_{t}_{k}'])} ({s[f'up_{t}_{k}']}/{n})"
                 for t, k in (("bbox", "AP"), ("bbox", "APr"), ("bbox", "APf"), ("segm", "APr"),
                              ("segm", "APf"))]
        ref = "n/a"
        if "reference" in s:
            ref = (f"vs {s['reference']}: APr {_fmt(s['ref_delta_bbox_APr'])}, APf "
                   f"{_fmt(s['ref_delta_bbox_APf'])}; {verdict(s, n, prefix='ref_')}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {verdict(s, n)} | {ref} |")
    if "norcal" in raw:
        lines += ["", norcal_note(raw, args.seeds, args.size)]
    if not args.no_write:
        bar, cat, best = plots(raw, summary, args.seeds, docs, suffix)
        lines += ["", f"![AP by frequency]({os.path.basename(bar)}) "
                  f"![per category]({os.path.basename(cat)})",
                  "", f"Per-category plot: baseline vs `{best}` (best mean bbox APr), seed "
                  f"{args.seeds[0]}."]
        with open(os.path.join(docs, f"benchmark_results{suffix}.json"), "w") as f:
            json.dump(report, f, indent=1)
        replace_section(os.path.join(docs, "benchmarks.md"), args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
