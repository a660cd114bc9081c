//! Documents-index lookup benchmark at the plan's size: synthesizes a `documents.jsonl.zst` with
//! millions of lines shaped like the pipeline's (FineWeb-Edu-style ids, 14 source files, 2% eval,
//! 3 to 2,002 tokens per document: about 1B tokens per million documents), then times what
//! `trainer batch` and an anomaly dump pay: a lookup without the sidecar (read every line), the
//! sidecar's one-time build, opening a current sidecar (and one whose documents file was touched,
//! which costs a sha256), and the documents of 32 random train sequences (one step of the plan's
//! batch). Not a test; the table is recorded in BENCHMARKS.md.
//!
//! `cargo run -p pipeline --example bench_documents -- --documents 2000000 --out /tmp/bench-docs`
//!
//! The synthesized file is kept in `--out` and reused when it already has `--documents` lines.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pipeline::format::{
    DOCUMENTS_FILE, DOCUMENTS_SIDECAR_FILE, DocumentIndex, DocumentLine, Split,
};
use pipeline::rng::SplitMix64;

struct Args {
    out: PathBuf,
    documents: u64,
    seq_len: u64,
    steps: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        out: "/tmp/bench-docs".into(),
        documents: 2_000_000,
        seq_len: 1024,
        steps: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--out" => args.out = value.into(),
            "--documents" => args.documents = value.parse().context("--documents")?,
            "--seq-len" => args.seq_len = value.parse().context("--seq-len")?,
            "--steps" => args.steps = value.parse().context("--steps")?,
            _ => bail!("unknown flag {flag}; hint: --out DIR --documents N --seq-len N --steps N"),
        }
    }
    Ok(args)
}

/// Writes `n` documents; returns the train split's token count.
fn synthesize(path: &std::path::Path, n: u64) -> Result<u64> {
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = zstd::stream::Encoder::new(std::io::BufWriter::new(file), 3)?;
    let mut rng = SplitMix64::new(7);
    let mut next = [0u64; 2];
    let mut line = Vec::with_capacity(256);
    for i in 0..n {
        let split = if rng.below(50) == 0 {
            Split::Eval
        } else {
            Split::Train
        };
        let tokens = 3 + rng.below(2000);
        let uuid = format!(
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            rng.next_u64() as u32,
            rng.next_u64() as u16,
            rng.next_u64() as u16,
            rng.next_u64() as u16,
            rng.next_u64() & 0xffff_ffff_ffff
        );
        let k = split as usize;
        let doc = DocumentLine {
            split,
            id: format!("<urn:uuid:{uuid}>").into(),
            file: format!("sample/10BT/{:03}_00000.parquet", i * 14 / n).into(),
            row: i % 700_000,
            position: next[k],
            tokens,
            kept: tokens,
        };
        next[k] += tokens;
        line.clear();
        serde_json::to_writer(&mut line, &doc)?;
        line.push(b'\n');
        enc.write_all(&line)?;
    }
    enc.finish()?.flush()?;
    Ok(next[0])
}

/// Lines and train tokens of an existing file (`None` if absent).
fn existing(path: &std::path::Path) -> Result<Option<(u64, u64)>> {
    let Ok(file) = File::open(path) else {
        return Ok(None);
    };
    let reader = BufReader::new(zstd::stream::read::Decoder::new(file)?);
    let (mut lines, mut train) = (0, 0);
    for l in reader.lines() {
        let l = l?;
        let d: DocumentLine = serde_json::from_str(&l)?;
        lines += 1;
        if d.split == Split::Train {
            train += d.kept;
        }
    }
    Ok(Some((lines, train)))
}

/// A lookup without the sidecar: every line decompressed and parsed.
fn scan(path: &std::path::Path, seq_len: u64, seq: u64) -> Result<Vec<String>> {
    let reader = BufReader::new(zstd::stream::read::Decoder::new(File::open(path)?)?);
    let (start, end) = (seq * seq_len, (seq + 1) * seq_len);
    let mut ids = Vec::new();
    for l in reader.lines() {
        let l = l?;
        let d: DocumentLine = serde_json::from_str(&l)?;
        if d.split == Split::Train && d.position < end && d.position + d.kept > start {
            ids.push(d.id.into_owned());
        }
    }
    Ok(ids)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let a = parse_args()?;
    std::fs::create_dir_all(&a.out)?;
    let path = a.out.join(DOCUMENTS_FILE);
    let train_tokens = match existing(&path)? {
        Some((lines, train)) if lines == a.documents => train,
        _ => {
            let t = Instant::now();
            let train = synthesize(&path, a.documents)?;
            eprintln!(
                "synthesized {} in {:.1} s",
                path.display(),
                t.elapsed().as_secs_f64()
            );
            train
        }
    };
    let sequences = train_tokens / a.seq_len;
    let size = std::fs::metadata(&path)?.len();
    println!(
        "documents.jsonl.zst: {} documents, {:.1} MB, {} train sequences of {}",
        a.documents,
        size as f64 / 1e6,
        sequences,
        a.seq_len
    );

    let mut rng = SplitMix64::new(42);
    let probe = rng.below(sequences);
    let t = Instant::now();
    let scanned = scan(&path, a.seq_len, probe)?;
    let scan_time = t.elapsed();

    let sidecar = a.out.join(DOCUMENTS_SIDECAR_FILE);
    let _ = std::fs::remove_file(&sidecar);
    let t = Instant::now();
    let (index, opened) = DocumentIndex::open(&a.out)?;
    let build_time = t.elapsed();
    assert!(matches!(
        opened,
        pipeline::format::documents::Opened::Built { .. }
    ));
    drop(index);
    let t = Instant::now();
    let (index, opened) = DocumentIndex::open(&a.out)?;
    let open_time = t.elapsed();
    assert_eq!(opened, pipeline::format::documents::Opened::Current);
    let found: Vec<String> = index
        .sequence(Split::Train, a.seq_len, probe)?
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(found, scanned, "the sidecar answers as a full scan does");

    let mut steps = Vec::with_capacity(a.steps);
    let mut docs = 0;
    for _ in 0..a.steps {
        let batch: Vec<u64> = (0..32).map(|_| rng.below(sequences)).collect();
        let t = Instant::now();
        let (index, _) = DocumentIndex::open(&a.out)?;
        for &s in &batch {
            docs += index.sequence(Split::Train, a.seq_len, s)?.len();
        }
        steps.push(t.elapsed());
    }
    steps.sort();

    // The documents file touched (same bytes, new mtime): the sidecar is vouched for by sha256.
    File::options()
        .write(true)
        .open(&path)?
        .set_modified(std::time::SystemTime::now())?;
    let t = Instant::now();
    let (_, opened) = DocumentIndex::open(&a.out)?;
    let touched_time = t.elapsed();
    assert_eq!(opened, pipeline::format::documents::Opened::Current);

    println!(
        "sidecar documents.idx: {:.1} MB",
        std::fs::metadata(&sidecar)?.len() as f64 / 1e6
    );
    println!("what\tms");
    println!(
        "one sequence without the sidecar (read every line)\t{:.0}",
        ms(scan_time)
    );
    println!("build the sidecar (once)\t{:.0}", ms(build_time));
    println!("open a current sidecar\t{:.2}", ms(open_time));
    println!(
        "open after the documents file was touched (sha256)\t{:.0}",
        ms(touched_time)
    );
    println!(
        "open + 32 random sequences (one step), median of {}\t{:.2}",
        a.steps,
        ms(steps[steps.len() / 2])
    );
    println!(
        "open + 32 random sequences (one step), max of {}\t{:.2}",
        a.steps,
        ms(*steps.last().expect("at least one step"))
    );
    println!(
        "documents per sequence, mean\t{:.2}",
        docs as f64 / (32 * a.steps) as f64
    );
    Ok(())
}
