#!/usr/bin/env bash
# Tokenizer speed, side by side in one run (issue 7; table in BENCHMARKS.md, "Tokenizer speed"):
# Python `tokenizers` encode_batch, the Rust plain `tokenizers` path and the fast encoder, on the
# same texts (the shipped sample), at each thread count in THREADS (default "1 2").
#
#   python3 -m venv .venv-bench && .venv-bench/bin/pip install "tokenizers==0.23.*" pyarrow
#   pipeline/bench/tokenize.sh            # from the workspace root
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENIZER=${TOKENIZER:-tests/fixtures/tokenizer/tokenizer.json}
SAMPLE=${SAMPLE:-tests/fixtures/fineweb-edu-sample}
THREADS=${THREADS:-1 2}
PYTHON=${PYTHON:-.venv-bench/bin/python}

cargo build --release -q -p pipeline --example bench_tokenize
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(uname -sr)"
printf 'impl\tthreads\twall_s\tMB/s\tMB/s/thread\tcpu_s\tMB/cpu_s\ttokens\n'
for t in $THREADS; do
    RAYON_NUM_THREADS=$t TOKENIZERS_PARALLELISM=true "$PYTHON" pipeline/bench/tokenize_hf.py "$TOKENIZER" "$SAMPLE" "$t"
done
target/release/examples/bench_tokenize --tokenizer "$TOKENIZER" --sample "$SAMPLE" \
    --threads "${THREADS// /,}" --impl fast,fast-uncached,plain | tail -n +2

# End to end: `pipeline prepare` (fast backend) on the same sample (all 3 files, ~5.66M tokens) and
# on COPIES (default 4) copies of it in a temp source folder; best of REPEAT (default 3) runs.
# stage_s is stats.json's tokenize_seconds (the tokenizing stage: parquet decoding, sha256 and
# work-file writes included), to set against the pure tokenization rows above; whole_s, cpu_s
# (user + system, all threads) and peak RSS are of the whole command.
cargo build --release -q -p pipeline --bin pipeline
OUT=$(mktemp -d)
COPIES=${COPIES:-4}
REPEAT=${REPEAT:-3}
for c in $(seq "$COPIES"); do mkdir -p "$OUT/src/copy$c" && cp -r "$SAMPLE/." "$OUT/src/copy$c/"; done
# Pure tokenization of the copies (the fast rows above are the 1x sample).
target/release/examples/bench_tokenize --tokenizer "$TOKENIZER" --sample "$OUT/src" \
    --threads "${THREADS// /,}" --impl fast | tail -n +2 | sed "s/^fast/fast-x$COPIES/"
printf 'prepare\tthreads\tstage_s\twhole_s\tcpu_s\tpeak_rss_MiB\n'
for input in "$SAMPLE:5M:sample" "$OUT/src:$((COPIES * 5))M:sample-x$COPIES"; do
    IFS=: read -r src tokens label <<<"$input"
    for t in $THREADS; do
        best=""
        for _ in $(seq "$REPEAT"); do
            rm -rf "$OUT/shards"
            /usr/bin/time -o "$OUT/time" -f "%e %U %S %M" target/release/pipeline prepare \
                --source "$src" --tokenizer "$TOKENIZER" --tokens "$tokens" --eval-sequences 80 \
                --out "$OUT/shards" --threads "$t" >/dev/null 2>&1
            stage=$(grep -o '"tokenize_seconds": [0-9.e-]*' "$OUT/shards/stats.json" | cut -d' ' -f2)
            row=$(awk -v s="$stage" '{printf "%.3f\t%.2f\t%.2f\t%.1f", s, $1, $2 + $3, $4 / 1024}' "$OUT/time")
            if [ -z "$best" ] || awk -v a="$row" -v b="$best" 'BEGIN{split(a,x,"\t");split(b,y,"\t");exit !(x[1]<y[1])}'; then
                best=$row
            fi
        done
        printf '%s\t%s\t%s\n' "$label" "$t" "$best"
    done
done
rm -rf "$OUT"
