#!/usr/bin/env bash
# Wheels for bench/gpu_check.sh: what the bare GPU machine (Python 3.12, torch 2.11, timm,
# pandas, opencv, scikit-image, ... preinstalled; no network) lacks, at uv.lock's versions,
# for CPython 3.12 on x86-64 Linux, into .whl/ (git-ignored; the device tool carries it).
# DVC and MLflow stay behind: the GPU check runs the stages directly with MLflow off.
#
#   bash bench/gpu_wheels.sh && du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
names=(segmentation-models-pytorch albumentations albucore simsimd stringzilla pydantic
       pydantic-core annotated-types typing-inspection typing-extensions openpyxl et-xmlfile)
mkdir -p .whl
for name in "${names[@]}"; do
  # the version uv.lock pins (the first [[package]] of that name)
  version=$(awk -v n="name = \"$name\"" '$0 == n {getline; gsub(/version = |"/, ""); print; exit}' uv.lock)
  [[ -n $version ]] || { echo "gpu_wheels: $name is not in uv.lock" >&2; exit 1; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$name==$version"
done
ls .whl
