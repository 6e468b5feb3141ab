#!/usr/bin/env bash
# The recipe's training step on one GPU with the real architectures (random weights), in one run of a
# few minutes: naive, ours at 8 clips x 4, budget batches (configs/whisper.yaml: 4 x 65 s a step), the
# same with the decoder's RMSNorms and MLPs compiled, and with whole frozen layers compiled; then
# configs/big_gpu.yaml's one 260 s batch a step; samples/s, MFU, peak memory, and the peak memory
# of the two largest batches each budget lets through. Figures go to OUT (default /tmp/budget-check).
#   bash benchmarks/gpu_budget_check.sh
# Python packages the GPU machine lacks can travel as wheels in .whl/ (installed into /tmp/site). On the
# lent H200 image (torch 2.11, transformers 5.17, lightning 2.6.6) these were missing: datasets dill
# multiprocess soundfile cffi pycparser soxr torchdata jsonargparse docstring_parser typeshed_client
# whisper-normalizer more-itertools indic-numtowords text2num. Fetch them for Python 3.12 with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d .whl NAME==VERSION
set -uo pipefail
out=${OUT:-/tmp/budget-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
python3 -c "
import importlib.metadata as m, torch
print(torch.cuda.get_device_name(), {p: m.version(p) for p in ('torch', 'transformers', 'lightning', 'datasets',
      'pyarrow', 'huggingface_hub', 'fsspec', 'triton')})
import tiny_audio_pl.cli" || exit 1
start=$SECONDS
[ -d /tmp/real-size-models/smollm3 ] || python3 scripts/make_real_size_models.py /tmp/real-size-models
echo "models built in $((SECONDS - start)) s"
timeout 460 python3 benchmarks/throughput.py --size real --modes naive,ours,budget,norms,compiled --worst-case \
  --batches 40 --json "$out/real.json" 2>&1 | grep -v "it/s\]" | tee "$out/real.log"
timeout 200 python3 benchmarks/throughput.py --size real --modes budget --worst-case --batches 40 --batch-seconds 260 \
  --max-batch-clips 64 --budget-accumulate 1 --json "$out/big_gpu.json" 2>&1 | grep -v "it/s\]" | tee "$out/big_gpu.log"
echo "benchmark done at $((SECONDS - start)) s"
