#!/usr/bin/env python
"""
Run a trained model on image files (detectron2's ``demo/demo.py`` interface): one visualised PNG
per image and one json of all detections, with category names and LVIS frequency buckets.

    python tools/predict.py --config-file configs/Synthetic/mask_rcnn_R18_FPN_rfs.yaml \\
        --input datasets/longtail_synth/val --output output/demo/predictions \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth
    # only rare categories, several inputs (files, folders, globs)
    python tools/predict.py --config-file ... --input a.jpg photos/ "shots/*.png" \\
        --output out/ --frequency r --confidence-threshold 0.3 --opts MODEL.WEIGHTS ...

The model is built as ``train_net.py --eval-only`` builds it (``longtail.Trainer.build_model``:
the class names and statistics come from the config's datasets, which must be registered and
loadable) and its weights are loaded the same way (``MODEL.WEIGHTS`` required; weights without
the box predictor are refused unless ``LONGTAIL.EVAL.ALLOW_UNTRAINED_HEADS True``). Without CUDA,
``MODEL.DEVICE`` falls back to ``cpu``.

Outputs in ``--output``: ``<image name>.png`` (detections with score >= the threshold, of the
``--frequency`` buckets if given) and ``predictions.json``: a list, one entry per image,
``{"file_name", "height", "width", "detections": [{"category_id" (the dataset's json id),
"category_name", "frequency", "score", "bbox" [x, y, w, h] in pixels, "segmentation" (RLE, when
the model predicts masks)}]}``, sorted by score.
"""
import argparse
import glob
import json
import os
from typing import List

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    p.add_argument("--input", nargs="+", required=True,
                   help="image files, folders (their images, sorted) or glob patterns")
    p.add_argument("--output", required=True, help="output folder (PNGs and predictions.json)")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="minimum score of the detections drawn and written")
    p.add_argument("--frequency", nargs="+", choices=["r", "c", "f"],
                   help="keep only categories of these LVIS frequency buckets")
    p.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs (e.g. MODEL.WEIGHTS path)")
    return p


def expand_inputs(inputs: List[str]) -> List[str]:
    """Image paths of ``inputs`` (files, folders, glob patterns), in order, without duplicates;
    FileNotFoundError naming the inputs that give no image."""
    paths, empty = [], []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            found = [item]
        else:
            found = sorted(f for f in glob.glob(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            empty.append(item)
        paths.extend(found)
    if empty:
        raise FileNotFoundError(f"--input: no image file in {empty} (extensions: "
                                f"{', '.join(IMAGE_EXTENSIONS)})")
    seen = set()
    return [p for p in paths if not (p in seen or seen.add(p))]


def setup_cfg(args):
    import torch
    from detectron2.config import get_cfg

    from longtail import add_longtail_config
    from longtail.custom_datasets import register_from_config
    from longtail.datasets import resolve_num_classes

    cfg = get_cfg()
    add_longtail_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    register_from_config(cfg)  # LONGTAIL.REGISTER_DATASETS: class names and r/c/f
    resolve_num_classes(cfg)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    # keep low-score detections in the model's output; --confidence-threshold filters after
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = min(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
                                                args.confidence_threshold)
    cfg.freeze()
    return cfg


def class_metadata(cfg):
    """(class names, frequency buckets or None, contiguous index -> json category id) of the
    config's first test dataset (else training dataset)."""
    from detectron2.data import MetadataCatalog

    from longtail.datasets import FREQUENCY

    names = list(cfg.DATASETS.TEST) or list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("The config names no dataset (DATASETS.TEST / DATASETS.TRAIN): the class "
                         "names come from it.")
    meta = MetadataCatalog.get(names[0])
    classes = list(meta.thing_classes)
    mapping = meta.get("thing_dataset_id_to_contiguous_id", None)
    to_json = ({v: k for k, v in mapping.items()} if mapping
               else {i: i + 1 for i in range(len(classes))})  # LVIS: contiguous ids 1..C
    return meta, classes, meta.get(FREQUENCY, None), to_json


def detections_of(instances, classes, frequency, to_json, threshold, buckets):
    """The json detections of one image's ``Instances`` (CPU), score-sorted, filtered; boxes and
    RLE masks as detectron2's ``instances_to_coco_json`` writes them."""
    import torch
    from detectron2.evaluation.coco_evaluation import instances_to_coco_json

    keep = instances.scores >= threshold
    if buckets:
        keep &= torch.tensor([frequency[c] in buckets for c in instances.pred_classes.tolist()],
                             dtype=torch.bool)
    kept = instances[keep]
    kept = kept[torch.argsort(kept.scores, descending=True, stable=True)]
    out = []
    for det in instances_to_coco_json(kept, None):
        c = det.pop("category_id")
        det.pop("image_id")
        out.append({"category_id": int(to_json[c]), "category_name": classes[c],
                    "frequency": frequency[c] if frequency else None, **det})
    return kept, out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import cv2
    import torch
    import tqdm
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import Visualizer

    from longtail import Trainer
    from longtail.weights import load_weights_for_evaluation

    logger = setup_logger(name="longtail")
    paths = expand_inputs(args.input)
    cfg = setup_cfg(args)
    model = Trainer.build_model(cfg)
    load_weights_for_evaluation(cfg, model)
    model.eval()
    meta, classes, frequency, to_json = class_metadata(cfg)
    if args.frequency and frequency is None:
        raise SystemExit("--frequency: the config's dataset has no r/c/f metadata "
                         "(longtail_class_frequency).")
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    os.makedirs(args.output, exist_ok=True)
    results = []
    used_names = set()
    for path in tqdm.tqdm(paths, desc="predict", unit="image"):
        image = utils.read_image(path, format=cfg.INPUT.FORMAT)
        height, width = image.shape[:2]
        resized = resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        with torch.no_grad():
            output = model([{"image": tensor, "height": height, "width": width}])[0]
        instances = output["instances"].to("cpu")
        kept, dets = detections_of(instances, classes, frequency, to_json,
                                   args.confidence_threshold, args.frequency)
        results.append({"file_name": path, "height": height, "width": width, "detections": dets})
        rgb = utils.convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        drawn = Visualizer(rgb, meta, scale=max(1.0, 480.0 / min(height, width)))
        vis = drawn.draw_instance_predictions(kept).get_image()
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = stem, 1
        while name in used_names:  # same file name in two folders
            k += 1
            name = f"{stem}_{k}"
        used_names.add(name)
        cv2.imwrite(os.path.join(args.output, name + ".png"), vis[:, :, ::-1])
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump(results, f)
    total = sum(len(r["detections"]) for r in results)
    logger.info("%d image(s), %d detection(s) with score >= %g%s: PNGs and predictions.json in %s",
                len(results), total, args.confidence_threshold,
                f" ({'/'.join(args.frequency)} categories)" if args.frequency else "", args.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
