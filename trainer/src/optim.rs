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

use candle_core::{CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var};
use rayon::prelude::*;

use crate::config::TrainingConfig;
use crate::cpu::{self, f32_slice, f32_slice_mut};
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

    /// One update with the gradients times `grad_scale` (the clipping coefficient of
    /// [`clip_coefficient`]; 1 leaves them as they are); `step` counts updates from 1 (Adam's
    /// bias correction uses it as t).
    pub fn step(
        &mut self,
        params: &Params,
        grads: &Grads,
        grad_scale: f64,
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
            let v = self
                .v
                .get_mut(name)
                .expect("moments exist for every parameter");
            let shrink = if var.rank() >= 2 && wd != 0.0 {
                Some(1.0 - lr * wd)
            } else {
                None
            };
            let update = Update {
                grad_scale: (grad_scale != 1.0).then_some(grad_scale),
                beta1: self.beta1,
                beta2: self.beta2,
                shrink,
                inv_bias2_sqrt: 1.0 / bias2_sqrt,
                eps: self.eps,
                step_size: lr / bias1,
            };
            if var.device().is_cpu() && g.is_contiguous() {
                update.in_place(var.as_tensor(), m, v, g)?;
            } else {
                update.with_tensor_ops(var, m, v, g)?;
            }
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

/// The arithmetic of one parameter's update, in two forms that give the same bits: tensor ops
/// (every device; each op a pass over the tensor into a new one) and, on the CPU, three in-place
/// passes over the f32 memory split across the thread pool (`m`, `v`, then the parameter), which
/// allocate nothing and read the tensors 7 times instead of about 20. `x * a + 0.0` below is
/// candle's `affine(a, 0.0)` written out, signed zeros included. The clipping scale is applied to
/// the gradient as it is read, as `g.affine(scale, 0.0)` would.
#[derive(Debug, Clone, Copy)]
struct Update {
    /// The clipping coefficient, where it is not 1.
    grad_scale: Option<f64>,
    beta1: f64,
    beta2: f64,
    /// `1 - lr * wd`, for tensors that decay.
    shrink: Option<f64>,
    inv_bias2_sqrt: f64,
    eps: f64,
    step_size: f64,
}

impl Update {
    fn with_tensor_ops(&self, var: &Var, m: &mut Tensor, v: &mut Tensor, g: &Tensor) -> Result<()> {
        let g = &match self.grad_scale {
            Some(c) => g.affine(c, 0.0)?,
            None => g.clone(),
        };
        *m = (m.affine(self.beta1, 0.0)? + g.affine(1.0 - self.beta1, 0.0)?)?;
        *v = (v.affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
        let mut p = var.as_tensor().detach();
        if let Some(shrink) = self.shrink {
            p = p.affine(shrink, 0.0)?;
        }
        let denom = v.sqrt()?.affine(self.inv_bias2_sqrt, self.eps)?;
        let update = m.div(&denom)?.affine(self.step_size, 0.0)?;
        var.set(&(p - update)?)
    }

    fn in_place(&self, p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> Result<()> {
        m.inplace_op2(
            g,
            &Moment {
                grad_scale: self.grad_scale.map(|c| c as f32),
                keep: self.beta1 as f32,
                take: (1.0 - self.beta1) as f32,
                square: false,
            },
        )?;
        v.inplace_op2(
            g,
            &Moment {
                grad_scale: self.grad_scale.map(|c| c as f32),
                keep: self.beta2 as f32,
                take: (1.0 - self.beta2) as f32,
                square: true,
            },
        )?;
        p.inplace_op3(m, v, self)
    }
}

/// Elements per task of the in-place passes: large enough that scheduling is noise, small enough
/// that a 768-wide norm vector stays on one thread and a 24.6M embedding splits evenly.
const CHUNK: usize = 1 << 16;

/// `moment = keep * moment + take * g` (or `g^2`), in place, `g` scaled by `grad_scale` first.
struct Moment {
    grad_scale: Option<f32>,
    keep: f32,
    take: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let moment = f32_slice_mut(s1, l1, "AdamW: a moment")?;
        let g = f32_slice(s2, l2, "AdamW: a gradient")?;
        if moment.len() != g.len() {
            candle_core::bail!("AdamW: moment and gradient sizes differ");
        }
        let (keep, take, square) = (self.keep, self.take, self.square);
        let grad_scale = self.grad_scale;
        moment
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(moment, g)| moment_chunk(moment, g, grad_scale, keep, take, square));
        Ok(())
    }
}

cpu::vectorized! {
    fn moment_chunk(
        moment: &mut [f32],
        g: &[f32],
        grad_scale: Option<f32>,
        keep: f32,
        take: f32,
        square: bool
    ) {
        for (x, &g) in moment.iter_mut().zip(g) {
            let g = match grad_scale {
                Some(c) => g * c + 0.0,
                None => g,
            };
            let g = if square { g * g } else { g };
            *x = (*x * keep + 0.0) + (g * take + 0.0);
        }
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let p = f32_slice_mut(s1, l1, "AdamW: a parameter")?;
        let m = f32_slice(s2, l2, "AdamW: a moment")?;
        let v = f32_slice(s3, l3, "AdamW: a moment")?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("AdamW: parameter and moment sizes differ");
        }
        let shrink = self.shrink.map(|s| s as f32);
        let inv_bias2_sqrt = self.inv_bias2_sqrt as f32;
        let eps = self.eps as f32;
        let step_size = self.step_size as f32;
        p.par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(p, (m, v))| update_chunk(p, m, v, shrink, inv_bias2_sqrt, eps, step_size));
        Ok(())
    }
}

cpu::vectorized! {
    fn update_chunk(
        p: &mut [f32],
        m: &[f32],
        v: &[f32],
        shrink: Option<f32>,
        inv_bias2_sqrt: f32,
        eps: f32,
        step_size: f32
    ) {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let kept = match shrink {
                Some(s) => *p * s + 0.0,
                None => *p,
            };
            let denom = v.sqrt() * inv_bias2_sqrt + eps;
            *p = kept - ((m / denom) * step_size + 0.0);
        }
    }
}

/// The global L2 norm of all gradients: on the CPU each tensor's sum of squares in one pass
/// (f32 lanes, f64 across chunks), elsewhere summed on the device in f32.
pub fn global_norm(grads: &Grads) -> Result<f64> {
    let mut cpu_sum = 0f64;
    let mut device_sum: Option<Tensor> = None;
    for g in grads.values() {
        if cpu::fusable(g) && g.is_contiguous() {
            cpu_sum += cpu::sum_of_squares(g)?;
            continue;
        }
        let s = g.sqr()?.sum_all()?;
        device_sum = Some(match device_sum {
            None => s,
            Some(t) => (t + s)?,
        });
    }
    let device_sum = match device_sum {
        None => 0.0,
        Some(t) => t.to_scalar::<f32>()? as f64,
    };
    Ok((cpu_sum + device_sum).sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`'s arithmetic: the global norm and the coefficient
/// `min(1, max_norm / (norm + 1e-6))` that [`AdamW::step`] scales every gradient by.
pub fn clip_coefficient(grads: &Grads, max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_norm(grads)?;
    Ok((norm, (max_norm / (norm + 1e-6)).min(1.0)))
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
        let (norm, coef) = clip_coefficient(&g, 1.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        assert!((coef - 1.0 / (5.0 + 1e-6)).abs() < 1e-12, "{coef}");
        // Below the threshold nothing changes.
        let (norm, coef) = clip_coefficient(&g, 10.0)?;
        assert!((norm - 5.0).abs() < 1e-6);
        assert_eq!(coef, 1.0);
        // Non-contiguous gradients (the tensor-op sum) count the same.
        g.insert(
            "c".into(),
            Tensor::new(&[[1f32, 2.0], [2.0, 4.0]], &dev)?.t()?,
        );
        let (norm, _) = clip_coefficient(&g, 1.0)?;
        assert!((norm - 50f64.sqrt()).abs() < 1e-6, "{norm}");
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
        opt.step(&params, &grads_of(1.0), 1.0, 1, lr, wd)?;
        opt.step(&params, &grads_of(-0.5), 4.0, 2, lr, wd)?;
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

    /// The in-place CPU passes give the tensor-op path's bits (which other devices run), over
    /// several steps, with and without decay, on a tensor spanning several chunks and uneven
    /// tails, with gradients that include signed zeros, subnormals and large values.
    #[test]
    fn in_place_update_equals_the_tensor_ops_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let rows = (3 * CHUNK + 777) / 7;
        let n = rows * 7;
        let mut rng = pipeline::rng::SplitMix64::new(5);
        let mut uniform = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let p0: Vec<f32> = (0..n).map(|_| uniform() * 0.1).collect();
        let var_a = Var::from_vec(p0.clone(), (rows, 7), &dev)?;
        let var_b = Var::from_vec(p0, (rows, 7), &dev)?;
        let (mut ma, mut va) = (var_a.zeros_like()?, var_a.zeros_like()?);
        let (mb, vb) = (var_b.zeros_like()?, var_b.zeros_like()?);
        for step in 1..=4 {
            let g: Vec<f32> = (0..n)
                .map(|i| match i % 97 {
                    0 => -0.0,
                    1 => 1e-40,
                    2 => 3e4,
                    _ => uniform() * 0.02,
                })
                .collect();
            let g = Tensor::from_vec(g, (rows, 7), &dev)?;
            let update = Update {
                grad_scale: (step % 3 == 0).then_some(0.37),
                beta1: 0.9,
                beta2: 0.95,
                shrink: (step % 2 == 1).then_some(1.0 - 1.5e-3 * 0.1),
                inv_bias2_sqrt: 1.0 / (1.0 - 0.95f64.powi(step)).sqrt(),
                eps: 1e-8,
                step_size: 1.5e-3 / (1.0 - 0.9f64.powi(step)),
            };
            update.with_tensor_ops(&var_a, &mut ma, &mut va, &g)?;
            update.in_place(var_b.as_tensor(), &mb, &vb, &g)?;
            for (what, a, b) in [
                ("parameter", var_a.as_tensor(), var_b.as_tensor()),
                ("m", &ma, &mb),
                ("v", &va, &vb),
            ] {
                let a: Vec<u32> = a
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let b: Vec<u32> = b
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .map(|x| x.to_bits())
                    .collect();
                let differ = a.iter().zip(&b).filter(|(x, y)| x != y).count();
                assert_eq!(
                    differ, 0,
                    "step {step}: {what}: {differ} of {n} elements differ"
                );
            }
        }
        Ok(())
    }
}
