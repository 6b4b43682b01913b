#!/usr/bin/env bash
# The GPU checks of issue 11 as one command, for a lent GPU machine (the `device` tool):
# the trainer against the paper-style loop, the roofline, and an HCP-size participant run
# with --device cuda. Wheels for what the machine's image lacks travel in .whl: make them here with
# benchmarks/gpu_wheels.sh, then run `bash benchmarks/gpu_session.sh` there with carry [".whl"].
# Writes every JSON and the log under $OUT (default benchmarks/out).
set -u
OUT=${OUT:-benchmarks/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/.whl/py:$PWD || exit 70
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} NIPYPE_NO_ET=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; local s=$SECONDS
         timeout "$t" python3 "$@"; echo "== rc $? in $((SECONDS - s)) s"; }
step 100 benchmarks/bench_training.py loop --device cuda --json "$OUT/loop_gpu.json"
step 60 benchmarks/bench_training.py roofline --device cuda --batch-sizes 4096 65536 \
  --json "$OUT/roofline_gpu.json"
step "${HCP_LIMIT:-400}" benchmarks/bench_hcp_scale.py --device cuda --nprocs "$(nproc)" \
  --root /tmp/hcp --json "$OUT/hcp_scale_gpu.json"
