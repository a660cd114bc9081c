#!/usr/bin/env bash
# Tokenizer speed, side by side in one run (table in BENCHMARKS.md, "Tokenizer speed"):
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

# End to end (end_to_end.sh): `pipeline prepare` against pure tokenization of the same texts, on
# the sample (3 files, 19.05 MB), on COPIES (default 4) and BIG (default 16) copies of it in a
# temp source folder, and on BIG copies in one file, REPEAT (default 5) alternations each.
# Budgets are just under each input's train tokens (5,571,645 per copy), so prepare reads every
# file for any COPIES and BIG up to hundreds (5500K per copy stopped 2 files short at 64).
cargo build --release -q -p pipeline --bin pipeline
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
COPIES=${COPIES:-4}
BIG=${BIG:-16}
REPEAT=${REPEAT:-5}
for c in $(seq "$BIG"); do mkdir -p "$OUT/src$BIG/copy$c" && cp -r "$SAMPLE/." "$OUT/src$BIG/copy$c/"; done
for c in $(seq "$COPIES"); do mkdir -p "$OUT/src$COPIES/copy$c" && cp -r "$SAMPLE/." "$OUT/src$COPIES/copy$c/"; done
export PIPELINE=target/release/pipeline BENCH=target/release/examples/bench_tokenize TOKENIZER
printf 'input\tthreads\tpure_s\tpure_MB/s\tstage_s\twhole_s\tstage/pure\twhole/pure\twhole/pure_paired\tcpu_s\tpeak_rss_MiB\tpaired_q1-q3\n'
inputs=("$SAMPLE:5570K:sample" "$OUT/src$COPIES:$((COPIES * 5570))K:sample-x$COPIES"
    "$OUT/src$BIG:$((BIG * 5570))K:sample-x$BIG")
# The same rows as BIG copies, in ONE parquet file (needs pyarrow, from the venv of the Python
# row): real FineWeb-Edu files are gigabytes each, and what the whole command adds to the stage
# is mostly the last file's assembly after its tokenizing ends.
if [ "$("$PYTHON" -c 'import pyarrow; print("ok")' 2>/dev/null)" = ok ]; then
    mkdir -p "$OUT/one/sample/10BT"
    "$PYTHON" pipeline/bench/concat_parquet.py "$OUT/one/sample/10BT/000_00000.parquet" "$BIG" "$SAMPLE"
    inputs+=("$OUT/one:$((BIG * 5570))K:one-file-x$BIG")
fi
for input in "${inputs[@]}"; do
    IFS=: read -r src tokens label <<<"$input"
    for t in $THREADS; do
        pipeline/bench/end_to_end.sh "$label" "$src" "$tokens" "$t" "$REPEAT"
    done
done
