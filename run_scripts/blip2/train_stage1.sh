#!/usr/bin/env bash
# Stage 1 at the paper's size (projects/blip2/train/pretrain_stage1.yaml) on all local GPUs (NPROC to change).
# Weights and data from the environment (docs/real_weights.md lists the files):
#   VIT_PRETRAINED  LAVIS's eva_vit_g.pth            BERT_PATH  a bert-base-uncased folder (config.json, vocab.txt, weights)
#   COCO_ROOT       annotations/coco_karpathy_*.json + images/{train2014,val2014}
#   VG_ROOT         annotations/vg_caption.json + images/{VG_100K,VG_100K_2}
# Extra arguments are --options, e.g. run.batch_size_train=50. CPU-sized on the embedded data: train_stage1_shapes.sh.
source "$(dirname "$0")/../launch.sh"
launch lavis_lite.train projects/blip2/train/pretrain_stage1.yaml \
  "model.vit_pretrained=${VIT_PRETRAINED:?set VIT_PRETRAINED to LAVIS\'s eva_vit_g.pth}" \
  "model.bert_init_path=${BERT_PATH:?set BERT_PATH to a local bert-base-uncased folder}" "model.tokenizer_path=$BERT_PATH" \
  "datasets.coco_retrieval.build_info.storage=${COCO_ROOT:?set COCO_ROOT to the COCO folder (docs/real_weights.md)}" \
  "datasets.vg_caption.build_info.storage=${VG_ROOT:?set VG_ROOT to the Visual Genome folder (docs/real_weights.md)}" "$@"
