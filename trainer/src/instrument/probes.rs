//! The probes that need the model: the frozen eval over the eval split, a sampling round of the
//! fixed prompts, the ternary statistics of the current weights, the top-20 next tokens of a
//! prompt and per-parameter gradient norms. Used by the run hooks and by `trainer eval` /
//! `trainer sample`.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use pipeline::format::{Manifest, Split, TOKENIZER_FILE};
use tokenizers::Tokenizer;

use super::anomaly::PromptTop20;
use super::eval::{EvalAccumulator, EvalRecord};
use super::generator::{self, CachedGenerator};
use super::sample::{self, FIXED_PROMPTS, Mode, SampleKey, SampleRecord};
use super::ternary::{LayerTernary, ternary_counts};
use crate::config::ModelConfig;
use crate::data::SplitData;
use crate::model::{BitNet, Params};

/// The eval split of a shard folder, memory-mapped.
#[derive(Debug)]
pub struct EvalSet {
    data: SplitData,
    seq_len: usize,
    /// Sequences evaluated (the whole split unless capped).
    pub sequences: u64,
    /// (tokens, text bytes) of the whole split, for bits per byte.
    pub split_tokens_bytes: (u64, u64),
}

impl EvalSet {
    /// Opens and checks the eval shards against the manifest; `cap` limits the sequences.
    pub fn open(dir: &Path, manifest: &Manifest, cap: Option<u64>) -> Result<Self> {
        let data = SplitData::open(manifest, dir, Split::Eval)
            .with_context(|| format!("opening the eval split of {}", dir.display()))?;
        let total = manifest.eval.sequences;
        anyhow::ensure!(
            total > 0,
            "{}: the eval split is empty; hint: run `pipeline prepare` with `--eval-sequences` above 0 (the default is 10,000)",
            Manifest::path(dir).display()
        );
        Ok(EvalSet {
            data,
            seq_len: manifest.seq_len as usize,
            sequences: cap.map_or(total, |c| c.min(total)),
            split_tokens_bytes: (manifest.eval.tokens, manifest.eval.text_bytes),
        })
    }

    fn load(&self, first: u64, n: usize) -> Vec<u32> {
        let indices: Vec<u64> = (first..first + n as u64).collect();
        self.data.load(&indices)
    }

    /// Mean next-token loss of `model` over the set, in batches of `batch_size`, with the
    /// training loss definition (`BitNet::loss`); returns the accumulator and the seconds taken.
    pub fn evaluate(
        &self,
        model: &BitNet,
        device: &Device,
        batch_size: usize,
    ) -> Result<(EvalAccumulator, f64)> {
        let t0 = Instant::now();
        let mut acc = EvalAccumulator::default();
        let mut first = 0u64;
        while first < self.sequences {
            let n = (self.sequences - first).min(batch_size as u64) as usize;
            let tokens = Tensor::from_vec(self.load(first, n), (n, self.seq_len), device)?;
            let loss = model
                .loss(&tokens)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            acc.add(loss, (n * (self.seq_len - 1)) as u64, n as u64);
            first += n as u64;
        }
        Ok((acc, t0.elapsed().as_secs_f64()))
    }

    /// One `eval_results.jsonl` record.
    pub fn record(
        &self,
        model: &BitNet,
        device: &Device,
        batch_size: usize,
        step: u64,
        tokens_seen: u64,
        train_loss_ma: Option<f64>,
    ) -> Result<EvalRecord> {
        let (acc, secs) = self.evaluate(model, device, batch_size)?;
        Ok(EvalRecord::new(
            step,
            tokens_seen,
            &acc,
            train_loss_ma,
            self.split_tokens_bytes,
            secs,
        ))
    }
}

/// The shard folder's tokenizer (`tokenizer.json` next to the manifest) and its BOS/EOS ids.
#[derive(Debug)]
pub struct PromptCodec {
    tokenizer: Tokenizer,
    pub bos: u32,
    pub eos: u32,
}

impl PromptCodec {
    pub fn open(dir: &Path, manifest: &Manifest) -> Result<Self> {
        let path = dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::from_file(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}; hint: the shard folder must hold the tokenizer.json that `pipeline prepare` copies there",
                path.display()
            )
        })?;
        Ok(PromptCodec {
            tokenizer,
            bos: manifest.bos_id,
            eos: manifest.eos_id,
        })
    }

    /// `<s>` + the prompt's ids (the LLaMA-2 tokenizer.json adds `<s>` itself; added if not).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("encoding {text:?}: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        if ids.first() != Some(&self.bos) {
            ids.insert(0, self.bos);
        }
        Ok(ids)
    }

    /// Text of `ids` without special tokens (`<s>`, `</s>`).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer
            .decode(ids, true)
            .unwrap_or_else(|e| format!("<decode error: {e}>"))
    }

    /// One token as the vocabulary spells it (`▁the`), so top-k lists show word boundaries.
    pub fn token(&self, id: u32) -> String {
        self.tokenizer
            .id_to_token(id)
            .unwrap_or_else(|| format!("<{id}>"))
    }
}

/// One sampling round: every fixed prompt in every mode, `max_new` tokens each.
pub fn sampling_round(
    model: &BitNet,
    codec: &PromptCodec,
    step: u64,
    max_new: usize,
) -> Result<Vec<SampleRecord>> {
    let mut out = Vec::with_capacity(FIXED_PROMPTS.len() * Mode::ALL.len());
    let mut generator = CachedGenerator::new(model);
    let room = model.max_seq_length();
    for (prompt_index, prompt) in FIXED_PROMPTS.iter().enumerate() {
        let ids = codec.encode(prompt)?;
        let max_new = max_new.min(room.saturating_sub(ids.len()));
        for mode in Mode::ALL {
            let seed = sample::stable_seed(prompt_index, step, mode);
            let g = sample::generate(&mut generator, &ids, mode, seed, max_new, Some(codec.eos))?;
            let key = SampleKey {
                step,
                prompt_index,
                prompt,
                mode,
                seed,
            };
            let decode_one = |ids: &[u32]| {
                if ids.len() == 1 {
                    codec.token(ids[0])
                } else {
                    codec.decode(ids)
                }
            };
            out.push(SampleRecord::new(key, &g, Some(codec.eos), &decode_one));
        }
    }
    Ok(out)
}

/// -1/0/+1 fractions and absmean scales of every block's weights, in
/// [`super::ternary::PROJECTIONS`] order.
pub fn quant_stats(params: &Params, m: &ModelConfig) -> Result<Vec<LayerTernary>> {
    params
        .model(m)?
        .blocks()
        .iter()
        .enumerate()
        .map(|(layer, block)| {
            let projections = block
                .bit_linears()
                .iter()
                .map(|w| ternary_counts(w.weight(), w.parts()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Ok(LayerTernary { layer, projections })
        })
        .collect()
}

/// The 20 most likely next tokens after `prompt` and the entropy of the full distribution.
pub fn top20(model: &BitNet, codec: &PromptCodec, prompt: &str) -> Result<PromptTop20> {
    let ids = codec.encode(prompt)?;
    let probs = sample::softmax(&generator::next_token_logits(model, &ids, None)?, 1.0);
    let top = sample::top_k(&probs, 20);
    Ok(PromptTop20 {
        prompt: prompt.to_owned(),
        tokens: top.iter().map(|&(i, _)| codec.token(i)).collect(),
        token_ids: top.iter().map(|&(i, _)| i).collect(),
        probs: top.iter().map(|&(_, p)| p).collect(),
        entropy: sample::entropy(&probs),
    })
}

/// L2 norm of each parameter's gradient of the mean loss on `tokens` at the current weights (the
/// hand-written pass, as in training: a dump of a full batch fits wherever its step did).
pub fn grad_norms(
    model: &BitNet,
    params: &Params,
    tokens: &Tensor,
) -> Result<BTreeMap<String, f64>> {
    let grads = model.forward_taped(tokens, 1.0)?.backward()?;
    let mut out = BTreeMap::new();
    for (name, var) in params.iter() {
        let n = match grads.get(var) {
            Some(g) => g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
                .sqrt(),
            None => 0.0,
        };
        out.insert(name.clone(), n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{Pattern, SyntheticSpec, write_dataset};

    #[test]
    fn eval_set_reads_every_sequence_across_shard_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let spec = SyntheticSpec {
            seq_len: 8,
            vocab_size: 1000,
            train_sequences: 4,
            eval_sequences: 12,
            sequences_per_shard: 5,
            tokenizer_sha256: "x".into(),
            pattern: Pattern::Position,
        };
        let m = write_dataset(dir.path(), &spec).unwrap();
        assert_eq!(m.eval.shards.len(), 3);
        let set = EvalSet::open(dir.path(), &m, None).unwrap();
        assert_eq!(set.sequences, 12);
        // Every sequence, read in batches that straddle the 5/5/2 shard split, equals the one
        // read directly from its shard.
        let readers = m.open_split(dir.path(), Split::Eval).unwrap();
        let mut direct = Vec::new();
        for r in &readers {
            for i in 0..r.num_sequences() {
                let mut row = vec![0u32; 8];
                r.copy_sequence(i, &mut row);
                direct.extend(row);
            }
        }
        let mut batched = Vec::new();
        for first in (0..12).step_by(7) {
            batched.extend(set.load(first, (12 - first).min(7) as usize));
        }
        assert_eq!(batched, direct);
        // Position pattern: consecutive sequences continue the count (an offset bug would show).
        assert_eq!(batched[8] - batched[0], 8);
        assert_eq!(EvalSet::open(dir.path(), &m, Some(5)).unwrap().sequences, 5);
    }
}
