#!/usr/bin/env bash
# One row of the end-to-end measurement: `pipeline prepare` against pure tokenization of
# the same texts at the same thread count, alternating REPEAT times so machine noise hits both
# alike. Used by tokenize.sh (here) and scaling.sh (the GPU machine).
#
#   PIPELINE=... BENCH=... TOKENIZER=... end_to_end.sh LABEL SRC TOKENS THREADS REPEAT
#
# pure: `bench_tokenize --impl fast` wall seconds of the encode alone (texts already in memory,
# tokenizer loaded). stage: stats.json's tokenize_seconds (parquet decoding, sha256, work-file
# writes, shard assembly of all but the last file). whole: the entire `prepare` command, start to
# exit (tokenizer load, the last file's assembly, fsyncs, manifest, clean-up included). TOKENS
# must make prepare read every file of SRC (checked), so all three cover the same text. Ratios
# are prepare time over pure time: best over best, and the median of the REPEAT side-by-side
# pairs, with their quartiles in the last column (the host's noise: say 10 or more pairs). cpu_s
# (user + system of the whole command) is a median, peak RSS the largest seen.
set -euo pipefail
label=$1 src=$2 tokens=$3 threads=$4 repeat=$5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
files=$(find "$src" -name '*.parquet' | wc -l)
for i in $(seq "$repeat"); do
    pure=$("$BENCH" --tokenizer "$TOKENIZER" --sample "$src" --threads "$threads" --impl fast \
        --repeat 1 2>/dev/null | tail -1 | cut -f3,4)
    rm -rf "$work/out"
    run=("$PIPELINE" prepare --source "$src" --tokenizer "$TOKENIZER" --tokens "$tokens"
        --eval-sequences 80 --out "$work/out" --threads "$threads")
    if [ -x /usr/bin/time ]; then
        /usr/bin/time -o "$work/time" -f "%e %U %S %M" "${run[@]}" >/dev/null 2>"$work/err" ||
            { cat "$work/err" >&2; exit 1; }
    else # no GNU time (a bare machine): bash's timer, peak RSS unknown (0)
        TIMEFORMAT="%R %U %S 0"
        { time "${run[@]}" >/dev/null 2>"$work/err"; } 2>"$work/time" ||
            { cat "$work/err" >&2; exit 1; }
    fi
    read_files=$(grep -o '"files_read": [0-9]*' "$work/out/stats.json" | cut -d' ' -f2)
    [ "$read_files" = "$files" ] || { echo "prepare read $read_files of $files files of $src" >&2; exit 1; }
    stage=$(grep -o '"tokenize_seconds": [0-9.e-]*' "$work/out/stats.json" | cut -d' ' -f2)
    echo "$pure $stage $(cat "$work/time")" >>"$work/rows"
done
# rows: pure_s pure_MB/s stage_s whole_s user_s sys_s peak_KiB
awk -v label="$label" -v t="$threads" '
    { p[NR] = $1; mbs[NR] = $2; s[NR] = $3; w[NR] = $4; c[NR] = $5 + $6; r[NR] = $7; pair[NR] = $4 / $1 }
    function min(a,   i, m) { m = a[1]; for (i in a) if (a[i] < m) m = a[i]; return m }
    function max(a,   i, m) { m = a[1]; for (i in a) if (a[i] > m) m = a[i]; return m }
    # q-th quantile (0 <= q <= 1), linear between the sorted values.
    function quantile(a, q,   i, j, n, b, x, h) {
        n = 0; for (i in a) b[++n] = a[i]
        for (i = 2; i <= n; i++) { x = b[i]; for (j = i - 1; j >= 1 && b[j] > x; j--) b[j + 1] = b[j]; b[j + 1] = x }
        h = 1 + (n - 1) * q; i = int(h)
        return i >= n ? b[n] : b[i] + (h - i) * (b[i + 1] - b[i])
    }
    END {
        printf "%s\t%s\t%.3f\t%.1f\t%.3f\t%.3f\t%.2f\t%.2f\t%.2f\t%.2f\t%.1f\t%.2f-%.2f\n", label, t, min(p), max(mbs),
            min(s), min(w), min(s) / min(p), min(w) / min(p), quantile(pair, 0.5), quantile(c, 0.5), max(r) / 1024,
            quantile(pair, 0.25), quantile(pair, 0.75)
    }' "$work/rows"
