//! The command line: `pipeline prepare | verify | inspect` (clap derive), and [`main`], which the
//! thin `main.rs` calls: parse, set up logging to stderr, run, print the error chain on one line.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::budget::parse_tokens;
use crate::format::{Manifest, Split};
use crate::prepare::{self, DEFAULT_SHARD_SEQUENCES, Outcome, PrepareConfig};
use crate::source::{LocalSource, Source};
use crate::tokenize::{Tokenizer, TokenizerSpec};
use crate::{inspect, verify};

#[derive(Debug, Parser)]
#[command(
    name = "pipeline",
    version,
    about = "FineWeb-Edu parquet -> exact LLaMA-2 tokens -> fingerprinted uint16 shards"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tokenize parquet files into train/eval shards with a manifest (resumable).
    Prepare(PrepareArgs),
    /// Re-hash every shard against the manifest; non-zero exit on any mismatch.
    Verify {
        /// Dataset folder.
        #[arg(default_value = "shards")]
        dir: PathBuf,
    },
    /// Summarise a dataset folder, or print one sequence.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Train token budget: 1.97B, 500M, 250K or 1970000000. Train sequences = ceil(tokens / seq_len).
    #[arg(long, default_value = "1.97B", value_parser = parse_tokens)]
    pub tokens: u64,
    /// Output folder for shards, manifest.json, stats.json and the tokenizer copy.
    #[arg(long, default_value = "shards")]
    pub out: PathBuf,
    /// `hub` (HuggingFaceFW/fineweb-edu) or a folder laid out like the hub repo.
    #[arg(long, default_value = "hub")]
    pub source: String,
    /// Hub model repo holding tokenizer.json, or a path to a tokenizer.json [default:
    /// meta-llama/Llama-2-7b-hf; when that gated repo cannot be read (no HF_TOKEN, offline), the
    /// byte-identical copy built into pipeline, recorded as tokenizer.bundled in the manifest].
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// `--dataset`, `--subset`, `--revision`, `--keep-downloads` (for `--source hub`).
    #[command(flatten)]
    pub hub: crate::fetch::HubArgs,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub seq_len: u32,
    /// Sequences in the eval split.
    #[arg(long, default_value_t = 10_000)]
    pub eval_sequences: u64,
    /// Seed of the file and document shuffles.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Tokenizer threads (default: all cores); the output does not depend on it. Parquet decoding
    /// (one thread per 8 tokenizer threads), sha256, work-file writing and shard assembly (as
    /// many threads, mostly idle until the last file) run on threads of their own next to them,
    /// so they overlap the tokenizing.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Tokenizer implementation: `fast` or `reference` (Hugging Face `tokenizers`); both give
    /// identical ids, so the shards are byte-identical.
    #[arg(long, value_enum, default_value = "fast")]
    pub tokenizer_impl: crate::tokenize::Backend,
    /// Replace a complete dataset made with different settings; with the same settings, re-read
    /// every file of it (as `pipeline verify`) and rebuild it if any is damaged.
    #[arg(long)]
    pub force: bool,
    /// Sequences per shard file (the last shard holds fewer).
    #[arg(long, default_value_t = DEFAULT_SHARD_SEQUENCES, hide = true)]
    pub shard_sequences: u64,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Dataset folder.
    #[arg(default_value = "shards")]
    pub dir: PathBuf,
    /// Print the summary as JSON (the manifest).
    #[arg(long)]
    pub json: bool,
    /// Print the token ids of this sequence (0-based) of --split.
    #[arg(long)]
    pub sequence: Option<u64>,
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// With --sequence: print the decoded text instead of ids.
    #[arg(long, requires = "sequence")]
    pub decode: bool,
}

/// Entry point of the `pipeline` binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A bad flag value (`--tokens lots`): one line like every other error; clap's message
        // names the flag and carries our hint, its "For more information" trailer is dropped.
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            eprintln!("{}", e.to_string().lines().next().unwrap_or_default());
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `pipeline inspect ... | head`: the reader left; that is not an error.
        Err(e)
            if e.root_cause()
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            // One line: the whole context chain, outermost first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare(args) => run_prepare(args),
        Command::Verify { dir } => {
            let v = verify::verify(&dir)?;
            println!(
                "ok: {} shards, {} sequences, {} bytes match {}",
                v.shards,
                v.sequences,
                v.bytes,
                Manifest::path(&dir).display()
            );
            Ok(())
        }
        Command::Inspect(args) => run_inspect(args),
    }
}

fn run_prepare(a: PrepareArgs) -> Result<()> {
    one_malloc_arena();
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        bail!("--threads 0: need at least one thread; hint: omit --threads to use all cores");
    }
    // Before anything slow: a second prepare on the same folder fails at once.
    let lock = prepare::lock_out(&a.out)?;
    let (tokenizer, origin) = open_tokenizer(a.tokenizer.as_deref())?;
    let tokenizer = tokenizer.with_backend(a.tokenizer_impl)?;
    let cfg = PrepareConfig {
        tokens: a.tokens,
        out: a.out.clone(),
        seq_len: a.seq_len,
        eval_sequences: a.eval_sequences,
        seed: a.seed,
        threads,
        force: a.force,
        sequences_per_shard: a.shard_sequences,
        tokenizer_source: origin.source,
        tokenizer_bundled: origin.bundled,
    };
    let mut source = open_source(&a, &cfg, &tokenizer)?;
    match prepare::prepare_locked(&cfg, &lock, source.as_mut(), &tokenizer)? {
        Outcome::AlreadyComplete(m) => {
            tracing::info!(
                "{} already holds this dataset ({} train + {} eval sequences); nothing to do",
                a.out.display(),
                m.train.sequences,
                m.eval.sequences
            );
        }
        Outcome::Written { manifest, stats } => {
            eprint!("{}", stats.table());
            tracing::info!(
                "wrote {} (dataset sha256 {})",
                Manifest::path(&a.out).display(),
                manifest.fingerprint.dataset_sha256
            );
        }
    }
    Ok(())
}

/// Makes glibc's malloc use one arena for all threads, before any thread starts. The tokenizing
/// stage hands documents from decoding threads to the tokenizer threads to a writer thread, and
/// per-thread arenas each keep their own peak of freed memory: peak RSS 82-91 MiB against 77-82
/// MiB with one arena on 12 and 24 sample files, at the same speed (threads allocate about once
/// per document).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator settings; called before this command starts threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Where the tokenizer came from, for the manifest.
struct TokenizerOrigin {
    /// The `--tokenizer` value, or the default hub repo.
    source: String,
    /// The default repo could not be read and the bundled copy was used.
    bundled: bool,
}

/// `--tokenizer`: a local tokenizer.json, or a hub repo ([`crate::fetch`]). Without the flag,
/// the default hub repo, or when it cannot be read, the bundled copy of its tokenizer.json
/// (checked by sha256); a repo or file named with the flag is never replaced.
fn open_tokenizer(value: Option<&str>) -> Result<(Tokenizer, TokenizerOrigin)> {
    let env = crate::fetch::HubEnv::from_env();
    let Some(value) = value else {
        let repo = crate::fetch::DEFAULT_TOKENIZER_REPO;
        let origin = |bundled| TokenizerOrigin {
            source: repo.to_owned(),
            bundled,
        };
        return match crate::fetch::cli::tokenizer_path(&env, repo) {
            Ok(path) => Ok((Tokenizer::load(&path)?, origin(false))),
            Err(e) if falls_back_to_bundled(&e) => {
                let tok =
                    Tokenizer::from_bytes(crate::fetch::bundled_llama2_tokenizer()?.to_vec())?;
                let why = format!("{e:#}");
                let why = why.split("; hint:").next().unwrap_or_default();
                tracing::info!(
                    "tokenizer: {repo} cannot be read ({why}); using the byte-identical copy of its tokenizer.json built into pipeline (sha256 {}), recorded as tokenizer.bundled in the manifest",
                    tok.sha256()
                );
                Ok((tok, origin(true)))
            }
            Err(e) => Err(e),
        };
    };
    let tok = match TokenizerSpec::parse(value) {
        TokenizerSpec::File(path) => Tokenizer::load(&path)?,
        TokenizerSpec::Hub(repo) => {
            Tokenizer::load(&crate::fetch::cli::tokenizer_path(&env, &repo)?)?
        }
    };
    crate::fetch::check_llama2_tokenizer(tok.sha256(), value);
    let origin = TokenizerOrigin {
        source: value.to_owned(),
        bundled: false,
    };
    Ok((tok, origin))
}

/// Whether a failure to read the default tokenizer repo means "not reachable from here" (gated
/// without a token, offline, no network, the hub down), where the bundled copy stands in; a
/// download that arrived with the wrong sha256 or a full disk is reported instead.
fn falls_back_to_bundled(e: &anyhow::Error) -> bool {
    !matches!(
        e.downcast_ref::<crate::fetch::FetchError>(),
        Some(
            crate::fetch::FetchError::ShaMismatch { .. }
                | crate::fetch::FetchError::DiskFull { .. }
        )
    )
}

/// `--source`: `hub` or a local folder.
fn open_source(a: &PrepareArgs, cfg: &PrepareConfig, tok: &Tokenizer) -> Result<Box<dyn Source>> {
    let value = a.source.as_str();
    if value == "hub" {
        let budget = crate::fetch::Budget {
            train_tokens: cfg.train_sequences() * cfg.seq_len as u64,
            eval_tokens: cfg.eval_sequences * cfg.seq_len as u64,
            seed: cfg.seed,
            out: cfg.out.clone(),
        };
        let env = crate::fetch::HubEnv::from_env();
        return Ok(Box::new(crate::fetch::cli::open_source(
            &env, &a.hub, &budget, tok,
        )?));
    }
    let dir = Path::new(value);
    // The folder's absolute path names the dataset in the manifest, so `./x` and `x` agree.
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    Ok(Box::new(LocalSource::open(&dir)?))
}

fn run_inspect(a: InspectArgs) -> Result<()> {
    let m = Manifest::load(&a.dir)?;
    let mut stdout = std::io::stdout().lock();
    match a.sequence {
        None if a.json => writeln!(stdout, "{}", inspect::summary_json(&m))?,
        None => write!(stdout, "{}", inspect::summary(&a.dir, &m))?,
        Some(n) => {
            let ids = inspect::sequence(&a.dir, &m, a.split, n)?;
            if a.decode {
                writeln!(stdout, "{}", inspect::decode(&a.dir, &ids)?)?;
            } else if a.json {
                writeln!(stdout, "{}", serde_json::to_string(&ids)?)?;
            } else {
                let line: Vec<String> = ids.iter().map(u32::to_string).collect();
                writeln!(stdout, "{}", line.join(" "))?;
            }
        }
    }
    Ok(())
}
