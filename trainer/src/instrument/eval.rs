//! The frozen evaluation -> `eval/eval_results.jsonl`: the mean cross-entropy over
//! the eval split of the shards (never used in training), with the same loss definition as
//! training (mean over every predicted token), plus perplexity and bits per byte.
//!
//! Bits per byte uses the eval split's `text_bytes` from the shard manifest: total nats / ln 2 /
//! bytes. The split's bytes cover all its tokens, the loss covers `seq_len - 1` predictions per
//! sequence, so bpb = loss / ln 2 x (tokens / text_bytes) over the split (the tokens-per-byte ratio
//! of a subset is taken to be the split's).

use serde::{Deserialize, Serialize};

/// Sums of per-batch mean losses weighted by their predicted-token counts, so a smaller last
/// batch counts for what it holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalAccumulator {
    nats: f64,
    predicted: u64,
    sequences: u64,
}

impl EvalAccumulator {
    /// Adds a batch of `sequences` sequences whose mean loss over `predicted` tokens is `mean_loss`.
    pub fn add(&mut self, mean_loss: f64, predicted: u64, sequences: u64) {
        self.nats += mean_loss * predicted as f64;
        self.predicted += predicted;
        self.sequences += sequences;
    }

    pub fn mean_loss(&self) -> f64 {
        if self.predicted == 0 {
            f64::NAN
        } else {
            self.nats / self.predicted as f64
        }
    }

    pub fn predicted_tokens(&self) -> u64 {
        self.predicted
    }

    pub fn sequences(&self) -> u64 {
        self.sequences
    }
}

/// Bits per UTF-8 byte of text for a mean loss in nats per token.
pub fn bits_per_byte(mean_loss_nats: f64, split_tokens: u64, split_text_bytes: u64) -> Option<f64> {
    (split_text_bytes > 0 && mean_loss_nats.is_finite()).then(|| {
        mean_loss_nats / std::f64::consts::LN_2 * split_tokens as f64 / split_text_bytes as f64
    })
}

/// One line of `eval/eval_results.jsonl`: the keys of the run-folder contract (README) first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub eval_loss: f64,
    /// Moving average of the training loss over the last 100 steps; `null` before any step.
    pub train_loss: Option<f64>,
    /// `train_loss - eval_loss`, in the contract's sign (negative when the model fits its training
    /// batches better than held-out text); `null` with `train_loss`.
    pub train_eval_gap: Option<f64>,
    // Added.
    pub eval_ppl: f64,
    pub bits_per_byte: Option<f64>,
    pub eval_sequences: u64,
    pub eval_predicted_tokens: u64,
    pub eval_seconds: f64,
    pub tokens_seen: u64,
}

impl EvalRecord {
    pub fn new(
        step: u64,
        tokens_seen: u64,
        acc: &EvalAccumulator,
        train_loss_ma: Option<f64>,
        split: (u64, u64),
        seconds: f64,
    ) -> Self {
        let eval_loss = acc.mean_loss();
        EvalRecord {
            step,
            eval_loss,
            train_loss: train_loss_ma,
            train_eval_gap: train_loss_ma.map(|t| t - eval_loss),
            eval_ppl: eval_loss.exp(),
            bits_per_byte: bits_per_byte(eval_loss, split.0, split.1),
            eval_sequences: acc.sequences(),
            eval_predicted_tokens: acc.predicted_tokens(),
            eval_seconds: seconds,
            tokens_seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_weighted_mean_and_derived_values() {
        let mut a = EvalAccumulator::default();
        a.add(2.0, 30, 2);
        a.add(4.0, 10, 1);
        assert!((a.mean_loss() - 2.5).abs() < 1e-12);
        let r = EvalRecord::new(1000, 5, &a, Some(2.7), (400, 1600), 1.5);
        assert!((r.eval_ppl - 2.5f64.exp()).abs() < 1e-9);
        assert!((r.train_eval_gap.unwrap() - 0.2).abs() < 1e-12);
        // 2.5 nats/token / ln 2 = 3.607 bits/token; 0.25 tokens/byte.
        assert!((r.bits_per_byte.unwrap() - 2.5 / std::f64::consts::LN_2 / 4.0).abs() < 1e-12);
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "step",
            "eval_loss",
            "train_loss",
            "train_eval_gap",
            "eval_ppl",
            "bits_per_byte",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(bits_per_byte(2.0, 10, 0), None);
        assert!(EvalAccumulator::default().mean_loss().is_nan());
    }
}
