#!/usr/bin/env bash
# Evaluate projects/blip2/eval/caption_coco_opt2.7b.yaml on all local GPUs (NPROC to change). Extra args: --options.
source "$(dirname "$0")/../../launch.sh"
launch lavis_lite.evaluate projects/blip2/eval/caption_coco_opt2.7b.yaml "$@"
