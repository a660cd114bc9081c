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
printf 'impl\tthreads\tseconds\tMB/s\tMB/s/thread\ttokens\n'
for t in $THREADS; do
    RAYON_NUM_THREADS=$t TOKENIZERS_PARALLELISM=true "$PYTHON" pipeline/bench/tokenize_hf.py "$TOKENIZER" "$SAMPLE" "$t"
done
target/release/examples/bench_tokenize --tokenizer "$TOKENIZER" --sample "$SAMPLE" \
    --threads "${THREADS// /,}" --impl fast,fast-uncached,plain | tail -n +2
