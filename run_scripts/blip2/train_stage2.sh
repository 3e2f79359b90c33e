#!/usr/bin/env bash
# Stage 2: Q-Former -> projection -> frozen LLM, trained on captions, from the stage-1 checkpoint.
# Default: tiny InternLM2 on the embedded shapes data (builds and caches the tiny LLM first; skipped
# when run.model_type names a real LLM). Extra arguments are --options, e.g. model.pretrained=...
source "$(dirname "$0")/../launch.sh"
case " $* " in *" model.model_type="*) ;; *) python -m lavis_lite.models.llm.tiny ;; esac
launch lavis_lite.train projects/blip2/train/pretrain_stage2.yaml "$@"
