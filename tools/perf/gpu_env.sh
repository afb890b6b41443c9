# Sourced by the GPU scripts (tools/perf/gpu_*.sh), from the repository root, with OUT and LOG set:
# creates $OUT, starts $LOG, defines log(), and makes open_clip / fastreid importable, from the
# wheels in .whl/ (tools/perf/fetch_gpu_wheels.sh) where the machine lacks them (no network there).
mkdir -p "$OUT"
: >"$LOG"
export PYTHONUNBUFFERED=1
export FASTREID_DATASETS=${FASTREID_DATASETS:-/tmp/promptsg_datasets}
PY=${PYTHON:-python3}
START=$SECONDS

log() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }

if ! "$PY" -c "import open_clip, fastreid, yacs, faiss" 2>/dev/null; then
    if ! ls .whl/*.whl >/dev/null 2>&1; then
        log "open_clip/fastreid are not installed and there is no .whl/ (run tools/perf/fetch_gpu_wheels.sh)"
        exit 1
    fi
    log "installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG" || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/projects/PromptSG${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, open_clip, fastreid; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'bf16', torch.cuda.is_bf16_supported(), '| open_clip', open_clip.__version__)"; } 2>&1 | tee -a "$LOG"
