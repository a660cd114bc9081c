//! Our parameter names -> the Hugging Face Llama/BitNet names of `transformers`
//! (`model.layers.{i}.self_attn.q_proj.weight`, ...), with the fused projections split: qkv_proj
//! into q_proj, k_proj, v_proj and gate_up into gate_proj, up_proj. The row counts of each split
//! are the model's own ([`BitLinear::parts`](crate::model::bitlinear::BitLinear::parts)), so the
//! pieces are exactly the projections that each get their own weight scale. The tied LM head is not
//! written: `lm_head` is `model.embed_tokens` (`tie_word_embeddings: true`).

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

use crate::config::ModelConfig;
use crate::model::{BitNet, Params, parameter_shapes};

/// The Hugging Face names of one of our (non-block or per-block) parameter suffixes, in row order.
fn hf_pieces(suffix: &str) -> Option<&'static [&'static str]> {
    Some(match suffix {
        "pre_attn_norm.weight" => &["input_layernorm.weight"],
        "attention.qkv_proj.weight" => &[
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
        ],
        "attention.sub_norm.weight" => &["self_attn.attn_sub_norm.weight"],
        "attention.out_proj.weight" => &["self_attn.o_proj.weight"],
        "pre_ffn_norm.weight" => &["post_attention_layernorm.weight"],
        "feedforward.gate_up.weight" => &["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        "feedforward.sub_norm.weight" => &["mlp.ffn_sub_norm.weight"],
        "feedforward.down_proj.weight" => &["mlp.down_proj.weight"],
        _ => return None,
    })
}

/// The Hugging Face names that our parameter `name` becomes, in row order (more than one for a
/// fused projection). Errors on a name without a mapping.
pub fn hf_names(name: &str) -> Result<Vec<String>> {
    match name {
        "token_embeddings.weight" => return Ok(vec!["model.embed_tokens.weight".into()]),
        "final_norm.weight" => return Ok(vec!["model.norm.weight".into()]),
        _ => {}
    }
    let mapped = name.strip_prefix("blocks.").and_then(|rest| {
        let (layer, suffix) = rest.split_once('.')?;
        layer.parse::<usize>().ok()?;
        let pieces = hf_pieces(suffix)?;
        Some(
            pieces
                .iter()
                .map(|p| format!("model.layers.{layer}.{p}"))
                .collect(),
        )
    });
    mapped.with_context(|| {
        format!(
            "parameter `{name}` has no Hugging Face name; hint: add it to the export's name table (trainer/src/export/names.rs)"
        )
    })
}

/// Row counts of the pieces of our parameter `name` in `model` (one entry for an unfused tensor).
fn row_parts(model: &BitNet, name: &str, rows: usize) -> Vec<usize> {
    let block = name
        .strip_prefix("blocks.")
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(i, suffix)| Some((i.parse::<usize>().ok()?, suffix)));
    match block {
        Some((i, "attention.qkv_proj.weight")) => {
            model.blocks()[i].attention().qkv_proj().parts().to_vec()
        }
        Some((i, "feedforward.gate_up.weight")) => {
            model.blocks()[i].feedforward().gate_up().parts().to_vec()
        }
        _ => vec![rows],
    }
}

/// Every tensor of the export, `(Hugging Face name, f32 tensor)`, in the order of our parameters.
pub fn hf_tensors(params: &Params, cfg: &ModelConfig) -> Result<Vec<(String, Tensor)>> {
    let model = params.model(cfg)?;
    let mut out = Vec::new();
    for (name, shape) in parameter_shapes(cfg) {
        let names = hf_names(&name)?;
        let parts = row_parts(&model, &name, shape[0]);
        if parts.len() != names.len() || parts.iter().sum::<usize>() != shape[0] {
            bail!(
                "parameter `{name}` {shape:?}: the model splits it into rows {parts:?}, the export into {} tensors",
                names.len()
            );
        }
        let tensor = params
            .get(&name)
            .with_context(|| format!("parameter `{name}` is missing from the checkpoint"))?
            .as_tensor();
        let mut offset = 0;
        for (hf, rows) in names.into_iter().zip(parts) {
            out.push((hf, tensor.narrow(0, offset, rows)?.contiguous()?));
            offset += rows;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_parameter_has_a_name_and_unknown_ones_are_refused() {
        for sub_norm in [false, true] {
            let cfg = crate::model::tests::tiny(sub_norm);
            let mut all = Vec::new();
            for (name, _) in parameter_shapes(&cfg) {
                all.extend(hf_names(&name).unwrap());
            }
            let unique: std::collections::BTreeSet<_> = all.iter().collect();
            assert_eq!(unique.len(), all.len(), "duplicate names: {all:?}");
            assert!(all.contains(&"model.layers.1.self_attn.v_proj.weight".to_string()));
            assert_eq!(
                all.contains(&"model.layers.0.mlp.ffn_sub_norm.weight".to_string()),
                sub_norm
            );
        }
        let err = hf_names("blocks.0.attention.rotary.weight")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`blocks.0.attention.rotary.weight`"), "{err}");
        assert!(hf_names("blocks.x.pre_attn_norm.weight").is_err());
    }
}
