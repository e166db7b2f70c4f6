#!/bin/bash
set -e
cd /work/main
source .venv/bin/activate
export HF_HUB_OFFLINE=1
T=runs/pipeline_v11/times.txt
echo "start $(date +%T)" > $T
rm -rf data/blends/embedded_train
visualchat blend data_blend/recipes/embedded_train.yaml > runs/pipeline_v11/blend.log 2>&1
echo "blend end $(date +%T)" >> $T
python -m training.vision_pretraining --out runs/stage0/vision.safetensors --steps 3600 --precision bf16 > runs/pipeline_v11/stage0.log 2>&1
echo "stage0 end $(date +%T)" >> $T
visualchat train training/recipes/embedded.yaml > runs/pipeline_v11/train.log 2>&1
echo "stage1 end $(date +%T)" >> $T
