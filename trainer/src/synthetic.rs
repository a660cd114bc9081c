//! Synthetic datasets in the real shard format (`pipeline::format`), for tests, demos and the
//! data-loader benchmark on machines without prepared FineWeb-Edu shards.
//!
//! Two token patterns: [`Pattern::Position`] (token = global position mod vocab, so any offset or
//! ordering bug shows in the values, as in llm.c's `test_dataloader.c`) and [`Pattern::Learnable`]
//! (each sequence is a walk `x_{t+1} = (a * x_t + c) mod vocab` from a pseudo-random start: the
//! next token is a function of the current one, so a model can drive the loss towards zero).

use std::path::Path;

use pipeline::format::manifest::{
    DatasetInfo, Fingerprint, PipelineInfo, TokenizerInfo, dataset_sha256, token_ids_sha256,
};
use pipeline::format::shard::ShardWriter;
use pipeline::format::{FORMAT_VERSION, Manifest, ShardEntry, ShardHeader, Split, SplitInfo};
use pipeline::rng::mix64;

/// Token pattern of a synthetic dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    /// token = (sequence index * seq_len + position) mod vocab.
    Position,
    /// A deterministic affine walk per sequence; learnable next-token structure.
    Learnable,
}

/// What to write.
#[derive(Debug, Clone)]
pub struct SyntheticSpec {
    pub seq_len: u32,
    pub vocab_size: u32,
    pub train_sequences: u64,
    pub eval_sequences: u64,
    pub sequences_per_shard: u64,
    /// Recorded in the manifest; the trainer compares it with `data.tokenizer_sha256`.
    pub tokenizer_sha256: String,
    pub pattern: Pattern,
}

/// Fills `out` with sequence `seq` of `split`.
fn fill(spec: &SyntheticSpec, split: Split, seq: u64, out: &mut [u16]) {
    let v = spec.vocab_size as u64;
    let seq = seq + if split == Split::Eval { 1 << 40 } else { 0 };
    let mut x = mix64(seq) % v;
    for (pos, t) in out.iter_mut().enumerate() {
        *t = match spec.pattern {
            Pattern::Position => ((seq * spec.seq_len as u64 + pos as u64) % v) as u16,
            Pattern::Learnable => {
                let now = x as u16;
                x = (5 * x + 3) % v;
                now
            }
        };
    }
}

fn write_split(
    dir: &Path,
    spec: &SyntheticSpec,
    split: Split,
    n: u64,
) -> std::io::Result<SplitInfo> {
    let mut shards = Vec::new();
    let mut first = 0u64;
    let mut index = 0u64;
    while first < n {
        let count = spec.sequences_per_shard.min(n - first);
        let file = split.shard_file_name(index as usize);
        let header = ShardHeader {
            format_version: FORMAT_VERSION,
            split,
            seq_len: spec.seq_len,
            vocab_size: spec.vocab_size,
            bos_id: 1,
            eos_id: 2,
            shard_index: index,
            num_sequences: 0,
            first_sequence: first,
            payload_sha256: [0; 32],
        };
        let mut w = ShardWriter::create(&dir.join(&file), header)?;
        let mut seq = vec![0u16; spec.seq_len as usize];
        for s in first..first + count {
            fill(spec, split, s, &mut seq);
            w.push(&seq)?;
        }
        let h = w.finish()?;
        shards.push(ShardEntry {
            file,
            sequences: h.num_sequences,
            sha256: h.payload_sha256_hex(),
            first_sequence: first,
            bytes: h.file_bytes(),
        });
        first += count;
        index += 1;
    }
    Ok(SplitInfo {
        sequences: n,
        tokens: n * spec.seq_len as u64,
        documents: n,
        text_bytes: 0,
        shards,
    })
}

/// Writes shards and `manifest.json` into `dir` (created if needed); returns the manifest.
pub fn write_dataset(dir: &Path, spec: &SyntheticSpec) -> std::io::Result<Manifest> {
    std::fs::create_dir_all(dir)?;
    let train = write_split(dir, spec, Split::Train, spec.train_sequences)?;
    let eval = write_split(dir, spec, Split::Eval, spec.eval_sequences)?;
    let mut first = Vec::new();
    let mut seq = vec![0u16; spec.seq_len as usize];
    for s in 0..spec.train_sequences {
        if first.len() >= 1000 {
            break;
        }
        fill(spec, Split::Train, s, &mut seq);
        first.extend_from_slice(&seq);
    }
    first.truncate(1000);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        seq_len: spec.seq_len,
        vocab_size: spec.vocab_size,
        bos_id: 1,
        eos_id: 2,
        seed: 0,
        sequences_per_shard: spec.sequences_per_shard,
        tokenizer: TokenizerInfo {
            source: "synthetic".into(),
            sha256: spec.tokenizer_sha256.clone(),
            bundled: false,
        },
        dataset: DatasetInfo {
            repo: "synthetic".into(),
            revision: "local".into(),
            files: Vec::new(),
        },
        fingerprint: Fingerprint {
            first_1000_token_ids_sha256: token_ids_sha256(&first),
            dataset_sha256: dataset_sha256(&train, &eval),
        },
        train,
        eval,
        pipeline: PipelineInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            git_commit: "synthetic".into(),
            config: serde_json::json!({ "pattern": format!("{:?}", spec.pattern) }),
        },
    };
    manifest.save(dir)?;
    Ok(manifest)
}
