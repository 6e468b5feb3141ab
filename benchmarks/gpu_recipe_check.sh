#!/usr/bin/env bash
# The production recipe (configs/whisper.yaml) on one GPU, offline: real architectures with random
# weights (scripts/make_real_size_models.py) and the tiny speech set. Reports optimizer-step time and
# peak GPU memory. Usage: bash benchmarks/gpu_recipe_check.sh [STEPS] [OUT_DIR]
set -euo pipefail
steps=${1:-20}
out=${2:-${OUT:-/tmp/recipe-check}}
models=/tmp/real-size-models
mkdir -p "$out"
[ -d "$models/smollm3" ] || python3 scripts/make_real_size_models.py "$models"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/gpu_mem.txt" 2>/dev/null &
monitor=$!
trap 'kill $monitor 2>/dev/null || true' EXIT
start=$(date +%s)
HF_HUB_OFFLINE=1 python3 -m tiny_audio_pl.cli fit -c configs/whisper.yaml \
  --model.encoder "$models/whisper" --model.decoder "$models/smollm3" --model.max_new_tokens 16 \
  --data.dataset assets/tiny-speech --data.config_name null --data.max_train_samples 80 \
  --data.max_eval_samples 16 --data.num_workers 4 \
  --trainer.max_steps "$steps" --trainer.val_check_interval $((steps * 4)) --trainer.log_every_n_steps 1 \
  --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$out" 2>&1 | tee "$out/fit.log"
echo "fit wall time: $(( $(date +%s) - start )) s for $steps optimizer steps (batch 8 x 4)"
echo "peak GPU memory used: $(sort -n "$out/gpu_mem.txt" | tail -1) MiB"
python3 - "$out" <<'PY'
import glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = sorted(glob.glob(f"{sys.argv[1]}/lightning_logs/version_*"))[-1]
events = EventAccumulator(run); events.Reload()
for tag in events.Tags()["scalars"]:
    values = [(e.step, round(e.value, 4), e.wall_time) for e in events.Scalars(tag)]
    print(tag, [v[:2] for v in values[:3]], "...", [v[:2] for v in values[-3:]])
losses = events.Scalars("train/loss")
if len(losses) > 5:
    # wall time between logged steps, skipping the first (warm-up, cudnn autotune)
    span = losses[-1].wall_time - losses[2].wall_time
    print(f"mean optimizer step time (steps 3..{losses[-1].step + 1}): {span / (losses[-1].step - losses[2].step):.3f} s")
PY
