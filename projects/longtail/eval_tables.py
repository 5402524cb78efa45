"""Per-category LVIS results: one row per category (id, name, r/c/f bucket, training image and
instance counts, validation instances, AP, AP50, AP75, AP_fixed) and the summary by frequency
bucket, as json, csv and a printed table.
"""
import csv
import json
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import numpy as np
from detectron2.utils.file_io import PathManager

from .datasets import FREQUENCY, IMAGE_COUNT, INSTANCE_COUNT
from .eval_backends import FREQUENCIES, LVISGroundTruth, TaskResult

__all__ = ["per_category_rows", "frequency_summary", "format_frequency_table", "write_json_list",
           "write_csv"]


# ------------------------------------------------------------------------------------------
# Per-category tables
# ------------------------------------------------------------------------------------------
def _category_metadata(metadata, gt: LVISGroundTruth):
    """Per category id: name, frequency, training image and instance counts. From detectron2's
    metadata (longtail.datasets.prepare_datasets) where present, else the json's fields."""
    cats = gt.categories
    out = {}
    names = metadata.get("thing_classes", None) if metadata is not None else None
    freq = metadata.get(FREQUENCY, None) if metadata is not None else None
    img_count = metadata.get(IMAGE_COUNT, None) if metadata is not None else None
    inst_count = metadata.get(INSTANCE_COUNT, None) if metadata is not None else None
    id_map = metadata.get("thing_dataset_id_to_contiguous_id", None) if metadata is not None else None
    for i, c in enumerate(cats):
        j = id_map[c["id"]] if id_map else c["id"] - 1
        def pick(values, key):
            if values is not None and 0 <= j < len(values):
                return values[j]
            return c.get(key)
        out[c["id"]] = {
            "name": pick(names, "name"),
            "frequency": pick(freq, "frequency"),
            "train_image_count": pick(img_count, "image_count"),
            "train_instance_count": pick(inst_count, "instance_count"),
        }
    return out


def _pct(x) -> Optional[float]:
    return None if x is None or not np.isfinite(x) else float(x) * 100.0


def per_category_rows(
    result: TaskResult, gt: LVISGroundTruth, metadata=None, fixed: Optional[TaskResult] = None
) -> List[Dict]:
    """One row per category: id, name, frequency, training image/instance counts, validation
    instances, detections evaluated, AP, AP50, AP75 (percent; None = no validation instances),
    and AP_fixed when ``fixed`` is given."""
    meta = _category_metadata(metadata, gt)
    ap, ap50, ap75 = result.per_category(), result.per_category(0.5), result.per_category(0.75)
    apf = fixed.per_category() if fixed is not None else None
    num_gt = gt.num_instances()
    rows = []
    for k, cid in enumerate(result.category_ids):
        row = OrderedDict(category_id=cid, **meta[cid])
        row["val_instance_count"] = num_gt.get(cid, 0)
        row["AP"], row["AP50"], row["AP75"] = _pct(ap[k]), _pct(ap50[k]), _pct(ap75[k])
        if apf is not None:
            row["AP_fixed"] = _pct(apf[k])
        rows.append(row)
    return rows


def frequency_summary(rows: List[Dict]) -> List[Dict]:
    """Rows r, c, f, all: categories, categories with validation instances, training
    instances, and the mean over those categories of AP, AP50, AP75 (and AP_fixed)."""
    keys = [k for k in ("AP", "AP50", "AP75", "AP_fixed") if rows and k in rows[0]]
    out = []
    for bucket in FREQUENCIES + ("all",):
        sel = [r for r in rows if bucket == "all" or r["frequency"] == bucket]
        evaluated = [r for r in sel if r["AP"] is not None]
        entry = OrderedDict(
            frequency=bucket,
            categories=len(sel),
            evaluated=len(evaluated),
            train_instances=int(sum(r["train_instance_count"] or 0 for r in sel)),
        )
        for k in keys:
            vals = [r[k] for r in evaluated if r[k] is not None]
            entry[k] = float(np.mean(vals)) if vals else None
        out.append(entry)
    return out


def write_json_list(f, items: Sequence, chunk: int = 65536) -> None:
    """Write ``json.dumps(items)`` to the text file ``f`` one slice of ``chunk`` items at a time:
    the same text (C encoder), without the whole string in memory (GBs at LVIS v1 val scale)."""
    f.write("[")
    for start in range(0, len(items), chunk):
        if start:
            f.write(", ")
        f.write(json.dumps(items[start:start + chunk])[1:-1])
    f.write("]")


def write_csv(path: str, rows: List[Dict]) -> None:
    with PathManager.open(path, "w") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (f"{v:.4f}" if isinstance(v, float) else v))
                        for k, v in r.items()})


def format_frequency_table(summary: Dict[str, List[Dict]]) -> str:
    """Markdown table of :func:`frequency_summary` rows for each task."""
    lines = []
    for task, rows in summary.items():
        keys = [k for k in ("AP", "AP50", "AP75", "AP_fixed") if rows and k in rows[0]]
        lines.append(f"| {task} | categories (evaluated) | train instances | "
                     + " | ".join(keys) + " |")
        lines.append("|---|---|---|" + "---|" * len(keys))
        for r in rows:
            vals = " | ".join("-" if r[k] is None else f"{r[k]:.2f}" for k in keys)
            lines.append(f"| {r['frequency']} | {r['categories']} ({r['evaluated']}) | "
                         f"{r['train_instances']} | {vals} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
