#!/usr/bin/env bash
# PromptSG against the CLIP visual-only baseline on one GPU, in one go: about 7 minutes on an
# H100, at most 8 (each step below has a time limit; they add up to 480 s, plus the install).
#
#   tools/perf/fetch_gpu_wheels.sh              # here, with network: the wheels the GPU machine lacks
#   OUT=/some/dir tools/perf/gpu_benchmark.sh   # there, from the repository root, .whl/ carried along
#   STEPS="a f" OUT=/some/dir tools/perf/gpu_benchmark.sh   # only the steps named (default: all)
#
# ViT-B/16 at 256x128, training batch 64 (16 ids x 4), bf16 autocast, fused Adam, in order of
# priority (every JSON line is kept as soon as it is written):
#   (a) eager PyTorch: training, and inference at batch 256 (about 50 s);
#   (b) training with MODEL.PROMPTSG.COMPILE reduce-overhead (torch.compile plus CUDA graphs;
#       its warm-up steps include about 90 s of compilation);
#   (c) the CUDA tests of tests/test_fast_paths.py (bf16 step, no host-device synchronisation;
#       the compiled-model test runs in tools/perf/gpu_compile_check.sh);
#   (d) eager training at batch 128 (32 ids x 4);
#   (e) the share of step time spent waiting for data, FastReID's real train loader on the
#       synthetic dataset (generated on first use) with 8 workers;
#   (f) inference at batch 256 with MODEL.PROMPTSG.COMPILE reduce-overhead;
#   (g) eager inference at batch 256 in float32, as FastReID's evaluation runs the model.
# MODEL.PROMPTSG.COMPILE default compiled for more than 4 minutes (all training and inference
# graphs, H100, 2026-11-27, commit 3917911), so it is not part of this script.
# Random CLIP weights: speed does not depend on them. Writes $OUT/gpu_benchmark.jsonl (every
# measurement, tagged by run) and $OUT/gpu_benchmark.log (everything printed).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-output/gpu_benchmark}
LOG="$OUT/gpu_benchmark.log"
JSONL="$OUT/gpu_benchmark.jsonl"
source tools/perf/gpu_env.sh
: >"$JSONL"
STEPS=${STEPS:-a b c d e f g}
for s in $STEPS; do
    [[ $s == [a-g] ]] || { log "STEPS: unknown step '$s' (the steps are a to g)"; exit 2; }
done
log "steps: $STEPS"
# step X: whether step X is to run.
step() { [[ " $STEPS " == *" $1 "* ]]; }

# bench TAG SECONDS ARGS...: one tools/perf/benchmark.py run, its JSON lines appended to $JSONL.
bench() {
    local tag=$1 limit=$2
    shift 2
    log "run $tag: tools/perf/benchmark.py $*"
    timeout "$limit" "$PY" tools/perf/benchmark.py --tag "$tag" --out "$OUT/$tag.jsonl" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    cat "$OUT/$tag.jsonl" >>"$JSONL" 2>/dev/null
    rm -f "$OUT/$tag.jsonl"
    log "run $tag: exit $rc"
}

VITB16=(MODEL.CLIP.NAME ViT-B-16 MODEL.CLIP.PRETRAINED "" MODEL.DEVICE cuda SOLVER.AMP.ENABLED True)
MARKET=projects/PromptSG/configs/Market1501/vit.yml

# (a) eager: 64 training images (the paper's batch), 256 per inference batch.
step a && bench eager_b64_t256 80 --config-file "$MARKET" --device cuda --batch 64 --test-batch 256 \
    --warmup 5 --iters 20 --rounds 3 "${VITB16[@]}"

# (b) torch.compile with CUDA graphs, training only.
step b && bench cudagraphs_b64 130 --config-file "$MARKET" --device cuda --batch 64 --train-only \
    --warmup 6 --iters 20 --rounds 3 "${VITB16[@]}" MODEL.PROMPTSG.COMPILE reduce-overhead

# (c) the CUDA tests.
if step c; then
    log "pytest tests/test_fast_paths.py -k \"cuda and not compiled\""
    timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_paths.py -k "cuda and not compiled" 2>&1 | tee -a "$LOG"
    log "pytest: exit ${PIPESTATUS[0]}"
fi

# (d) eager training at batch 128.
step d && bench eager_b128 40 --config-file "$MARKET" --device cuda --batch 128 --train-only \
    --warmup 4 --iters 10 --rounds 3 "${VITB16[@]}"

# (e) data loading: ViT-B/16 at 256x128 on the synthetic dataset, 8 workers, bf16.
step e && bench data_wait_vitb16 50 --config-file projects/PromptSG/configs/Synthetic/promptsg_small_vit.yml \
    --device cuda --data-wait 60 --warmup 10 --batch 64 "${VITB16[@]}" MODEL.CLIP.STRIDE 16 \
    MODEL.PROMPTSG.MIM.HEADS 8 INPUT.SIZE_TRAIN "[256, 128]" INPUT.SIZE_TEST "[256, 128]" \
    INPUT.PADDING.SIZE 10 DATALOADER.NUM_WORKERS 8

# (f) torch.compile with CUDA graphs, inference only.
step f && bench cudagraphs_t256 80 --config-file "$MARKET" --device cuda --test-batch 256 --inference-only \
    --warmup 3 --iters 20 --rounds 3 "${VITB16[@]}" MODEL.PROMPTSG.COMPILE reduce-overhead

# (g) float32 inference (no autocast), what FastReID's evaluator and tools/extract_features.py run.
step g && bench eager_fp32_t256 40 --config-file "$MARKET" --device cuda --test-batch 256 --inference-only \
    --warmup 2 --iters 10 --rounds 3 "${VITB16[@]}" SOLVER.AMP.ENABLED False

log "done: $(grep -c . "$JSONL") JSON lines in $JSONL"
grep '"kind": "ratios"\|"kind": "data_wait"\|"kind": "summary"' "$JSONL" | tee -a "$LOG"
