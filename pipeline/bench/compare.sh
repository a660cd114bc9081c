#!/usr/bin/env bash
# Two or more `pipeline` binaries against each other and against pure encoding, side by side on
# a noisy host (BENCHMARKS.md, "A second host"): each round runs one pure encode
# (`bench_tokenize --impl fast`), then `prepare` with every binary, the order rotating by round.
# Prints one row per run (round, binary or "pure", wall s, CPU s), then per binary the mean wall
# time and the median and quartiles of its ratio to its round's pure encode.
#
#   BENCH=target/release/examples/bench_tokenize TOKENIZER=tests/fixtures/tokenizer/tokenizer.json \
#       pipeline/bench/compare.sh SRC TOKENS THREADS ROUNDS BIN...
#
# TOKENS must make prepare read every file of SRC (as in end_to_end.sh).
set -euo pipefail
[ -x /usr/bin/time ] || { echo "compare.sh needs GNU time (/usr/bin/time; Debian: apt-get install time)" >&2; exit 1; }
src=$1 tokens=$2 threads=$3 rounds=$4
shift 4
bins=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq "$rounds"); do
    read -r pure cpu < <("$BENCH" --tokenizer "$TOKENIZER" --sample "$src" --threads "$threads" \
        --impl fast --repeat 1 2>/dev/null | tail -1 | cut -f3,6)
    echo "$r pure $pure $cpu" | tee -a "$work/rows"
    for k in "${!bins[@]}"; do
        bin=${bins[$(((k + r) % ${#bins[@]}))]}
        rm -rf "$work/out"
        /usr/bin/time -o "$work/time" -f "%e %U %S" "$bin" prepare --source "$src" \
            --tokenizer "$TOKENIZER" --tokens "$tokens" --eval-sequences 80 --out "$work/out" \
            --threads "$threads" >/dev/null 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
        read -r wall user sys <"$work/time"
        echo "$r $bin $wall $(printf %.2f "$(echo "$user + $sys" | bc)")" | tee -a "$work/rows"
    done
done
awk '
    function quantile(a, n, q,   i, j, x, h) {
        for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
        h = 1 + (n - 1) * q; i = int(h)
        return i >= n ? a[n] : a[i] + (h - i) * (a[i + 1] - a[i])
    }
    $2 == "pure" { pure = $3; next }
    { n[$2]++; sum[$2] += $3; ratio[$2, n[$2]] = $3 / pure }
    END {
        for (b in n) {
            for (i = 1; i <= n[b]; i++) r[i] = ratio[b, i]
            printf "# %s: %d rounds, mean wall %.2f s, / pure: median %.2f, quartiles %.2f-%.2f\n", b, n[b],
                sum[b] / n[b], quantile(r, n[b], 0.5), quantile(r, n[b], 0.25), quantile(r, n[b], 0.75)
        }
    }' "$work/rows"
