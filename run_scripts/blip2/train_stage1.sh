#!/usr/bin/env bash
# Stage 1: Q-Former pre-training (ITC + ITM + ITG), then retrieval on the val split.
# Default data: the embedded shapes set (CPU-sized). Extra arguments are --options, e.g. run.max_epoch=1
source "$(dirname "$0")/../launch.sh"
launch lavis_lite.train projects/blip2/train/pretrain_stage1.yaml "$@"
