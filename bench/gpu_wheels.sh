#!/usr/bin/env bash
# The wheels bench/gpu_check.sh installs on the GPU image (Python 3.12, torch 2.11.0+cu130, triton 3.6.0,
# transformers 5.17.0, no network), pinned, into .whl/ (ignored by git), for Python 3.12 manylinux x86_64:
#   math-verify (+ latex2sympy2_extended, antlr4-python3-runtime): the reward tests;
#   liger-kernel, cut-cross-entropy: the peers of bench.kernels and bench.train_step.
# Everything else the check needs is on the image; --no-deps keeps pip from replacing its torch.
#     bench/gpu_wheels.sh            # then: du -sh .whl  (the device tool carries at most 64 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  math-verify==0.9.0
  latex2sympy2_extended==1.11.0
  antlr4-python3-runtime==4.13.2
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
)
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -l .whl
total=$(du -sk .whl | cut -f1)
echo "${total} KiB in .whl"
if (( total > 60 * 1024 )); then echo "more than 60 MiB of wheels" >&2; exit 1; fi
