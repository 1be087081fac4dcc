#!/usr/bin/env bash
# GPU readiness check: the device-agnostic tests on the device, per-evaluation speed (fp32, bf16, fp16,
# channels_last, torch.compile) and one `sr3 upscale` of a 512x512 photo, as one JSON + markdown report.
#
#   bash benchmarks/gpu_check.sh                                 # on a CUDA machine, under 10 minutes
#   bash benchmarks/gpu_check.sh --device cpu                    # smaller sizes: proves the script works (CI)
#   bash benchmarks/gpu_check.sh --output DIR --model PIPELINE   # see benchmarks/gpu_check.py --help
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-600}" "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
