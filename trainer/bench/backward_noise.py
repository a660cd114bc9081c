#!/usr/bin/env python3
"""Does the hand-written backward train like autograd? A tiny-config run of STEPS steps (default
50) on the shipped sample, seven times: autograd, autograd over 2, 4 and 8 micro-batches (the
same math summed in other orders: the autograd path's own float noise), the hand-written pass,
and the hand-written pass over 2 and 4 micro-batches. Prints, per pair, the largest relative
difference of the loss and of the gradient norm over the steps, and the step where the runs
first differ. A single pair's maximum over a chaotic trajectory is itself noisy; the noise pairs
give its spread.

    cargo build --release -p pipeline -p trainer
    python3 trainer/bench/backward_noise.py            # from the workspace root
"""

import glob
import json
import os
import subprocess
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
STEPS = os.environ.get("STEPS", "50")


def run(tmp, name, backward, accumulation):
    with open(os.path.join(ROOT, "configs/tiny.toml")) as f:
        text = f.read().replace("grad_clip_norm", f'backward = "{backward}"\ngrad_clip_norm', 1)
    text = text.replace("grad_accumulation_steps = 1", f"grad_accumulation_steps = {accumulation}", 1)
    config = os.path.join(tmp, f"{name}.toml")
    with open(config, "w") as f:
        f.write(text)
    runs = os.path.join(tmp, f"runs-{name}")
    env = dict(os.environ, RUST_LOG="warn")
    subprocess.run([os.path.join(ROOT, "target/release/trainer"), "run", "--shards",
                    os.path.join(tmp, "shards"), "--config", config, "--steps", STEPS,
                    "--run-dir", runs], env=env, check=True, cwd=ROOT, capture_output=True)
    (path,) = glob.glob(os.path.join(runs, "*/metrics/scalars.jsonl"))
    with open(path) as f:
        return [json.loads(line) for line in f]


def compare(label, a, b):
    rel = lambda key: [abs(x[key] - y[key]) / abs(y[key]) for x, y in zip(a, b)]  # noqa: E731
    loss, norm = rel("loss"), rel("grad_norm")
    first = next((x["step"] for x, y in zip(a, b) if x["loss"] != y["loss"]), None)
    print(f"| {label} | {max(loss):.2e} | {max(norm):.2e} | {first} | "
          f"{a[-1]['loss']:.6f} vs {b[-1]['loss']:.6f} |")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([os.path.join(ROOT, "target/release/pipeline"), "prepare", "--source",
                        "tests/fixtures/fineweb-edu-sample", "--tokenizer",
                        "tests/fixtures/tokenizer/tokenizer.json", "--tokens", "2M", "--seq-len",
                        "128", "--eval-sequences", "256", "--out", os.path.join(tmp, "shards")],
                       check=True, cwd=ROOT, capture_output=True)
        autograd = run(tmp, "autograd", "autograd", 1)
        autograd_2 = run(tmp, "autograd-2", "autograd", 2)
        autograd_4 = run(tmp, "autograd-4", "autograd", 4)
        autograd_8 = run(tmp, "autograd-8", "autograd", 8)
        manual = run(tmp, "manual", "manual", 1)
        manual_2 = run(tmp, "manual-2", "manual", 2)
        manual_4 = run(tmp, "manual-4", "manual", 4)
    print(f"| pair ({STEPS} tiny steps) | max rel. loss diff | max rel. grad-norm diff | "
          "first differing step | last loss |")
    print("|---|---:|---:|---:|---|")
    compare("autograd, 2 micro-batches vs 1", autograd_2, autograd)
    compare("autograd, 4 micro-batches vs 1", autograd_4, autograd)
    compare("autograd, 8 micro-batches vs 1", autograd_8, autograd)
    compare("hand-written, 2 micro-batches vs 1", manual_2, manual)
    compare("hand-written, 4 micro-batches vs 1", manual_4, manual)
    compare("hand-written vs autograd", manual, autograd)


if __name__ == "__main__":
    main()
