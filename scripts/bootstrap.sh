#!/usr/bin/env bash
# Idempotent set-up used by `make demo` and `make test`.
#
# Creates a virtual environment in the checkout (.venv, or $VENV) and installs, in order:
#   1. torch + torchvision from the package registry (the CUDA builds; they also run on CPU),
#   2. detectron2, unless one (>= 0.6) is already importable in that environment:
#        default           -> the registry's pb1-detectron2==0.6 sources (identical Python files to
#                             upstream v0.6) with an empty C++ extension, see docs/INSTALL.md;
#        LONGTAIL_D2=upstream -> upstream detectron2 from its source repository (compiles the CUDA
#                             ops; needs network access to GitHub and a CUDA toolchain). Opt-in only.
#   3. this project, editable, with the `dev` extra (pytest).
# If a virtual environment is already active ($VIRTUAL_ENV), it is used instead of .venv, so an
# existing detectron2 installation is kept.
# A stamp file records a hash of the inputs; when nothing changed the script exits immediately.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ -n "${VIRTUAL_ENV:-}" ] && [ -z "${VENV:-}" ]; then
  VENV="$VIRTUAL_ENV"
else
  VENV="${VENV:-$ROOT/.venv}"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.longtail-bootstrap"
HASH=$(cat constraints.txt pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)

if [ -x "$PY" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
  exit 0
fi

log() { echo "[bootstrap] $*"; }
if [ ! -x "$PY" ]; then
  log "creating virtual environment at $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -c constraints.txt --upgrade "pip<25" wheel "setuptools<81"

if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch + torchvision (about 2 minutes; several GB)"
  "${PIP[@]}" install -q -c constraints.txt torch torchvision
fi

d2_ok() {
  "$PY" - <<'PY' 2>/dev/null
import re
import detectron2
major_minor = tuple(int(x) for x in re.findall(r"\d+", detectron2.__version__)[:2])
assert major_minor >= (0, 6), detectron2.__version__
PY
}
if d2_ok; then
  log "detectron2 already importable: kept ($("$PY" -c 'import detectron2; print(detectron2.__version__)'))"
elif [ "${LONGTAIL_D2:-registry}" = "upstream" ]; then
  log "installing upstream detectron2 from its source repository (LONGTAIL_D2=upstream)"
  "${PIP[@]}" install -c constraints.txt --no-build-isolation \
    'git+https://github.com/facebookresearch/detectron2.git'
else
  log "installing detectron2 0.6 from the registry's pb1-detectron2 sources (about 2 minutes)"
  # Its setup.py imports torch, hence --no-build-isolation; fvcore & co. come with it.
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  "${PIP[@]}" download -q --no-deps --no-binary :all: --no-build-isolation -d "$TMP" pb1-detectron2==0.6
  tar -xzf "$TMP"/pb1*detectron2-0.6.tar.gz -C "$TMP"
  SRC=$(find "$TMP" -maxdepth 1 -type d -name '*detectron2-0.6' | head -n 1)
  # The sdist lacks detectron2/layers/csrc; an empty extension lets setup.py build. Only the ops
  # that live there (rotated boxes, deformable conv, the C++ COCO evaluator) are unavailable;
  # Mask/Faster R-CNN FPN needs none of them.
  mkdir -p "$SRC/detectron2/layers/csrc"
  # detectron2.utils.collect_env (run by default_setup) asks the extension for two versions.
  cat > "$SRC/detectron2/layers/csrc/vision.cpp" <<'CPP'
#include <torch/extension.h>
#include <string>
static std::string compiler_version() { return "none (registry sdist: no C++/CUDA ops built)"; }
static std::string cuda_version() { return "not compiled"; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &compiler_version);
  m.def("get_cuda_version", &cuda_version);
}
CPP
  "${PIP[@]}" install -q -c constraints.txt --no-build-isolation "$SRC"
fi

log "installing the project (editable, with the dev extra)"
"${PIP[@]}" install -q -c constraints.txt --no-build-isolation -e ".[dev]"
"$PY" -c "import detectron2, lvis, longtail; from detectron2.engine import DefaultTrainer; from detectron2.evaluation import LVISEvaluator"
echo "$HASH" > "$STAMP"
log "ready: $VENV"
