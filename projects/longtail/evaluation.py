"""LVIS evaluation for long-tail research: a fast backend, per-category results, AP_fixed and AP_pool.

:class:`LongTailLVISEvaluator` extends detectron2's ``LVISEvaluator`` (same inputs; works with
``--eval-only`` and during training) and:

* evaluates with a selectable backend (``LONGTAIL.EVAL.BACKEND``): ``"lvis"`` (the official
  ``lvis`` package), ``"faster_coco_eval"`` (``COCOeval_faster(..., lvis_style=True)``) or
  ``"hotcoco"`` (``hotcoco.LVISeval``); ``"auto"`` picks the first installed of
  :data:`AUTO_ORDER` (the fastest that reproduces the official numbers, see docs/benchmarks.md);
* writes per-category AP (bbox and segm) as json and csv, with the category's id, name, r/c/f
  bucket, training image and instance counts and validation instance count, and the summary
  table by frequency bucket (``summary_by_frequency.{json,csv}``);
* optionally adds the fixed-AP protocol of Dave et al. (2021) (``AP_fixed``: the top
  ``MAX_DETS_PER_CLASS`` detections of every class over the whole dataset, no per-image cap)
  and their pooled AP (``AP_pool``) to the result dict;
* is rank-safe: predictions are gathered to the main process, which evaluates, and every process
  returns the same result dict (an evaluation error on the main process is raised everywhere).

Every backend gets the same, already selected, detections: :func:`select_detections` applies
the official package's result-side rules itself (the per-image cap, ties in input order, then
dropping detections whose area is not positive, which ``lvis`` does in ``get_ann_ids``), and the
ground truth the libraries load follows the official semantics (``iscrowd`` is ignored,
annotations with non-positive area are dropped). The backends then only match and accumulate.
The selection works on columns read once from the detection dicts (:class:`DetectionColumns`,
shared by the bbox, segm, AP_fixed and AP_pool evaluations of one set), and ``hotcoco`` gets the
selected detections as one array (plus the masks' RLEs for segm) instead of a dict each.

The concerns live in their own modules, re-exported here: the backends, the ground truth and the
detection selection in :mod:`longtail.eval_backends`, pooled AP in :mod:`longtail.eval_protocols`,
the per-category tables in :mod:`longtail.eval_tables`.

Optional libraries are imported lazily: importing this module needs only ``lvis``.
"""
import copy
import itertools
import json
import os
from collections import OrderedDict
from typing import Dict, Optional

import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import LVISEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from . import eval_backends, eval_protocols, eval_tables
from .eval_backends import (  # noqa: F401  (re-exported: the module's former contents)
    AUTO_ORDER,
    BACKENDS,
    FREQUENCIES,
    METRICS,
    DetectionColumns,
    LVISGroundTruth,
    TaskResult,
    available_backends,
    check_results,
    evaluate_detections,
    load_results_json,
    resolve_backend,
    select_detections,
)
from .eval_protocols import pooled_ap
from .eval_tables import (  # noqa: F401
    format_frequency_table,
    frequency_summary,
    per_category_rows,
    write_csv,
    write_json_list,
)

__all__ = eval_backends.__all__ + eval_protocols.__all__ + eval_tables.__all__ + [
    "LongTailLVISEvaluator",
    "build_lvis_evaluator",
]


# ------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------
class LongTailLVISEvaluator(LVISEvaluator):
    """detectron2's ``LVISEvaluator`` with a selectable backend, per-category outputs, AP_fixed,
    AP_pool and results on every process (see the module docstring)."""

    def __init__(
        self,
        dataset_name: str,
        tasks=None,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        backend: str = "auto",
        max_dets_per_image: int = 300,
        fixed_ap: bool = False,
        pooled_ap: bool = False,
        max_dets_per_class: int = 10000,
        per_category: bool = True,
    ):
        super().__init__(dataset_name, tasks, distributed, output_dir)
        self._backend = resolve_backend(backend)
        self._max_dets_per_image = max_dets_per_image
        self._fixed_ap = fixed_ap
        self._pooled_ap = pooled_ap
        self._max_dets_per_class = max_dets_per_class
        self._per_category = per_category
        self._gt = LVISGroundTruth(self._metadata.json_file, self._lvis_api)
        self._logger.info(f"LVIS evaluation backend: {self._backend}")

    def evaluate(self):
        """Gather to the main process, evaluate there, and give every process the results."""
        payload = None
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if comm.is_main_process():
                payload = self._evaluate_safely(predictions)
            if comm.get_world_size() > 1:
                payload = comm.all_gather(payload)[0]
        else:
            payload = self._evaluate_safely(self._predictions)
        status, value = payload
        if status == "error":
            raise RuntimeError(f"LVIS evaluation failed on the main process: {value}")
        return value

    def _evaluate_safely(self, predictions):
        try:
            return ("ok", self._evaluate_predictions(predictions))
        except Exception as e:  # re-raised on every process by evaluate()
            if self._distributed and comm.get_world_size() > 1:
                self._logger.exception("LVIS evaluation failed")
                return ("error", f"{type(e).__name__}: {e}")
            raise

    def _evaluate_predictions(self, predictions):
        if len(predictions) == 0:
            self._logger.warning("[LongTailLVISEvaluator] Did not receive valid predictions.")
            return {}
        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            with PathManager.open(os.path.join(self._output_dir, "instances_predictions.pth"), "wb") as f:
                torch.save(predictions, f)
        self._results = OrderedDict()
        if "proposals" in predictions[0]:
            self._eval_box_proposals(predictions)
        if "instances" in predictions[0]:
            self._eval_instances(predictions)
        return copy.deepcopy(self._results)

    def _to_lvis_ids(self, lvis_results):
        if hasattr(self._metadata, "thing_dataset_id_to_contiguous_id"):
            reverse = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
            bad = sorted({r["category_id"] for r in lvis_results} - set(reverse))
            if bad:
                raise ValueError(f"predictions have contiguous class ids {bad} that "
                                 f"{self._metadata.name} lacks")
            for r in lvis_results:
                r["category_id"] = reverse[r["category_id"]]
        else:  # LVIS: contiguous 0-based -> 1-based
            for r in lvis_results:
                r["category_id"] += 1

    def _eval_instances(self, predictions):
        lvis_results = list(itertools.chain(*[x["instances"] for x in predictions]))
        tasks = self._tasks or self._tasks_from_predictions(lvis_results)
        self._to_lvis_ids(lvis_results)
        results_file = None
        if self._output_dir:
            results_file = os.path.join(self._output_dir, "lvis_instances_results.json")
            self._logger.info(f"Saving results to {results_file}")
            with PathManager.open(results_file, "w") as f:
                write_json_list(f, lvis_results)
        if not self._do_evaluation:
            self._logger.info("Annotations are not available for evaluation.")
            return
        # the detections' fields, read once for every evaluation below
        columns = DetectionColumns(lvis_results)
        check_results(columns, self._gt, source=results_file or "predictions")
        per_cat_summary = OrderedDict()
        for task in sorted(tasks):
            self._logger.info(f"Evaluating {task} with {self._backend} ...")
            std = evaluate_detections(self._gt, columns, task, self._backend,
                                      self._max_dets_per_image, -1)
            self._logger.info(f"{task}: {std.num_detections} detections evaluated in "
                              f"{sum(std.timings.values()):.1f} s (" + ", ".join(
                                  f"{k} {v:.1f}" for k, v in std.timings.items()) + ")")
            res = OrderedDict((k, float(std.summary[k]) * 100.0) for k in METRICS)
            fixed = None
            if self._fixed_ap:
                fixed = evaluate_detections(self._gt, columns, task, self._backend, -1,
                                            self._max_dets_per_class)
                for k in ("AP", "APr", "APc", "APf"):
                    res[f"{k}_fixed"] = float(fixed.summary[k]) * 100.0
            if self._pooled_ap:
                pooled = pooled_ap(self._gt, columns, task, self._backend,
                                   self._max_dets_per_class, -1)
                for k, v in pooled.items():
                    res[k] = float(v) * 100.0
            self._logger.info(f"Evaluation results for {task}: \n" + create_small_table(res))
            self._results[task] = res
            if self._per_category:
                rows = per_category_rows(std, self._gt, self._metadata, fixed)
                per_cat_summary[task] = frequency_summary(rows)
                if self._output_dir:
                    base = os.path.join(self._output_dir, f"per_category_{task}")
                    with PathManager.open(base + ".json", "w") as f:
                        json.dump(rows, f, indent=1)
                    write_csv(base + ".csv", rows)
        if per_cat_summary:
            self._logger.info("AP by frequency bucket (mean over categories with validation "
                              "instances):\n" + format_frequency_table(per_cat_summary))
            if self._output_dir:
                path = os.path.join(self._output_dir, "summary_by_frequency")
                with PathManager.open(path + ".json", "w") as f:
                    json.dump(per_cat_summary, f, indent=1)
                write_csv(path + ".csv", [dict(task=t, **r) for t, rs in per_cat_summary.items()
                                           for r in rs])


def build_lvis_evaluator(cfg, dataset_name: str, output_folder: Optional[str] = None):
    """:class:`LongTailLVISEvaluator` configured from ``cfg.LONGTAIL.EVAL``."""
    e = cfg.LONGTAIL.EVAL
    return LongTailLVISEvaluator(
        dataset_name,
        output_dir=output_folder,
        backend=e.BACKEND,
        max_dets_per_image=e.MAX_DETS_PER_IMAGE,
        fixed_ap=e.FIXED_AP,
        pooled_ap=e.POOLED_AP,
        max_dets_per_class=e.MAX_DETS_PER_CLASS,
        per_category=e.PER_CATEGORY,
    )


# ------------------------------------------------------------------------------------------
# Command line: evaluate a results file
# ------------------------------------------------------------------------------------------
def main(argv=None) -> Dict[str, Dict[str, float]]:
    """``python tools/evaluate_results.py RESULTS.json (--dataset NAME | --gt-json PATH)
    [--tasks bbox segm] [--backend auto] [--fixed] [--pooled] [--dets-per-class 10000]``:
    evaluate an LVIS results file and print AP (and AP_fixed / AP_pool), percent."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", help="LVIS-format results json (list of detections)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", help="registered dataset name (e.g. longtail_synth_val)")
    g.add_argument("--gt-json", help="LVIS-format ground-truth json")
    p.add_argument("--tasks", nargs="+", default=None, choices=["bbox", "segm"],
                   help="default: bbox, and segm when the results have masks")
    p.add_argument("--backend", default="auto", choices=("auto",) + BACKENDS)
    p.add_argument("--max-dets-per-image", type=int, default=300)
    p.add_argument("--fixed", action="store_true", help="also AP_fixed")
    p.add_argument("--pooled", action="store_true", help="also AP_pool")
    p.add_argument("--dets-per-class", type=int, default=10000)
    args = p.parse_args(argv)

    if args.dataset:
        from . import datasets

        datasets.prepare_datasets([args.dataset])
        json_file = MetadataCatalog.get(args.dataset).json_file
    else:
        json_file = args.gt_json
    results = DetectionColumns(load_results_json(args.results))  # fields read once
    gt = LVISGroundTruth(json_file)
    check_results(results, gt, source=args.results)
    tasks = args.tasks or (["bbox", "segm"] if results.has("segmentation") else ["bbox"])
    out = OrderedDict()
    for task in tasks:
        std = evaluate_detections(gt, results, task, args.backend, args.max_dets_per_image, -1)
        res = OrderedDict((k, std.summary[k] * 100.0) for k in METRICS)
        if args.fixed:
            fixed = evaluate_detections(gt, results, task, args.backend, -1, args.dets_per_class)
            res.update((f"{k}_fixed", fixed.summary[k] * 100.0) for k in ("AP", "APr", "APc", "APf"))
        if args.pooled:
            res.update((k, v * 100.0) for k, v in
                       pooled_ap(gt, results, task, args.backend, args.dets_per_class).items())
        out[task] = res
        print(f"{task} ({std.backend}, {std.num_detections} detections)\n" + create_small_table(res))
    return out

