//! Shard payload hashing benchmark: what the trainer's background data check
//! (`trainer::data::PayloadCheck`) and `pipeline verify` pay per byte. Times sha256 (the `sha2`
//! crate, SHA-NI when the CPU has it) on a buffer already in memory, then over every shard of a
//! dataset two ways: `ShardReader::verify_payload` (the payload through the reader's memory map)
//! and `read` in chunks of `--chunk-mib` after `posix_fadvise(SEQUENTIAL)`, the alternative to
//! the map's page faults. Not a test; the table is recorded in BENCHMARKS.md.
//!
//! `cargo run --release -p pipeline --example bench_payload_hash -- --shards /dev/shm/b95 --rounds 2`

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use pipeline::format::{Manifest, Split};
use sha2::{Digest, Sha256};

fn main() -> Result<()> {
    let mut shards: Option<PathBuf> = None;
    let (mut rounds, mut buffer_mib, mut chunk_mib) = (2usize, 1024usize, 4usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a}: needs a value"));
        match a.as_str() {
            "--shards" => shards = Some(PathBuf::from(value()?)),
            "--rounds" => rounds = value()?.parse()?,
            "--buffer-mib" => buffer_mib = value()?.parse()?,
            "--chunk-mib" => chunk_mib = value()?.parse()?,
            other => bail!(
                "{other}: unknown; hint: --shards DIR --rounds N --buffer-mib N --chunk-mib N"
            ),
        }
    }
    #[cfg(target_arch = "x86_64")]
    println!(
        "cpu sha extensions (SHA-NI): {}",
        std::arch::is_x86_feature_detected!("sha")
    );

    // A buffer in memory: the hash alone.
    let mut buf = vec![0u8; buffer_mib << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in buf.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    for _ in 0..rounds {
        let t = Instant::now();
        std::hint::black_box(Sha256::digest(&buf));
        report("in-memory buffer", buf.len() as u64, t);
    }
    drop(buf);

    let Some(dir) = shards else { return Ok(()) };
    let m = Manifest::load(&dir)?;
    let mut readers = Vec::new();
    for split in [Split::Train, Split::Eval] {
        readers.extend(m.open_split(&dir, split)?);
    }
    let total: u64 = readers.iter().map(|r| r.header().file_bytes()).sum();
    for _ in 0..rounds {
        let t = Instant::now();
        for r in &readers {
            r.verify_payload()?;
        }
        report("shards via verify_payload (mmap)", total, t);
        let t = Instant::now();
        let mut chunk = vec![0u8; chunk_mib << 20];
        for r in &readers {
            let mut f = std::fs::File::open(r.path())?;
            // SAFETY: a valid open descriptor and the whole-file range; the call only sets the
            // readahead policy of this open file.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                    0,
                    libc::POSIX_FADV_SEQUENTIAL,
                );
            }
            let mut h = Sha256::new();
            loop {
                let n = f.read(&mut chunk)?;
                if n == 0 {
                    break;
                }
                h.update(&chunk[..n]);
            }
            std::hint::black_box(h.finalize());
        }
        report(
            &format!("shards via read ({chunk_mib} MiB chunks)"),
            total,
            t,
        );
    }
    Ok(())
}

fn report(what: &str, bytes: u64, t: Instant) {
    let s = t.elapsed().as_secs_f64();
    println!(
        "{what:<48} {:>6.2} GB in {s:>6.2} s = {:>5.2} GB/s",
        bytes as f64 / 1e9,
        bytes as f64 / 1e9 / s
    );
}
