#!/usr/bin/env bash
# The wheels bench/gpu_pass.sh carries to a GPU host that has its own torch, transformers, numpy,
# OpenCV and the like but not the rest of lipstream's dependencies, and no network (CPython 3.12,
# x86_64): downloaded here, with pip, into .whl/ (ignored by git; about 8 MB). The pass installs
# them into a temporary folder; nothing is installed into the host's own environment.
#   bench/gpu_wheels.sh            # then carry .whl/ with the checkout
# diffusers: the MuseTalk networks; pydantic (and what it needs, with a recent typing-extensions):
# the settings the command line reads.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
rm -rf .whl && mkdir .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib-metadata==10.2.0 pydantic==2.14.4 pydantic-core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
ls -1 .whl && du -sh .whl
