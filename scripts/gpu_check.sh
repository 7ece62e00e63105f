#!/usr/bin/env bash
# The GPU checks, for a machine with one CUDA GPU and no internet, in two parts that each fit in one call of
# under 10 minutes: PART=bench, where a training step waits for the GPU (scripts/gpu_syncs.py), then the
# benchmark's training rows (ours eager and compiled against transformers, MFU over the bf16 peak) for medium,
# qwen3-0.6b and large; PART=train, the default GPU training path (bf16-mixed, fused AdamW, clipping) and FSDP
# with a resume, a generate and a fine-tuning run. PART=all (the default) runs both, the benchmark first.
# Each step has a time limit and the whole run a deadline, so a hang costs one step, not the run; the most
# important steps come first. Logs and results go to $OUT (default: gpu_check_out/), at most 8 files.
#
#   PART=bench OUT=/tmp/gpu bash scripts/gpu_check.sh   # within DEADLINE (9 minutes); not yet run on a GPU
#   PART=train OUT=/tmp/gpu bash scripts/gpu_check.sh
#   QUICK=1 OUT=/tmp/gpu bash scripts/gpu_check.sh      # a smoke run of the script itself (also on a CPU)
#
# Missing pure-Python dependencies (jsonargparse and the two packages of its `signatures` extra) can travel as
# wheels in .whl/, which this script installs first. Prepare them where pip reaches PyPI:
#   pip download --no-deps --only-binary=:all: -d .whl jsonargparse docstring_parser typeshed_client
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check_out}
DEADLINE=${DEADLINE:-540}  # seconds for the whole script; a step gets what is left, at most its own limit
QUICK=${QUICK:-}
PART=${PART:-all}
[[ $PART =~ ^(all|bench|train)$ ]] || { echo "PART=$PART: choose bench, train or all" >&2; exit 2; }
WORK=$(mktemp -d)
mkdir -p "$OUT"
LOG=$OUT/log.txt
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        .whl/*.whl && export PYTHONPATH=$PYTHONPATH:$WORK/site
fi

# step NAME LIMIT COMMAND...: runs COMMAND with its output in the log and one line in the summary
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) start=$SECONDS rc
    shift 2
    if ((left < 20)); then
        echo "$name: skipped, deadline reached" | tee -a "$SUMMARY"
        return
    fi
    ((limit > left)) && limit=$left
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s$( ((rc == 124)) && echo ' (timed out)')" | tee -a "$SUMMARY"
}

step environment 60 bash -c 'nvidia-smi -L; python3 -c "
import torch, lightning, transformers, jsonargparse
print(torch.__version__, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print(\"lightning\", lightning.__version__, \"transformers\", transformers.__version__, \"jsonargparse\", jsonargparse.__version__)
"'

if [[ -n $QUICK ]]; then
    presets=(tiny) bench_args=(--quick) fsdp_preset=configs/tiny.yaml fsdp_steps=(4 6)
else
    presets=(medium qwen3-0.6b large) bench_args=(--batch-size 16 --seq-len 1024 --repeats 1)
    fsdp_preset=configs/large.yaml fsdp_steps=(30 40)
fi

# 1. where a training step waits for the GPU (the sync debug mode over 30 steps of `small`), then the
#    benchmark's training rows: ours eager and compiled against transformers, MFU over the bf16 peak
if [[ $PART != train ]]; then
    step syncs 75 python3 scripts/gpu_syncs.py --json "$OUT/syncs.json"
    for preset in "${presets[@]}"; do
        # three presets in what DEADLINE leaves: 150 s each. The best options (the MFU target's case) first, with
        # up to 80 s for a cold compile; then transformers and ours eager, the reference rows
        step "bench_$preset" 150 python3 scripts/benchmark.py --sections train --preset "$preset" "${bench_args[@]}" \
            --case-timeout 80 --compile --fused --cases ours_compiled,hf,ours --json "$OUT/bench_$preset.json"
    done
fi
finish() {
    echo "--- summary ($SECONDS s) ---"
    cat "$SUMMARY"
    grep -h -A12 '^| case\|^| call site' "$LOG" | head -80
    rm -rf "$WORK"
    exit
}
[[ $PART == bench ]] && finish

# the CLI needs jsonargparse, which the GPU machine's image lacks unless its wheels came in .whl/ (the benchmark
# does not): say so once, rather than spend the device time on steps that fail at their first import
if ! python3 -c "import jsonargparse, docstring_parser, typeshed_client" 2>>"$LOG"; then
    echo "train: skipped, jsonargparse (or its signatures extra) is missing: prepare .whl/ as the header says" | tee -a "$SUMMARY"
    finish
fi

# 2. what every GPU user runs first: the CLI's GPU defaults (bf16-mixed, fused AdamW, clipping at 1.0)
step fit_tiny 120 python3 -m qwen3_lightning fit --config configs/tiny.yaml --trainer.max_steps 30 \
    --trainer.default_root_dir "$WORK/tiny"
cp "$WORK/tiny/logs/version_0/metrics.csv" "$OUT/tiny_metrics.csv" 2>/dev/null

# 3. FSDP (one GPU: the wrapping, sharded clipping and full-state checkpoints), resumed, then sampled;
#    Lightning's FSDP needs CUDA
if python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    fsdp=(fit --config "$fsdp_preset" --config configs/fsdp.yaml --trainer.default_root_dir "$WORK/fsdp")
    step fsdp_fit 150 python3 -m qwen3_lightning "${fsdp[@]}" --trainer.max_steps "${fsdp_steps[0]}"
    step fsdp_resume 120 python3 -m qwen3_lightning "${fsdp[@]}" --trainer.max_steps "${fsdp_steps[1]}" --ckpt_path last
    cp "$(ls -d "$WORK"/fsdp/logs/version_* | tail -1)/metrics.csv" "$OUT/fsdp_resumed_metrics.csv" 2>/dev/null
    step generate 60 python3 -m qwen3_lightning generate --ckpt_path "$WORK/fsdp/checkpoints/last.ckpt" \
        --max_new_tokens 64 --num_samples 2 --seed 0
    # fine-tuning under FSDP: the initial weights are loaded into the model built on the GPU, before sharding
    step fsdp_finetune 120 python3 -m qwen3_lightning fit --config "$fsdp_preset" --config configs/fsdp.yaml \
        --model.initial_checkpoint "$WORK/fsdp/checkpoints/last.ckpt" --trainer.default_root_dir "$WORK/tuned" \
        --trainer.max_steps 5
else
    echo "fsdp: skipped, no CUDA device" | tee -a "$SUMMARY"
fi

finish
