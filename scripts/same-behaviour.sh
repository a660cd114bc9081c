#!/usr/bin/env bash
# Checks that the working tree behaves exactly like an earlier commit: byte-identical shards and
# bit-identical training.
#
#   scripts/same-behaviour.sh BASE [WORK]
#
# BASE is any commit (e.g. the commit before a refactor); WORK (default /tmp/same-behaviour) holds
# the outputs. Both sides are built with the dev profile into one target dir, so dependencies are
# compiled once. Then, for each side:
#   - `pipeline prepare` of the shipped FineWeb-Edu sample at two budgets (2M, 500K tokens) and two
#     thread counts (1, 2); every file of each dataset folder but stats.json (timings) must be
#     byte-identical between the sides;
#   - `trainer run` of configs/tiny.toml for 50 steps on the CPU on the 2M dataset: every step's
#     loss, gradient norm, learning rate and weight decay must be bit-identical, the final
#     checkpoint's weights and optimizer moments byte-identical, and the run's samples and
#     `trainer sample` from the final checkpoint (greedy, typical, stress) identical.
# Exits non-zero, naming what differs, on the first difference.
set -euo pipefail

BASE=${1:?usage: scripts/same-behaviour.sh BASE_COMMIT [WORK_DIR]}
WORK=${2:-/tmp/same-behaviour}
REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
SAMPLE=$REPO/tests/fixtures/fineweb-edu-sample
TOKENIZER=$REPO/tests/fixtures/tokenizer/tokenizer.json
STEPS=50

base_sha=$(git -C "$REPO" rev-parse --verify "$BASE^{commit}") || {
    echo "error: $BASE is not a commit of $REPO; hint: pass a commit hash or branch name" >&2
    exit 2
}
rm -rf "$WORK"
mkdir -p "$WORK"

# build SIDE SRC: builds both binaries from SRC and copies them to $WORK/SIDE/bin.
build() {
    local side=$1 src=$2
    echo "== building $side ($src)"
    # Both sides share target/debug/{pipeline,trainer}; cargo re-links a binary there only when it
    # rebuilds it, so touch the binaries' sources to be sure the copy below is this side's.
    touch "$src/pipeline/src/main.rs" "$src/trainer/src/main.rs"
    (cd "$src" && CARGO_TARGET_DIR=$TARGET cargo build --locked -q -p pipeline --bin pipeline -p trainer --bin trainer)
    mkdir -p "$WORK/$side/bin"
    cp "$TARGET/debug/pipeline" "$TARGET/debug/trainer" "$WORK/$side/bin/"
}

# outputs SIDE SRC: the four datasets and the tiny training run of one side, with the side's own
# configs/tiny.toml.
outputs() {
    local side=$1 src=$2 bin=$WORK/$1/bin
    for tokens in 2M 500K; do
        for threads in 1 2; do
            echo "== $side: prepare --tokens $tokens --threads $threads"
            # No git for the binary: the manifest records the commit it was built from, which
            # differs between the sides by design.
            GIT_DIR=/nonexistent "$bin/pipeline" prepare --source "$SAMPLE" --tokenizer "$TOKENIZER" --tokens "$tokens" \
                --seq-len 128 --eval-sequences 256 --threads "$threads" \
                --out "$WORK/$side/shards-$tokens-$threads" 2>"$WORK/$side/prepare-$tokens-$threads.log"
        done
    done
    echo "== $side: trainer run, tiny config, $STEPS steps"
    (cd "$src" && "$bin/trainer" run --shards "$WORK/$side/shards-2M-2" --config configs/tiny.toml \
        --steps "$STEPS" --device cpu --run-dir "$WORK/$side/runs" >/dev/null 2>"$WORK/$side/run.log")
    # Generation from the trained weights (the run itself samples only the initial ones).
    local ckpt
    ckpt=$(find "$WORK/$side/runs" -mindepth 3 -maxdepth 3 -name "$(printf 'step_%06d' "$STEPS")")
    for mode in greedy typical stress; do
        "$bin/trainer" sample --checkpoint "$ckpt" --shards "$WORK/$side/shards-2M-2" --device cpu \
            --prompt "The history of the" --mode "$mode" --max-new-tokens 40 \
            >"$WORK/$side/sample-$mode.txt" 2>>"$WORK/$side/run.log"
    done
}

base_tree=$WORK/base-src
git -C "$REPO" worktree add --detach "$base_tree" "$base_sha" >/dev/null
trap 'git -C "$REPO" worktree remove --force "$base_tree" >/dev/null 2>&1 || true' EXIT
build base "$base_tree"
build work "$REPO"
outputs base "$base_tree"
outputs work "$REPO"

echo "== comparing"
for tokens in 2M 500K; do
    for threads in 1 2; do
        a=$WORK/base/shards-$tokens-$threads b=$WORK/work/shards-$tokens-$threads
        diff <(cd "$a" && find . -type f ! -name stats.json | sort) \
            <(cd "$b" && find . -type f ! -name stats.json | sort) ||
            { echo "FAIL: the file lists of $a and $b differ" >&2; exit 1; }
        while read -r f; do
            cmp -s "$a/$f" "$b/$f" || { echo "FAIL: $b/$f differs from $a/$f" >&2; exit 1; }
        done < <(cd "$a" && find . -type f ! -name stats.json | sort)
        echo "ok: shards --tokens $tokens --threads $threads ($(find "$a" -type f | wc -l) files)"
    done
done

run_a=$(find "$WORK/base/runs" -mindepth 1 -maxdepth 1 -type d | head -1)
run_b=$(find "$WORK/work/runs" -mindepth 1 -maxdepth 1 -type d | head -1)
ck=$(printf 'step_%06d' "$STEPS")
for f in model.safetensors optimizer.safetensors; do
    cmp -s "$run_a/checkpoints/$ck/$f" "$run_b/checkpoints/$ck/$f" ||
        { echo "FAIL: $ck/$f differs" >&2; exit 1; }
done
echo "ok: $ck weights and optimizer moments byte-identical"
for mode in greedy typical stress; do
    cmp -s "$WORK/base/sample-$mode.txt" "$WORK/work/sample-$mode.txt" ||
        { echo "FAIL: trainer sample --mode $mode differs" >&2; exit 1; }
done
echo "ok: trainer sample from $ck identical in every mode"
python3 - "$run_a" "$run_b" "$STEPS" <<'EOF'
import json, sys
a, b, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rows(run, name, key):
    with open(f"{run}/{name}") as f:
        return [key(json.loads(l)) for l in f if l.strip()]
step_keys = ("step", "tokens_seen", "loss", "grad_norm", "lr", "wd", "update_applied")
sa = rows(a, "metrics/scalars.jsonl", lambda r: tuple(r.get(k) for k in step_keys))
sb = rows(b, "metrics/scalars.jsonl", lambda r: tuple(r.get(k) for k in step_keys))
if len(sa) != steps or sa != sb:
    bad = next((x, y) for x, y in zip(sa + [None], sb + [None]) if x != y)
    sys.exit(f"FAIL: scalars.jsonl differs ({len(sa)} vs {len(sb)} records); first difference {bad}")
sample = lambda r: (r["step"], r["prompt"], r["mode"], r["generated_text"])
xa, xb = rows(a, "samples/samples.jsonl", sample), rows(b, "samples/samples.jsonl", sample)
if xa != xb:
    bad = next((x, y) for x, y in zip(xa + [None], xb + [None]) if x != y)
    sys.exit(f"FAIL: samples.jsonl differs; first difference {bad}")
print(f"ok: {len(sa)} steps of loss/grad_norm/lr/wd bit-identical (last loss {sa[-1][2]}), "
      f"{len(xa)} samples identical")
EOF
echo "same behaviour as $base_sha"
