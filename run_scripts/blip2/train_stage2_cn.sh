#!/usr/bin/env bash
# Stage 2 on Chinese captions with InternLM2 (default: tiny InternLM2, shapes Chinese captions).
source "$(dirname "$0")/../launch.sh"
case " $* " in *" model.model_type="*) ;; *) python -m lavis_lite.models.llm.tiny ;; esac
launch lavis_lite.train projects/blip2/train/caption_cn_stage2.yaml "$@"
