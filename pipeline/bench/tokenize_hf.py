"""Python `tokenizers` side of the tokenizer benchmark: encode_batch on the same
documents as `examples/bench_tokenize.rs`, with special-token matching off and no BOS/EOS (the
settings that match SentencePiece). Threads: set RAYON_NUM_THREADS before starting Python.

usage: tokenize_hf.py TOKENIZER_JSON SAMPLE_DIR THREADS
prints one tab-separated line: impl threads wall_s MB/s MB/s/thread cpu_s MB/cpu_s tokens
(cpu_s: user + system seconds of the whole process, all threads, during encode_batch)
"""

import pathlib
import sys
import time

import pyarrow.parquet as pq
import tokenizers


def main() -> None:
    tokenizer_json, sample_dir, threads = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
    texts = []
    for path in sorted(sample_dir.rglob("*.parquet")):
        texts.extend(pq.read_table(path, columns=["text"]).column("text").to_pylist())
    size = sum(len(t.encode("utf-8")) for t in texts)
    tok = tokenizers.Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True
    start, cpu_start = time.perf_counter(), time.process_time()
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    tokens = sum(len(e.ids) for e in encodings)
    mbs = size / 1e6 / seconds
    label = f"python-tokenizers-{tokenizers.__version__}"
    mb_cpu = size / 1e6 / cpu
    print(
        f"{label}\t{threads}\t{seconds:.3f}\t{mbs:.2f}\t{mbs / threads:.2f}\t{cpu:.3f}\t{mb_cpu:.2f}\t{tokens}",
        flush=True,
    )


if __name__ == "__main__":
    main()
