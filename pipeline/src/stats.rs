//! The end-of-run summary: printed as a table and saved as `stats.json` next to the shards
//! ([`crate::format::STATS_FILE`]).

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Source files whose documents were read (all runs of this dataset).
    pub files_read: u64,
    /// Rows read from those files.
    pub documents_read: u64,
    /// Documents with text (rows minus empty documents).
    pub documents_kept: u64,
    /// Empty or null texts, skipped.
    pub documents_skipped_empty: u64,
    pub train_sequences: u64,
    pub train_tokens: u64,
    pub train_documents: u64,
    pub eval_sequences: u64,
    pub eval_tokens: u64,
    pub eval_documents: u64,
    /// Bytes of all shard files.
    pub shard_bytes: u64,
    /// Shards written by this run (the others were already complete on disk).
    pub shards_written: u64,
    /// Source files tokenized by this run (the others were resumed from finished work files).
    pub files_tokenized: u64,
    /// Text tokenized by this run (files resumed from work files are not counted).
    pub text_bytes_tokenized: u64,
    pub tokens_tokenized: u64,
    /// From the first source file opened until the last work file was finished: decoding,
    /// hashing, writing, and the assembly of every file but the last, which runs beside it.
    pub tokenize_seconds: f64,
    /// The whole `prepare` call, including the last file's assembly and the final files.
    pub wall_seconds: f64,
    pub text_mb_per_s: f64,
    pub tokens_per_s: f64,
    pub threads: usize,
}

impl Stats {
    /// The summary as an aligned two-column table.
    pub fn table(&self) -> String {
        let rows: Vec<(&str, String)> = vec![
            ("files read", self.files_read.to_string()),
            ("documents read", self.documents_read.to_string()),
            ("documents kept", self.documents_kept.to_string()),
            (
                "documents skipped (empty)",
                self.documents_skipped_empty.to_string(),
            ),
            (
                "train",
                format!(
                    "{} sequences, {} tokens, {} documents",
                    self.train_sequences, self.train_tokens, self.train_documents
                ),
            ),
            (
                "eval",
                format!(
                    "{} sequences, {} tokens, {} documents",
                    self.eval_sequences, self.eval_tokens, self.eval_documents
                ),
            ),
            (
                "shard bytes",
                format!("{} ({} written now)", self.shard_bytes, self.shards_written),
            ),
            ("wall time", format!("{:.1} s", self.wall_seconds)),
            (
                "tokenized now",
                format!(
                    "{:.1} MB text, {} tokens in {:.1} s on {} threads",
                    self.text_bytes_tokenized as f64 / 1e6,
                    self.tokens_tokenized,
                    self.tokenize_seconds,
                    self.threads
                ),
            ),
            (
                "speed",
                format!(
                    "{:.2} MB/s text, {:.0} tokens/s",
                    self.text_mb_per_s, self.tokens_per_s
                ),
            ),
        ];
        let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        rows.iter()
            .map(|(k, v)| format!("{k:<w$}  {v}\n"))
            .collect()
    }
}
