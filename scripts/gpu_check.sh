#!/usr/bin/env bash
# The project's CUDA checks in one run, for a session that is lent a GPU machine (CI never has one):
#
#   scripts/gpu_check.sh [MTP_CHECKPOINT]
#
# 1. env: torch, CUDA device, and whether transformers is importable;
# 2. tests/test_cuda.py: chunked prefill == one-shot (no (chunk, context) mask in fp32 or bf16), cached
#    decode == eager, fp32 decode over a long cache without copying it, speculative greedy == plain
#    greedy, the decoder's compiled step (reduce-overhead: CUDA graphs) == eager, a training step on
#    CUDA == CPU, torch.compile'd forward+backward == eager (float32, bfloat16), the trainer trains
#    and resumes on the GPU, its reductions in an NCCL group;
# 3. benchmarks/decode.py on CUDA with the fast path (the compiled step): plain decode vs transformers,
#    speculative vs plain on MTP_CHECKPOINT (else a tiny MTP model trained there), latency vs context;
# 4. benchmarks/decode_attention.py: one query per head over up to 1M cached tokens (SDPA vs split-KV);
# 5. benchmarks/train_speed.py --device cuda: trainer tokens/s and MFU against the GPU's fp32 peak;
# 6. benchmarks/long_context.py: a 1M-token prompt in float32, peak memory vs cache budget + weights.
#
# Logs (decode.py's tables are in its log) and the long-context JSON -- 8 files, as many as a lent
# machine returns -- go to $OUT (default ./gpu-check); every step has its own time limit and a
# failing step does not stop the next; the limits add up to under 10 minutes, one call on a lent
# machine. Uses $PYTHON (default python3, the one with a CUDA torch).
# To stage the quickstart checkpoint for the machine, copy its config.json, model.safetensors and
# tokenizer.json into a folder that git ignores and that travels with the run.
set -u
OUT=${OUT:-gpu-check}
PY=${PYTHON:-python3}
CKPT=${1:-}
mkdir -p "$OUT"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: > "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run, keep the log, print its tail and the exit status
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    echo "$name exit=$rc seconds=$((SECONDS - start))" >> "$OUT/summary.txt"
}

step env 30 "$PY" -c "import importlib.util, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())
print('transformers', 'yes' if importlib.util.find_spec('transformers') else 'no')"
step test_cuda 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step decode 110 "$PY" benchmarks/decode.py --device cuda --compile ${CKPT:+--checkpoint "$CKPT"} \
    --draft-tokens 2 3 5
step decode_attention 50 "$PY" benchmarks/decode_attention.py --device cuda
step train_speed 40 "$PY" benchmarks/train_speed.py --device cuda --steps 5
step long_context_fp32 110 "$PY" benchmarks/long_context.py --device cuda --tokens 1048576 --chunk 1024 \
    --json "$OUT/long_context_fp32.json"
cat "$OUT/summary.txt"
! grep -q -v "exit=0 " "$OUT/summary.txt"
