//! Text-sample snapshots: the five fixed prompts, the three decoding modes (greedy;
//! typical = temperature 0.9 + top-p 0.95; stress = temperature 1.5 + top-k 10), a stable
//! per-(prompt, step, mode) seed, and the statistics of each generation (entropy, repetition,
//! top-5 of the first 10 positions). Works on plain f32 logits from any [`LogitsSource`], so the
//! math is tested without a model; the model's KV-cache path implements the trait.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The fixed prompts, in order; they never change, so samples of any two runs or steps compare.
pub const FIXED_PROMPTS: [&str; 5] = [
    "The quick brown fox",
    "In the beginning",
    "Once upon a time",
    "The capital of France",
    "Machine learning is",
];

/// Positions whose entropy and top-5 are recorded in `logits_first_10`.
pub const DETAILED_POSITIONS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Greedy,
    /// temperature 0.9, top_p 0.95
    Typical,
    /// temperature 1.5, top_k 10
    Stress,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Greedy, Mode::Typical, Mode::Stress];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Greedy => "greedy",
            Mode::Typical => "typical",
            Mode::Stress => "stress",
        }
    }

    pub fn temperature(self) -> f32 {
        match self {
            Mode::Greedy => 0.0,
            Mode::Typical => 0.9,
            Mode::Stress => 1.5,
        }
    }

    pub fn top_p(self) -> Option<f32> {
        matches!(self, Mode::Typical).then_some(0.95)
    }

    pub fn top_k(self) -> Option<usize> {
        matches!(self, Mode::Stress).then_some(10)
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown mode `{s}`; hint: use greedy, typical or stress"))
    }
}

/// The seed of one generation: the first 4 bytes (little-endian) of
/// sha256("{prompt_index}:{step}:{mode}"). Stable across runs, builds and platforms (Rust's
/// `DefaultHasher` is randomized per process) and below 2^32, like a Python
/// `hash(...) % 2**32` seed.
pub fn stable_seed(prompt_index: usize, step: u64, mode: Mode) -> u64 {
    let digest = Sha256::digest(format!("{prompt_index}:{step}:{}", mode.name()).as_bytes());
    u32::from_le_bytes(digest[..4].try_into().expect("sha256 has 32 bytes")) as u64
}

use pipeline::rng::SplitMix64;

/// softmax(logits / temperature) in f64 (max-subtracted). Non-finite logits get probability 0.
pub fn softmax(logits: &[f32], temperature: f32) -> Vec<f64> {
    let t = if temperature > 0.0 {
        temperature as f64
    } else {
        1.0
    };
    let max = logits
        .iter()
        .filter(|x| x.is_finite())
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let mut p: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_finite() {
                ((x as f64 - max) / t).exp()
            } else {
                0.0
            }
        })
        .collect();
    let sum: f64 = p.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        p.iter_mut().for_each(|x| *x /= sum);
    }
    p
}

/// Shannon entropy in nats, -sum p ln p (the common `p * log(p + 1e-10)` form biases it; skipping
/// p = 0 terms is the same limit without the bias).
pub fn entropy(probs: &[f64]) -> f64 {
    probs
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -p * p.ln())
        .sum()
}

/// The `k` most probable token ids with their probabilities, most probable first (ties: lower id).
pub fn top_k(probs: &[f64], k: usize) -> Vec<(u32, f64)> {
    let mut idx: Vec<u32> = (0..probs.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        probs[*b as usize]
            .total_cmp(&probs[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, probs[i as usize])).collect()
}

/// Picks the next token from raw logits. Greedy: argmax (lowest id on ties). Typical: nucleus of
/// the temperature-0.9 distribution holding 0.95 of the mass. Stress: the 10 most likely tokens
/// of the temperature-1.5 distribution. One uniform draw per token.
pub fn pick_next(logits: &[f32], mode: Mode, rng: &mut SplitMix64) -> u32 {
    if mode == Mode::Greedy {
        return top_k(&softmax(logits, 1.0), 1)
            .first()
            .map_or(0, |&(i, _)| i);
    }
    let probs = softmax(logits, mode.temperature());
    let mut cands = match (mode.top_k(), mode.top_p()) {
        (Some(k), _) => top_k(&probs, k),
        (None, Some(p)) => {
            let sorted = top_k(&probs, probs.len());
            let mut mass = 0.0;
            let mut keep = Vec::new();
            for (i, q) in sorted {
                keep.push((i, q));
                mass += q;
                if mass >= p as f64 {
                    break;
                }
            }
            keep
        }
        (None, None) => top_k(&probs, probs.len()),
    };
    let total: f64 = cands.iter().map(|c| c.1).sum();
    if cands.is_empty() || total <= 0.0 {
        return 0;
    }
    let mut u = rng.next_f64() * total;
    let last = cands.pop().expect("non-empty");
    for (i, q) in cands {
        if u < q {
            return i;
        }
        u -= q;
    }
    last.0
}

/// Anything that yields next-token logits one token at a time (the model with its KV cache).
pub trait LogitsSource {
    /// Forgets all context (a new prompt).
    fn reset(&mut self);
    /// Appends `tokens` to the context; returns the logits `[vocab]` after the last one.
    fn feed(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>>;
}

/// One position of `logits_first_10`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PositionDetail {
    pub pos: usize,
    /// Of the untempered distribution, in nats.
    pub entropy: f64,
    /// Decoded strings of the top-5 ids.
    pub top5_tokens: Vec<String>,
    pub top5_ids: Vec<u32>,
    pub top5_probs: Vec<f64>,
}

/// The raw result of one generation, before decoding to text.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Prompt (with `<s>`) followed by the new tokens: `generated_ids` of `samples.jsonl`.
    pub ids: Vec<u32>,
    pub prompt_len: usize,
    /// Untempered entropy before each new token.
    pub entropies: Vec<f64>,
    /// (entropy, top-5) of the first [`DETAILED_POSITIONS`] new tokens.
    pub detail: Vec<(f64, Vec<(u32, f64)>)>,
}

/// Generates up to `max_new` tokens after `prompt`, stopping after `eos`.
pub fn generate(
    source: &mut dyn LogitsSource,
    prompt: &[u32],
    mode: Mode,
    seed: u64,
    max_new: usize,
    eos: Option<u32>,
) -> anyhow::Result<Generation> {
    anyhow::ensure!(
        !prompt.is_empty(),
        "empty prompt; hint: prompts start with <s>"
    );
    let mut rng = SplitMix64::new(seed);
    source.reset();
    let mut ids = prompt.to_vec();
    let mut entropies = Vec::with_capacity(max_new);
    let mut detail = Vec::new();
    let mut logits = source.feed(prompt)?;
    for n in 0..max_new {
        let probs = softmax(&logits, 1.0);
        let h = entropy(&probs);
        entropies.push(h);
        if n < DETAILED_POSITIONS {
            detail.push((h, top_k(&probs, 5)));
        }
        let next = pick_next(&logits, mode, &mut rng);
        ids.push(next);
        if Some(next) == eos || n + 1 == max_new {
            break;
        }
        logits = source.feed(&[next])?;
    }
    Ok(Generation {
        ids,
        prompt_len: prompt.len(),
        entropies,
        detail,
    })
}

/// Repetition statistics over a token list: (max count of one id, distinct ids).
pub fn repetition(ids: &[u32]) -> (u64, u64) {
    let mut counts = std::collections::HashMap::new();
    for &i in ids {
        *counts.entry(i).or_insert(0u64) += 1;
    }
    (
        counts.values().copied().max().unwrap_or(0),
        counts.len() as u64,
    )
}

/// One line of `samples/samples.jsonl`, the keys of the run-folder contract (README) first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub step: u64,
    pub prompt: String,
    pub mode: String,
    pub seed: u64,
    pub generated_text: String,
    /// Prompt ids (with `<s>`) and new ids: the whole sequence, prompt included.
    pub generated_ids: Vec<u32>,
    /// Mean untempered entropy (nats) over the first 10 new positions: the model's
    /// distribution before temperature, so it describes the model rather than the decoding mode.
    pub mean_entropy: f64,
    /// Highest count of one id in `generated_ids`.
    pub max_repetition: u64,
    pub unique_tokens: u64,
    /// Length of `generated_ids`.
    pub total_tokens: u64,
    pub logits_first_10: Vec<PositionDetail>,
    // Added fields.
    pub prompt_index: usize,
    pub prompt_tokens: u64,
    pub new_tokens: u64,
    /// Text of the new tokens only.
    pub completion_text: String,
    /// Mean entropy over all new positions.
    pub mean_entropy_all: f64,
    /// `max_repetition` over the new tokens only.
    pub max_repetition_new: u64,
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub stopped_at_eos: bool,
}

/// What identifies one generation of a sampling round.
#[derive(Debug, Clone, Copy)]
pub struct SampleKey<'a> {
    pub step: u64,
    pub prompt_index: usize,
    pub prompt: &'a str,
    pub mode: Mode,
    pub seed: u64,
}

impl SampleRecord {
    /// Builds the record; `decode` maps ids to text (skipping special tokens).
    pub fn new(
        key: SampleKey<'_>,
        g: &Generation,
        eos: Option<u32>,
        decode: &dyn Fn(&[u32]) -> String,
    ) -> Self {
        let SampleKey {
            step,
            prompt_index,
            prompt,
            mode,
            seed,
        } = key;
        let new = &g.ids[g.prompt_len..];
        let (max_repetition, unique_tokens) = repetition(&g.ids);
        let (max_repetition_new, _) = repetition(new);
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let first: Vec<f64> = g.detail.iter().map(|d| d.0).collect();
        SampleRecord {
            step,
            prompt: prompt.to_owned(),
            mode: mode.name().to_owned(),
            seed,
            generated_text: decode(&g.ids),
            generated_ids: g.ids.clone(),
            mean_entropy: mean(&first),
            max_repetition,
            unique_tokens,
            total_tokens: g.ids.len() as u64,
            logits_first_10: g
                .detail
                .iter()
                .enumerate()
                .map(|(pos, (h, top))| PositionDetail {
                    pos,
                    entropy: *h,
                    top5_tokens: top.iter().map(|&(i, _)| decode(&[i])).collect(),
                    top5_ids: top.iter().map(|&(i, _)| i).collect(),
                    top5_probs: top.iter().map(|&(_, p)| p).collect(),
                })
                .collect(),
            prompt_index,
            prompt_tokens: g.prompt_len as u64,
            new_tokens: new.len() as u64,
            completion_text: decode(new),
            mean_entropy_all: mean(&g.entropies),
            max_repetition_new,
            temperature: mode.temperature(),
            top_p: mode.top_p(),
            top_k: mode.top_k(),
            stopped_at_eos: eos.is_some() && new.last().copied() == eos,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bigram table: the logits after token t are row t. Deterministic, so sampling is too.
    struct Bigram {
        rows: Vec<Vec<f32>>,
        last: Option<u32>,
        fed: usize,
    }

    impl LogitsSource for Bigram {
        fn reset(&mut self) {
            self.last = None;
        }
        fn feed(&mut self, tokens: &[u32]) -> anyhow::Result<Vec<f32>> {
            self.fed += tokens.len();
            self.last = tokens.last().copied();
            Ok(self.rows[self.last.unwrap() as usize].clone())
        }
    }

    fn key(step: u64, prompt_index: usize, prompt: &str, mode: Mode, seed: u64) -> SampleKey<'_> {
        SampleKey {
            step,
            prompt_index,
            prompt,
            mode,
            seed,
        }
    }

    fn bigram(v: usize) -> Bigram {
        let mut rng = SplitMix64::new(7);
        let rows = (0..v)
            .map(|_| {
                (0..v)
                    .map(|_| (rng.next_f64() * 6.0 - 3.0) as f32)
                    .collect()
            })
            .collect();
        Bigram {
            rows,
            last: None,
            fed: 0,
        }
    }

    #[test]
    fn seeds_are_stable_and_distinct() {
        // Pinned: a change of the hash input would silently change every recorded sample.
        assert_eq!(
            stable_seed(0, 1000, Mode::Greedy),
            stable_seed(0, 1000, Mode::Greedy)
        );
        let mut all = std::collections::HashSet::new();
        for p in 0..5 {
            for step in [0u64, 1000, 2000] {
                for m in Mode::ALL {
                    let s = stable_seed(p, step, m);
                    assert!(s < 1 << 32);
                    all.insert(s);
                }
            }
        }
        assert_eq!(all.len(), 45);
        let d = Sha256::digest(b"0:1000:greedy");
        assert_eq!(
            stable_seed(0, 1000, Mode::Greedy),
            u32::from_le_bytes([d[0], d[1], d[2], d[3]]) as u64
        );
    }

    #[test]
    fn softmax_entropy_and_topk() {
        let p = softmax(&[0.0, 0.0, 0.0, 0.0], 1.0);
        assert!((entropy(&p) - 4f64.ln()).abs() < 1e-12);
        let p = softmax(&[1.0, 3.0, 2.0, f32::NEG_INFINITY], 1.0);
        assert_eq!(p[3], 0.0);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let t = top_k(&p, 2);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        // e^3 / (e + e^3 + e^2)
        let want = 3f64.exp() / (1f64.exp() + 3f64.exp() + 2f64.exp());
        assert!((t[0].1 - want).abs() < 1e-12);
        // Temperature sharpens/flattens.
        let hot = softmax(&[1.0, 3.0, 2.0], 1.5);
        let cold = softmax(&[1.0, 3.0, 2.0], 0.9);
        assert!(entropy(&hot) > entropy(&cold));
        assert_eq!(top_k(&[0.5, 0.5], 1), vec![(0, 0.5)]);
    }

    #[test]
    fn greedy_is_argmax_and_topk_topp_restrict_the_support() {
        let mut rng = SplitMix64::new(1);
        let logits: Vec<f32> = (0..50).map(|i| -(i as f32) * 0.05).collect();
        assert_eq!(pick_next(&logits, Mode::Greedy, &mut rng), 0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            seen.insert(pick_next(&logits, Mode::Stress, &mut rng));
        }
        assert_eq!(seen, (0..10).collect());
        // Top-p 0.95 on a peaked distribution keeps only the head.
        let peaked = [10.0f32, 7.5, 0.0, 0.0, 0.0, 0.0];
        let probs = softmax(&peaked, 0.9);
        assert!(probs[0] < 0.95 && probs[0] + probs[1] > 0.95);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3000 {
            seen.insert(pick_next(&peaked, Mode::Typical, &mut rng));
        }
        assert_eq!(seen, [0u32, 1].into_iter().collect());
    }

    #[test]
    fn stress_frequencies_follow_the_tempered_distribution() {
        let logits = [2.0f32, 1.0, 0.0];
        let p = softmax(&logits, 1.5);
        let mut rng = SplitMix64::new(99);
        let mut counts = [0usize; 3];
        let n = 60_000;
        for _ in 0..n {
            counts[pick_next(&logits, Mode::Stress, &mut rng) as usize] += 1;
        }
        for i in 0..3 {
            assert!(
                (counts[i] as f64 / n as f64 - p[i]).abs() < 0.01,
                "{counts:?} vs {p:?}"
            );
        }
    }

    #[test]
    fn generation_is_reproducible_from_its_seed_and_stops_at_eos() {
        let mut src = bigram(40);
        let a = generate(&mut src, &[1, 5], Mode::Typical, 42, 50, None).unwrap();
        let b = generate(&mut src, &[1, 5], Mode::Typical, 42, 50, None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.ids.len(), 52);
        assert_eq!(a.entropies.len(), 50);
        assert_eq!(a.detail.len(), DETAILED_POSITIONS);
        let c = generate(&mut src, &[1, 5], Mode::Typical, 43, 50, None).unwrap();
        assert_ne!(a.ids, c.ids);
        // Incremental feeding: the prompt once, then one token per step (a KV cache's usage).
        src.fed = 0;
        generate(&mut src, &[1, 5], Mode::Greedy, 0, 10, None).unwrap();
        assert_eq!(src.fed, 2 + 9);
        // Stop at EOS: make token 3 certain after everything.
        let mut eos = bigram(8);
        for r in &mut eos.rows {
            r[3] = 100.0;
        }
        let g = generate(&mut eos, &[1], Mode::Greedy, 0, 50, Some(3)).unwrap();
        assert_eq!(g.ids, vec![1, 3]);
        let rec = SampleRecord::new(key(7, 0, "x", Mode::Greedy, 0), &g, Some(3), &|ids| {
            format!("{ids:?}")
        });
        assert!(rec.stopped_at_eos);
        assert_eq!(rec.total_tokens, 2);
        assert!(rec.mean_entropy < 1e-6);
    }

    #[test]
    fn record_statistics() {
        let g = Generation {
            ids: vec![1, 9, 7, 7, 7, 2],
            prompt_len: 2,
            entropies: vec![1.0, 2.0, 3.0, 4.0],
            detail: vec![(1.0, vec![(7, 0.5)]), (3.0, vec![(7, 0.9), (2, 0.1)])],
        };
        let r = SampleRecord::new(
            key(1000, 3, "The capital of France", Mode::Stress, 5),
            &g,
            Some(2),
            &|ids| {
                ids.iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            },
        );
        assert_eq!(
            (r.max_repetition, r.unique_tokens, r.total_tokens),
            (3, 4, 6)
        );
        assert_eq!(r.new_tokens, 4);
        assert_eq!(r.mean_entropy, 2.0);
        assert_eq!(r.mean_entropy_all, 2.5);
        assert_eq!(r.completion_text, "7,7,7,2");
        assert_eq!(r.logits_first_10[1].top5_tokens, vec!["7", "2"]);
        assert_eq!(r.top_k, Some(10));
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "step",
            "prompt",
            "mode",
            "seed",
            "generated_text",
            "generated_ids",
            "mean_entropy",
            "max_repetition",
            "unique_tokens",
            "total_tokens",
            "logits_first_10",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        for key in ["pos", "entropy", "top5_tokens", "top5_probs"] {
            assert!(v["logits_first_10"][0].get(key).is_some(), "{key}");
        }
    }
}
