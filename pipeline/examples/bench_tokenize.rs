//! Tokenizer speed benchmark: text MB/s of the fast encoder and of the plain
//! `tokenizers` encoder on the same documents, at several thread counts, and of parquet decoding
//! alone (one thread, first line). Not a test; run by `pipeline/bench/tokenize.sh`, which adds
//! Python `tokenizers` side by side and writes the table recorded in BENCHMARKS.md.
//!
//! `cargo run --release -p pipeline --example bench_tokenize -- \
//!     --tokenizer tests/fixtures/tokenizer/tokenizer.json \
//!     --sample tests/fixtures/fineweb-edu-sample --threads 1,2 --impl fast,plain`
//!
//! Each measurement builds a fresh thread pool, so the fast encoder's per-thread caches start
//! cold, as in one `prepare` run. Output: one tab-separated line per (impl, threads) with wall
//! seconds and CPU seconds (user + system of the whole process during the run): on a shared
//! machine, MB per CPU-second is the per-core speed that other processes disturb least.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pipeline::tokenize::fast::FastTokenizer;
use rayon::prelude::*;

struct Args {
    tokenizer: PathBuf,
    sample: PathBuf,
    threads: Vec<usize>,
    impls: Vec<String>,
    repeat: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        tokenizer: "tests/fixtures/tokenizer/tokenizer.json".into(),
        sample: "tests/fixtures/fineweb-edu-sample".into(),
        threads: vec![1, 2],
        impls: vec!["fast".into(), "plain".into()],
        repeat: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; hint: see the file's doc comment"))?;
        match flag.as_str() {
            "--tokenizer" => args.tokenizer = value.into(),
            "--sample" => args.sample = value.into(),
            "--threads" => {
                args.threads = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--threads: hint: a list like 1,2,4")?
            }
            "--impl" => args.impls = value.split(',').map(str::to_owned).collect(),
            "--repeat" => args.repeat = value.parse().context("--repeat: hint: an integer")?,
            _ => bail!("unknown flag {flag}; hint: --tokenizer --sample --threads --impl --repeat"),
        }
    }
    Ok(args)
}

/// User + system CPU seconds of this process so far (all threads).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct we pass; zeroed is a valid `rusage`.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer to a live `rusage`.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // Decoding alone, one thread (the reader of `prepare`'s decoding threads), best of `repeat`.
    let (mut decode, mut decode_cpu) = (f64::INFINITY, f64::INFINITY);
    let mut texts = Vec::new();
    for _ in 0..args.repeat {
        let (start, cpu_start) = (Instant::now(), cpu_seconds());
        texts = pipeline::source::read_all_texts(&args.sample)?;
        decode = decode.min(start.elapsed().as_secs_f64());
        decode_cpu = decode_cpu.min(cpu_seconds() - cpu_start);
    }
    let bytes: usize = texts.iter().map(String::len).sum();
    let fast = FastTokenizer::from_file(&args.tokenizer)?;
    let mut plain = tokenizers::Tokenizer::from_file(&args.tokenizer)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.tokenizer.display()))?;
    plain.set_encode_special_tokens(true);
    eprintln!("{} documents, {:.2} MB", texts.len(), bytes as f64 / 1e6);
    println!("impl\tthreads\twall_s\tMB/s\tMB/s/thread\tcpu_s\tMB/cpu_s\ttokens");
    let mb = bytes as f64 / 1e6;
    println!(
        "parquet-decode\t1\t{decode:.3}\t{:.2}\t{:.2}\t{decode_cpu:.3}\t{:.2}\t-",
        mb / decode,
        mb / decode,
        mb / decode_cpu
    );
    for name in &args.impls {
        for &threads in &args.threads {
            let encode = |text: &str, out: &mut Vec<u32>| -> Result<()> {
                match name.as_str() {
                    "fast" => fast.encode(text, out),
                    "fast-uncached" => fast.encode_uncached(text, out),
                    "plain" => out.extend_from_slice(
                        plain
                            .encode_fast(text, false)
                            .map_err(|e| anyhow::anyhow!("{e}"))?
                            .get_ids(),
                    ),
                    other => bail!("--impl {other}; hint: fast, fast-uncached or plain"),
                }
                Ok(())
            };
            // The slow reference gets one run; the fast paths the best of `repeat`.
            let runs = if name == "plain" { 1 } else { args.repeat };
            let (mut best, mut best_cpu) = (f64::INFINITY, f64::INFINITY);
            let mut tokens = 0usize;
            for _ in 0..runs {
                // Named as in `prepare`, so per-thread profiles of the two line up.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("tokenize-{i}"))
                    .build()?;
                let (start, cpu_start) = (Instant::now(), cpu_seconds());
                tokens = pool.install(|| {
                    texts
                        .par_iter()
                        .map_init(Vec::new, |out, t| {
                            out.clear();
                            encode(t, out).map(|()| out.len())
                        })
                        .sum::<Result<usize>>()
                })?;
                best = best.min(start.elapsed().as_secs_f64());
                best_cpu = best_cpu.min(cpu_seconds() - cpu_start);
            }
            let mbs = bytes as f64 / 1e6 / best;
            println!(
                "{name}\t{threads}\t{best:.3}\t{mbs:.2}\t{:.2}\t{best_cpu:.3}\t{:.2}\t{tokens}",
                mbs / threads as f64,
                bytes as f64 / 1e6 / best_cpu,
            );
        }
    }
    Ok(())
}
