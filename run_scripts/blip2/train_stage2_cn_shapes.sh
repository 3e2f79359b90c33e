#!/usr/bin/env bash
# Stage 2 on the shapes Chinese captions with the tiny InternLM2 stand-in (built and cached first), CPU-sized.
source "$(dirname "$0")/../launch.sh"
python -m lavis_lite.models.llm.tiny
launch lavis_lite.train projects/blip2/train/caption_cn_stage2_shapes.yaml "$@"
