#!/usr/bin/env bash
# Evaluate projects/blip2/eval/vqav2_zeroshot_internlm.yaml on all local GPUs (NPROC to change). Extra args: --options.
source "$(dirname "$0")/../../launch.sh"
launch lavis_lite.evaluate projects/blip2/eval/vqav2_zeroshot_internlm.yaml "$@"
