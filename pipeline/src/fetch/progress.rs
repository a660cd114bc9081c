//! Download progress: an indicatif bar (bytes, MB/s, ETA) on a terminal, otherwise one plain
//! `tracing` line every few seconds, the same split the tokenization progress uses.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the plain (non-terminal) progress line is written.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

/// The process's one set of terminal bars: download bars and the pipeline's tokenizing bars are
/// added to it, so they draw together instead of overwriting each other.
pub fn bars() -> MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()))
        .clone()
}

pub(crate) struct DownloadProgress {
    name: String,
    total: u64,
    done: u64,
    /// Bytes already on disk when this run started (a resumed download), excluded from the rate.
    resumed: u64,
    started: Instant,
    last_line: Instant,
    bar: Option<ProgressBar>,
}

impl DownloadProgress {
    pub(crate) fn new(name: &str, total: u64, already: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = bars().add(ProgressBar::new(total));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
            bar.set_message(short_name(name));
            bar.set_position(already);
            bar.reset_eta();
            bar
        });
        let now = Instant::now();
        DownloadProgress {
            name: name.to_owned(),
            total,
            done: already,
            resumed: already,
            started: now,
            last_line: now,
            bar,
        }
    }

    /// The file on disk now holds `done` bytes (after a write, or after a restart from zero).
    pub(crate) fn set(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= PLAIN_EVERY => {
                self.last_line = Instant::now();
                let secs = self.started.elapsed().as_secs_f64().max(1e-3);
                let rate = self.done.saturating_sub(self.resumed) as f64 / secs;
                let eta = if rate > 0.0 {
                    format!("{:.0}s", self.total.saturating_sub(self.done) as f64 / rate)
                } else {
                    "?".into()
                };
                tracing::info!(
                    "download {}: {} / {}, {:.1} MB/s, ETA {eta}",
                    self.name,
                    super::plan::human_bytes(self.done),
                    super::plan::human_bytes(self.total),
                    rate / 1e6,
                );
            }
            None => {}
        }
    }

    pub(crate) fn finish(self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let fresh = self.done.saturating_sub(self.resumed);
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        tracing::info!(
            "downloaded {} ({}, {:.1} MB/s{})",
            self.name,
            super::plan::human_bytes(self.total),
            fresh as f64 / secs / 1e6,
            if self.resumed > 0 {
                format!(", resumed at {}", super::plan::human_bytes(self.resumed))
            } else {
                String::new()
            }
        );
    }
}

fn short_name(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= 28 {
        name.to_owned()
    } else {
        let tail: String = chars[chars.len() - 26..].iter().collect();
        format!("..{tail}")
    }
}
