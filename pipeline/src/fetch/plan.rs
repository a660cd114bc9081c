//! How much to download for a token budget, and whether the disk can hold it.
//!
//! FineWeb-Edu's `token_count` column is the GPT-2 token count of each document. On the first
//! file we tokenize a sample of documents with the LLaMA-2 tokenizer to get the LLaMA-2/GPT-2
//! ratio; then a file holds about `sum(token_count) * ratio + 2 * rows` pipeline tokens (each
//! document also gets `<s>` and `</s>`), and a file not yet downloaded about its size times the
//! tokens per parquet byte seen so far. The plan walks the pipeline's file order until the
//! estimate covers the budget. It is only an estimate: the pipeline stops asking for files when
//! the budget is really covered, and asks for more when it is short.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int32Type, Int64Type, UInt32Type, UInt64Type};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::FetchError;
use crate::tokenize::Tokenizer;

/// Text tokenized on the first file to measure the LLaMA-2/GPT-2 ratio (about 1 s of work).
pub const RATIO_SAMPLE_BYTES: usize = 1 << 20;

/// What the parquet metadata and `token_count` column say about one file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FileCounts {
    pub rows: u64,
    /// Sum of `token_count` (GPT-2 tokens); `None` when the file has no such column.
    pub gpt2_tokens: Option<u64>,
}

/// LLaMA-2 ids per GPT-2 token, measured on a sample of documents.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ratio {
    pub docs: u64,
    pub text_bytes: u64,
    pub llama_ids: u64,
    pub gpt2_tokens: u64,
}

impl Ratio {
    pub fn value(&self) -> f64 {
        self.llama_ids as f64 / self.gpt2_tokens.max(1) as f64
    }
}

/// Row count (from the footer) and the `token_count` sum of a parquet file.
pub fn file_counts(path: &Path) -> Result<FileCounts> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
    let schema = builder.parquet_schema();
    let Some(col) = schema
        .columns()
        .iter()
        .position(|c| c.path().parts() == ["token_count"])
    else {
        return Ok(FileCounts {
            rows,
            gpt2_tokens: None,
        });
    };
    let mask = ProjectionMask::leaves(schema, [col]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(65_536)
        .build()
        .with_context(|| format!("{}: cannot read token_count", path.display()))?;
    let mut sum = 0u64;
    for batch in reader {
        let batch =
            batch.with_context(|| format!("{}: cannot read token_count", path.display()))?;
        sum += int_sum(batch.column(0).as_ref()).unwrap_or(0);
    }
    Ok(FileCounts {
        rows,
        gpt2_tokens: Some(sum),
    })
}

fn int_at(col: &dyn Array, i: usize) -> Option<u64> {
    if col.is_null(i) {
        return Some(0);
    }
    Some(match col.data_type() {
        DataType::Int64 => col.as_primitive::<Int64Type>().value(i).max(0) as u64,
        DataType::Int32 => col.as_primitive::<Int32Type>().value(i).max(0) as u64,
        DataType::UInt64 => col.as_primitive::<UInt64Type>().value(i),
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(i) as u64,
        _ => return None,
    })
}

fn int_sum(col: &dyn Array) -> Option<u64> {
    (0..col.len()).map(|i| int_at(col, i)).sum()
}

fn text_at(col: &dyn Array, i: usize) -> Option<&str> {
    if col.is_null(i) {
        return Some("");
    }
    match col.data_type() {
        DataType::Utf8 => Some(col.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => Some(col.as_string::<i64>().value(i)),
        DataType::Utf8View => Some(col.as_string_view().value(i)),
        _ => None,
    }
}

/// Tokenizes the first documents of `path` (up to `sample_bytes` of text) and compares with
/// their `token_count`. `None` when the file has no `token_count` column.
pub fn measure_ratio(
    path: &Path,
    tokenizer: &Tokenizer,
    sample_bytes: usize,
) -> Result<Option<Ratio>> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let schema = builder.parquet_schema();
    let find = |name: &str| {
        schema
            .columns()
            .iter()
            .position(|c| c.path().parts() == [name])
    };
    let (Some(text), Some(count)) = (find("text"), find("token_count")) else {
        return Ok(None);
    };
    let mask = ProjectionMask::leaves(schema, [text, count]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(256)
        .build()
        .with_context(|| format!("{}: cannot read text/token_count", path.display()))?;
    let mut r = Ratio {
        docs: 0,
        text_bytes: 0,
        llama_ids: 0,
        gpt2_tokens: 0,
    };
    let mut ids = Vec::new();
    'batches: for batch in reader {
        let batch =
            batch.with_context(|| format!("{}: cannot read a row group", path.display()))?;
        // Projection keeps schema order: text comes before token_count in FineWeb-Edu, but look
        // the columns up by name rather than trust that.
        let (Some(t), Some(c)) = (
            batch.column_by_name("text"),
            batch.column_by_name("token_count"),
        ) else {
            return Ok(None);
        };
        for i in 0..batch.num_rows() {
            let (Some(doc), Some(gpt2)) = (text_at(t.as_ref(), i), int_at(c.as_ref(), i)) else {
                return Ok(None);
            };
            if doc.is_empty() {
                continue;
            }
            ids.clear();
            tokenizer.encode(doc, &mut ids)?;
            r.docs += 1;
            r.text_bytes += doc.len() as u64;
            r.llama_ids += ids.len() as u64;
            r.gpt2_tokens += gpt2;
            if r.text_bytes as usize >= sample_bytes {
                break 'batches;
            }
        }
    }
    Ok((r.gpt2_tokens > 0).then_some(r))
}

/// Per-file token estimates, refined as files arrive.
#[derive(Debug, Clone)]
pub struct Estimator {
    ratio: f64,
    /// Sum over files with known counts: (estimated tokens, parquet bytes).
    known_tokens: f64,
    known_bytes: u64,
}

impl Estimator {
    pub fn new(ratio: f64) -> Self {
        Estimator {
            ratio,
            known_tokens: 0.0,
            known_bytes: 0,
        }
    }

    pub fn ratio(&self) -> f64 {
        self.ratio
    }

    /// Pipeline tokens (ids plus `<s>`/`</s>`) in a file with these counts.
    pub fn tokens_in(&self, counts: FileCounts) -> Option<f64> {
        counts
            .gpt2_tokens
            .map(|g| g as f64 * self.ratio + 2.0 * counts.rows as f64)
    }

    /// Records a downloaded file; returns its estimate.
    pub fn observe(&mut self, counts: FileCounts, size: u64) -> Option<f64> {
        let t = self.tokens_in(counts)?;
        self.known_tokens += t;
        self.known_bytes += size;
        Some(t)
    }

    pub fn tokens_per_byte(&self) -> f64 {
        self.known_tokens / self.known_bytes.max(1) as f64
    }

    /// Estimate for a file not downloaded yet, from its size.
    pub fn guess(&self, size: u64) -> f64 {
        size as f64 * self.tokens_per_byte()
    }
}

/// One disk the plan writes to, and what it needs there.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskNeed {
    pub dir: PathBuf,
    pub needed: u64,
    pub free: u64,
}

/// Free bytes for an unprivileged user on the filesystem holding `dir` (or its nearest
/// existing ancestor), and that filesystem's device id.
pub fn free_space(dir: &Path) -> Result<(u64, u64)> {
    crate::disk::free_space(dir).with_context(|| format!("statvfs {}", dir.display()))
}

/// Adds up what each filesystem must hold and refuses if one cannot.
pub fn check_disk(needs: &[(PathBuf, u64)]) -> Result<Vec<DiskNeed>> {
    let mut by_dev: Vec<(u64, DiskNeed)> = Vec::new();
    for (dir, bytes) in needs {
        let (free, dev) = free_space(dir)?;
        match by_dev.iter_mut().find(|(d, _)| *d == dev) {
            Some((_, need)) => need.needed += bytes,
            None => by_dev.push((
                dev,
                DiskNeed {
                    dir: dir.clone(),
                    needed: *bytes,
                    free,
                },
            )),
        }
    }
    for (_, need) in &by_dev {
        if need.needed > need.free {
            return Err(FetchError::DiskFull {
                dir: need.dir.clone(),
                needed: need.needed,
                free: need.free,
            }
            .into());
        }
    }
    Ok(by_dev.into_iter().map(|(_, n)| n).collect())
}

pub use crate::disk::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/fineweb-edu-sample/sample/10BT")
            .join(name)
    }

    #[test]
    fn counts_and_ratio_on_the_shipped_sample() {
        let counts = file_counts(&sample("000_00000.parquet")).unwrap();
        assert_eq!(counts.rows, 819);
        let gpt2 = counts.gpt2_tokens.unwrap();
        assert!(gpt2 > 100_000, "{gpt2}");

        let tok = Tokenizer::load(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures/tokenizer/tokenizer.json"),
        )
        .unwrap();
        let r = measure_ratio(&sample("000_00000.parquet"), &tok, 200_000)
            .unwrap()
            .unwrap();
        assert!(r.text_bytes >= 200_000 && r.docs > 0);
        // LLaMA-2's 32k vocabulary splits text finer than GPT-2's 50k.
        assert!((0.9..2.0).contains(&r.value()), "ratio {}", r.value());

        let mut e = Estimator::new(r.value());
        let t = e.observe(counts, 4_072_588).unwrap();
        assert!((t - (gpt2 as f64 * r.value() + 2.0 * 819.0)).abs() < 1e-6);
        assert!((e.guess(4_072_588) - t).abs() < 1e-3);
    }

    #[test]
    fn disk_check_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let (free, _) = free_space(dir.path()).unwrap();
        assert!(check_disk(&[(dir.path().to_owned(), 1)]).is_ok());
        let err = check_disk(&[
            (dir.path().join("not/yet/there"), free / 2 + 1),
            (dir.path().to_owned(), free / 2 + 1),
        ])
        .unwrap_err();
        let e = err.downcast_ref::<FetchError>().expect("a FetchError");
        assert!(matches!(e, FetchError::DiskFull { .. }), "{e}");
        assert!(e.to_string().contains("hint:"));
    }
}
