#!/usr/bin/env bash
# The GPU checks, as one call on a lent GPU machine (torch there; Ray, DeepSpeed and Faiss not):
#   1. (INDEX_TRAIN=1 only; measured on an H200 already) index-train k-means at the 1M-vector auto
#      setting: Faiss on all CPU cores vs torch k-means on the GPU (benchmarks/bench_index_train.py);
#      faiss-cpu comes as a wheel in .whl/
#   2. the 125M RETRO model, its GPT baseline and RETRO with a 384-wide encoder
#      (model.retro.retro_encoder_hidden_size), bf16, torch.compile, batch ${BATCHES:-32}: tokens/s,
#      MFU, RETRO/GPT step time, and a kernel profile of 3 steps (GPU time by kernel kind, top
#      kernels), which says where the H100's missing MFU goes (benchmarks/gpu_model_bench.py --profile)
# Results land in $OUT (the device tool's output folder; /tmp/gpu_checks elsewhere).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
nproc
[ "${INDEX_TRAIN:-0}" = 1 ] && timeout 220 python3 benchmarks/bench_index_train.py --index-str IVF8192_HNSW32,Flat --n-train 320000 --sources 20000 \
    --out "$OUT/bench_index_train_gpu.json" 2>&1 | grep -v "^WARNING clustering" | tee "$OUT/index_train.log"
timeout "${MODEL_TIMEOUT_S:-400}" python3 benchmarks/gpu_model_bench.py --compile --configs 125m --batches "${BATCHES:-32}" --profile \
    --variants retro,gpt,retro_narrow \
    --deadline-s "${MODEL_DEADLINE_S:-290}" --out "$OUT/gpu_model_bench_sweep.json" > "$OUT/model.log" 2>&1
echo "model bench exit $?"
grep -E "^125m|by kernel kind|deadline|over_gpt|Error|error" "$OUT/model.log" | cut -c1-400
