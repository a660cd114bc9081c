//! AdamW (Loshchilov & Hutter 2019, Algorithm 2) with decoupled weight decay and global-norm
//! gradient clipping, written out so its state can be checkpointed and decay can skip 1-D tensors
//! (candle-nn's AdamW can do neither).
//!
//! The arithmetic follows `torch.optim.AdamW` (single-tensor path): `p *= 1 - lr*wd` (only for
//! tensors with 2+ dimensions, which includes the tied embedding, never the norms), `m = b1*m +
//! (1-b1)*g`, `v = b2*v + (1-b2)*g^2`, `p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)` with
//! `t = step + 1`. Moments are f32 tensors on the training device. The step count is not state:
//! it is the checkpoint's step.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

use crate::config::TrainingConfig;
use crate::model::Params;

/// Gradients by canonical parameter name.
pub type Grads = BTreeMap<String, Tensor>;

/// AdamW moments and hyper-parameters.
#[derive(Debug)]
pub struct AdamW {
    /// First moments by parameter name.
    m: BTreeMap<String, Tensor>,
    /// Second moments by parameter name.
    v: BTreeMap<String, Tensor>,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl AdamW {
    /// Zero moments for every parameter.
    pub fn new(params: &Params, cfg: &TrainingConfig) -> Result<Self> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        for (name, var) in params.iter() {
            m.insert(name.clone(), var.zeros_like()?);
            v.insert(name.clone(), var.zeros_like()?);
        }
        Ok(AdamW {
            m,
            v,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
        })
    }

    /// One update with the (already clipped) gradients; `step` counts updates from 1 (Adam's
    /// bias correction uses it as t).
    pub fn step(
        &mut self,
        params: &Params,
        grads: &Grads,
        step: u64,
        lr: f64,
        wd: f64,
    ) -> Result<()> {
        let t = step as i32;
        let bias1 = 1.0 - self.beta1.powi(t);
        let bias2_sqrt = (1.0 - self.beta2.powi(t)).sqrt();
        for (name, var) in params.iter() {
            let g = grads
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("no gradient for `{name}`")))?;
            let m = self
                .m
                .get_mut(name)
                .expect("moments exist for every parameter");
            *m = (m.affine(self.beta1, 0.0)? + g.affine(1.0 - self.beta1, 0.0)?)?;
            let v = self
                .v
                .get_mut(name)
                .expect("moments exist for every parameter");
            *v = (v.affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
            let mut p = var.as_tensor().detach();
            if var.rank() >= 2 && wd != 0.0 {
                p = p.affine(1.0 - lr * wd, 0.0)?;
            }
            let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, self.eps)?;
            let update = m.div(&denom)?.affine(lr / bias1, 0.0)?;
            var.set(&(p - update)?)?;
        }
        Ok(())
    }

    /// Writes the moments as `m.<name>` and `v.<name>` (f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = std::collections::HashMap::new();
        for (name, t) in &self.m {
            tensors.insert(format!("m.{name}"), t.clone());
        }
        for (name, t) in &self.v {
            tensors.insert(format!("v.{name}"), t.clone());
        }
        candle_core::safetensors::save(&tensors, path)
    }

    /// Reads moments written by [`AdamW::save`], requiring one pair per parameter with its shape.
    pub fn load(
        path: &Path,
        params: &Params,
        cfg: &TrainingConfig,
        device: &Device,
    ) -> Result<Self> {
        let mut tensors = candle_core::safetensors::load(path, device)?;
        let mut opt = AdamW::new(params, cfg)?;
        for (name, var) in params.iter() {
            for (prefix, store) in [("m", &mut opt.m), ("v", &mut opt.v)] {
                let key = format!("{prefix}.{name}");
                let t = tensors.remove(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: moment `{key}` is missing",
                        path.display()
                    ))
                })?;
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "{}: moment `{key}` has shape {:?}, expected {:?}",
                        path.display(),
                        t.dims(),
                        var.dims()
                    );
                }
                store.insert(name.clone(), t.to_dtype(DType::F32)?);
            }
        }
        Ok(opt)
    }
}

/// The global L2 norm of all gradients, computed in f32 on the device.
pub fn global_norm(grads: &Grads) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for g in grads.values() {
        let s = g.sqr()?.sum_all()?;
        total = Some(match total {
            None => s,
            Some(t) => (t + s)?,
        });
    }
    match total {
        None => Ok(0.0),
        Some(t) => Ok(t.sqrt()?.to_scalar::<f32>()? as f64),
    }
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `min(1, max_norm / (norm + 1e-6))`
/// and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut Grads, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn cfg() -> Config {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/bitnet-95m.toml");
        let mut c = Config::load(&path).unwrap();
        c.model.vocab_size = 8;
        c.model.hidden_size = 4;
        c.model.num_heads = 2;
        c.model.num_kv_heads = 1;
        c.model.ffn_hidden_size = 4;
        c.model.num_layers = 1;
        c
    }

    #[test]
    fn clipping_follows_torch_semantics() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = Grads::new();
        g.insert("a".into(), Tensor::new(&[3f32, 0.0], &dev)?);
        g.insert("b".into(), Tensor::new(&[[4f32]], &dev)?);
        let norm = clip_grad_norm(&mut g, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        let a: Vec<f32> = g["a"].to_vec1()?;
        assert!((a[0] as f64 - 3.0 / (5.0 + 1e-6)).abs() < 1e-6, "{a:?}");
        // Below the threshold nothing changes.
        let norm = clip_grad_norm(&mut g, 10.0)?;
        assert!((norm - 1.0).abs() < 1e-5);
        assert!((g["a"].to_vec1::<f32>()?[0] - a[0]).abs() == 0.0);
        Ok(())
    }

    /// From zero state at t = 1, AdamW reduces to `p = p*(1 - lr*wd) - lr * g/(|g| + eps)` for
    /// matrices and `p - lr * g/(|g| + eps)` for vectors (reference README). At t = 2 the bias
    /// corrections matter; the expected values are computed here in f64 from the formulas.
    #[test]
    fn two_steps_match_the_closed_form() -> Result<()> {
        let c = cfg();
        let dev = Device::Cpu;
        let params = Params::init(&c.model, 3, &dev)?;
        let mut opt = AdamW::new(&params, &c.training)?;
        let before: BTreeMap<String, Vec<f32>> = params
            .iter()
            .map(|(n, v)| (n.clone(), v.flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        let grads_of = |scale: f32| -> Grads {
            params
                .iter()
                .map(|(n, v)| {
                    let k = v.elem_count();
                    let g: Vec<f32> = (0..k)
                        .map(|i| scale * ((i % 7) as f32 - 3.0) * 0.01)
                        .collect();
                    (n.clone(), Tensor::from_vec(g, v.dims(), &dev).unwrap())
                })
                .collect()
        };
        let (lr, wd, b1, b2, eps) = (1e-2, 0.1, 0.9, 0.95, 1e-8);
        opt.step(&params, &grads_of(1.0), 1, lr, wd)?;
        opt.step(&params, &grads_of(-2.0), 2, lr, wd)?;
        for (name, var) in params.iter() {
            let after: Vec<f32> = var.flatten_all()?.to_vec1()?;
            let decay = if var.rank() >= 2 { 1.0 - lr * wd } else { 1.0 };
            for (i, (&p0, &p2)) in before[name].iter().zip(&after).enumerate() {
                let g1 = ((i % 7) as f64 - 3.0) * 0.01;
                let g2 = -2.0 * g1;
                let (mut m, mut v, mut p) = (0.0, 0.0, p0 as f64);
                for (t, g) in [(1, g1), (2, g2)] {
                    m = b1 * m + (1.0 - b1) * g;
                    v = b2 * v + (1.0 - b2) * g * g;
                    let denom = v.sqrt() / (1.0 - f64::powi(b2, t)).sqrt() + eps;
                    p = p * decay - lr / (1.0 - f64::powi(b1, t)) * m / denom;
                }
                assert!((p - p2 as f64).abs() < 2e-6, "{name}[{i}]: {p} vs {p2}");
            }
        }
        Ok(())
    }
}
