#!/usr/bin/env bash
# Thread scaling of the tokenizer and of `prepare`, for the GPU machine's 16 cores,
# which have no Rust: the binaries are built here and carried.
#
#   pipeline/bench/scaling.sh pack   # HERE: release-builds `pipeline` and `bench_tokenize`, strips
#                                    # and xz-packs them into .gpu/pipeline/ (git-ignored), with
#                                    # one parquet file of ONE_FILE (default 4) copies of the
#                                    # sample's rows when .venv-bench has pyarrow (44 MB at 4)
#   pipeline/bench/scaling.sh run    # THERE, with the device tool:
#                                    #   run(command="pipeline/bench/scaling.sh run", carry=[".gpu"])
#
# `run` makes COPIES (default 8) copies of the shipped sample (152 MB of text at 8), then for each
# thread count in THREADS (default "1 4 8 16"): pure fast encoding against `prepare --threads N`,
# side by side REPEAT (default 3) times (end_to_end.sh: the tokenizing stage and the whole
# command); the same on the one-file input when packed (its whole - stage is the last file's
# assembly, which the stretches spread over the threads); then fast encoding and Python
# `tokenizers` `encode_batch` (where the machine's Python has it) on the 1x sample, for the
# per-core comparison. Output: a table on stdout and, when $OUT is set, scaling.txt in it. A dry run on any machine:
# `THREADS="1 2" pipeline/bench/scaling.sh run` after `pack`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PACK=$ROOT/.gpu/pipeline
SAMPLE=$ROOT/tests/fixtures/fineweb-edu-sample
TOKENIZER=$ROOT/tests/fixtures/tokenizer/tokenizer.json

case "${1:-}" in
pack)
    cd "$ROOT"
    cargo build --release -q -p pipeline --bin pipeline --example bench_tokenize
    mkdir -p "$PACK"
    for bin in target/release/pipeline target/release/examples/bench_tokenize; do
        name=$(basename "$bin")
        strip -o "$PACK/$name" "$bin"
        xz -T0 -6 -f "$PACK/$name"
        echo "packed $PACK/$name.xz ($(du -h "$PACK/$name.xz" | cut -f1))"
    done
    python=${PYTHON:-.venv-bench/bin/python}
    rm -rf "$PACK/one"
    if "$python" -c 'import pyarrow' 2>/dev/null; then
        one=${ONE_FILE:-4}
        mkdir -p "$PACK/one/sample/10BT"
        "$python" pipeline/bench/concat_parquet.py "$PACK/one/sample/10BT/000_00000.parquet" \
            "$one" "$SAMPLE"
        echo "$one" >"$PACK/one/copies"
        echo "packed $PACK/one ($(du -sh "$PACK/one" | cut -f1), $one copies in one file)"
    else
        echo "no pyarrow in $python: the one-file rows will be skipped"
    fi
    ;;
run)
    THREADS=${THREADS:-1 4 8 16}
    COPIES=${COPIES:-8}
    REPEAT=${REPEAT:-3}
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    for name in pipeline bench_tokenize; do
        [ -f "$PACK/$name.xz" ] || { echo "no $PACK/$name.xz; hint: run 'pipeline/bench/scaling.sh pack' on the build machine and carry .gpu" >&2; exit 1; }
        xz -dc "$PACK/$name.xz" >"$WORK/$name" && chmod +x "$WORK/$name"
    done
    for c in $(seq "$COPIES"); do mkdir -p "$WORK/src/copy$c" && cp -r "$SAMPLE/." "$WORK/src/copy$c/"; done
    # Just under the copies' train tokens (5,571,645 per copy), so prepare reads every file: the
    # 1,645 tokens of slack per copy stay below the smallest file's share up to hundreds of copies
    # (5500K per copy stopped 2 files short at 64 copies).
    tokens=$((COPIES * 5570))K
    files=$(find "$WORK/src" -name '*.parquet' | wc -l)
    {
        echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $COPIES copies of the sample, $files files"
        printf 'input\tthreads\tpure_s\tpure_MB/s\tstage_s\twhole_s\tstage/pure\twhole/pure\twhole/pure_paired\tcpu_s\tpeak_rss_MiB\tpaired_q1-q3\n'
        for t in $THREADS; do
            PIPELINE="$WORK/pipeline" BENCH="$WORK/bench_tokenize" TOKENIZER="$TOKENIZER" \
                "$ROOT/pipeline/bench/end_to_end.sh" "sample-x$COPIES" "$WORK/src" "$tokens" "$t" \
                "$REPEAT" | tee -a "$WORK/rows"
        done
        if [ -f "$PACK/one/copies" ]; then
            one=$(cat "$PACK/one/copies")
            for t in $THREADS; do
                PIPELINE="$WORK/pipeline" BENCH="$WORK/bench_tokenize" TOKENIZER="$TOKENIZER" \
                    "$ROOT/pipeline/bench/end_to_end.sh" "one-file-x$one" "$PACK/one" \
                    "$((one * 5570))K" "$t" "$REPEAT" | tee -a "$WORK/one_rows"
            done
            awk '{ printf "# one file, %s threads: whole - stage %.3f s (the last file'"'"'s assembly, plus the fixed end costs)\n", $2, $6 - $5 }' \
                "$WORK/one_rows"
        fi
        awk 'NR == 1 { p = $4; w = $6 }
            { printf "# %s threads: pure encoding %.2fx, whole prepare %.2fx the first row\n", $2, $4 / p, w / $6 }' \
            "$WORK/rows"
        # Per core against Python, on the 1x sample (its two 1 MB documents bound the speed-up).
        "$WORK/bench_tokenize" --tokenizer "$TOKENIZER" --sample "$SAMPLE" \
            --threads "${THREADS// /,}" --impl fast 2>/dev/null
        python=${PYTHON:-python3}
        if "$python" -c 'import tokenizers, pyarrow' 2>/dev/null; then
            for t in $THREADS; do
                RAYON_NUM_THREADS=$t TOKENIZERS_PARALLELISM=true "$python" \
                    "$ROOT/pipeline/bench/tokenize_hf.py" "$TOKENIZER" "$SAMPLE" "$t"
            done
        else
            echo "# $python has no tokenizers/pyarrow: Python rows skipped"
        fi
    } | tee "${OUT:-$WORK}/scaling.txt"
    ;;
*)
    echo "usage: pipeline/bench/scaling.sh pack|run (see the comment at the top)" >&2
    exit 2
    ;;
esac
