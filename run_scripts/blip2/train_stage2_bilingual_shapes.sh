#!/usr/bin/env bash
# One stage 2 on the shapes English and Chinese captions, each after a prompt in its language, with the tiny
# InternLM2 stand-in (built and cached first), CPU-sized.
source "$(dirname "$0")/../launch.sh"
python -m lavis_lite.models.llm.tiny
launch lavis_lite.train projects/blip2/train/caption_bilingual_stage2_shapes.yaml "$@"
