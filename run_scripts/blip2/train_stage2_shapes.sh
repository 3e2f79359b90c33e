#!/usr/bin/env bash
# Stage 2 on the embedded shapes data (CPU-sized): the stage-1 Q-Former (train_stage1_shapes.sh) -> projection ->
# the tiny warmed-up InternLM2 stand-in (built and cached first), trained on captions. Extra arguments are --options.
# Real weights and data: train_stage2.sh.
source "$(dirname "$0")/../launch.sh"
python -m lavis_lite.models.llm.tiny
launch lavis_lite.train projects/blip2/train/pretrain_stage2_shapes.yaml "$@"
