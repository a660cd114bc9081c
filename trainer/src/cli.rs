//! The `trainer` command line: `run`, `params`, `data-order`, `batch`, `bench`, `bench-data`,
//! `synthetic-shards`, `eval`, `sample`, `report`, `export`, `logits`.
//! Flags are paths and run-level switches; hyper-parameters live in the config file.

use std::ops::Range;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

use crate::bench::{self, BenchOptions};
use crate::config::{Backward, Config};
use crate::data::{DataOrder, batch_hash};
use crate::device_check::{self, DeviceCheckOptions};
use crate::export::{self, ExportOptions, LogitsOptions};
use crate::instrument::{commands, sample::Mode};
use crate::model::{group_thousands, parameter_breakdown, parameter_count};
use crate::setup::{self, DEFAULT_CONFIG, DeviceChoice, Resume, RunOptions};
use crate::synthetic::{Pattern, SyntheticSpec, write_dataset};
use crate::train;

#[derive(Debug, Parser)]
#[command(
    name = "trainer",
    version,
    about = "Train BitNet b1.58 on memory-mapped token shards"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train (or resume) a model; checkpoints go to RUN_DIR/RUN_ID/checkpoints/.
    Run {
        /// Dataset folder made by `pipeline prepare` (manifest.json + shards).
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        /// Run config [default: configs/bitnet-95m.toml; on resume, the checkpoint's own config].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Folder of runs (or, with --resume latest, one run folder).
        #[arg(long, default_value = "runs")]
        run_dir: PathBuf,
        /// Stop once N updates are done (counted from the start of the run), writing step_N.
        /// The schedule still follows total_steps.
        #[arg(long)]
        steps: Option<u64>,
        /// `latest` or a checkpoint folder runs/RUN_ID/checkpoints/step_NNNNNN.
        #[arg(long)]
        resume: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Do not re-hash the shard payloads (by default every train and eval payload is checked
        /// against the manifest on a background thread, and a mismatch stops the run before its
        /// first checkpoint after step 0).
        #[arg(long)]
        no_verify_data: bool,
    },
    /// Print the parameter count, layer by layer.
    Params {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print which train sequences each step reads and a sha256 of each batch's tokens (the
    /// `batch_sha256` of that step in metrics/scalars.jsonl).
    DataOrder {
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Steps to show, counted from 1 as in scalars.jsonl: `A..B` (B excluded) or one step `N`.
        #[arg(long, default_value = "1..11")]
        steps: String,
    },
    /// Print the batch of one step (counted from 1, as in metrics/scalars.jsonl): each train
    /// sequence and the documents it holds (id, source file, row, token range), from the
    /// dataset's documents.jsonl.zst (indexed once into documents.idx for fast lookups).
    Batch {
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        /// The run's config (its seed and batch_size decide the batch).
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        step: u64,
        /// Also print the text of each document's tokens in the sequence.
        #[arg(long)]
        decode: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Time training steps on random tokens (no data): median ms/step, tokens/s, MFU.
    Bench {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed warm-up steps.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Sequences per step [default: the config's batch_size].
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
        /// Peak dense bf16 TFLOP/s of the device, to report MFU (e.g. 989 for H100/H200 SXM).
        #[arg(long)]
        peak_tflops: Option<f64>,
        /// How the gradients are computed [default: the config's training.backward].
        #[arg(long, value_enum)]
        backward: Option<Backward>,
    },
    /// Compare one forward/backward on --device against the CPU (same weights, same batch): loss
    /// within one bf16 ulp, every gradient's cosine > 0.99. Prints JSON; exits non-zero on failure.
    CheckDevice {
        #[arg(long, default_value = "configs/tiny.toml")]
        config: PathBuf,
        /// Sequences in the batch [default: the config's batch_size].
        #[arg(long)]
        batch: Option<usize>,
        /// Seed of the random tokens.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value = "cuda")]
        device: DeviceChoice,
    },
    /// Time the data loader alone (what the prefetch thread does per step).
    BenchData {
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Batches to load.
        #[arg(long, default_value_t = 200)]
        batches: u64,
    },
    /// Write a synthetic dataset in the shard format (benchmarks and demos without FineWeb-Edu).
    SyntheticShards {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1024)]
        seq_len: u32,
        #[arg(long, default_value_t = 32000)]
        vocab_size: u32,
        /// Train sequences (the eval split gets 1%).
        #[arg(long, default_value_t = 10_000)]
        sequences: u64,
        #[arg(long, default_value_t = 4096)]
        sequences_per_shard: u64,
        #[arg(long, value_enum, default_value = "learnable")]
        pattern: Pattern,
        /// Tokenizer hash to record [default: the LLaMA-2 tokenizer.json of the configs].
        #[arg(
            long,
            default_value = "bcd04f0eadf90287bd26e1a183ac487d8a141b09b06aecb7725bbdd343640f2e"
        )]
        tokenizer_sha256: String,
    },
    /// Frozen eval of one checkpoint over the eval split: loss, perplexity, bits per byte.
    Eval {
        /// A checkpoint folder runs/RUN_ID/checkpoints/step_NNNNNN.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        /// Print one JSON object (the eval_results.jsonl record) instead of a line of text.
        #[arg(long)]
        json: bool,
        /// Sequences per forward pass [default: the run's eval_batch_size].
        #[arg(long)]
        batch_size: Option<usize>,
        /// Evaluate only the first N eval sequences [default: the run's eval_sequences or all].
        #[arg(long)]
        sequences: Option<u64>,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Generate text from a checkpoint with the KV cache (the code of samples.jsonl).
    Sample {
        #[arg(long)]
        checkpoint: PathBuf,
        /// Shard folder whose tokenizer.json encodes the prompt.
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        #[arg(long)]
        prompt: String,
        /// greedy | typical (T 0.9, top-p 0.95) | stress (T 1.5, top-k 10).
        #[arg(long, default_value = "typical")]
        mode: Mode,
        #[arg(long, default_value_t = 50)]
        max_new_tokens: usize,
        /// Sampling seed [default: the stable seed of (prompt 0, checkpoint step, mode)].
        #[arg(long)]
        seed: Option<u64>,
        /// Print the whole samples.jsonl record as JSON.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceChoice,
    },
    /// Plots (PNG) and a markdown summary of a run folder into runs/RUN_ID/report/.
    Report {
        /// The run folder runs/RUN_ID.
        run: PathBuf,
    },
    /// Write a checkpoint as a Hugging Face transformers folder (weights, config, tokenizer,
    /// model card) that AutoModelForCausalLM and AutoTokenizer load.
    Export {
        /// A checkpoint folder runs/RUN_ID/checkpoints/step_NNNNNN.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Dataset folder the run trained on (its tokenizer.json goes into the export).
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        /// Folder to create; it appears only once complete.
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Write a checkpoint's logits for shard sequences (CPU, f32) to a safetensors file with
    /// `tokens` [n, seq_len] and `logits` [n, seq_len, vocab], to compare other implementations
    /// (e.g. an export loaded in transformers) against.
    Logits {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long, default_value = "shards")]
        shards: PathBuf,
        #[arg(long, value_enum, default_value = "eval")]
        split: SplitArg,
        /// Sequence indices of the split: `A..B` (B excluded) or one index `N`.
        #[arg(long, default_value = "0..4")]
        sequences: String,
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--split` of `trainer logits`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SplitArg {
    Train,
    Eval,
}

/// Parses `A..B` or `N` of `--steps`.
pub fn parse_step_range(s: &str) -> Result<Range<u64>> {
    parse_range("--steps", "a step number", s)
}

/// Parses `A..B` (B excluded, A < B) or `N` (`N..N+1`) given to `flag`; `what` names one number.
fn parse_range(flag: &str, what: &str, s: &str) -> Result<Range<u64>> {
    let parse = |x: &str| {
        x.trim()
            .parse::<u64>()
            .with_context(|| format!("{flag} `{s}`: `{x}` is not {what}; hint: use A..B or N"))
    };
    match s.split_once("..") {
        Some((a, b)) => {
            let r = parse(a)?..parse(b)?;
            if r.is_empty() {
                bail!("{flag} `{s}` is empty; hint: A..B with A < B");
            }
            Ok(r)
        }
        None => {
            let n = parse(s)?;
            Ok(n..n + 1)
        }
    }
}

/// The `trainer` binary: tunes the allocator, sets up logging to stderr, parses the command
/// line, runs the command, prints the error chain and exits non-zero on failure.
pub fn main() -> std::process::ExitCode {
    setup::tune_allocator();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            shards,
            config,
            run_dir,
            steps,
            resume,
            device,
            no_verify_data,
        } => {
            let resume = resume.map(|r| match r.as_str() {
                "latest" => Resume::Latest,
                path => Resume::Checkpoint(PathBuf::from(path)),
            });
            setup::install_sigint_handler();
            let opts = RunOptions {
                shards,
                config,
                run_dir,
                steps,
                resume,
                device,
                verify_data: !no_verify_data,
            };
            let summary = train::run(&opts)?;
            println!("{}", summary.last_checkpoint.display());
        }
        Command::Params { config } => {
            let cfg = Config::load(&config)?;
            print!("{}", parameter_breakdown(&cfg.model));
            println!(
                "embedding: {} | non-embedding: {}",
                group_thousands((cfg.model.vocab_size * cfg.model.hidden_size) as u64),
                group_thousands(
                    (parameter_count(&cfg.model) - cfg.model.vocab_size * cfg.model.hidden_size)
                        as u64
                )
            );
        }
        Command::DataOrder {
            shards,
            config,
            steps,
        } => {
            let cfg = Config::load(&config)?;
            let range = parse_step_range(&steps)?;
            let s = setup::open_shards(&shards, &cfg)?;
            let order = DataOrder::new(cfg.training.seed, s.data.num_sequences());
            let b = cfg.training.batch_size;
            if range.start == 0 {
                bail!(
                    "--steps {steps}: step 0 is the initial weights and reads no batch; hint: steps count updates from 1, as in metrics/scalars.jsonl"
                );
            }
            if (range.end - 1) * b as u64 > order.len() {
                bail!(
                    "--steps {steps}: step {} needs sequences beyond the {} the shards hold",
                    range.end - 1,
                    order.len()
                );
            }
            for step in range {
                let idx = order.batch(step, b);
                let hash = batch_hash(&s.data.load(&idx));
                let list: Vec<String> = idx.iter().map(u64::to_string).collect();
                println!("step {step} sha256 {hash} sequences {}", list.join(","));
            }
        }
        Command::Batch {
            shards,
            config,
            step,
            decode,
            json,
        } => {
            let r = commands::batch_documents(&commands::BatchOptions {
                shards,
                config,
                step,
                decode,
            })?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{}", commands::format_batch(&r));
            }
        }
        Command::Bench {
            config,
            steps,
            warmup,
            batch,
            device,
            peak_tflops,
            backward,
        } => {
            let r = bench::bench(&BenchOptions {
                config,
                steps,
                warmup,
                batch,
                device,
                peak_tflops,
                backward,
            })?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::CheckDevice {
            config,
            batch,
            seed,
            device,
        } => {
            let r = device_check::check_device(&DeviceCheckOptions {
                config,
                batch,
                seed,
                device,
            })?;
            println!("{}", serde_json::to_string(&r)?);
            if !r.passed {
                bail!(
                    "check-device: {} disagrees with the CPU (loss rel diff {:.2e}, tol {:.2e}; min gradient cosine {:.4} at `{}`, min {})",
                    r.device,
                    r.loss_rel_diff,
                    r.loss_rel_tol,
                    r.min_grad_cosine,
                    r.min_grad_cosine_tensor,
                    r.grad_cosine_min
                );
            }
        }
        Command::BenchData {
            shards,
            config,
            batches,
        } => {
            let r = bench::bench_data(&shards, &config, batches)?;
            println!("{}", serde_json::to_string(&r)?);
        }
        Command::SyntheticShards {
            out,
            seq_len,
            vocab_size,
            sequences,
            sequences_per_shard,
            pattern,
            tokenizer_sha256,
        } => {
            let spec = SyntheticSpec {
                seq_len,
                vocab_size,
                train_sequences: sequences,
                eval_sequences: sequences.div_ceil(100),
                sequences_per_shard,
                tokenizer_sha256,
                pattern,
            };
            write_dataset(&out, &spec).with_context(|| format!("writing {}", out.display()))?;
            println!("{}", out.display());
        }
        Command::Eval {
            checkpoint,
            shards,
            json,
            batch_size,
            sequences,
            device,
        } => {
            let r = commands::eval_checkpoint(&checkpoint, &shards, device, batch_size, sequences)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", commands::format_eval(&r));
            }
        }
        Command::Sample {
            checkpoint,
            shards,
            prompt,
            mode,
            max_new_tokens,
            seed,
            json,
            device,
        } => {
            let o = commands::SampleOptions {
                checkpoint,
                shards,
                prompt,
                mode,
                max_new_tokens,
                seed,
            };
            let r = commands::sample_checkpoint(&o, device)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", r.generated_text);
                eprintln!(
                    "step {} | {} | seed {} | {} new tokens | mean entropy {:.3} | max repetition {}",
                    r.step, r.mode, r.seed, r.new_tokens, r.mean_entropy_all, r.max_repetition
                );
            }
        }
        Command::Export {
            checkpoint,
            shards,
            out,
            force,
        } => {
            let r = export::export(&ExportOptions {
                checkpoint,
                shards,
                out,
                force,
            })?;
            eprintln!(
                "step {} as {} ({} files)",
                r.step,
                r.architecture,
                r.files.len()
            );
            println!("{}", r.out.display());
        }
        Command::Logits {
            checkpoint,
            shards,
            split,
            sequences,
            out,
        } => {
            let range = parse_range("--sequences", "a sequence index", &sequences)?;
            let loss = export::dump_logits(&LogitsOptions {
                checkpoint,
                shards,
                split: match split {
                    SplitArg::Train => pipeline::format::Split::Train,
                    SplitArg::Eval => pipeline::format::Split::Eval,
                },
                sequences: range,
                out: out.clone(),
            })?;
            eprintln!("mean next-token loss {loss:.4}");
            println!("{}", out.display());
        }
        Command::Report { run } => {
            let out = commands::report_run(&run)?;
            for p in &out.plots {
                println!("{}", p.display());
            }
            println!("{}", out.summary.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ranges() {
        assert_eq!(parse_step_range("0..10").unwrap(), 0..10);
        assert_eq!(parse_step_range("7").unwrap(), 7..8);
        assert!(parse_step_range("5..5").is_err());
        assert!(
            parse_step_range("x..5")
                .unwrap_err()
                .to_string()
                .contains("`x`")
        );
    }
}
