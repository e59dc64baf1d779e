#!/bin/bash
# The GPU check of the train step, as run on an H200 on 2026-11-28 (README, Benchmarks).
# On the GPU machine, from the repository root, with:
#   .gpu/bin/train-bench  the bench binary of a `--features cuda` build
#                         (cargo bench -p huse-model --bench train --features cuda --no-run),
#   .gpu/features/        an encode output (or the first rows of one: image.safetensors,
#                         text.safetensors, tfidf.safetensors, tfidf.json),
# and a python3 with torch (CUDA) for the PyTorch side. Output also goes to $OUT/log.txt.
exec > >(tee "${OUT:-.}/log.txt") 2>&1
set -x
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# The bench finds torch_train.py under the repository path it was built in (BUILT_ROOT,
# /work/main here): link that path to this checkout when it differs.
BUILT_ROOT=${BUILT_ROOT:-/work/main}
if [ ! -e "$BUILT_ROOT/stages/huse/benches/torch_train.py" ]; then mkdir -p "$(dirname "$BUILT_ROOT")" && ln -sfn "$PWD" "$BUILT_ROOT"; fi
# libcublas/libcurand/libcudart from PyTorch's CUDA wheels; libcuda from the driver.
NVLIB=$(python3 -c "import os, nvidia; print(':'.join(p for d in nvidia.__path__ for p in [os.path.join(d, 'cu13', 'lib')] if os.path.isdir(p)))")
export LD_LIBRARY_PATH=$NVLIB:/usr/local/nvidia/lib64:$LD_LIBRARY_PATH
ldd .gpu/bin/train-bench | grep -E 'cuda|cublas|curand|not found'
export HUSE_TORCH_PYTHON=python3 BENCH_ENCODE_DIR=.gpu/features
BENCH_DEVICE=cuda:0 BENCH_STEPS=300 timeout 240 .gpu/bin/train-bench; echo "rc=$?"
BENCH_DEVICE=cpu BENCH_STEPS=20 timeout 90 .gpu/bin/train-bench; echo "rc=$?"
