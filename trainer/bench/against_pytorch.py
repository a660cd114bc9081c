#!/usr/bin/env python3
"""Trainer step against the independent PyTorch reference, side by side on this machine.

For each case (config, batch), in alternation for ROUNDS rounds: `trainer bench` with the
hand-written backward, `trainer bench` with candle autograd, and the reference's `bench` in eager
f32 (`--amp 0 --compile 0`), all with the same thread count. Reports the median step time and the
peak RSS of the whole process (`/usr/bin/time -f %M`), and for configs run at two batch sizes the
memory per extra sequence (the RSS difference over the batch difference). The table goes into
BENCHMARKS.md.

    cargo build --release -p trainer
    python3 -m venv .venv-ref && .venv-ref/bin/pip install torch numpy safetensors
    python3 trainer/bench/against_pytorch.py            # from the workspace root

Environment: TRAINER (default target/release/trainer; a dev build runs its dependencies with debug
assertions, which cost candle's matmuls about 40%), PYTHON (the venv's python, default .venv-ref/bin/python), REF (bitnet_ref.py, default
../shared/reference/bitnet_ref.py), CASES (default "95m:1 95m:2 tiny:8"), ROUNDS (default 1),
THREADS (default 2), STEPS (timed steps, default 2 for 95m and 5 for tiny), BACKWARDS (default
"manual autograd").
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import tomllib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "../.."))
TRAINER = os.environ.get("TRAINER", os.path.join(ROOT, "target/release/trainer"))
PYTHON = os.environ.get("PYTHON", os.path.join(ROOT, ".venv-ref/bin/python"))
REF = os.environ.get("REF", os.path.join(ROOT, "../shared/reference/bitnet_ref.py"))
THREADS = os.environ.get("THREADS", "2")
ROUNDS = int(os.environ.get("ROUNDS", "1"))
CASES = os.environ.get("CASES", "95m:1 95m:2 tiny:8").split()
BACKWARDS = os.environ.get("BACKWARDS", "manual autograd").split()
CONFIGS = {"95m": "configs/bitnet-95m.toml", "tiny": "configs/tiny.toml"}


def reference_config(toml_path, out_dir):
    """The reference's JSON config with the model of one of our TOML configs."""
    with open(os.path.join(ROOT, toml_path), "rb") as f:
        m = tomllib.load(f)["model"]
    cfg = {k: m[k] for k in ("vocab_size", "hidden_size", "num_layers", "num_heads",
                             "num_kv_heads", "ffn_hidden_size", "max_seq_length", "norm_eps",
                             "rope_theta")}
    cfg["head_dim"] = m["hidden_size"] // m["num_heads"]
    path = os.path.join(out_dir, os.path.basename(toml_path) + ".json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path, m.get("max_seq_length")


def timed(cmd, env):
    """Runs cmd under /usr/bin/time; returns (last stdout line as JSON, peak RSS in GB)."""
    with tempfile.NamedTemporaryFile("r") as t:
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name, *cmd], env=env,
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-2000:]}")
        rss_kb = int(t.read().split()[-1])
    return json.loads(p.stdout.strip().splitlines()[-1]), rss_kb * 1024 / 1e9


def main():
    env = dict(os.environ, RAYON_NUM_THREADS=THREADS, OMP_NUM_THREADS=THREADS,
               MKL_NUM_THREADS=THREADS, RUST_LOG="warn")
    cpu = subprocess.run("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2", shell=True,
                         capture_output=True, text=True).stdout.strip()
    print(f"# {cpu}, {os.cpu_count()} cores, {THREADS} threads each, {ROUNDS} round(s)")
    results = {}  # (impl, config, batch) -> [(ms, rss_gb)]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            for case in CASES:
                name, batch = case.split(":")
                batch = int(batch)
                toml_path = CONFIGS[name]
                ref_cfg, seq = reference_config(toml_path, tmp)
                steps = os.environ.get("STEPS", "2" if name == "95m" else "5")
                for backward in BACKWARDS:
                    out, rss = timed([TRAINER, "bench", "--config", toml_path, "--device", "cpu",
                                      "--batch", str(batch), "--steps", steps, "--warmup", "1",
                                      "--backward", backward], env)
                    results.setdefault((f"candle {backward}", name, batch), []).append(
                        (out["median_ms"], rss))
                    print(f"round {r} {case} candle {backward}: {out['median_ms']:.0f} ms, "
                          f"{rss:.2f} GB", flush=True)
                out, rss = timed([PYTHON, REF, "bench", "--config", ref_cfg, "--batch", str(batch),
                                  "--seq", str(seq), "--steps", steps, "--warmup-steps", "1",
                                  "--compile", "0", "--amp", "0", "--device", "cpu"], env)
                results.setdefault(("pytorch eager", name, batch), []).append(
                    (out["median_step_s"] * 1e3, rss))
                print(f"round {r} {case} pytorch eager: {out['median_step_s'] * 1e3:.0f} ms, "
                      f"{rss:.2f} GB", flush=True)
    print()
    print("| impl | config | batch | median step ms | peak RSS GB |")
    print("|---|---|---:|---:|---:|")
    medians = {}
    for (impl, name, batch), runs in results.items():
        ms = statistics.median(x[0] for x in runs)
        rss = statistics.median(x[1] for x in runs)
        medians[(impl, name, batch)] = (ms, rss)
        print(f"| {impl} | {name} | {batch} | {ms:.0f} | {rss:.2f} |")
    print()
    print("| impl | config | GB per extra sequence | step time / pytorch eager |")
    print("|---|---|---:|---:|")
    for (impl, name, batch), (ms, rss) in medians.items():
        torch_ms = medians[("pytorch eager", name, batch)][0]
        others = sorted(b for (i, n, b) in medians if i == impl and n == name and b != batch)
        per_seq = ""
        if others and others[0] > batch:
            b2 = others[0]
            per_seq = f"{(medians[(impl, name, b2)][1] - rss) / (b2 - batch):.3f} (batch {batch} -> {b2})"
        print(f"| {impl} | {name} batch {batch} | {per_seq} | {ms / torch_ms:.2f} |")


if __name__ == "__main__":
    main()
