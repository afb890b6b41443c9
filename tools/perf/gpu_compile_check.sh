#!/usr/bin/env bash
# MODEL.PROMPTSG.COMPILE reduce-overhead (torch.compile + CUDA graphs) through FastReID's own
# trainer and evaluator on one GPU, and the GPU stream fixes of engine/compat/training.py and data.py (sections 12-13), in one
# go: about 5 minutes on an H100, at most 9 (each step has a time limit; 545 s in all, plus the install).
#
#   OUT=/some/dir tools/perf/gpu_compile_check.sh       # from the repository root, .whl/ carried along
#
# (a) the CUDA tests: tests/test_fast_paths.py (bf16 step, no host-device synchronisation, and the
#     compiled model against eager through FastReID's training step and flip test: losses,
#     gradients and weights over three steps, features) and tests/test_compat.py (the loss log
#     and DataLoaderX's batches with the GPU kept busy, for the patched code and for FastReID's);
# (b) tools/train_net.py with the compiled model: 2 epochs of the synthetic small-ViT PromptSG
#     (random CLIP weights, bf16, FastReID's AMP trainer), evaluated with FastReID's flip test
#     (two model calls per batch);
# (c) --eval-only of that checkpoint, eager and compiled: the same mAP / Rank-1 up to rounding.
# Writes $OUT/gpu_compile_check.log and $OUT/gpu_compile_check.json (the results of b-c, and
# whether the compiled evaluation equals the eager one).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-output/gpu_compile_check}
LOG="$OUT/gpu_compile_check.log"
source tools/perf/gpu_env.sh
WORK=${WORK:-/tmp/gpu_compile_check}
rm -rf "$WORK"

log "pytest tests/test_fast_paths.py tests/test_compat.py -k cuda"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_fast_paths.py tests/test_compat.py -k cuda 2>&1 \
    | tee -a "$LOG"
log "pytest: exit ${PIPESTATUS[0]}"

SMALL=(--config-file projects/PromptSG/configs/Synthetic/promptsg_small_vit.yml)
CUDA=(MODEL.CLIP.PRETRAINED "" MODEL.DEVICE cuda SOLVER.AMP.ENABLED True DATALOADER.NUM_WORKERS 8
      TEST.FLIP.ENABLED True)
# train TAG SECONDS ARGS...: one tools/train_net.py run with OUTPUT_DIR $WORK/TAG.
train() {
    local tag=$1 limit=$2
    shift 2
    log "run $tag: tools/train_net.py $*"
    timeout "$limit" "$PY" tools/train_net.py "$@" OUTPUT_DIR "$WORK/$tag" >"$WORK.$tag.out" 2>&1
    local rc=$?
    grep -E "Evaluation results|^\| *[0-9]|Rank-1|mAP|total_loss|Error|error" "$WORK.$tag.out" | tail -10 | tee -a "$LOG"
    log "run $tag: exit $rc"
}
mkdir -p "$WORK"

train compiled_train 180 "${SMALL[@]}" "${CUDA[@]}" SOLVER.MAX_EPOCH 2 SOLVER.STEPS "[1]" \
    SOLVER.CHECKPOINT_PERIOD 2 TEST.EVAL_PERIOD 2 MODEL.PROMPTSG.COMPILE reduce-overhead
train eager_eval 45 "${SMALL[@]}" --eval-only "${CUDA[@]}" MODEL.WEIGHTS "$WORK/compiled_train/model_final.pth"
train compiled_eval 120 "${SMALL[@]}" --eval-only "${CUDA[@]}" MODEL.WEIGHTS "$WORK/compiled_train/model_final.pth" \
    MODEL.PROMPTSG.COMPILE reduce-overhead

"$PY" - "$WORK" "$OUT/gpu_compile_check.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
work, out = sys.argv[1:]
found = {}
for tag, name in (("compiled_train", "results.json"), ("eager_eval", "eval_results.json"),
                  ("compiled_eval", "eval_results.json")):
    path = os.path.join(work, tag, name)
    found[tag] = json.load(open(path)) if os.path.exists(path) else None
eager, compiled = found["eager_eval"], found["compiled_eval"]
# Compiled kernels round differently and can swap near-tied gallery images (on the CPU, COMPILE
# default against eager on SyntheticMarket with the flip test: 50.85 vs 50.88 mAP, the same Rank-1):
# allow 0.5 mAP points and 2 of the 249 queries' Rank-1. Overwritten CUDA-graph outputs raise an
# error or give garbage features, far outside that.
TOLERANCE = {"mAP": 0.5, "Rank-1": 100 * 2 / 249 + 1e-6}
found["compiled_eval_equals_eager"] = bool(eager and compiled) and all(
    abs(eager[k] - compiled[k]) <= tol for k, tol in TOLERANCE.items())
json.dump(found, open(out, "w"), indent=2, default=float)
print(json.dumps(found, default=float))
PY
