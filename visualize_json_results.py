#!/usr/bin/env python
"""
Draw LVIS-format predictions beside the ground truth, one PNG per image (detectron2's
``tools/visualize_json_results.py`` interface, for LVIS-format datasets, the embedded one
included):

    python visualize_json_results.py --input output/demo/inference/longtail_synth_val/lvis_instances_results.json \\
        --output output/demo/vis --dataset longtail_synth_val --conf-threshold 0.5
    # only rare categories (predictions and ground truth), 20 images
    python visualize_json_results.py --input ... --output ... --dataset ... --frequency r --max-images 20

Left: predictions with score >= --conf-threshold (boxes, masks when the file has them); right:
the ground truth. ``--frequency`` keeps only categories of the given buckets (r, c, f) on both
sides. A results file that is not valid JSON, or that names categories or images the dataset
lacks, stops with an error naming the file and the bad ids.
"""
import argparse
import os
from collections import defaultdict

import numpy as np


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="LVIS-format results json (list of detections)")
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--dataset", default="longtail_synth_val", help="name of the dataset")
    p.add_argument("--conf-threshold", default=0.5, type=float, help="confidence threshold")
    p.add_argument("--frequency", nargs="+", choices=["r", "c", "f"],
                   help="show only categories of these frequency buckets")
    p.add_argument("--max-images", type=int, default=0,
                   help="draw at most this many images (0: all)")
    p.add_argument("--only-with-predictions", action="store_true",
                   help="skip images with no prediction above the threshold")
    p.add_argument("--scale", type=float, default=0.0,
                   help="drawing scale (0: enlarge images whose short side is < 480 px)")
    return p


def create_instances(predictions, image_size, threshold, keep_classes):
    from detectron2.structures import Boxes, BoxMode, Instances

    ret = Instances(image_size)
    chosen = [i for i, p in enumerate(predictions)
              if p["score"] >= threshold and (keep_classes is None or p["category_id"] - 1 in keep_classes)]
    chosen.sort(key=lambda i: -predictions[i]["score"])
    scores = np.asarray([predictions[i]["score"] for i in chosen], dtype=np.float32)
    boxes = np.asarray([predictions[i]["bbox"] for i in chosen], dtype=np.float32).reshape(-1, 4)
    ret.scores = scores
    ret.pred_boxes = Boxes(BoxMode.convert(boxes, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS))
    ret.pred_classes = np.asarray([predictions[i]["category_id"] - 1 for i in chosen], dtype=np.int64)
    if chosen and "segmentation" in predictions[chosen[0]]:
        ret.pred_masks = [predictions[i]["segmentation"] for i in chosen]
    return ret


def _titled(img, title):
    import cv2

    bar = np.full((22, img.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], axis=0)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import cv2
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import Visualizer

    import longtail  # noqa: F401  (registers the embedded dataset)
    from longtail.datasets import FREQUENCY, prepare_datasets
    from longtail.evaluation import LVISGroundTruth, check_results, load_results_json

    logger = setup_logger(name="longtail")
    prepare_datasets([args.dataset])
    metadata = MetadataCatalog.get(args.dataset)
    if metadata.get("evaluator_type", None) != "lvis":
        raise SystemExit(f"{args.dataset} is not an LVIS-format dataset (evaluator_type "
                         f"{metadata.get('evaluator_type', None)!r}).")
    predictions = load_results_json(args.input)
    check_results(predictions, LVISGroundTruth(metadata.json_file), source=args.input)
    by_image = defaultdict(list)
    for p in predictions:
        by_image[p["image_id"]].append(p)

    keep_classes = None
    if args.frequency:
        freq = metadata.get(FREQUENCY, None)
        if freq is None:
            raise SystemExit(f"{args.dataset} has no r/c/f frequency metadata (longtail_class_frequency) for --frequency.")
        keep_classes = {i for i, f in enumerate(freq) if f in args.frequency}

    dicts = DatasetCatalog.get(args.dataset)
    os.makedirs(args.output, exist_ok=True)
    written = 0
    for dic in dicts:
        if args.max_images and written >= args.max_images:
            break
        preds = create_instances(by_image.get(dic["image_id"], []), (dic["height"], dic["width"]),
                                 args.conf_threshold, keep_classes)
        if args.only_with_predictions and len(preds) == 0:
            continue
        if keep_classes is not None and len(preds) == 0 and not any(
                a["category_id"] in keep_classes for a in dic.get("annotations", [])):
            continue  # nothing of the selected frequency buckets in this image
        img = cv2.imread(dic["file_name"], cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read image {dic['file_name']}")
        img = img[:, :, ::-1]
        scale = args.scale or max(1.0, 480.0 / min(img.shape[:2]))
        gt = dict(dic)
        if keep_classes is not None:
            gt["annotations"] = [a for a in dic.get("annotations", [])
                                 if a["category_id"] in keep_classes]
        vis_pred = Visualizer(img, metadata, scale=scale).draw_instance_predictions(preds).get_image()
        vis_gt = Visualizer(img, metadata, scale=scale).draw_dataset_dict(gt).get_image()
        shown = f" [{'/'.join(args.frequency)}]" if args.frequency else ""
        concat = np.concatenate([
            _titled(vis_pred, f"predictions >= {args.conf_threshold:g}{shown}: {len(preds)}"),
            _titled(vis_gt, f"ground truth{shown}: {len(gt.get('annotations', []))}"),
        ], axis=1)
        name = os.path.splitext(os.path.basename(dic["file_name"]))[0] + ".png"
        cv2.imwrite(os.path.join(args.output, name), concat[:, :, ::-1])
        written += 1
    logger.info("Wrote %d images to %s", written, args.output)
    return written


if __name__ == "__main__":
    main()
