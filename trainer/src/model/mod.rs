//! The BitNet b1.58 decoder: tied token embedding, pre-norm blocks of GQA attention and SwiGLU
//! whose projections are all BitLinear, a final RMSNorm and the tied LM head.
//! No biases anywhere. Also owns the parameter set ([`Params`]: canonical names, deterministic
//! initialisation, safetensors I/O) and the parameter count, with its per-layer breakdown.
//!
//! One model serves training, evaluation and generation (the shape of candle-transformers
//! `models/llama.rs`): [`BitNet::forward`] takes the position of the first token and an optional
//! [`KvCache`]; [`BitNet::freeze`] gives the inference form, whose BitLinear weights are
//! quantized once instead of at every call. The loaders (`load(vb, cfg)` of each layer) are the
//! only place the parameter names are spelled; [`parameter_shapes`] records what they request.
//!
//! Initialisation: every matrix (the embedding and every BitLinear weight) ~ normal(0, init_std =
//! 0.02), every norm weight = 1. The random numbers come from our own seeded generator
//! (SplitMix64 + Box-Muller, one stream per tensor name), so the initial weights are a pure
//! function of (seed, config), identical on every device and independent of candle's RNG.
//!
//! Precision: master weights, norms, softmax, quantization and the loss are f32; on CUDA the
//! matmuls run in bf16 ([`matmul`]). On CPU everything is f32.

pub mod attention;
mod backward;
pub mod bitlinear;
mod flash;
pub mod loss;
pub mod mlp;
pub mod norm;
pub mod rope;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, TensorId, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use pipeline::rng::{SplitMix64, mix64};

use crate::config::ModelConfig;
use attention::{Attention, LayerKvCache, causal_mask};
pub use backward::TrainingPass;
use bitlinear::BitLinear;
use mlp::Mlp;
use norm::RmsNorm;
use rope::Rope;

pub use loss::{cross_entropy, next_token_loss};

/// The shapes the model derives from its config.
/// bf16 tensor-core matmuls on CUDA; f32 on CPU (candle's CPU bf16 matmul is slow and the tests
/// compare against f64 references).
pub fn matmul_dtype_for(device: &Device) -> DType {
    if device.is_cuda() {
        DType::BF16
    } else {
        DType::F32
    }
}

/// `a @ b` (batched, broadcasting) computed in `dtype`, returned as f32.
pub fn matmul(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        return a.broadcast_matmul(b);
    }
    a.to_dtype(dtype)?
        .broadcast_matmul(&b.to_dtype(dtype)?)?
        .to_dtype(DType::F32)
}

/// Parameter gradients of the hand-written pass ([`BitNet::forward_taped`]), keyed by the
/// parameter tensor (the `Var`s of [`Params`]).
#[derive(Debug, Default)]
pub struct Gradients(HashMap<TensorId, Tensor>);

impl Gradients {
    /// Adds `grad` to the gradient of `param`.
    pub fn add(&mut self, param: &Tensor, grad: Tensor) -> Result<()> {
        match self.0.entry(param.id()) {
            Entry::Occupied(mut e) => {
                let sum = (e.get() + grad)?;
                e.insert(sum);
            }
            Entry::Vacant(e) => {
                e.insert(grad);
            }
        }
        Ok(())
    }

    pub fn get(&self, param: &Tensor) -> Option<&Tensor> {
        self.0.get(&param.id())
    }
}

/// Keys and values of every block for the positions seen so far (candle `llama.rs` `Cache`).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerKvCache>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.clear();
        self.len = 0;
    }
}

/// A block's two residual branches before they are added to the stream, `[batch, seq, hidden]`
/// each.
#[derive(Debug, Clone)]
pub struct BranchOutputs {
    pub attention: Tensor,
    pub feedforward: Tensor,
}

/// One pre-norm transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    pre_attn_norm: RmsNorm,
    attention: Attention,
    pre_ffn_norm: RmsNorm,
    feedforward: Mlp,
}

impl Block {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        Ok(Block {
            pre_attn_norm: RmsNorm::load(vb.pp("pre_attn_norm"), cfg.hidden_size, cfg.norm_eps)?,
            attention: Attention::load(vb.pp("attention"), cfg)?,
            pre_ffn_norm: RmsNorm::load(vb.pp("pre_ffn_norm"), cfg.hidden_size, cfg.norm_eps)?,
            feedforward: Mlp::load(vb.pp("feedforward"), cfg)?,
        })
    }

    /// The inference form (see [`BitLinear::freeze`]).
    pub fn freeze(&self) -> Result<Self> {
        Ok(Block {
            pre_attn_norm: self.pre_attn_norm.freeze(),
            attention: self.attention.freeze()?,
            pre_ffn_norm: self.pre_ffn_norm.freeze(),
            feedforward: self.feedforward.freeze()?,
        })
    }

    /// `x: [batch, seq, hidden] -> [batch, seq, hidden]`; `index_pos`, `mask` and `cache` as in
    /// [`Attention::forward`].
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        index_pos: usize,
        mask: &Tensor,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<Tensor> {
        Ok(self
            .forward_with_branches(x, rope, index_pos, mask, cache)?
            .0)
    }

    /// [`Block::forward`] that also returns the attention and feed-forward outputs.
    pub fn forward_with_branches(
        &self,
        x: &Tensor,
        rope: &Rope,
        index_pos: usize,
        mask: &Tensor,
        cache: Option<&mut LayerKvCache>,
    ) -> Result<(Tensor, BranchOutputs)> {
        let attention = self.attention.forward(
            &self.pre_attn_norm.forward(x)?,
            rope,
            index_pos,
            mask,
            cache,
        )?;
        let x = (x + &attention)?;
        let feedforward = self.feedforward.forward(&self.pre_ffn_norm.forward(&x)?)?;
        let y = (&x + &feedforward)?;
        Ok((
            y,
            BranchOutputs {
                attention,
                feedforward,
            },
        ))
    }

    pub fn attention(&self) -> &Attention {
        &self.attention
    }

    pub fn feedforward(&self) -> &Mlp {
        &self.feedforward
    }

    /// The block's BitLinear layers: qkv_proj, out_proj, gate_up, down_proj.
    pub fn bit_linears(&self) -> [&BitLinear; 4] {
        [
            self.attention.qkv_proj(),
            self.attention.out_proj(),
            self.feedforward.gate_up(),
            self.feedforward.down_proj(),
        ]
    }
}

/// The whole decoder.
#[derive(Debug, Clone)]
pub struct BitNet {
    /// [vocab, hidden]; also the LM head (`logits = h @ W^T`).
    token_embeddings: Tensor,
    /// `token_embeddings^T` [hidden, vocab], contiguous; only in the inference form.
    lm_head_t: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    rope: Rope,
    /// [max_seq_length, max_seq_length] additive causal mask, built once on the device.
    mask: Tensor,
    cfg: ModelConfig,
    /// bf16 on CUDA, f32 on CPU.
    matmul_dtype: DType,
}

impl BitNet {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let token_embeddings = vb
            .pp("token_embeddings")
            .get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::load(vb.pp(format!("blocks.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = RmsNorm::load(vb.pp("final_norm"), cfg.hidden_size, cfg.norm_eps)?;
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.max_seq_length,
            cfg.rope_theta,
            vb.device(),
        )?;
        let mask = causal_mask(cfg.max_seq_length, vb.device())?;
        Ok(BitNet {
            token_embeddings,
            lm_head_t: None,
            blocks,
            final_norm,
            rope,
            mask,
            cfg: cfg.clone(),
            matmul_dtype: matmul_dtype_for(vb.device()),
        })
    }

    /// The inference form (generation, the probes, anomaly dumps): every tensor detached from the
    /// parameters, every BitLinear weight quantized once. Same values as the training forward; it
    /// cannot be differentiated.
    pub fn freeze(&self) -> Result<Self> {
        let token_embeddings = self.token_embeddings.detach();
        Ok(BitNet {
            lm_head_t: Some(token_embeddings.t()?.contiguous()?),
            token_embeddings,
            blocks: self
                .blocks
                .iter()
                .map(Block::freeze)
                .collect::<Result<_>>()?,
            final_norm: self.final_norm.freeze(),
            rope: self.rope.clone(),
            mask: self.mask.clone(),
            cfg: self.cfg.clone(),
            matmul_dtype: self.matmul_dtype,
        })
    }

    /// `tokens: [batch, seq] (u32) -> final-normed hidden states [batch, seq, hidden] (f32)` at
    /// positions `index_pos .. index_pos + seq`. With `cache`, the tokens attend to the cached
    /// positions too and their keys and values are appended (generation passes
    /// `index_pos = cache.len()`).
    pub fn hidden(
        &self,
        tokens: &Tensor,
        index_pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.run(tokens, index_pos, cache, None)
    }

    /// `tokens: [batch, seq] (u32) -> logits [batch, seq, vocab] (f32)`; `index_pos` and `cache`
    /// as in [`BitNet::hidden`].
    pub fn forward(
        &self,
        tokens: &Tensor,
        index_pos: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        self.lm_head(&self.hidden(tokens, index_pos, cache)?)
    }

    /// `tokens: [batch, seq] (u32)` from position 0 -> each block's attention and feed-forward
    /// outputs, `[batch, seq, hidden]` each, in block order.
    pub fn branch_outputs(&self, tokens: &Tensor) -> Result<Vec<BranchOutputs>> {
        let mut out = Vec::with_capacity(self.blocks.len());
        self.run(tokens, 0, None, Some(&mut out))?;
        Ok(out)
    }

    /// The tied LM head: `h: [batch, seq, hidden] -> logits [batch, seq, vocab]`.
    pub fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        match &self.lm_head_t {
            Some(w_t) => matmul(h, w_t, self.matmul_dtype),
            None => matmul(h, &self.token_embeddings.t()?, self.matmul_dtype),
        }
    }

    /// Mean next-token cross-entropy of `logits[:, :-1]` against `tokens[:, 1:]` (0-dim, f32).
    /// The LM head only runs on the positions that have a target (the largest tensor of a step).
    /// On the training form this is the composed loss the autograd path differentiates; on the
    /// inference form ([`BitNet::freeze`]: the eval) there is no graph, and the head runs in row
    /// chunks so the full logits never exist.
    pub fn loss(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let h = self
            .hidden(tokens, 0, None)?
            .narrow(1, 0, t - 1)?
            .reshape((b * (t - 1), self.cfg.hidden_size))?;
        let targets = tokens.narrow(1, 1, t - 1)?.flatten_all()?;
        match self.lm_head_t {
            Some(_) => loss::head_loss(&h, &self.token_embeddings, &targets, self.matmul_dtype),
            None => cross_entropy(&self.lm_head(&h)?, &targets),
        }
    }

    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Longest context the RoPE tables and the mask cover.
    pub fn max_seq_length(&self) -> usize {
        self.cfg.max_seq_length
    }

    pub fn device(&self) -> &Device {
        self.token_embeddings.device()
    }

    /// The forward of [`BitNet::hidden`]; pushes each block's branch outputs into `branches`.
    fn run(
        &self,
        tokens: &Tensor,
        index_pos: usize,
        mut cache: Option<&mut KvCache>,
        mut branches: Option<&mut Vec<BranchOutputs>>,
    ) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let cached = cache.as_ref().map_or(0, |c| c.len);
        let end = index_pos.max(cached) + t;
        if end > self.cfg.max_seq_length {
            candle_core::bail!(
                "{end} positions exceed max_seq_length {}",
                self.cfg.max_seq_length
            );
        }
        let mut h = self
            .token_embeddings
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?;
        // Query i sees the cached keys and the new keys 0..=i.
        let mask = self.mask.narrow(0, cached, t)?.narrow(1, 0, cached + t)?;
        if let Some(c) = cache.as_deref_mut() {
            c.layers
                .resize_with(self.blocks.len(), LayerKvCache::default);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().and_then(|c| c.layers.get_mut(i));
            let (out, outputs) =
                block.forward_with_branches(&h, &self.rope, index_pos, &mask, layer_cache)?;
            h = out;
            if let Some(branches) = branches.as_deref_mut() {
                branches.push(outputs);
            }
        }
        if let Some(c) = cache {
            c.len += t;
        }
        self.final_norm.forward(&h)
    }
}

/// A parameter's checkpoint name and shape.
pub type NamedShape = (String, Vec<usize>);

/// Name and shape of every parameter, in the order the loaders request them (the checkpoint
/// tensor names). Runs [`BitNet::load`] over a [`VarBuilder`] that records each request and
/// answers with a zero-stride tensor, so the names stay spelled once, in the loaders.
pub fn parameter_shapes(m: &ModelConfig) -> Vec<NamedShape> {
    let recorder = ShapeRecorder::default();
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    BitNet::load(vb, m).expect("the shape recorder answers every request of the loaders");
    let requests = recorder
        .requests
        .lock()
        .expect("the recorder lock is only taken by the loaders, which did not panic");
    requests.clone()
}

/// A [`VarBuilder`] backend that writes down the (name, shape) of each tensor requested and hands
/// back zeros broadcast to that shape (one scalar of memory).
#[derive(Debug, Clone, Default)]
struct ShapeRecorder {
    requests: Arc<Mutex<Vec<NamedShape>>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        self.requests
            .lock()
            .map_err(|_| candle_core::Error::Msg("shape recorder lock poisoned".into()))?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("shape recorder: `{name}` requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Total parameter count (tied embedding counted once).
pub fn parameter_count(m: &ModelConfig) -> usize {
    parameter_shapes(m)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// The parameter count by part (embedding, attention, FFN, per block, layers, final norm, total)
/// as printable lines.
pub fn parameter_breakdown(m: &ModelConfig) -> String {
    let (h, f, v) = (m.hidden_size, m.ffn_hidden_size, m.vocab_size);
    let hd = m.head_dim();
    let qkv_out = (m.num_heads + 2 * m.num_kv_heads) * hd;
    let qkv = h * qkv_out;
    let out = h * m.num_heads * hd;
    let sub_attn = if m.sub_norm { m.num_heads * hd } else { 0 };
    let attn = qkv + out + h + sub_attn;
    let gate_up = h * 2 * f;
    let down = f * h;
    let sub_ffn = if m.sub_norm { f } else { 0 };
    let ffn = gate_up + down + h + sub_ffn;
    let block = attn + ffn;
    let embed = v * h;
    let total = embed + m.num_layers * block + h;
    let n = |x: usize| group_thousands(x as u64);
    let mut s = String::new();
    s += &format!(
        "1. Tied embeddings (counted once): {v} x {h} = {}\n",
        n(embed)
    );
    s += &format!(
        "2. Transformer blocks ({} layers), per block:\n",
        m.num_layers
    );
    s += &format!("   qkv_proj: {h} x {qkv_out} = {}\n", n(qkv));
    s += &format!("   out_proj: {h} x {} = {}\n", m.num_heads * hd, n(out));
    s += &format!("   pre_attn_norm (RMSNorm): {}\n", n(h));
    if m.sub_norm {
        s += &format!("   attention sub_norm (RMSNorm): {}\n", n(sub_attn));
    }
    s += &format!("   attention subtotal: {}\n", n(attn));
    s += &format!("   gate_up_proj: {h} x {} = {}\n", 2 * f, n(gate_up));
    s += &format!("   down_proj: {f} x {h} = {}\n", n(down));
    s += &format!("   pre_ffn_norm (RMSNorm): {}\n", n(h));
    if m.sub_norm {
        s += &format!("   feedforward sub_norm (RMSNorm): {}\n", n(sub_ffn));
    }
    s += &format!("   FFN subtotal: {}\n", n(ffn));
    s += &format!("   per-block total: {}\n", n(block));
    s += &format!("   {} layers: {}\n", m.num_layers, n(m.num_layers * block));
    s += &format!("3. Final RMSNorm: {}\n", n(h));
    s += &format!("Total: {}\n", n(total));
    s
}

/// `95367936` -> `95,367,936`.
pub fn group_thousands(x: u64) -> String {
    let digits = x.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The trainable parameters: one f32 [`Var`] per canonical name.
#[derive(Debug, Clone)]
pub struct Params {
    vars: BTreeMap<String, Var>,
    device: Device,
}

impl Params {
    /// Fresh weights, a pure function of (config, seed): matrices ~ N(0, init_std), norms = 1.
    pub fn init(m: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, shape) in parameter_shapes(m) {
            let n: usize = shape.iter().product();
            let data = if shape.len() >= 2 {
                normal_f32(seed, &name, n, m.init_std)
            } else {
                vec![1f32; n]
            };
            let t = Tensor::from_vec(data, shape, device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(Params {
            vars,
            device: device.clone(),
        })
    }

    /// Loads `model.safetensors`, requiring exactly the names and shapes of `m`.
    pub fn load(path: &Path, m: &ModelConfig, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(path, device)?;
        Self::from_tensors(tensors, m, &path.display().to_string())
    }

    /// Takes exactly the tensors `m` needs (names and shapes) from `tensors`, as f32 variables;
    /// `origin` names their source in errors.
    pub fn from_tensors(
        mut tensors: std::collections::HashMap<String, Tensor>,
        m: &ModelConfig,
        origin: &str,
    ) -> Result<Self> {
        let mut vars = BTreeMap::new();
        let mut device = Device::Cpu;
        for (name, shape) in parameter_shapes(m) {
            let t = tensors.remove(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "{origin}: tensor `{name}` is missing; hint: it was written for another model config"
                ))
            })?;
            if t.dims() != shape.as_slice() {
                candle_core::bail!(
                    "{origin}: tensor `{name}` has shape {:?}, the config needs {shape:?}",
                    t.dims()
                );
            }
            device = t.device().clone();
            vars.insert(name, Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        if let Some(extra) = tensors.keys().next() {
            candle_core::bail!("{origin}: unexpected tensor `{extra}` for this model config");
        }
        Ok(Params { vars, device })
    }

    /// Writes every parameter (f32) to `path` under its canonical name.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: BTreeMap<&str, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors.into_iter().collect(), path)
    }

    /// A VarBuilder whose tensors are these variables (gradients flow into them).
    pub fn var_builder(&self) -> VarBuilder<'static> {
        let map = VarMap::new();
        {
            let mut data = map
                .data()
                .lock()
                .expect("fresh VarMap lock is not poisoned");
            for (k, v) in &self.vars {
                data.insert(k.clone(), v.clone());
            }
        }
        VarBuilder::from_varmap(&map, DType::F32, &self.device)
    }

    /// Builds the model over these variables.
    pub fn model(&self, m: &ModelConfig) -> Result<BitNet> {
        BitNet::load(self.var_builder(), m)
    }

    /// (name, variable) in canonical (sorted) order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Var)> {
        self.vars.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.vars.get(name)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}

/// `n` samples of N(0, std) from the stream of (`seed`, `name`) (Box-Muller).
fn normal_f32(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let stream = name.bytes().fold(mix64(seed), |h, b| mix64(h ^ b as u64));
    let mut rng = SplitMix64::new(stream);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let r = (-2.0 * rng.next_unit().ln()).sqrt();
        let theta = std::f64::consts::TAU * rng.next_unit();
        out.push((std * r * theta.cos()) as f32);
        out.push((std * r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use crate::config::Config;

    fn config_95m() -> Config {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        Config::load(&path).unwrap()
    }

    #[test]
    fn plan_model_has_95_367_936_parameters_with_the_plan_breakdown() {
        let c = config_95m();
        assert_eq!(parameter_count(&c.model), 95_367_936);
        let b = parameter_breakdown(&c.model);
        for line in [
            "32000 x 768 = 24,576,000",
            "qkv_proj: 768 x 1536 = 1,179,648",
            "out_proj: 768 x 768 = 589,824",
            "attention subtotal: 1,770,240",
            "gate_up_proj: 768 x 6144 = 4,718,592",
            "down_proj: 3072 x 768 = 2,359,296",
            "FFN subtotal: 7,078,656",
            "per-block total: 8,848,896",
            "8 layers: 70,791,168",
            "Final RMSNorm: 768",
            "Total: 95,367,936",
        ] {
            assert!(b.contains(line), "missing `{line}` in\n{b}");
        }
        let mut s = c.model.clone();
        s.sub_norm = true;
        assert_eq!(parameter_count(&s), 95_367_936 + 30_720);
        assert!(parameter_breakdown(&s).contains("Total: 95,398,656"));
    }

    #[test]
    fn instantiated_tiny_model_matches_the_count_and_init_is_deterministic() -> Result<()> {
        let mut c = config_95m();
        c.model.vocab_size = 100;
        c.model.hidden_size = 32;
        c.model.num_heads = 4;
        c.model.num_kv_heads = 2;
        c.model.ffn_hidden_size = 48;
        c.model.num_layers = 2;
        c.model.sub_norm = true;
        let dev = Device::Cpu;
        let a = Params::init(&c.model, 7, &dev)?;
        assert_eq!(a.count(), parameter_count(&c.model));
        let b = Params::init(&c.model, 7, &dev)?;
        for ((n, x), (_, y)) in a.iter().zip(b.iter()) {
            assert_eq!(
                x.flatten_all()?.to_vec1::<f32>()?,
                y.flatten_all()?.to_vec1::<f32>()?,
                "{n}"
            );
        }
        let emb: Vec<f32> = a
            .get("token_embeddings.weight")
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        let mean = emb.iter().sum::<f32>() / emb.len() as f32;
        let std = (emb.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / emb.len() as f32).sqrt();
        assert!(
            mean.abs() < 2e-3 && (std - 0.02).abs() < 1e-3,
            "mean {mean} std {std}"
        );
        let norm: Vec<f32> = a.get("final_norm.weight").unwrap().to_vec1()?;
        assert!(norm.iter().all(|&x| x == 1.0));
        Ok(())
    }

    #[test]
    fn parameter_names_are_the_checkpoint_names() {
        let mut m = config_95m().model;
        m.num_layers = 1;
        m.sub_norm = true;
        let names: Vec<String> = parameter_shapes(&m).into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "token_embeddings.weight",
                "blocks.0.pre_attn_norm.weight",
                "blocks.0.attention.qkv_proj.weight",
                "blocks.0.attention.sub_norm.weight",
                "blocks.0.attention.out_proj.weight",
                "blocks.0.pre_ffn_norm.weight",
                "blocks.0.feedforward.gate_up.weight",
                "blocks.0.feedforward.sub_norm.weight",
                "blocks.0.feedforward.down_proj.weight",
                "final_norm.weight",
            ]
        );
    }

    /// A model small enough for exact checks in milliseconds (also used by other modules' tests).
    pub(crate) fn tiny(sub_norm: bool) -> ModelConfig {
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

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
    }

    #[test]
    fn frozen_forward_matches_the_training_forward() -> Result<()> {
        for sub_norm in [false, true] {
            let m = tiny(sub_norm);
            let params = Params::init(&m, 7, &Device::Cpu)?;
            let model = params.model(&m)?;
            let frozen = model.freeze()?;
            let ids: Vec<u32> = (0..2 * 12).map(|i| (i * 31 + 5) % 97).collect();
            let tokens = Tensor::from_vec(ids, (2, 12), &Device::Cpu)?;
            let want = model.forward(&tokens, 0, None)?;
            let got = frozen.forward(&tokens, 0, None)?;
            let d = max_diff(&want, &got)?;
            assert!(d < 1e-4, "sub_norm {sub_norm}: {d}");
            // The branch outputs of the last block rebuild its output from its input.
            let branches = frozen.branch_outputs(&tokens)?;
            assert_eq!(branches.len(), 2);
            assert_eq!(branches[1].feedforward.dims(), &[2, 12, 32]);
            let h = frozen
                .token_embeddings
                .index_select(&tokens.flatten_all()?, 0)?
                .reshape((2, 12, 32))?;
            let rebuilt = branches
                .iter()
                .try_fold(h, |h, b| (h + &b.attention)? + &b.feedforward)?;
            let d = max_diff(
                &frozen.final_norm.forward(&rebuilt)?,
                &frozen.hidden(&tokens, 0, None)?,
            )?;
            assert_eq!(d, 0.0, "sub_norm {sub_norm}");
        }
        Ok(())
    }

    #[test]
    fn cached_steps_match_the_full_forward() -> Result<()> {
        let m = tiny(false);
        let params = Params::init(&m, 3, &Device::Cpu)?;
        let training = params.model(&m)?;
        for model in [training.clone(), training.freeze()?] {
            let ids: Vec<u32> = vec![1, 17, 42, 5, 88, 23, 61, 9];
            let all = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let full = model.forward(&all, 0, None)?;
            let mut cache = KvCache::default();
            // A prompt of 3, then one token at a time.
            let first = model.forward(&all.narrow(1, 0, 3)?, 0, Some(&mut cache))?;
            let d = max_diff(&first, &full.narrow(1, 0, 3)?)?;
            assert!(d < 1e-4, "prompt: {d}");
            for i in 3..ids.len() {
                let step = model.forward(&all.narrow(1, i, 1)?, i, Some(&mut cache))?;
                let d = max_diff(&step, &full.narrow(1, i, 1)?)?;
                assert!(d < 1e-4, "position {i}: {d}");
            }
            assert_eq!(cache.len(), ids.len());
            // Past the RoPE table: a clear error, not a panic.
            let long = Tensor::new(&[1u32; 40], &Device::Cpu)?.unsqueeze(0)?;
            assert!(model.forward(&long, 8, Some(&mut cache)).is_err());
        }
        Ok(())
    }

    /// Relative L2 error |a - b| / |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
        let a = a.to_dtype(DType::F64)?.flatten_all()?;
        let b = b.to_dtype(DType::F64)?.flatten_all()?;
        let diff = (a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        let norm = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        Ok(diff / norm.max(1e-30))
    }

    /// Logits, loss and every parameter gradient against the float64 JAX implementation in
    /// `trainer/tests/reference/bitnet_jax.py` (fixture and provenance next to it).
    fn check_against_reference(case: &str) -> Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference");
        let json = std::fs::read_to_string(dir.join(format!("{case}.json")))?;
        let m: ModelConfig = serde_json::from_str(&json).map_err(candle_core::Error::wrap)?;
        let dev = Device::Cpu;
        let mut fixture =
            candle_core::safetensors::load(dir.join(format!("{case}.safetensors")), &dev)?;
        let mut weights = std::collections::HashMap::new();
        for name in fixture
            .keys()
            .filter(|k| k.starts_with("param."))
            .cloned()
            .collect::<Vec<_>>()
        {
            let t = fixture.remove(&name).expect("key listed above");
            weights.insert(name["param.".len()..].to_string(), t);
        }
        let params = Params::from_tensors(weights, &m, case)?;
        let model = params.model(&m)?;
        let tokens = fixture.remove("tokens").expect("fixture has tokens");
        let logits = model.forward(&tokens, 0, None)?;
        let e = rel_err(&logits, &fixture["logits"])?;
        assert!(e < 1e-4, "{case}: logits relative error {e}");
        let loss = next_token_loss(&logits, &tokens)?;
        let e = rel_err(&loss, &fixture["loss"].squeeze(0)?)?;
        assert!(e < 1e-4, "{case}: loss relative error {e}");
        // The training path (LM head only on positions with a target) gives the same loss and
        // gradients.
        let loss = model.loss(&tokens)?;
        let e = rel_err(&loss, &fixture["loss"].squeeze(0)?)?;
        assert!(e < 1e-4, "{case}: training loss relative error {e}");
        let grads = loss.backward()?;
        let mut checked = 0;
        for (name, var) in params.iter() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{case}: no gradient for {name}"));
            let expected = &fixture[&format!("grad.{name}")];
            let e = rel_err(g, expected)?;
            assert!(e < 1e-4, "{case}: gradient of {name}: relative error {e}");
            let nonzero = g.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(nonzero > 0.0, "{case}: zero gradient for {name}");
            checked += 1;
        }
        assert_eq!(checked, parameter_shapes(&m).len());
        // The hand-written pass against the same reference.
        let pass = model.forward_taped(&tokens, 1.0)?;
        let e = rel_err(pass.loss(), &fixture["loss"].squeeze(0)?)?;
        assert!(
            e < 1e-4,
            "{case}: hand-written pass loss relative error {e}"
        );
        let grads = pass.backward()?;
        for (name, var) in params.iter() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("{case}: hand-written pass: no gradient for {name}"));
            let e = rel_err(g, &fixture[&format!("grad.{name}")])?;
            assert!(
                e < 1e-4,
                "{case}: hand-written gradient of {name}: relative error {e}"
            );
        }
        Ok(())
    }

    /// The hand-written pass (`forward_taped` + `backward`, gradients of `grad_scale * loss`)
    /// against candle's autograd over the composed forward, for the loss and every parameter
    /// gradient, printed per tensor and bounded by 3x a yardstick (1e-6 at the least).
    ///
    /// The two compute the same function but do not round alike: the blocked softmax, the
    /// chunked loss and the fused CPU passes sum in other orders, and an activation that sits
    /// within that rounding of a half-level lands on the other int8 level, which moves the loss
    /// and gradients by more than round-off. The yardstick is the same autograd path on weights
    /// moved by about one ulp each (each multiplied by 1 + u * 2^-23, u uniform in [-1, 1]; this
    /// also moves the weights that sit at a ternary threshold), the largest difference over
    /// `nudges` such draws: the function's own sensitivity to f32 rounding. A wrong backward formula is off by order 1 (a sign flipped in the RoPE
    /// backward: 0.3 and more).
    fn hand_written_against_autograd(
        m: &ModelConfig,
        tokens: &Tensor,
        seed: u64,
        grad_scale: f64,
        nudges: usize,
    ) -> Result<()> {
        let dev = tokens.device();
        let autograd = |params: &Params| -> Result<(Tensor, BTreeMap<String, Tensor>)> {
            let loss = params.model(m)?.loss(tokens)?;
            let store = loss.affine(grad_scale, 0.0)?.backward()?;
            let grads = params
                .iter()
                .map(|(name, var)| {
                    let g = store.get(var).expect("autograd reaches every parameter");
                    (name.clone(), g.clone())
                })
                .collect();
            Ok((loss, grads))
        };
        let params = Params::init(m, seed, dev)?;
        let (loss, reference) = autograd(&params)?;
        // The yardstick: per gradient tensor (and "loss"), the largest difference over the nudges.
        let mut yardsticks: BTreeMap<String, f64> = BTreeMap::new();
        let mut rng = SplitMix64::new(seed ^ 0x5eed);
        for _ in 0..nudges {
            let nudged = Params::init(m, seed, dev)?;
            for (_, var) in nudged.iter() {
                let factors: Vec<f32> = (0..var.elem_count())
                    .map(|_| {
                        1.0 + (rng.next_u64() as f64 / u64::MAX as f64 * 2.0 - 1.0) as f32
                            * f32::EPSILON
                    })
                    .collect();
                let factors = Tensor::from_vec(factors, var.shape(), dev)?;
                var.set(&(var.as_tensor() * factors)?)?;
            }
            let (nudged_loss, noise) = autograd(&nudged)?;
            let mut differences = vec![("loss".to_string(), rel_err(&nudged_loss, &loss)?)];
            for (name, g) in &noise {
                differences.push((name.clone(), rel_err(g, &reference[name])?));
            }
            for (name, e) in differences {
                let y = yardsticks.entry(name).or_default();
                *y = y.max(e);
            }
        }
        let model = params.model(m)?;
        let pass = model.forward_taped(tokens, grad_scale)?;
        // Every row is printed before the check, so that a failure shows the whole table.
        let mut outside = Vec::new();
        let mut check = |name: &str, e: f64, yardstick: f64| {
            println!("{name}: hand-written {e:.2e}, one-ulp yardstick {yardstick:.2e}");
            if e > (3.0 * yardstick).max(1e-6) {
                outside.push(format!("{name}: {e:.2e} vs {yardstick:.2e}"));
            }
        };
        check("loss", rel_err(pass.loss(), &loss)?, yardsticks["loss"]);
        let grads = pass.backward()?;
        let mut worst = (0.0f64, String::new());
        for (name, var) in params.iter() {
            let g = grads.get(var).expect("hand-written gradient");
            let e = rel_err(g, &reference[name])?;
            check(name, e, yardsticks[name]);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        println!(
            "largest hand-written difference: {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(outside.is_empty(), "beyond 3x the yardstick: {outside:?}");
        Ok(())
    }

    /// [`hand_written_against_autograd`] on a batch that spans several attention query blocks
    /// (300 positions) and several LM-head chunks (4 x 299 rows), with and without the sub-norms,
    /// with the fused CPU passes and with the tensor ops that other devices run in their place.
    #[test]
    fn hand_written_gradients_equal_autograd() -> Result<()> {
        let dev = Device::Cpu;
        for sub_norm in [false, true] {
            let m = ModelConfig {
                max_seq_length: 300,
                init_std: 0.05,
                ..tiny(sub_norm)
            };
            let ids: Vec<u32> = (0..4 * 300u32).map(|i| (i * 37 + i / 7) % 97).collect();
            let tokens = Tensor::from_vec(ids, (4, 300), &dev)?;
            println!("sub_norm {sub_norm}, fused CPU passes:");
            hand_written_against_autograd(&m, &tokens, 3, 0.5, 8)?;
            println!("sub_norm {sub_norm}, tensor ops:");
            crate::cpu::with_tensor_ops_only(|| {
                hand_written_against_autograd(&m, &tokens, 3, 0.5, 8)
            })?;
        }
        Ok(())
    }

    /// [`hand_written_against_autograd`] at the plan's size: the 95M model of
    /// configs/bitnet-95m.toml, one sequence of 1,024 tokens (8 attention query blocks, one
    /// LM-head chunk), seeded init and tokens drawn over the whole vocabulary, four nudged draws.
    /// Ignored in the suite (14 GB peak, 70 s in a release build); run it with
    /// `cargo test --release -p trainer -- --ignored --nocapture hand_written_gradients_equal_autograd_95m`.
    #[test]
    #[ignore = "95M model: 14 GB peak and 70 s in a release build"]
    fn hand_written_gradients_equal_autograd_95m() -> Result<()> {
        let m = config_95m().model;
        let mut rng = SplitMix64::new(7);
        let ids: Vec<u32> = (0..1024)
            .map(|_| rng.below(m.vocab_size as u64) as u32)
            .collect();
        let tokens = Tensor::from_vec(ids, (1, 1024), &Device::Cpu)?;
        hand_written_against_autograd(&m, &tokens, 42, 1.0, 4)
    }

    #[test]
    fn forward_loss_and_gradients_match_the_jax_reference() -> Result<()> {
        check_against_reference("tiny_plain")
    }

    #[test]
    fn sub_norm_model_matches_the_jax_reference() -> Result<()> {
        check_against_reference("tiny_subnorm")
    }
}
