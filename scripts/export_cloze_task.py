"""Writes a small offline lm-evaluation-harness task for trying `lm_eval --model hf` on an export.

`fineweb_cloze`: 50 four-way multiple-choice items from the FineWeb-Edu sample parquet of
tests/fixtures: the first 20 words of a document, and as choices its next 8 words or the next 8
words of three other documents (accuracy by chance: 0.25). Data and task YAML go to OUT_DIR; run
`lm_eval --include_path OUT_DIR --tasks fineweb_cloze ...`. Needs pyarrow (installed with lm-eval).
"""

import glob
import json
import random
import sys
from pathlib import Path

import pyarrow.parquet as pq

out = Path(sys.argv[1]).resolve()
out.mkdir(parents=True, exist_ok=True)
root = Path(__file__).resolve().parent.parent
files = sorted(glob.glob(str(root / "tests/fixtures/fineweb-edu-sample/**/*.parquet"), recursive=True))
texts = pq.read_table(files[0], columns=["text"]).column("text").to_pylist()[:400]
items = []
for t in texts:
    w = t.split()
    if len(w) < 40:
        continue
    context, continuation = " ".join(w[:20]), " " + " ".join(w[20:28])
    # Short enough for a 128-token model (words can be long URLs or code).
    if len(context) < 200 and len(continuation) < 70:
        items.append((context, continuation))
rng = random.Random(0)
docs = []
for i, (context, continuation) in enumerate(items[:50]):
    choices = [continuation] + [items[(i + k) % len(items)][1] for k in (5, 11, 17)]
    rng.shuffle(choices)
    docs.append({"context": context, "choices": choices, "label": choices.index(continuation)})
(out / "cloze.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
(out / "fineweb_cloze.yaml").write_text(
    f"""task: fineweb_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {out / "cloze.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
)
print(out)
