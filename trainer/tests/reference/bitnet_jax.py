"""Independent float64 JAX implementation of the trainer's BitNet b1.58 model, used once, offline,
to produce the reference values that `trainer/src/model/mod.rs` tests compare against.

It is written from a prose description of the model (not from the Rust code and not from the
shared PyTorch reference): RMSNorm, RoPE (rotate-half), GQA by explicit head repetition
(`jnp.repeat`, i.e. repeat_interleave), causal softmax, SwiGLU, BitLinear with per-token int8
absmax activations and per-projection absmean ternary weights, straight-through estimators via
`stop_gradient`, tied LM head, mean next-token cross-entropy. Gradients come from `jax.grad`.

Usage (CPU, a few seconds):
    python3 -m venv .venv-trainer-ref && .venv-trainer-ref/bin/pip install jax numpy safetensors
    .venv-trainer-ref/bin/python trainer/tests/reference/bitnet_jax.py trainer/tests/reference

Writes, for each case, `<case>.safetensors` with the f32 inputs (`param.<name>`, `tokens`) and the outputs
computed in float64 and stored as f32 (`logits`, `loss`, `grad.<name>`), and `<case>.json` with the model config.
"""

import json
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

CASES = {
    # Small enough for a ~200 KB fixture, large enough to exercise GQA (4 q heads, 2 kv heads).
    "tiny_plain": dict(vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       ffn_hidden_size=64, max_seq_length=16, norm_eps=1e-5, rope_theta=10000.0,
                       sub_norm=False, batch=2, seq=12, seed=1),
    "tiny_subnorm": dict(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=1,
                         ffn_hidden_size=48, max_seq_length=16, norm_eps=1e-5, rope_theta=500.0,
                         sub_norm=True, batch=2, seq=9, seed=2),
}


def param_shapes(c):
    h, f, v = c["hidden_size"], c["ffn_hidden_size"], c["vocab_size"]
    hd = h // c["num_heads"]
    shapes = {"token_embeddings.weight": (v, h), "final_norm.weight": (h,)}
    for i in range(c["num_layers"]):
        p = f"blocks.{i}."
        shapes[p + "pre_attn_norm.weight"] = (h,)
        shapes[p + "attention.qkv_proj.weight"] = ((c["num_heads"] + 2 * c["num_kv_heads"]) * hd, h)
        shapes[p + "attention.out_proj.weight"] = (h, c["num_heads"] * hd)
        shapes[p + "pre_ffn_norm.weight"] = (h,)
        shapes[p + "feedforward.gate_up.weight"] = (2 * f, h)
        shapes[p + "feedforward.down_proj.weight"] = (h, f)
        if c["sub_norm"]:
            shapes[p + "attention.sub_norm.weight"] = (c["num_heads"] * hd,)
            shapes[p + "feedforward.sub_norm.weight"] = (f,)
    return shapes


def rms(x, w, eps):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def ste(x, q):
    return x + jax.lax.stop_gradient(q - x)


def quant_act(x):
    s = 127.0 / jnp.maximum(jnp.max(jnp.abs(x), axis=-1, keepdims=True), 1e-5)
    return jnp.clip(jnp.round(x * s), -128, 127) / s


def quant_weight(w, parts):
    out, start = [], 0
    for rows in parts:
        p = w[start:start + rows]
        gamma = jnp.maximum(jnp.mean(jnp.abs(p)), 1e-5)
        out.append(jnp.clip(jnp.round(p / gamma), -1, 1) * gamma)
        start += rows
    return jnp.concatenate(out, axis=0)


def bitlinear(x, w, parts):
    xq = ste(x, quant_act(x))
    wq = ste(w, quant_weight(w, parts))
    return xq @ wq.T


def rope(x, theta):
    # x: [b, heads, t, hd]; feature i pairs with i + hd/2.
    t, hd = x.shape[2], x.shape[3]
    inv = theta ** (-np.arange(0, hd // 2, dtype=np.float64) * 2.0 / hd)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=-1)
    # The Rust side rounds the cos/sin tables to f32 once; do the same so only the arithmetic differs.
    cos = jnp.asarray(np.cos(ang).astype(np.float32).astype(np.float64))
    sin = jnp.asarray(np.sin(ang).astype(np.float32).astype(np.float64))
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def forward(params, tokens, c):
    b, t = tokens.shape
    h_size, nh, nkv = c["hidden_size"], c["num_heads"], c["num_kv_heads"]
    hd = h_size // nh
    f = c["ffn_hidden_size"]
    eps = c["norm_eps"]
    emb = params["token_embeddings.weight"]
    h = emb[tokens]
    causal = np.tril(np.ones((t, t), dtype=bool))
    for i in range(c["num_layers"]):
        p = lambda n: params[f"blocks.{i}.{n}"]  # noqa: E731
        x = rms(h, p("pre_attn_norm.weight"), eps)
        qkv = bitlinear(x, p("attention.qkv_proj.weight"), [nh * hd, nkv * hd, nkv * hd])
        q = qkv[..., : nh * hd].reshape(b, t, nh, hd).transpose(0, 2, 1, 3)
        k = qkv[..., nh * hd:(nh + nkv) * hd].reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        v = qkv[..., (nh + nkv) * hd:].reshape(b, t, nkv, hd).transpose(0, 2, 1, 3)
        q, k = rope(q, c["rope_theta"]), rope(k, c["rope_theta"])
        k = jnp.repeat(k, nh // nkv, axis=1)
        v = jnp.repeat(v, nh // nkv, axis=1)
        scores = (q @ k.transpose(0, 1, 3, 2)) / np.sqrt(hd)
        scores = jnp.where(causal, scores, -jnp.inf)
        att = jax.nn.softmax(scores, axis=-1) @ v
        att = att.transpose(0, 2, 1, 3).reshape(b, t, nh * hd)
        if c["sub_norm"]:
            att = rms(att, p("attention.sub_norm.weight"), eps)
        h = h + bitlinear(att, p("attention.out_proj.weight"), [h_size])
        x = rms(h, p("pre_ffn_norm.weight"), eps)
        gu = bitlinear(x, p("feedforward.gate_up.weight"), [f, f])
        g, u = gu[..., :f], gu[..., f:]
        m = jax.nn.silu(g) * u
        if c["sub_norm"]:
            m = rms(m, p("feedforward.sub_norm.weight"), eps)
        h = h + bitlinear(m, p("feedforward.down_proj.weight"), [h_size])
    h = rms(h, params["final_norm.weight"], eps)
    return h @ emb.T


def loss_fn(params, tokens, c):
    logits = forward(params, tokens, c)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return -jnp.mean(picked), logits


def make_case(name, c, out_dir):
    rng = np.random.RandomState(c["seed"])
    params32 = {}
    for n, shape in sorted(param_shapes(c).items()):
        if len(shape) >= 2:
            params32[n] = (rng.normal(0.0, 0.02, size=shape)).astype(np.float32)
        else:
            # Not all ones, so a norm weight that is ignored or misplaced shows up.
            params32[n] = (1.0 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    tokens = rng.randint(0, c["vocab_size"], size=(c["batch"], c["seq"])).astype(np.int64)
    params = {n: jnp.asarray(w, dtype=jnp.float64) for n, w in params32.items()}
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens, c)
    out = {f"param.{n}": w for n, w in params32.items()}
    out["tokens"] = tokens.astype(np.uint32)
    out["logits"] = np.asarray(logits).astype(np.float32)
    out["loss"] = np.asarray([loss]).astype(np.float32)
    for n, g in grads.items():
        out[f"grad.{n}"] = np.asarray(g).astype(np.float32)
    save_file(out, str(out_dir / f"{name}.safetensors"))
    cfg = {k: v for k, v in c.items() if k not in ("batch", "seq", "seed")}
    (out_dir / f"{name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{name}: loss {float(loss):.10f}, {len(grads)} gradients, logits {logits.shape}")


def main():
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, c in CASES.items():
        make_case(name, c, out_dir)


if __name__ == "__main__":
    main()
