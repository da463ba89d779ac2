#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run (for a lent GPU machine; CI has none):
#   - the CUDA build of csrc/ and the tests marked `gpu` (flash-attn backend, CUDA kernels),
#   - engine equality with Hugging Face on CUDA (float32 and bfloat16 smoke),
#   - the offline engine and KV-copy benchmarks on the GPU.
# Results land in ${OUT:-results/gpu}; record them in docs/benchmarks.md with the date and device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

status=0
make -C csrc cuda 2>&1 | tee "$OUT/csrc_cuda.log" || status=1
python -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
python -m pytest -q tests/engine/test_llm_vs_hf.py -k "greedy_batch_equals_hf" 2>&1 | tee "$OUT/pytest_engine.log" || status=1
python benchmarks/engine_offline.py --quick --out "$OUT/engine_offline.json" 2>&1 | tee "$OUT/engine_offline.log" || status=1
python benchmarks/kv_copy.py --out "$OUT/kv_copy.json" 2>&1 | tee "$OUT/kv_copy.log" || status=1
echo "gpu checks finished with status $status"
exit $status
