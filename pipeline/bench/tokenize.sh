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

# End to end: `pipeline prepare` (fast backend) against pure tokenization of the same texts, on
# the sample (3 files, 19.05 MB) and on COPIES (default 4) copies of it in a temp source folder.
# The two alternate, REPEAT (default 5) times each, and the best of each is kept, so machine
# noise hits both alike. pure_s: `bench_tokenize --impl fast` (texts already in memory);
# stage_s: stats.json's tokenize_seconds (parquet decoding, sha256, work-file writes included);
# ratio = pure MB/s over stage MB/s (the budget asks for every file, so both cover the same text).
# whole_s, cpu_s (user + system, all threads) and peak RSS are of the whole prepare command.
cargo build --release -q -p pipeline --bin pipeline
OUT=$(mktemp -d)
COPIES=${COPIES:-4}
REPEAT=${REPEAT:-5}
for c in $(seq "$COPIES"); do mkdir -p "$OUT/src/copy$c" && cp -r "$SAMPLE/." "$OUT/src/copy$c/"; done
printf 'input\tthreads\tpure_s\tpure_MB/s\tstage_s\tstage_MB/s\tratio\twhole_s\tcpu_s\tpeak_rss_MiB\n'
# Budgets just under each input's train tokens, so prepare reads every file.
for input in "$SAMPLE:5400K:sample" "$OUT/src:$((COPIES * 5400))K:sample-x$COPIES"; do
    IFS=: read -r src tokens label <<<"$input"
    for t in $THREADS; do
        best_pure="" best=""
        for _ in $(seq "$REPEAT"); do
            pure=$(target/release/examples/bench_tokenize --tokenizer "$TOKENIZER" --sample "$src" \
                --threads "$t" --impl fast --repeat 1 2>/dev/null | tail -1 | cut -f3,4)
            if [ -z "$best_pure" ] || awk -v a="$pure" -v b="$best_pure" 'BEGIN{split(a,x,"\t");split(b,y,"\t");exit !(x[1]<y[1])}'; then
                best_pure=$pure
            fi
            rm -rf "$OUT/shards"
            /usr/bin/time -o "$OUT/time" -f "%e %U %S %M" target/release/pipeline prepare \
                --source "$src" --tokenizer "$TOKENIZER" --tokens "$tokens" --eval-sequences 80 \
                --out "$OUT/shards" --threads "$t" >/dev/null 2>&1
            files=$(grep -o '"files_read": [0-9]*' "$OUT/shards/stats.json" | cut -d' ' -f2)
            [ "$files" = "$(find "$src" -name '*.parquet' | wc -l)" ] || { echo "prepare read $files files of $src" >&2; exit 1; }
            stage=$(grep -o '"tokenize_seconds": [0-9.e-]*' "$OUT/shards/stats.json" | cut -d' ' -f2)
            mbs=$(grep -o '"text_mb_per_s": [0-9.e-]*' "$OUT/shards/stats.json" | cut -d' ' -f2)
            row=$(awk -v s="$stage" -v m="$mbs" '{printf "%.3f\t%.2f\t%.2f\t%.2f\t%.1f", s, m, $1, $2 + $3, $4 / 1024}' "$OUT/time")
            if [ -z "$best" ] || awk -v a="$row" -v b="$best" 'BEGIN{split(a,x,"\t");split(b,y,"\t");exit !(x[1]<y[1])}'; then
                best=$row
            fi
        done
        ratio=$(awk -v p="$best_pure" -v r="$best" 'BEGIN{split(p,x,"\t");split(r,y,"\t");printf "%.2f", x[2]/y[2]}')
        printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$label" "$t" "$best_pure" \
            "$(echo "$best" | cut -f1,2)" "$ratio" "$(echo "$best" | cut -f3-)"
    done
done
rm -rf "$OUT"
