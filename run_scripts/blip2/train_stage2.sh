#!/usr/bin/env bash
# Stage 2 at the paper's size (projects/blip2/train/pretrain_stage2.yaml) on all local GPUs (NPROC to change).
# Weights and data from the environment (docs/real_weights.md lists the files):
#   VIT_PRETRAINED  LAVIS's eva_vit_g.pth            STAGE1_CKPT  stage 1's checkpoint_best.pth (or LAVIS's blip2_pretrained.pth)
#   LLM_PATH        a local facebook/opt-2.7b folder (with InternLM2: a local internlm/internlm2-1_8b folder and the
#                   arguments model.arch=blip2_internlm model.model_type=pretrain_internlm2_1.8b)
#   COCO_ROOT, VG_ROOT  as for train_stage1.sh
# Extra arguments are --options. CPU-sized on the embedded data: train_stage2_shapes.sh.
source "$(dirname "$0")/../launch.sh"
launch lavis_lite.train projects/blip2/train/pretrain_stage2.yaml \
  "model.vit_pretrained=${VIT_PRETRAINED:?set VIT_PRETRAINED to LAVIS\'s eva_vit_g.pth}" \
  "model.pretrained=${STAGE1_CKPT:?set STAGE1_CKPT to the stage-1 checkpoint}" \
  "model.llm_path=${LLM_PATH:?set LLM_PATH to a local LLM folder, e.g. opt-2.7b}" \
  "datasets.coco_caption.build_info.storage=${COCO_ROOT:?set COCO_ROOT to the COCO folder (docs/real_weights.md)}" \
  "datasets.vg_caption.build_info.storage=${VG_ROOT:?set VG_ROOT to the Visual Genome folder (docs/real_weights.md)}" "$@"
