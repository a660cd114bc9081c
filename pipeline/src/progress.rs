//! Progress of the tokenizing stage: indicatif bars when stderr is a terminal (files, then
//! tokens with documents, MB/s and ETA), otherwise one plain line every few seconds, so logs of
//! unattended runs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// How often the plain (non-terminal) progress line is printed.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// Counters shown by the progress display.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counts {
    pub files_done: u64,
    pub documents: u64,
    pub tokens: u64,
    /// Text bytes tokenized by this run (resumed work files are not counted).
    pub text_bytes: u64,
}

pub struct Progress {
    bars: Option<(MultiProgress, ProgressBar, ProgressBar)>,
    files_total: u64,
    tokens_needed: u64,
    start: Instant,
    last_line: Instant,
    counts: Counts,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// `files_total`: files in the source; `tokens_needed`: train + eval tokens to collect.
    pub fn new(files_total: u64, tokens_needed: u64) -> Self {
        let bars = std::io::stderr().is_terminal().then(|| {
            // Shared with the hub's download bars, so both draw on the same terminal lines.
            let multi = crate::fetch::progress_bars();
            let files = multi.add(
                ProgressBar::new(files_total).with_style(
                    ProgressStyle::with_template("files  {bar:30} {pos}/{len} {msg}")
                        .expect("valid template"),
                ),
            );
            let tokens = multi.add(
                ProgressBar::new(tokens_needed).with_style(
                    ProgressStyle::with_template(
                        "tokens {bar:30} {human_pos}/{human_len} {msg} eta {eta}",
                    )
                    .expect("valid template"),
                ),
            );
            (multi, files, tokens)
        });
        let now = Instant::now();
        Progress {
            bars,
            files_total,
            tokens_needed,
            start: now,
            last_line: now,
            counts: Counts::default(),
        }
    }

    pub fn file_started(&mut self, name: &str) {
        if let Some((_, files, _)) = &self.bars {
            files.set_message(name.to_owned());
        } else {
            tracing::info!("tokenizing {name}");
        }
    }

    pub fn update(&mut self, counts: Counts) {
        self.counts = counts;
        let mbs = self.mb_per_s();
        match &self.bars {
            Some((_, files, tokens)) => {
                files.set_position(counts.files_done);
                tokens.set_position(counts.tokens.min(self.tokens_needed));
                tokens.set_message(format!("| {} docs | {mbs:.1} MB/s", counts.documents));
            }
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                let pct = 100.0 * counts.tokens as f64 / self.tokens_needed.max(1) as f64;
                eprintln!(
                    "tokenize: files {}/{} | {} docs | {}/{} tokens ({pct:.1}%) | {mbs:.1} MB/s",
                    counts.files_done,
                    self.files_total,
                    counts.documents,
                    counts.tokens,
                    self.tokens_needed
                );
            }
            None => {}
        }
    }

    fn mb_per_s(&self) -> f64 {
        self.counts.text_bytes as f64 / 1e6 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// Runs `f` with the bars hidden, so log lines do not tear them.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bars {
            Some((multi, _, _)) => multi.suspend(f),
            None => f(),
        }
    }

    pub fn finish(self) {
        if let Some((multi, files, tokens)) = self.bars {
            files.finish_and_clear();
            tokens.finish_and_clear();
            let _ = multi.clear();
        }
    }
}
