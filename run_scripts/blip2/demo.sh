#!/usr/bin/env bash
# The learning demo on the embedded shapes data (CPU, no network, about 7 minutes on 2 cores):
# tiny LLM warm-up (cached), stage 1, stage 2 on captions, zero-shot VQA on the held-out split
# next to two baselines. Arguments go to `python -m lavis_lite.demo` (--help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
python -m lavis_lite.demo "$@"
