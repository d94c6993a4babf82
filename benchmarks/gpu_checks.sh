#!/usr/bin/env bash
# The GPU checks on a lent GPU machine (torch there; Ray, DeepSpeed and Faiss not), in two calls of
# under 10 minutes each:
#   bash benchmarks/gpu_checks.sh loss    1. and 2. below (about 5 minutes on an H100)
#   bash benchmarks/gpu_checks.sh model   3. below, with the fastest exact external loss kernel that
#                                         1. found (its JSON must be in $OUT or $LOSS_JSON)
#   bash benchmarks/gpu_checks.sh index   (measured on an H200 already) index-train k-means at the
#                                         1M-vector auto setting: Faiss on all CPU cores vs torch k-means
#                                         on the GPU (benchmarks/bench_index_train.py; faiss-cpu wheel)
# Wheels in .whl/ (ignored by git, so pass carry=[".whl"]; e.g. `pip download --no-deps -d .whl
# liger-kernel cut-cross-entropy faiss-cpu`) are installed first, without their dependencies (torch and
# triton are there already).
#   1. the output layer + loss of the 125M model (d 768, V 50,304, bf16) at 8 and 32 sequences of
#      2,048 tokens: retro_ray (this project's) against liger-kernel, cut-cross-entropy and the unfused
#      path; time, memory, error against float32 (benchmarks/bench_loss_kernels.py)
#   2. the largest batch of the 125M RETRO model that trains, per loss kernel (unfused = before issue
#      19), eager bf16 (benchmarks/gpu_model_bench.py --max-batch)
#   3. the 125M RETRO model (with retro_ray's loss and with the external kernel) and its GPT baseline,
#      bf16, torch.compile, batch ${BATCHES:-32}: tokens/s, MFU, RETRO/GPT step time, and a kernel
#      profile of 3 steps (GPU time by kernel kind) (benchmarks/gpu_model_bench.py --profile)
# Results land in $OUT (the device tool's output folder; /tmp/gpu_checks elsewhere).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_checks}
PART=${1:-loss}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi_$PART.txt"
case "$PART" in
loss)
    timeout "${LOSS_TIMEOUT_S:-150}" python3 benchmarks/bench_loss_kernels.py --out "$OUT/bench_loss_kernels.json" 2>&1 \
        | tee "$OUT/loss_kernels.log" | cut -c1-300
    echo "loss kernels exit ${PIPESTATUS[0]}"
    timeout "${MAX_BATCH_TIMEOUT_S:-240}" python3 benchmarks/gpu_model_bench.py --configs 125m --variants retro --max-batch \
        --loss-kernels unfused,retro_ray,liger,cce --batch-ladder "${LADDER:-8,16,24,32,48,64,80,96,128}" \
        --out "$OUT/gpu_model_bench_max_batch.json" > "$OUT/max_batch.log" 2>&1
    echo "max batch exit $?"
    grep -E "largest batch|Error|error" "$OUT/max_batch.log" | cut -c1-300
    ;;
model)
    # the faster of liger and cce at 65,536 rows in step 1 (both are exact as trainer.loss_kernel runs them)
    BEST=$(python3 -c "
import json, sys
runs = json.load(open(sys.argv[1]))['runs']
ms = {k: runs.get(f'65536/{k}', {}).get('ms') for k in ('liger', 'cce')}
ms = {k: v for k, v in ms.items() if v}
print(min(ms, key=ms.get) if ms else '')" "${LOSS_JSON:-$OUT/bench_loss_kernels.json}" 2>/dev/null)
    KERNELS=retro_ray${BEST:+,$BEST}
    echo "timed loss kernels: $KERNELS"
    timeout "${MODEL_TIMEOUT_S:-540}" python3 benchmarks/gpu_model_bench.py --compile --configs 125m --batches "${BATCHES:-32}" \
        --profile --variants retro,gpt --loss-kernels "$KERNELS" --deadline-s "${MODEL_DEADLINE_S:-420}" \
        --out "$OUT/gpu_model_bench_sweep.json" > "$OUT/model.log" 2>&1
    echo "model bench exit $?"
    grep -E "^125m|by kernel kind|deadline|over_gpt|Error|error" "$OUT/model.log" | cut -c1-400
    ;;
index)
    nproc
    timeout 220 python3 benchmarks/bench_index_train.py --index-str IVF8192_HNSW32,Flat --n-train 320000 --sources 20000 \
        --out "$OUT/bench_index_train_gpu.json" 2>&1 | grep -v "^WARNING clustering" | tee "$OUT/index_train.log"
    ;;
*)
    echo "usage: bash benchmarks/gpu_checks.sh loss|model|index" >&2
    exit 2
    ;;
esac
