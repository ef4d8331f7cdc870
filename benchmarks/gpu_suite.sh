#!/usr/bin/env bash
# The GPU measurements in one go, on one CUDA GPU (about 8 minutes on an H100 or H200):
#
#  1. train_throughput.py on a model of gemma-2-2b's exact shape with random weights: the
#     reference recipe, TRL's SFTTrainer defaults and socratune's defaults, all QLoRA (NF4) as
#     in the notebook, then socratune in bf16 LoRA without gradient checkpointing, at the
#     preset's batch (4 x 8) and at batch 32 x 1, and last socratune's QLoRA with logits at every
#     position (what the output head's trained-positions-only default saves). Tokens/s, MFU, peak
#     GPU memory, eval loss; the JSON is rewritten after every run, so a cut-short suite keeps
#     the rows it finished.
#  2. The tiny model trained for one epoch through every config in examples/accelerate (DDP,
#     FSDP, DeepSpeed ZeRO-2 and ZeRO-3; DeepSpeed only when it is installed), one process,
#     with LoRA, and with QLoRA under the sharding ones (FSDP, ZeRO-3): proof that each config
#     starts, trains and writes a finished run directory; then the FSDP and ZeRO-3 LoRA runs are
#     continued for a second epoch, which resumes from the checkpoint in the engine's layout.
#  3. The vLLM hand-off (docs/serve.md), when vLLM is installed: a tiny run whose adapter covers
#     the projections only (what vLLM's LoRA takes) is served by `socratune serve` and by
#     `vllm serve BASE --enable-lora --lora-modules NAME=RUN/adapter`; vllm.json records whether
#     the adapter loads and whether the greedy replies are the same (benchmarks/vllm_handoff.py).
#
# Usage, from the repository root, after `pip install -e ".[bench]"` (and `pip install deepspeed`):
#     bash benchmarks/gpu_suite.sh RESULTS_DIR [more train_throughput.py arguments]
# Arguments after RESULTS_DIR override the throughput defaults; a quick check of the script on a
# CPU: bash benchmarks/gpu_suite.sh /tmp/suite --model tiny --preset tiny --samples 64
# RESULTS_DIR receives throughput.json / throughput.md, launch.log (one line per config) and each
# launch's log; the run directories themselves go to a temporary folder.
# PARTS (default "throughput launches vllm") picks the parts and their order, e.g. PARTS=launches, so
# that a time-limited machine can run them as separate commands.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:?usage: bash benchmarks/gpu_suite.sh RESULTS_DIR [train_throughput.py arguments]}
shift
mkdir -p "$results"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

throughput() {
    local bf16_lora="quant.load_in_4bit=false+model.dtype=bfloat16+quant.compute_dtype=bfloat16+train.precision=bf16+model.gradient_checkpointing=false"
    python3 benchmarks/train_throughput.py --model gemma2-2b-random --preset gemma2-2b-jpn-qlora --samples 1024 \
        --runs "reference,trl,socratune,socratune@${bf16_lora},socratune@${bf16_lora}+train.batch_size=32+train.grad_accum=1,socratune@train.trained_logits_only=false" \
        --output "$results/throughput.json" "$@" >"$results/throughput.md"
    echo "throughput: exit $?" | tee -a "$results/launch.log"
}

# One epoch of the tiny model, no style generation (its morphological dictionary is not needed
# to prove that a launcher trains).
runs=$(mktemp -d)
printf 'preset: tiny\ntrain: {epochs: 1}\nstyle: {eval_samples: 0}\n' >"$runs/lora.yaml"
printf 'preset: tiny\ntrain: {epochs: 1}\nstyle: {eval_samples: 0}\nquant: {load_in_4bit: true, compute_dtype: bfloat16}\n' \
    >"$runs/qlora.yaml"

launch() {  # launch CONFIG_NAME lora|qlora
    local name=$1 kind=$2 run="$runs/$1-$2" status finished
    if [[ $name == deepspeed_* ]] && ! python3 -c "import deepspeed" 2>/dev/null; then
        echo "$name $kind: skipped (deepspeed is not installed)" | tee -a "$results/launch.log"
        return
    fi
    python3 -m accelerate.commands.launch --config_file "examples/accelerate/$name.yaml" --num_processes 1 \
        -m socratune train --config "$runs/$kind.yaml" --output "$run" >"$results/$name-$kind.log" 2>&1
    status=$?
    finished=$([[ -f $run/training_summary.json && -d $run/adapter ]] && echo "finished run directory" || echo "no finished run")
    echo "$name $kind: exit $status, $finished, $(grep -o '"eval_loss_final": [0-9.]*' "$run/training_summary.json" 2>/dev/null)" \
        | tee -a "$results/launch.log"
}

# A second epoch for a finished run: it must continue from the engine's checkpoint of step N.
second_epoch() {  # second_epoch CONFIG_NAME lora|qlora
    local name=$1 kind=$2 run="$runs/$1-$2" status log="$results/$1-$2-epoch2.log"
    [[ -f $run/training_summary.json ]] || return
    python3 -m accelerate.commands.launch --config_file "examples/accelerate/$name.yaml" --num_processes 1 \
        -m socratune train --config "$runs/$kind.yaml" --output "$run" --epochs 2 >"$log" 2>&1
    status=$?
    echo "$name $kind, epoch 2: exit $status, $(grep -o 'continuing the finished run for more epochs from [^ ]*' "$log" | head -1)," \
        "$(grep -o '"global_step": [0-9]*' "$run/training_summary.json")" | tee -a "$results/launch.log"
}

launches() {
    local name
    for name in ddp fsdp deepspeed_zero2 deepspeed_zero3; do
        launch "$name" lora
    done
    for name in fsdp deepspeed_zero3; do
        launch "$name" qlora
    done
    for name in fsdp deepspeed_zero3; do
        second_epoch "$name" lora
    done
}

vllm_handoff() {
    if ! python3 -c "import vllm" 2>/dev/null; then
        echo "vllm: skipped (vllm is not installed)" | tee -a "$results/launch.log"
        return
    fi
    printf 'preset: tiny\ntrain: {epochs: 2}\nstyle: {eval_samples: 0}\nlora: {target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}\n' \
        >"$runs/projections.yaml"
    python3 -m socratune train --config "$runs/projections.yaml" --output "$runs/handoff" >"$results/handoff-train.log" 2>&1
    python3 benchmarks/vllm_handoff.py "$runs/handoff" --logs "$results" >"$results/vllm.json" 2>"$results/vllm-handoff.log"
    echo "vllm: exit $?, $(grep -o '"adapter_loaded": [a-z]*' "$results/vllm.json"), $(grep -o '"same_greedy_replies": [a-z]*' "$results/vllm.json")" \
        | tee -a "$results/launch.log"
}

for part in ${PARTS:-throughput launches vllm}; do
    case $part in
        throughput) throughput "$@" ;;
        launches) launches ;;
        vllm) vllm_handoff ;;
        *) echo "unknown part $part (throughput, launches, vllm)" >&2; exit 2 ;;
    esac
done
