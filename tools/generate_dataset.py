#!/usr/bin/env python
"""
Generate a synthetic long-tailed dataset (:mod:`longtail.synthetic`) into a directory, in LVIS v1
format (the embedded dataset's) or COCO format (``--format coco``: the form in which one's own
data usually arrives; README "Train on your own data").

    python tools/generate_dataset.py datasets/shapes_coco --format coco
    python tools/generate_dataset.py /tmp/shapes --num-train-images 300 --num-val-images 80

Deterministic (``--seed``); an up-to-date directory is left as it is (``--force`` rebuilds).
Prints the json and image paths.
"""
import sys

from longtail.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
