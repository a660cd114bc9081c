//! The model as a [`LogitsSource`] for the sampling probes: [`CachedGenerator`] feeds the prompt
//! once, then one token per step through the model's key/value cache.

use candle_core::{DType, Result, Tensor};

use super::sample::LogitsSource;
use crate::model::{BitNet, KvCache};

/// Logits `[vocab]` after the last of `tokens` (one sequence), which continue the positions held
/// by `cache` (or start at position 0 without one). The LM head runs on the last position only.
pub fn next_token_logits(
    model: &BitNet,
    tokens: &[u32],
    cache: Option<&mut KvCache>,
) -> Result<Vec<f32>> {
    let index_pos = cache.as_ref().map_or(0, |c| c.len());
    let t = Tensor::from_vec(tokens.to_vec(), (1, tokens.len()), model.device())?;
    let h = model.hidden(&t, index_pos, cache)?;
    let last = h.narrow(1, tokens.len() - 1, 1)?;
    model
        .lm_head(&last)?
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1()
}

/// Generation with the key/value cache; `model` is normally the inference form
/// ([`BitNet::freeze`]).
#[derive(Debug)]
pub struct CachedGenerator<'a> {
    model: &'a BitNet,
    cache: KvCache,
}

impl<'a> CachedGenerator<'a> {
    pub fn new(model: &'a BitNet) -> Self {
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
        Ok(next_token_logits(
            self.model,
            tokens,
            Some(&mut self.cache),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instrument::sample::{Mode, generate};
    use crate::model::Params;
    use candle_core::Device;

    #[test]
    fn cached_generation_equals_uncached_generation() {
        struct Uncached<'a>(&'a BitNet, Vec<u32>);
        impl LogitsSource for Uncached<'_> {
            fn reset(&mut self) {
                self.1.clear();
            }
            fn feed(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
                self.1.extend_from_slice(tokens);
                Ok(next_token_logits(self.0, &self.1, None)?)
            }
        }
        let m = crate::model::tests::tiny(false);
        let params = Params::init(&m, 11, &Device::Cpu).unwrap();
        let model = params.model(&m).unwrap().freeze().unwrap();
        for mode in Mode::ALL {
            let a = generate(
                &mut CachedGenerator::new(&model),
                &[1, 7, 9],
                mode,
                5,
                20,
                None,
            )
            .unwrap();
            let b = generate(&mut Uncached(&model, vec![]), &[1, 7, 9], mode, 5, 20, None).unwrap();
            assert_eq!(a.ids, b.ids, "{mode:?}");
        }
    }
}
