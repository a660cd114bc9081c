#!/usr/bin/env bash
# Checks `trainer export` end to end in Hugging Face transformers, offline, on the CPU:
# for each model variant (configs/tiny.toml as it is, sub_norm = false: the shipped modeling code
# with trust_remote_code; and with sub_norm = true: the native BitNetForCausalLM) it trains a short
# run on shards prepared from the FineWeb-Edu sample of tests/fixtures, exports the last
# checkpoint, and has scripts/export_check.py compare the transformers model with the trainer:
# tokenizer ids, logits on real eval-shard sequences (`trainer logits`), and greedy generations
# token for token (`trainer sample --mode greedy`).
#
#   bash scripts/export-check.sh            # about 3 minutes after the venv exists
#
# Environment: STEPS (training steps per variant, default 60), WORK (scratch folder, default
# target/export-check), VENV (Python environment, default .venv-export: created with
# `pip install torch transformers safetensors numpy accelerate` when missing), CARGO_PROFILE
# (dev or release, default dev), LM_EVAL=1 (also install lm-eval and run it on each export with
# the offline task of scripts/export_cloze_task.py). Results: $WORK/summary.txt.
set -euo pipefail

cd "$(dirname "$0")/.."
STEPS=${STEPS:-60}
WORK=${WORK:-target/export-check}
VENV=${VENV:-.venv-export}
CARGO_PROFILE=${CARGO_PROFILE:-dev}

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "== creating $VENV (torch, transformers, safetensors, numpy, accelerate)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet torch transformers safetensors numpy accelerate
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "| transformers", transformers.__version__)'

echo "== building pipeline and trainer ($CARGO_PROFILE)"
cargo build --locked --profile "$CARGO_PROFILE" -p pipeline -p trainer --bins
BIN=target/$([[ $CARGO_PROFILE == dev ]] && echo debug || echo "$CARGO_PROFILE")

rm -rf "$WORK"
mkdir -p "$WORK"
echo "== preparing shards from tests/fixtures/fineweb-edu-sample"
"$BIN/pipeline" prepare --source tests/fixtures/fineweb-edu-sample \
    --tokenizer tests/fixtures/tokenizer/tokenizer.json \
    --tokens 200K --seq-len 128 --eval-sequences 32 --out "$WORK/shards" 2>"$WORK/prepare.log"

summary="$WORK/summary.txt"
: >"$summary"
for variant in plain sub_norm; do
    dir="$WORK/$variant"
    mkdir -p "$dir"
    config="$dir/tiny.toml"
    # The tiny config, evaluated every 20 steps so the model card has a recent eval.
    sed -e 's/^eval_every = .*/eval_every = 20/' configs/tiny.toml >"$config"
    if [[ $variant == sub_norm ]]; then
        sed -i -e 's/^sub_norm = false.*/sub_norm = true/' "$config"
        architecture=BitNetForCausalLM
    else
        architecture=BitNetB158ForCausalLM
    fi
    grep -q "^sub_norm = $([[ $variant == sub_norm ]] && echo true || echo false)" "$config"

    echo "== $variant: training $STEPS steps"
    checkpoint=$("$BIN/trainer" run --shards "$WORK/shards" --config "$config" --run-dir "$dir/runs" \
        --steps "$STEPS" --device cpu 2>"$dir/train.log")
    echo "== $variant: exporting $checkpoint"
    "$BIN/trainer" export --checkpoint "$checkpoint" --shards "$WORK/shards" --out "$dir/export"
    "$BIN/trainer" logits --checkpoint "$checkpoint" --shards "$WORK/shards" --split eval \
        --sequences 0..8 --out "$dir/logits.safetensors"
    for prompt in "The quick brown fox" "Once upon a time" "Machine learning is" "The capital of France"; do
        "$BIN/trainer" sample --checkpoint "$checkpoint" --shards "$WORK/shards" --prompt "$prompt" \
            --mode greedy --max-new-tokens 60 --device cpu --json >>"$dir/greedy.jsonl"
    done
    echo "== $variant: checking in transformers"
    "$PY" scripts/export_check.py --export "$dir/export" --logits "$dir/logits.safetensors" \
        --samples "$dir/greedy.jsonl" --architecture "$architecture" </dev/null | tee "$dir/check.jsonl"
    { echo "## $variant ($architecture)"; cat "$dir/check.jsonl"; } >>"$summary"
    if [[ ${LM_EVAL:-0} == 1 ]]; then
        "$PY" -c 'import lm_eval' 2>/dev/null || "$VENV/bin/pip" install --quiet lm-eval
        tasks=$("$PY" scripts/export_cloze_task.py "$WORK/lm-eval-task")
        echo "== $variant: lm_eval on the offline fineweb_cloze task"
        HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$VENV/bin/lm_eval" --model hf \
            --model_args "pretrained=$dir/export,trust_remote_code=True,dtype=float32" \
            --include_path "$tasks" --tasks fineweb_cloze --device cpu --batch_size 8 </dev/null \
            2>"$dir/lm_eval.log" | tee "$dir/lm_eval.txt"
        grep -q "fineweb_cloze" "$dir/lm_eval.txt"
        cat "$dir/lm_eval.txt" >>"$summary"
    fi
done
echo "== all checks passed; $summary"
