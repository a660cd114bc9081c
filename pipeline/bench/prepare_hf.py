"""Python `tokenizers` baseline for `pipeline/bench/prepare.sh`: `encode_batch` over every text of
the sample, with the same tokenizer.json and the settings that match SentencePiece (special-token
matching off, no BOS/EOS). Set RAYON_NUM_THREADS to choose the threads before starting Python.

usage: prepare_hf.py TOKENIZER_JSON SAMPLE_DIR THREADS
prints: python-tokenizers <threads> <seconds> <text MB/s> <tokens/s> <tokens>
"""

import pathlib
import sys
import time

import pyarrow.parquet as pq
import tokenizers


def main() -> None:
    tokenizer_json, sample, threads = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    texts = []
    for path in sorted(sample.rglob("*.parquet")):
        texts += [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
    tok = tokenizers.Tokenizer.from_file(tokenizer_json)
    tok.encode_special_tokens = True
    mb = sum(len(t.encode()) for t in texts) / 1e6
    start = time.perf_counter()
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    secs = time.perf_counter() - start
    n = sum(len(e.ids) for e in encodings)
    print(f"python-tokenizers {tokenizers.__version__}\t{threads}\t{secs:.2f}\t{mb / secs:.2f}\t{n / secs:.0f}\t{n}")


if __name__ == "__main__":
    main()
