"""Per-category analysis and plots of long-tail runs (matplotlib, PNG).

Reads what :class:`longtail.evaluation.LongTailLVISEvaluator` writes into a run's output
directory (``OUTPUT_DIR/inference/<dataset>/per_category_{bbox,segm}.json``) and, for LOCE
runs, the mean-score statistics that the checkpoint carries
(``roi_heads.box_predictor.cls_loss.mean_score.mean_scores``; older checkpoints:
``roi_heads.box_predictor.mean_score.mean_scores``).

* :func:`plot_ap_vs_instances`: AP per category against its training instance count (log x),
  coloured by rare / common / frequent, for one run or two runs overlaid (a line joins each
  category's two points);
* :func:`plot_mean_scores`: LOCE's running mean classification score per category against its
  training instance count (the "equilibrium" picture);
* :func:`plot_run`: every plot of an output directory (``tools/plot_results.py`` is the command).
"""
import glob
import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "FREQ_COLORS",
    "find_per_category",
    "load_per_category",
    "mean_scores_from_checkpoint",
    "plot_ap_vs_instances",
    "plot_mean_scores",
    "plot_run",
]

logger = logging.getLogger(__name__)

FREQ_COLORS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}
FREQ_NAMES = {"r": "rare", "c": "common", "f": "frequent"}
MEAN_SCORE_SUFFIX = "mean_score.mean_scores"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def find_per_category(output_dir: str, task: str = "bbox") -> List[str]:
    """``per_category_{task}.json`` files under ``output_dir`` (the run's OUTPUT_DIR, or an
    evaluator's inference directory), sorted."""
    direct = os.path.join(output_dir, f"per_category_{task}.json")
    if os.path.exists(direct):
        return [direct]
    return sorted(glob.glob(os.path.join(output_dir, "inference", "*", f"per_category_{task}.json")))


def load_per_category(output_dir: str, task: str = "bbox") -> List[Dict]:
    """The per-category rows of a run (the first dataset when it evaluated several)."""
    files = find_per_category(output_dir, task)
    if not files:
        raise FileNotFoundError(
            f"No per_category_{task}.json under {output_dir} (or {output_dir}/inference/*/). "
            "Evaluate the run with the project's evaluator first: python train_net.py "
            "--config-file ... --eval-only MODEL.WEIGHTS <run>/model_final.pth OUTPUT_DIR <run>"
        )
    with open(files[0]) as f:
        return json.load(f)


def _check_rows(rows: Sequence[Dict], source: str) -> None:
    need = {"category_id", "frequency", "train_instance_count", "AP"}
    if not rows or not need <= set(rows[0]):
        raise ValueError(f"{source}: per-category rows need the fields {sorted(need)}")


def plot_ap_vs_instances(
    runs: Sequence[Tuple[str, Sequence[Dict]]],
    path: str,
    title: str = "AP per category",
    metric: str = "AP",
) -> str:
    """
    Scatter of ``metric`` per category against training instances (log scale), coloured by
    frequency bucket. ``runs`` = [(label, rows)] with one or two runs; with two, each
    category's points are joined and the second run uses a different marker.
    Categories without validation instances (AP None) are left out. Returns ``path``.
    """
    plt = _pyplot()
    if not 1 <= len(runs) <= 2:
        raise ValueError("plot_ap_vs_instances takes one or two runs")
    for label, rows in runs:
        _check_rows(rows, label)
    markers = ("o", "^")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    if len(runs) == 2:
        second = {r["category_id"]: r for r in runs[1][1]}
        for r in runs[0][1]:
            o = second.get(r["category_id"])
            if o is not None and r[metric] is not None and o[metric] is not None:
                x = max(r["train_instance_count"] or 0, 1)
                ax.plot([x, x], [r[metric], o[metric]], color="0.75", lw=0.8, zorder=1)
    for i, (label, rows) in enumerate(runs):
        for f in ("r", "c", "f"):
            sel = [r for r in rows if r["frequency"] == f and r[metric] is not None]
            if not sel:
                continue
            x = [max(r["train_instance_count"] or 0, 1) for r in sel]
            y = [r[metric] for r in sel]
            mean = float(np.mean(y))
            name = f"{FREQ_NAMES[f]} (mean {mean:.1f})"
            ax.scatter(x, y, s=28, marker=markers[i], color=FREQ_COLORS[f], alpha=0.85,
                       edgecolors="k" if i else "none", linewidths=0.4, zorder=2,
                       label=f"{label}: {name}" if len(runs) == 2 else name)
    ax.set_xscale("log")
    ax.set_xlabel("training instances of the category (log scale)")
    ax.set_ylabel(f"{metric} (%)")
    top = max([r[metric] for _, rows in runs for r in rows if r[metric] is not None] + [0.0])
    ax.set_ylim(-2, min(102, max(10.0, top * 1.08)))
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title if len(runs) == 1 else f"{title}: {runs[0][0]} (o) vs {runs[1][0]} (^)")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def mean_scores_from_checkpoint(path: str) -> Optional[np.ndarray]:
    """LOCE's mean classification scores [C + 1] (background last) from a checkpoint, or None
    when the checkpoint carries no such statistics (models trained without EBL)."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else {}
    for key, value in state.items():
        if key.endswith(MEAN_SCORE_SUFFIX):
            return np.asarray(value.detach().cpu().float() if hasattr(value, "detach") else value)
    return None


def plot_mean_scores(
    mean_scores: np.ndarray, rows: Sequence[Dict], path: str, title: str = "Mean classification score"
) -> str:
    """LOCE's per-category mean score against training instances (log-log), coloured by r/c/f:
    a balanced ("equilibrium") classifier has a flat cloud; a biased one rises with frequency."""
    plt = _pyplot()
    scores = np.asarray(mean_scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(rows) + 1:
        raise ValueError(
            f"the checkpoint has {len(scores) - 1} foreground mean scores but the run has "
            f"{len(rows)} categories"
        )
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for f in ("r", "c", "f"):
        idx = [i for i, r in enumerate(rows) if r["frequency"] == f]
        if not idx:
            continue
        x = [max(rows[i]["train_instance_count"] or 0, 1) for i in idx]
        y = scores[idx]
        ax.scatter(x, y, s=28, color=FREQ_COLORS[f], alpha=0.85,
                   label=f"{FREQ_NAMES[f]} (mean {float(np.mean(y)):.3f})")
    ax.axhline(scores[-1], color="0.5", ls="--", lw=1, label=f"background ({scores[-1]:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training instances of the category (log scale)")
    ax.set_ylabel("mean classification score m_c (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(
    output_dir: str,
    compare_dir: Optional[str] = None,
    checkpoint: Optional[str] = None,
    out_dir: Optional[str] = None,
    labels: Optional[Tuple[str, str]] = None,
) -> List[str]:
    """
    Every plot for a run: ``ap_vs_instances_{bbox,segm}.png`` (with ``compare_dir``:
    ``ap_vs_instances_{task}_compare.png`` too) and, when the checkpoint (default
    ``output_dir/model_final.pth``) carries LOCE statistics, ``mean_score_vs_instances.png``.
    Written to ``out_dir`` (default ``output_dir/plots``). Returns the written paths.
    """
    out_dir = out_dir or os.path.join(output_dir, "plots")
    labels = labels or (os.path.basename(os.path.normpath(output_dir)),
                        os.path.basename(os.path.normpath(compare_dir or "")) or "other")
    written = []
    tasks = [t for t in ("bbox", "segm") if find_per_category(output_dir, t)]
    if not tasks:
        load_per_category(output_dir, "bbox")  # raises the explanatory error
    for task in tasks:
        rows = load_per_category(output_dir, task)
        written.append(plot_ap_vs_instances(
            [(labels[0], rows)], os.path.join(out_dir, f"ap_vs_instances_{task}.png"),
            title=f"{task} AP per category"))
        if compare_dir:
            other = load_per_category(compare_dir, task)
            written.append(plot_ap_vs_instances(
                [(labels[0], rows), (labels[1], other)],
                os.path.join(out_dir, f"ap_vs_instances_{task}_compare.png"),
                title=f"{task} AP"))
    checkpoint = checkpoint or os.path.join(output_dir, "model_final.pth")
    if os.path.exists(checkpoint):
        scores = mean_scores_from_checkpoint(checkpoint)
        if scores is None:
            logger.info("%s carries no LOCE mean-score statistics: no equilibrium plot.", checkpoint)
        else:
            rows = load_per_category(output_dir, tasks[0])
            written.append(plot_mean_scores(
                scores, rows, os.path.join(out_dir, "mean_score_vs_instances.png"),
                title=f"LOCE mean classification score ({os.path.basename(checkpoint)})"))
    return written
