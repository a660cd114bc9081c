"""BitNet b1.58 decoder exported by `trainer export` (bitnet-fineweb), for `transformers` with
`trust_remote_code=True`.

The forward is the trainer's (Rust, candle) operation for operation, in float32:

- BitLinear (Ma et al. 2024, arXiv:2402.17764, eqs. 1-3; activations as BitNet, arXiv:2310.11453
  eq. 4). Activations per token: `s = (1 / max(max|x|, 1e-5)) * 127`,
  `x_q = clamp(round(x * s), -128, 127) / s`. Weights per projection (q, k, v, o, gate, up, down
  each with its own scale): `gamma = max(mean|W|, 1e-5)`, `W_q = clamp(round(W / gamma), -1, 1) *
  gamma`. The latent float weights are stored; they are quantized when the model is loaded (and
  again if they change), exactly as the trainer's inference form does.
- Rounding is half away from zero (Rust `f32::round`), not torch's half to even.
- Pre-norm blocks: `h += o_proj(attention(rms(h)))`, `h += down_proj(silu(gate(x)) * up(x))` with
  `x = rms(h)`; `rms(x) = x * (1 / sqrt(mean(x^2) + eps)) * weight`; no biases; no sub-norms.
- RoPE in the rotate-half convention of HF Llama, angles computed in float64 and rounded once to
  float32; grouped-query attention (kv head j serves query heads j*r .. j*r+r-1).
- The LM head is the token embedding (tied): `logits = h @ embed_tokens.weight^T`.

Beyond `max_position_embeddings` (the trainer's `max_seq_length`) the model refuses to run, as the
trainer does: it never saw later positions.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_bitnet_b158 import BitNetB158Config

# transformers 5 names the key/value cache `cache`, 4.x `past_key_values`.
_CACHE_FIELD = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
)


def round_half_away_from_zero(x):
    """`f32::round` of Rust: halves go away from zero (torch.round sends them to the even
    neighbour). `x - trunc(x)` is exact in floating point, so ties are found exactly."""
    t = torch.trunc(x)
    return torch.where((x - t).abs() == 0.5, t + torch.sign(x), torch.round(x))


def quantize_activations(x):
    """Per-token 8-bit absmax fake quantization, `x: [..., features]`."""
    s = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5).reciprocal() * 127.0
    return round_half_away_from_zero(x * s).clamp(-128.0, 127.0) / s


def quantize_weight(w):
    """Ternary absmean fake quantization with one scale for the whole projection."""
    gamma = w.abs().mean().clamp(min=1e-5)
    return round_half_away_from_zero(w / gamma).clamp(-1.0, 1.0) * gamma


class BitLinear(nn.Linear):
    """A bias-free linear layer with ternary weights and 8-bit activations. `weight` holds the
    latent float weights; the quantized copy is made once and remade when `weight` changes."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self._quantized = None
        self._quantized_version = None

    def quantized_weight(self):
        key = (self.weight.data_ptr(), self.weight._version, self.weight.device, self.weight.dtype)
        if self.training or self._quantized is None or self._quantized_version != key:
            w = self.weight.float()
            q = quantize_weight(w)
            if self.training:
                # Straight-through estimator, as in training: the forward uses q, the gradient
                # reaches the latent weight unchanged.
                return w + (q - w).detach()
            self._quantized, self._quantized_version = q.detach(), key
        return self._quantized

    def forward(self, x):
        x = x.float()
        x_q = quantize_activations(x.detach())
        if self.training:
            x_q = x + (x_q - x).detach()
        return torch.matmul(x_q, self.quantized_weight().t())


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        inv = torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps).reciprocal()
        return x * inv * self.weight


def rope_tables(head_dim, length, theta, device):
    """cos, sin `[length, head_dim]` in float32 from float64 angles (rotate-half layout)."""
    half = head_dim // 2
    i = torch.arange(head_dim, dtype=torch.float64) % half
    inv_freq = torch.pow(torch.tensor(theta, dtype=torch.float64), -2.0 * i / head_dim)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angle.cos().float().to(device), angle.sin().float().to(device)


def apply_rope(x, cos, sin):
    """`x: [b, heads, t, hd]`, `cos, sin: [b, 1, t, hd]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        h, hd = config.hidden_size, self.head_dim
        self.q_proj = BitLinear(h, self.num_heads * hd)
        self.k_proj = BitLinear(h, self.num_kv_heads * hd)
        self.v_proj = BitLinear(h, self.num_kv_heads * hd)
        self.o_proj = BitLinear(self.num_heads * hd, h)

    def forward(self, x, cos, sin, mask, cache):
        """`x: [b, t, hidden]`, `mask: [b, 1, t, keys]` additive -> `[b, t, hidden]`."""
        b, t, _ = x.shape
        hd = self.head_dim

        def heads(y, n):
            return y.view(b, t, n, hd).transpose(1, 2)

        q = apply_rope(heads(self.q_proj(x), self.num_heads), cos, sin)
        k = apply_rope(heads(self.k_proj(x), self.num_kv_heads), cos, sin)
        v = heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        r = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(r, dim=1)
        v = v.repeat_interleave(r, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + mask
        probs = torch.softmax(scores, dim=-1)
        y = torch.matmul(probs, v).transpose(1, 2).reshape(b, t, self.num_heads * hd)
        return self.o_proj(y)


class Mlp(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = BitLinear(config.hidden_size, config.intermediate_size)
        self.up_proj = BitLinear(config.hidden_size, config.intermediate_size)
        self.down_proj = BitLinear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        # gate and up see the same quantized input, as the trainer's fused gate_up does.
        gate = self.gate_proj(x)
        # silu written as candle computes it: x / (1 + exp(-x)).
        return self.down_proj(gate / (1.0 + torch.exp(-gate)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Mlp(config)

    def forward(self, h, cos, sin, mask, cache):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class BitNetB158PreTrainedModel(PreTrainedModel):
    config_class = BitNetB158Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


class BitNetB158Model(BitNetB158PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Not buffers: computed on first use, so loading on the meta device cannot leave them empty.
        self._rope = None
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def _rope_for(self, device):
        if self._rope is None or self._rope[0].device != device:
            c = self.config
            self._rope = rope_tables(c.hidden_size // c.num_attention_heads, c.max_position_embeddings, c.rope_theta, device)
        return self._rope

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """`input_ids: [b, t]` -> final-normed hidden states `[b, t, hidden]`. With `cache`, the
        tokens follow the cached positions. `attention_mask: [b, cached + t]` (1 = token, 0 =
        padding) only hides padding; `position_ids` default to the positions after the cache."""
        b, t = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=device).unsqueeze(0).expand(b, t)
        end = int(position_ids.max()) + 1 if position_ids.numel() else 0
        if end > self.config.max_position_embeddings or past + t > self.config.max_position_embeddings:
            raise ValueError(
                f"{max(end, past + t)} positions exceed max_position_embeddings "
                f"{self.config.max_position_embeddings} (the trainer's max_seq_length); "
                "shorten the input or max_new_tokens"
            )
        cos, sin = self._rope_for(device)
        cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
        keys = past + t
        # Query i (absolute position past + i) sees keys 0 ..= past + i.
        causal = torch.arange(keys, device=device)[None, :] > (past + torch.arange(t, device=device))[:, None]
        mask = torch.zeros(t, keys, device=device).masked_fill(causal, float("-inf"))[None, None]
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be 2-D [batch, keys] (1 = token, 0 = padding)")
            # A large finite value rather than -inf: a padding query whose keys are all padding
            # still gets a finite (unused) row instead of NaN.
            padding = (attention_mask[:, None, None, -keys:] == 0).to(torch.float32)
            mask = mask + padding * torch.finfo(torch.float32).min
        h = self.embed_tokens(input_ids).float()
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h)


class BitNetB158ForCausalLM(BitNetB158PreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = BitNetB158Model(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: pass input_ids")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            try:
                cache = DynamicCache(config=self.config)
            except TypeError:  # transformers 4.x
                cache = DynamicCache()
        h = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            h = h[:, logits_to_keep]
        # The tied LM head.
        logits = torch.matmul(h, self.model.embed_tokens.weight.float().t())
        loss = None
        if labels is not None:
            # Mean next-token cross-entropy, labels -100 ignored (the HF convention).
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
