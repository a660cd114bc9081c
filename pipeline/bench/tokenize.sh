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

# End to end: `pipeline prepare` on the same sample (all 3 files, ~5.66M tokens), fast backend;
# its stage-1 time ("tokenized now ... in X s") against the pure tokenization rows above.
cargo build --release -q -p pipeline --bin pipeline
OUT=$(mktemp -d)
for t in $THREADS; do
    for impl in fast reference; do
        rm -rf "$OUT/shards"
        /usr/bin/time -f "maxrss_kb %M" target/release/pipeline prepare --source "$SAMPLE" \
            --tokenizer "$TOKENIZER" --tokens 5M --eval-sequences 80 --out "$OUT/shards" \
            --threads "$t" --tokenizer-impl "$impl" 2>&1 \
            | grep -E "tokenized now|wall time|maxrss_kb" | sed "s/^/prepare $impl threads=$t: /"
    done
done
rm -rf "$OUT"
