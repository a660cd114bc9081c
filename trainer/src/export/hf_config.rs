//! The JSON files `transformers` reads next to the weights: `config.json` (the architecture),
//! `generation_config.json`, `tokenizer_config.json` and `special_tokens_map.json`.
//!
//! - `sub_norm = true`: the native `BitNetForCausalLM` (`model_type: bitnet`), whose blocks are ours
//!   with the sub-norms (`attn_sub_norm` before o_proj, `ffn_sub_norm` before down_proj). Its
//!   linear layers become BitLinear through `quantization_config` (`quant_method: bitnet`,
//!   `linear_class: autobitlinear`, `quantization_mode: online`): the latent weights are stored and
//!   quantized at every call with one absmean scale per projection, activations per token to int8,
//!   as in training. `lm_head` stays a plain (tied) linear layer, as ours.
//! - `sub_norm = false`: no native class has BitLinear blocks without the sub-norms, so the export
//!   ships its own `configuration_bitnet_b158.py` / `modeling_bitnet_b158.py`, named in
//!   `auto_map` (loaded with `trust_remote_code=True`, the hub's convention for custom models).
//!
//! The tokenizer is the shards' `tokenizer.json` itself, loaded as `PreTrainedTokenizerFast`:
//! transformers 5's `LlamaTokenizer` rebuilds the tokenizer instead of reading the file and then
//! encodes some inputs differently (e.g. leading double spaces), so its class is not named.

use serde_json::{Value, json};

use crate::config::ModelConfig;

/// The custom modeling code of `sub_norm = false` exports: (file name, contents).
pub const REMOTE_CODE: [(&str, &str); 2] = [
    (
        "configuration_bitnet_b158.py",
        include_str!("python/configuration_bitnet_b158.py"),
    ),
    (
        "modeling_bitnet_b158.py",
        include_str!("python/modeling_bitnet_b158.py"),
    ),
];

/// Special token strings and ids of the tokenizer.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    pub bos: (String, u32),
    pub eos: (String, u32),
    pub unk: Option<String>,
}

/// `config.json`.
pub fn config_json(m: &ModelConfig, tokens: &SpecialTokens) -> Value {
    let mut c = json!({
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.head_dim(),
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_length,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": { "rope_type": "default", "rope_theta": m.rope_theta },
        "initializer_range": m.init_std,
        "attention_bias": false,
        "attention_dropout": 0.0,
        "tie_word_embeddings": true,
        "use_cache": true,
        "bos_token_id": tokens.bos.1,
        "eos_token_id": tokens.eos.1,
        "pad_token_id": null,
        "dtype": "float32",
        "torch_dtype": "float32",
    });
    let extra = if m.sub_norm {
        json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "online",
                "use_rms_norm": false,
                "modules_to_not_convert": ["lm_head"],
            },
        })
    } else {
        json!({
            "architectures": ["BitNetB158ForCausalLM"],
            "model_type": "bitnet_b158",
            "auto_map": {
                "AutoConfig": "configuration_bitnet_b158.BitNetB158Config",
                "AutoModelForCausalLM": "modeling_bitnet_b158.BitNetB158ForCausalLM",
            },
        })
    };
    let (Value::Object(map), Value::Object(more)) = (&mut c, extra) else {
        unreachable!("both are JSON objects")
    };
    map.extend(more);
    c
}

/// `generation_config.json`: greedy (transformers' default), stops at `</s>`, pads with it. No
/// `max_length`: transformers warns whenever `max_new_tokens` is given next to it; the context
/// limit is `max_position_embeddings`.
pub fn generation_config_json(tokens: &SpecialTokens) -> Value {
    json!({
        "bos_token_id": tokens.bos.1,
        "eos_token_id": tokens.eos.1,
        "pad_token_id": tokens.eos.1,
    })
}

/// `tokenizer_config.json`.
pub fn tokenizer_config_json(m: &ModelConfig, tokens: &SpecialTokens) -> Value {
    let mut c = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens.bos.0,
        "eos_token": tokens.eos.0,
        "model_max_length": m.max_seq_length,
        "clean_up_tokenization_spaces": false,
    });
    if let (Value::Object(map), Some(unk)) = (&mut c, &tokens.unk) {
        map.insert("unk_token".into(), json!(unk));
    }
    c
}

/// `special_tokens_map.json` (read by transformers 4.x).
pub fn special_tokens_map_json(tokens: &SpecialTokens) -> Value {
    let mut c = json!({ "bos_token": tokens.bos.0, "eos_token": tokens.eos.0 });
    if let (Value::Object(map), Some(unk)) = (&mut c, &tokens.unk) {
        map.insert("unk_token".into(), json!(unk));
    }
    c
}
