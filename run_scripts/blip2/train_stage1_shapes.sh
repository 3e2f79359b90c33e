#!/usr/bin/env bash
# Stage 1 on the embedded shapes data (CPU-sized): Q-Former pre-training (ITC + ITM + ITG), then retrieval on
# the val split. Extra arguments are --options, e.g. run.max_epoch=1. Real weights and data: train_stage1.sh.
source "$(dirname "$0")/../launch.sh"
launch lavis_lite.train projects/blip2/train/pretrain_stage1_shapes.yaml "$@"
