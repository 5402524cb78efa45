import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Synthetic datasets are generated once into the checkout's datasets/ (git-ignored) and reused.
os.environ.setdefault("DETECTRON2_DATASETS", os.path.join(ROOT, "datasets"))


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def python():
    return sys.executable
