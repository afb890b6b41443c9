#!/usr/bin/env bash
# MODEL.PROMPTSG.COMPILE reduce-overhead (torch.compile + CUDA graphs) through FastReID's own
# trainer and evaluator on one GPU, in one go (about 4 minutes on an H100):
#
#   OUT=/some/dir tools/gpu_compile_check.sh       # from the repository root, .whl/ carried along
#
# (a) the CUDA tests of tests/test_fast_paths.py;
# (b) tools/train_net.py, eager, 4 epochs of the synthetic small-ViT PromptSG (random CLIP
#     weights, bf16), evaluated with FastReID's flip test (two model calls per batch);
# (c) --eval-only of that checkpoint, eager and compiled: the same mAP / Rank-1 is expected;
# (d) 2 epochs of training with the compiled model (FastReID's AMP trainer, then evaluation).
# Writes $OUT/gpu_compile_check.log and $OUT/gpu_compile_check.json (the results of b-d).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-output/gpu_compile_check}
LOG="$OUT/gpu_compile_check.log"
source tools/gpu_env.sh
WORK=${WORK:-/tmp/gpu_compile_check}
rm -rf "$WORK"

log "pytest tests/test_fast_paths.py -k cuda"
timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_paths.py -k cuda 2>&1 | tee -a "$LOG"
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
    grep -E "Evaluation results|^\| *[0-9]|Rank-1|mAP|Error|error" "$WORK.$tag.out" | tail -8 | tee -a "$LOG"
    log "run $tag: exit $rc"
}
mkdir -p "$WORK"

train eager_train 100 "${SMALL[@]}" "${CUDA[@]}" SOLVER.MAX_EPOCH 4 SOLVER.STEPS "[3]" \
    SOLVER.CHECKPOINT_PERIOD 4 TEST.EVAL_PERIOD 4
train eager_eval 60 "${SMALL[@]}" --eval-only "${CUDA[@]}" MODEL.WEIGHTS "$WORK/eager_train/model_final.pth"
train compiled_eval 150 "${SMALL[@]}" --eval-only "${CUDA[@]}" MODEL.WEIGHTS "$WORK/eager_train/model_final.pth" \
    MODEL.PROMPTSG.COMPILE reduce-overhead
train compiled_train 200 "${SMALL[@]}" "${CUDA[@]}" SOLVER.MAX_EPOCH 2 SOLVER.STEPS "[1]" \
    SOLVER.CHECKPOINT_PERIOD 2 TEST.EVAL_PERIOD 2 MODEL.PROMPTSG.COMPILE reduce-overhead

"$PY" - "$WORK" "$OUT/gpu_compile_check.json" <<'PY' 2>&1 | tee -a "$LOG"
import json, os, sys
work, out = sys.argv[1:]
found = {}
for tag, name in (("eager_train", "results.json"), ("eager_eval", "eval_results.json"),
                  ("compiled_eval", "eval_results.json"), ("compiled_train", "results.json")):
    path = os.path.join(work, tag, name)
    found[tag] = json.load(open(path)) if os.path.exists(path) else None
json.dump(found, open(out, "w"), indent=2, default=float)
print(json.dumps(found, default=float))
PY
