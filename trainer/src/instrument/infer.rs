//! An inference view of the model for the probes: weights quantized once (not at every call, as
//! the training forward must), an incremental forward with a key/value cache for generation,
//! and a forward that hands back each block's attention and feed-forward outputs for anomaly
//! histograms. Same math as `model::BitNet::forward` (tests compare the logits); training never
//! runs through here.
//!
//! Shapes: `tokens: [batch, t]` -> hidden `[batch, t, hidden]` -> logits `[batch, t, vocab]`.
//! With a cache holding `p` positions the new tokens sit at positions `p .. p + t`.

use candle_core::{D, DType, Device, Result, Tensor};

use crate::config::ModelConfig;
use crate::model::bitlinear::{quantize_activations, quantize_weight};
use crate::model::{Params, matmul, matmul_dtype_for};

use super::sample::LogitsSource;

#[derive(Debug, Clone)]
struct Layer {
    attn_norm: Tensor,
    /// Quantized weights W_q = gamma * {-1, 0, 1}, transposed to [in, out] for `x @ W`.
    qkv_t: Tensor,
    attn_sub_norm: Option<Tensor>,
    out_t: Tensor,
    ffn_norm: Tensor,
    gate_up_t: Tensor,
    ffn_sub_norm: Option<Tensor>,
    down_t: Tensor,
}

/// The model with quantized, detached weights.
#[derive(Debug, Clone)]
pub struct InferenceModel {
    embed: Tensor,
    embed_t: Tensor,
    layers: Vec<Layer>,
    final_norm: Tensor,
    cos: Tensor,
    sin: Tensor,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    eps: f64,
    max_seq: usize,
    dtype: DType,
    device: Device,
}

/// Per-layer keys and values of the positions seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.kv.clear();
        self.len = 0;
    }
}

/// Each block's attention output and feed-forward output (before the residual adds).
pub type Activations = Vec<(Tensor, Tensor)>;

impl InferenceModel {
    pub fn new(params: &Params, m: &ModelConfig) -> Result<Self> {
        let get = |name: &str| -> Result<Tensor> {
            params
                .get(name)
                .map(|v| v.as_tensor().detach())
                .ok_or_else(|| candle_core::Error::Msg(format!("parameter `{name}` missing")))
        };
        let (h, f) = (m.hidden_size, m.ffn_hidden_size);
        let hd = h / m.num_heads;
        let q = |name: &str, parts: &[usize]| -> Result<Tensor> {
            quantize_weight(&get(name)?, parts)?.t()?.contiguous()
        };
        let mut layers = Vec::with_capacity(m.num_layers);
        for i in 0..m.num_layers {
            let p = |s: &str| format!("blocks.{i}.{s}");
            layers.push(Layer {
                attn_norm: get(&p("pre_attn_norm.weight"))?,
                qkv_t: q(
                    &p("attention.qkv_proj.weight"),
                    &[m.num_heads * hd, m.num_kv_heads * hd, m.num_kv_heads * hd],
                )?,
                attn_sub_norm: m
                    .sub_norm
                    .then(|| get(&p("attention.sub_norm.weight")))
                    .transpose()?,
                out_t: q(&p("attention.out_proj.weight"), &[h])?,
                ffn_norm: get(&p("pre_ffn_norm.weight"))?,
                gate_up_t: q(&p("feedforward.gate_up.weight"), &[f, f])?,
                ffn_sub_norm: m
                    .sub_norm
                    .then(|| get(&p("feedforward.sub_norm.weight")))
                    .transpose()?,
                down_t: q(&p("feedforward.down_proj.weight"), &[h])?,
            });
        }
        let device = params.device().clone();
        // RoPE tables as in `model::rope` (rotate-half; angles in f64, rounded once).
        let half = hd / 2;
        let mut cos = Vec::with_capacity(m.max_seq_length * hd);
        let mut sin = Vec::with_capacity(m.max_seq_length * hd);
        for pos in 0..m.max_seq_length {
            for j in 0..hd {
                let inv = m.rope_theta.powf(-2.0 * (j % half) as f64 / hd as f64);
                cos.push((pos as f64 * inv).cos() as f32);
                sin.push((pos as f64 * inv).sin() as f32);
            }
        }
        let embed = get("token_embeddings.weight")?;
        Ok(InferenceModel {
            embed_t: embed.t()?.contiguous()?,
            embed,
            layers,
            final_norm: get("final_norm.weight")?,
            cos: Tensor::from_vec(cos, (m.max_seq_length, hd), &device)?,
            sin: Tensor::from_vec(sin, (m.max_seq_length, hd), &device)?,
            num_heads: m.num_heads,
            num_kv_heads: m.num_kv_heads,
            head_dim: hd,
            ffn: f,
            eps: m.norm_eps,
            max_seq: m.max_seq_length,
            dtype: matmul_dtype_for(&device),
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn max_seq_length(&self) -> usize {
        self.max_seq
    }

    fn rms(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        x.broadcast_mul(&inv)?.broadcast_mul(w)
    }

    fn bitlinear(&self, x: &Tensor, w_t: &Tensor) -> Result<Tensor> {
        matmul(&quantize_activations(x)?, w_t, self.dtype)
    }

    fn rope(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, t, hd) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        let half = hd / 2;
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half)?.neg()?,
                &x.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        x.broadcast_mul(&cos)?.add(&rotated.broadcast_mul(&sin)?)
    }

    /// `tokens: [b, t]` -> final-normed hidden states `[b, t, hidden]`. With `cache`, the tokens
    /// continue the cached positions and their keys/values are appended. With `capture`, each
    /// block's attention and feed-forward outputs are pushed.
    pub fn hidden(
        &self,
        tokens: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut capture: Option<&mut Activations>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.len);
        if offset + t > self.max_seq {
            candle_core::bail!(
                "{} positions exceed max_seq_length {}",
                offset + t,
                self.max_seq
            );
        }
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let total = offset + t;
        // [t, total]: query i (position offset + i) sees keys 0 ..= offset + i.
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..total).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), &self.device)?;
        let hidden_size = self.embed.dim(1)?;
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, hidden_size))?;
        for (li, l) in self.layers.iter().enumerate() {
            let qkv = self.bitlinear(&self.rms(&x, &l.attn_norm)?, &l.qkv_t)?;
            let heads = |start: usize, n: usize| -> Result<Tensor> {
                qkv.narrow(D::Minus1, start * hd, n * hd)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = self.rope(&heads(0, nh)?, offset)?;
            let mut k = self.rope(&heads(nh, nkv)?, offset)?;
            let mut v = heads(nh + nkv, nkv)?;
            if let Some(c) = cache.as_deref_mut() {
                if c.kv.len() <= li {
                    c.kv.resize(li + 1, None);
                }
                if let Some((pk, pv)) = &c.kv[li] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                c.kv[li] = Some((k.clone(), v.clone()));
            }
            // Grouped-query attention: the r query heads of kv head j are consecutive.
            let r = nh / nkv;
            let qg = q.reshape((b, nkv, r * t, hd))?;
            let scores = (matmul(&qg, &k.t()?, self.dtype)? * (1.0 / (hd as f64).sqrt()))?;
            let scores = scores
                .reshape((b, nkv, r, t, total))?
                .broadcast_add(&mask)?;
            let max = scores.max_keepdim(D::Minus1)?;
            let e = scores.broadcast_sub(&max)?.exp()?;
            let probs =
                e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?
                    .reshape((b, nkv, r * t, total))?;
            let y = matmul(&probs, &v, self.dtype)?
                .reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))?;
            let y = match &l.attn_sub_norm {
                Some(w) => self.rms(&y, w)?,
                None => y,
            };
            let attn = self.bitlinear(&y, &l.out_t)?;
            x = (x + &attn)?;
            let gu = self.bitlinear(&self.rms(&x, &l.ffn_norm)?, &l.gate_up_t)?;
            let hmid = (gu.narrow(D::Minus1, 0, self.ffn)?.silu()?
                * gu.narrow(D::Minus1, self.ffn, self.ffn)?)?;
            let hmid = match &l.ffn_sub_norm {
                Some(w) => self.rms(&hmid, w)?,
                None => hmid,
            };
            let ffn = self.bitlinear(&hmid, &l.down_t)?;
            x = (x + &ffn)?;
            if let Some(cap) = capture.as_deref_mut() {
                cap.push((attn, ffn));
            }
        }
        if let Some(c) = cache {
            c.len = total;
        }
        self.rms(&x, &self.final_norm)
    }

    /// Logits of hidden states `[..., hidden]` -> `[..., vocab]` (the tied embedding).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        matmul(hidden, &self.embed_t, self.dtype)
    }

    /// Logits after the last token of `tokens` (one sequence), as f32 values.
    pub fn next_token_logits(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
    ) -> Result<Vec<f32>> {
        let t = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), &self.device)?;
        let h = self.hidden(&t, cache, None)?;
        let last = h.narrow(1, tokens.len() - 1, 1)?;
        self.logits(&last)?
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1()
    }
}

/// The model as a [`LogitsSource`]: the prompt once, then one token per step through the cache.
#[derive(Debug)]
pub struct CachedGenerator<'a> {
    model: &'a InferenceModel,
    cache: KvCache,
}

impl<'a> CachedGenerator<'a> {
    pub fn new(model: &'a InferenceModel) -> Self {
        CachedGenerator {
            model,
            cache: KvCache::default(),
        }
    }
}

impl LogitsSource for CachedGenerator<'_> {
    fn reset(&mut self) {
        self.cache.clear();
    }

    fn feed(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
        Ok(self
            .model
            .next_token_logits(tokens, Some(&mut self.cache))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instrument::sample::{Mode, generate};

    fn tiny(sub_norm: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 97,
            hidden_size: 32,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            ffn_hidden_size: 48,
            max_seq_length: 40,
            norm_eps: 1e-5,
            rope_theta: 10000.0,
            sub_norm,
            init_std: 0.2,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn full_forward_matches_the_training_model() {
        for sub_norm in [false, true] {
            let m = tiny(sub_norm);
            let params = Params::init(&m, 7, &Device::Cpu).unwrap();
            let model = params.model(&m).unwrap();
            let inf = InferenceModel::new(&params, &m).unwrap();
            let ids: Vec<u32> = (0..2 * 12).map(|i| (i * 31 + 5) % 97).collect();
            let tokens = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
            let want = model.forward(&tokens).unwrap();
            let mut acts = Vec::new();
            let got = inf
                .logits(&inf.hidden(&tokens, None, Some(&mut acts)).unwrap())
                .unwrap();
            assert!(
                max_diff(&want, &got) < 1e-4,
                "sub_norm {sub_norm}: {}",
                max_diff(&want, &got)
            );
            assert_eq!(acts.len(), 2);
            assert_eq!(acts[1].1.dims(), &[2, 12, 32]);
        }
    }

    #[test]
    fn cached_steps_match_the_full_forward() {
        let m = tiny(false);
        let params = Params::init(&m, 3, &Device::Cpu).unwrap();
        let inf = InferenceModel::new(&params, &m).unwrap();
        let ids: Vec<u32> = vec![1, 17, 42, 5, 88, 23, 61, 9];
        let full = inf
            .logits(
                &inf.hidden(
                    &Tensor::new(ids.as_slice(), &Device::Cpu)
                        .unwrap()
                        .unsqueeze(0)
                        .unwrap(),
                    None,
                    None,
                )
                .unwrap(),
            )
            .unwrap();
        let mut cache = KvCache::default();
        // Prompt of 3, then one at a time.
        let first = inf.next_token_logits(&ids[..3], Some(&mut cache)).unwrap();
        let row = |i: usize| {
            full.get(0)
                .unwrap()
                .get(i)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
        assert!(close(&first, &row(2)));
        for i in 3..ids.len() {
            let l = inf
                .next_token_logits(&ids[i..i + 1], Some(&mut cache))
                .unwrap();
            assert!(close(&l, &row(i)), "position {i}");
        }
        assert_eq!(cache.len(), ids.len());
        // Too long for the RoPE table: a clear error, not a panic.
        assert!(inf.next_token_logits(&[1; 40], Some(&mut cache)).is_err());
    }

    #[test]
    fn cached_generation_equals_uncached_generation() {
        struct Uncached<'a>(&'a InferenceModel, Vec<u32>);
        impl LogitsSource for Uncached<'_> {
            fn reset(&mut self) {
                self.1.clear();
            }
            fn feed(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
                self.1.extend_from_slice(tokens);
                Ok(self.0.next_token_logits(&self.1, None)?)
            }
        }
        let m = tiny(false);
        let params = Params::init(&m, 11, &Device::Cpu).unwrap();
        let inf = InferenceModel::new(&params, &m).unwrap();
        for mode in Mode::ALL {
            let a = generate(
                &mut CachedGenerator::new(&inf),
                &[1, 7, 9],
                mode,
                5,
                20,
                None,
            )
            .unwrap();
            let b = generate(&mut Uncached(&inf, vec![]), &[1, 7, 9], mode, 5, 20, None).unwrap();
            assert_eq!(a.ids, b.ids, "{mode:?}");
        }
    }
}
