#!/usr/bin/env bash
# `pipeline prepare` speed and memory on the shipped sample (table in BENCHMARKS.md,
# section "pipeline"). Speed: text MB/s and tokens/s of prepare's tokenizing stage, and end to end,
# at each thread count in THREADS, next to Python `tokenizers` encode_batch on the same texts with
# the same tokenizer.json. Memory: peak RSS of prepare at two budgets (property 7).
#
#   python3 -m venv .venv-pipeline && .venv-pipeline/bin/pip install "tokenizers==0.23.*" pyarrow
#   pipeline/bench/prepare.sh            # from anywhere; builds the release binary
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENIZER=${TOKENIZER:-tests/fixtures/tokenizer/tokenizer.json}
SAMPLE=${SAMPLE:-tests/fixtures/fineweb-edu-sample}
THREADS=${THREADS:-1 2}
PYTHON=${PYTHON:-.venv-pipeline/bin/python}
BIN=target/release/pipeline
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

cargo build --release -q -p pipeline --bin pipeline
echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $(uname -sr)"

# 4M train tokens at seq_len 1024 need all three sample files (19.05 MB of text, 5.66M tokens).
# With `--tokenizer-impl`, both encoders are measured (their shards are identical).
IMPLS=default
if "$BIN" prepare --help | grep -q -- --tokenizer-impl; then IMPLS=${IMPLS_OVERRIDE:-reference fast}; fi
prepare() { # threads tokens out impl
    local impl=()
    [ "$4" = default ] || impl=(--tokenizer-impl "$4")
    "$BIN" prepare --source "$SAMPLE" --tokenizer "$TOKENIZER" --out "$3" --threads "$1" \
        --tokens "$2" --seq-len 1024 --eval-sequences 20 "${impl[@]}" 2>/dev/null
}

printf 'impl\tthreads\tseconds\ttext MB/s\ttokens/s\ttokens\tend-to-end s\n'
for t in $THREADS; do
    # tokenize_hf.py (shared with tokenize.sh) prints: impl threads wall_s MB/s MB/s/thread cpu_s MB/cpu_s tokens
    RAYON_NUM_THREADS=$t "$PYTHON" pipeline/bench/tokenize_hf.py "$TOKENIZER" "$SAMPLE" "$t" |
        awk -F'\t' -v OFS='\t' '{ printf "%s\t%s\t%.2f\t%.2f\t%.0f\t%s\t-\n", $1, $2, $3, $4, $8 / $3, $8 }'
    for impl in $IMPLS; do
        rm -rf "$OUT/s"
        start=$(date +%s.%N)
        prepare "$t" 4M "$OUT/s" "$impl"
        end=$(date +%s.%N)
        "$PYTHON" - "$OUT/s/stats.json" "$t" "$start" "$end" "$impl" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
wall = float(sys.argv[4]) - float(sys.argv[3])
assert s["files_tokenized"] == 3, s
print(f"pipeline prepare ({sys.argv[5]})\t{sys.argv[2]}\t{s['tokenize_seconds']:.2f}\t{s['text_mb_per_s']:.2f}\t"
      f"{s['tokens_per_s']:.0f}\t{s['tokens_tokenized']}\t{wall:.2f}")
PY
    done
done

echo
# Property 7. The shipped sample's third file holds its two largest documents (1.1 MB and 0.9 MB),
# so budgets that read it measure those documents, not the budget. The re-cut sample (documents up
# to 64 KB, 40 per file, as in the e2e tests) separates the two: budgets 20x apart read 4x as many
# similar files.
"$PYTHON" - "$SAMPLE" "$OUT/recut" <<'PY'
import pathlib, sys
import pyarrow as pa, pyarrow.parquet as pq
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).rglob("*.parquet")):
    t = pq.read_table(p, columns=["id", "text"])
    rows += [r for r in zip(t.column("id").to_pylist(), t.column("text").to_pylist()) if len(r[1]) <= 65536]
out = pathlib.Path(sys.argv[2]) / "sample/10BT"
out.mkdir(parents=True)
for k in range(0, len(rows), 40):
    chunk = rows[k:k + 40]
    pq.write_table(pa.table({"id": [r[0] for r in chunk], "text": [r[1] for r in chunk]}),
                   out / f"{k // 40:03}_00000.parquet")
PY
printf 'source\timpl\tbudget\tfiles read\ttrain sequences\tpeak RSS MiB\n'
measure() { # source-name source-dir impl budget seq_len eval
    rm -rf "$OUT/m"
    /usr/bin/time -f '%M' -o "$OUT/rss" "$BIN" prepare --source "$2" --tokenizer "$TOKENIZER" \
        --out "$OUT/m" --threads 2 --tokens "$4" --seq-len "$5" --eval-sequences "$6" \
        $([ "$3" = default ] || echo --tokenizer-impl "$3") 2>/dev/null
    read -r files seqs < <("$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['files_read'], s['train_sequences'])" "$OUT/m/stats.json")
    printf '%s\t%s\t%s\t%s\t%s\t%.0f\n' "$1" "$3" "$4" "$files" "$seqs" "$(echo "$(cat "$OUT/rss") / 1024" | bc -l)"
}
for impl in $IMPLS; do
    for budget in 100K 4M; do measure sample "$SAMPLE" "$impl" "$budget" 1024 20; done
    for budget in 100K 2M; do measure re-cut "$OUT/recut" "$impl" "$budget" 128 16; done
done
