//! `trainer report runs/<id>`: PNG plots and a markdown summary in `runs/<id>/report/`, read
//! from the run folder alone (so it works on a copied folder, during or after a run).
//!
//! Plots: `loss.png` (train loss, its 100-step average and the eval loss vs tokens),
//! `lr_wd.png` (the two schedules), `grad_norm.png` (pre-clip, log scale), `throughput.png`
//! (tokens/s and MFU), `ternary_zero.png` (per layer, the fraction of 0 weights per projection
//! over time), `ternary_signs.png` (per layer, -1 and +1 fractions), `absmean.png` (per layer
//! scale). `summary.md` lists the headline numbers, evals, anomalies and checkpoints.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use super::anomaly::list_dumps;
use super::metrics::read_jsonl;
use super::plots::{COLORS, Panel, Series, XAxis, draw_panels, si_label};
use super::retention::list_checkpoints;
use super::ternary::PROJECTIONS;

/// What `write_report` produced.
#[derive(Debug, Clone)]
pub struct ReportOutput {
    pub dir: PathBuf,
    pub plots: Vec<PathBuf>,
    pub summary: PathBuf,
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn series(rows: &[Value], x: &str, y: &str) -> Vec<(f64, f64)> {
    rows.iter()
        .filter_map(|r| Some((num(r, x)?, num(r, y)?)))
        .collect()
}

/// Trailing mean over `window` points (the same window as the eval's train_loss).
fn trailing_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(points.len());
    let mut sum = 0.0;
    for (i, &(x, y)) in points.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= points[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

/// Layers present in the scalars (keys `L{i}_attn_qkv_zero_pct`).
fn layers(rows: &[Value]) -> Vec<usize> {
    let mut set = std::collections::BTreeSet::new();
    for r in rows {
        if let Some(o) = r.as_object() {
            for k in o.keys() {
                if let Some(rest) = k.strip_prefix('L')
                    && let Some((i, tail)) = rest.split_once('_')
                    && tail == "attn_qkv_zero_pct"
                    && let Ok(i) = i.parse()
                {
                    set.insert(i);
                }
            }
        }
    }
    set.into_iter().collect()
}

fn grid_for(n: usize) -> (usize, usize) {
    let cols = if n <= 2 {
        n.max(1)
    } else if n <= 6 {
        3
    } else {
        4
    };
    (n.div_ceil(cols).max(1), cols)
}

pub fn write_report(run_dir: &Path) -> Result<ReportOutput> {
    let scalars_path = run_dir.join("metrics/scalars.jsonl");
    let scalars = read_jsonl(&scalars_path).with_context(|| {
        format!(
            "reading {}; hint: is this a run folder (runs/<run_id>)?",
            scalars_path.display()
        )
    })?;
    let evals = read_jsonl(&run_dir.join("eval/eval_results.jsonl")).unwrap_or_default();
    let samples = read_jsonl(&run_dir.join("samples/samples.jsonl")).unwrap_or_default();
    let dir = run_dir.join("report");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let run_name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut plots = Vec::new();
    let wide = (1400, 800);

    // Loss vs tokens.
    let train = series(&scalars, "tokens_seen", "loss");
    let mut p = Panel::new(
        format!("Loss — {run_name}"),
        "tokens seen",
        "cross-entropy (nats/token)",
        XAxis::Tokens,
    );
    p.series
        .push(Series::line("train (per step)", train.clone(), COLORS[0]).faint());
    p.series.push(Series::line(
        "train (100-step mean)",
        trailing_mean(&train, 100),
        COLORS[0],
    ));
    let ev = series(&evals, "tokens_seen", "eval_loss");
    let ev = if ev.is_empty() {
        // Older eval lines without tokens_seen: map step -> tokens through the scalars.
        let by_step: BTreeMap<u64, f64> = scalars
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_u64()?, num(r, "tokens_seen")?)))
            .collect();
        evals
            .iter()
            .filter_map(|r| {
                Some((
                    *by_step.get(&r.get("step")?.as_u64()?)?,
                    num(r, "eval_loss")?,
                ))
            })
            .collect()
    } else {
        ev
    };
    p.series.push(Series::line("eval", ev.clone(), COLORS[3]));
    p.series.push(Series::line("", ev, COLORS[3]).markers());
    plots.push(plot(&dir, "loss.png", wide, None, vec![p], (1, 1))?);

    // LR and WD, stacked.
    let mut lr = Panel::new("Learning rate", "step", "lr", XAxis::Steps);
    lr.series.push(Series::line(
        "lr",
        series(&scalars, "step", "lr"),
        COLORS[1],
    ));
    let mut wd = Panel::new("Weight decay", "step", "wd", XAxis::Steps);
    wd.series.push(Series::line(
        "wd",
        series(&scalars, "step", "wd"),
        COLORS[2],
    ));
    plots.push(plot(
        &dir,
        "lr_wd.png",
        (1400, 900),
        Some("Schedules"),
        vec![lr, wd],
        (2, 1),
    )?);

    // Gradient norm (log scale).
    let gn = series(&scalars, "step", "grad_norm");
    let mut g = Panel::new(
        format!("Gradient norm (pre-clip) — {run_name}"),
        "step",
        "global L2 norm (log scale)",
        XAxis::Steps,
    );
    g.log_y = true;
    g.series
        .push(Series::line("per step", gn.clone(), COLORS[4]).faint());
    g.series.push(Series::line(
        "100-step mean",
        trailing_mean(&gn, 100),
        COLORS[4],
    ));
    plots.push(plot(&dir, "grad_norm.png", wide, None, vec![g], (1, 1))?);

    // Throughput and MFU.
    let tps = series(&scalars, "step", "tokens_per_sec");
    let mut t = Panel::new("Throughput", "step", "tokens / s", XAxis::Steps);
    t.series
        .push(Series::line("per step", tps.clone(), COLORS[5]).faint());
    t.series.push(Series::line(
        "100-step mean",
        trailing_mean(&tps, 100),
        COLORS[5],
    ));
    let mfu = series(&scalars, "step", "mfu");
    let mut panels = vec![t];
    if !mfu.is_empty() {
        let mut m = Panel::new("Model FLOPs utilisation", "step", "MFU", XAxis::Steps);
        m.series.push(Series::line("mfu", mfu, COLORS[6]));
        panels.push(m);
    }
    let n = panels.len();
    plots.push(plot(
        &dir,
        "throughput.png",
        (1400, 500 * n as u32),
        None,
        panels,
        (n, 1),
    )?);

    // Ternary statistics per layer.
    let ls = layers(&scalars);
    if !ls.is_empty() {
        let grid = grid_for(ls.len());
        let size = (620 * grid.1 as u32, 440 * grid.0 as u32 + 50);
        let mut zero = Vec::new();
        let mut signs = Vec::new();
        let mut absmean = Vec::new();
        for (n, &i) in ls.iter().enumerate() {
            let mut z = Panel::new(format!("Layer {i}"), "step", "fraction 0", XAxis::Steps);
            let mut s = Panel::new(format!("Layer {i}"), "step", "fraction", XAxis::Steps);
            let mut a = Panel::new(format!("Layer {i}"), "step", "absmean γ", XAxis::Steps);
            // The four projections are the same in every panel: one legend, in the first.
            for p in [&mut z, &mut s, &mut a] {
                p.legend = n == 0;
            }
            for (j, proj) in PROJECTIONS.iter().enumerate() {
                let short = proj.trim_start_matches("attn_").trim_start_matches("ffn_");
                let key = |stat: &str| format!("L{i}_{proj}_{stat}");
                z.series.push(Series::line(
                    short,
                    series(&scalars, "step", &key("zero_pct")),
                    COLORS[j],
                ));
                s.series.push(Series::line(
                    format!("{short} -1"),
                    series(&scalars, "step", &key("neg1_pct")),
                    COLORS[j],
                ));
                s.series.push(
                    Series::line(
                        format!("{short} +1"),
                        series(&scalars, "step", &key("pos1_pct")),
                        COLORS[j],
                    )
                    .dashed(),
                );
                a.series.push(Series::line(
                    short,
                    series(&scalars, "step", &key("absmean")),
                    COLORS[j],
                ));
            }
            zero.push(z);
            signs.push(s);
            absmean.push(a);
        }
        plots.push(plot(
            &dir,
            "ternary_zero.png",
            size,
            Some("Fraction of 0 in the ternary weights, per layer and projection"),
            zero,
            grid,
        )?);
        plots.push(plot(
            &dir,
            "ternary_signs.png",
            size,
            Some("Fractions of -1 (solid) and +1 (dashed) per layer and projection"),
            signs,
            grid,
        )?);
        plots.push(plot(
            &dir,
            "absmean.png",
            size,
            Some("Absmean scale γ per layer and projection"),
            absmean,
            grid,
        )?);
    }

    let summary = dir.join("summary.md");
    let md = summary_markdown(run_dir, &run_name, &scalars, &evals, &samples, &plots);
    pipeline::format::shard::write_atomic(&summary, md.as_bytes())
        .with_context(|| format!("writing {}", summary.display()))?;
    Ok(ReportOutput {
        dir,
        plots,
        summary,
    })
}

fn plot(
    dir: &Path,
    name: &str,
    size: (u32, u32),
    title: Option<&str>,
    panels: Vec<Panel>,
    grid: (usize, usize),
) -> Result<PathBuf> {
    let path = dir.join(name);
    draw_panels(&path, size, title, &panels, grid)?;
    Ok(path)
}

fn summary_markdown(
    run_dir: &Path,
    run_name: &str,
    scalars: &[Value],
    evals: &[Value],
    samples: &[Value],
    plots: &[PathBuf],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Run report: {run_name}\n");
    let last = scalars.last();
    let step = last.and_then(|r| r.get("step")?.as_u64()).unwrap_or(0);
    let tokens = last.and_then(|r| num(r, "tokens_seen")).unwrap_or(0.0);
    let losses: Vec<f64> = scalars.iter().filter_map(|r| num(r, "loss")).collect();
    let tail = &losses[losses.len().saturating_sub(100)..];
    let tail_mean = if tail.is_empty() {
        f64::NAN
    } else {
        tail.iter().sum::<f64>() / tail.len() as f64
    };
    let tps: Vec<f64> = scalars
        .iter()
        .filter_map(|r| num(r, "tokens_per_sec"))
        .collect();
    let tps_tail = &tps[tps.len().saturating_sub(100)..];
    let tps_mean = if tps_tail.is_empty() {
        f64::NAN
    } else {
        tps_tail.iter().sum::<f64>() / tps_tail.len() as f64
    };
    let skipped = scalars
        .iter()
        .filter(|r| r.get("update_applied").and_then(Value::as_bool) == Some(false))
        .count();
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| last step | {step} |");
    let _ = writeln!(s, "| tokens seen | {} ({tokens:.0}) |", si_label(tokens));
    let _ = writeln!(
        s,
        "| first loss | {:.4} |",
        losses.first().copied().unwrap_or(f64::NAN)
    );
    let _ = writeln!(
        s,
        "| train loss, mean of last {} steps | {tail_mean:.4} |",
        tail.len()
    );
    let _ = writeln!(
        s,
        "| tokens/s, mean of last {} steps | {tps_mean:.0} |",
        tps_tail.len()
    );
    let _ = writeln!(s, "| skipped (NaN/Inf) updates | {skipped} |");
    if let Some(e) = evals.last() {
        let best = evals
            .iter()
            .filter_map(|r| num(r, "eval_loss"))
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            s,
            "| last eval loss (step {}) | {:.4} |",
            e.get("step").and_then(Value::as_u64).unwrap_or(0),
            num(e, "eval_loss").unwrap_or(f64::NAN)
        );
        let _ = writeln!(s, "| best eval loss | {best:.4} |");
        if let Some(ppl) = num(e, "eval_ppl") {
            let _ = writeln!(s, "| last eval perplexity | {ppl:.2} |");
        }
        if let Some(b) = num(e, "bits_per_byte") {
            let _ = writeln!(s, "| last eval bits/byte | {b:.4} |");
        }
    }
    let _ = writeln!(
        s,
        "\n## Evals\n\n| step | eval loss | train loss (MA 100) | gap | ppl | bits/byte | seconds |\n|---|---|---|---|---|---|---|"
    );
    for e in evals {
        let f = |k: &str, d: usize| num(e, k).map_or("–".to_string(), |v| format!("{v:.d$}"));
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            e.get("step").and_then(Value::as_u64).unwrap_or(0),
            f("eval_loss", 4),
            f("train_loss", 4),
            f("train_eval_gap", 4),
            f("eval_ppl", 2),
            f("bits_per_byte", 4),
            f("eval_seconds", 1)
        );
    }
    let _ = writeln!(
        s,
        "\n## Samples\n\n{} records in samples/samples.jsonl.",
        samples.len()
    );
    if let Some(last_step) = samples.iter().filter_map(|r| r.get("step")?.as_u64()).max() {
        let _ = writeln!(s, "\nGreedy samples at step {last_step}:\n");
        for r in samples.iter().filter(|r| {
            r.get("step").and_then(Value::as_u64) == Some(last_step)
                && r.get("mode").and_then(Value::as_str) == Some("greedy")
        }) {
            let text = r
                .get("generated_text")
                .and_then(Value::as_str)
                .unwrap_or("")
                .replace('\n', " ");
            let _ = writeln!(
                s,
                "- `{}`: {}",
                r.get("prompt").and_then(Value::as_str).unwrap_or(""),
                text.chars().take(300).collect::<String>()
            );
        }
    }
    let dumps = list_dumps(&run_dir.join("anomalies"));
    let _ = writeln!(s, "\n## Anomalies\n\n{} dumps.", dumps.len());
    for (step, kind) in dumps {
        let _ = writeln!(s, "- step {step}: {}", kind.name());
    }
    let ckpts = list_checkpoints(&run_dir.join("checkpoints")).unwrap_or_default();
    let _ = writeln!(
        s,
        "\n## Checkpoints\n\n{}",
        ckpts
            .iter()
            .map(|(st, _)| st.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(s, "\n## Plots\n");
    for p in plots {
        if let Some(n) = p.file_name() {
            let n = n.to_string_lossy();
            let _ = writeln!(s, "![{n}]({n})");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_mean_window() {
        let p = vec![(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)];
        assert_eq!(
            trailing_mean(&p, 2),
            vec![(0.0, 1.0), (1.0, 2.0), (2.0, 4.0)]
        );
        assert_eq!(grid_for(8), (2, 4));
        assert_eq!(grid_for(2), (1, 2));
        assert_eq!(grid_for(3), (1, 3));
    }

    /// A synthetic 8-layer run folder; `TRAINER_REPORT_TEST_OUT=dir` keeps it for viewing.
    #[test]
    fn report_from_a_synthetic_run() {
        let tmp = tempfile::tempdir().unwrap();
        let run = std::env::var_os("TRAINER_REPORT_TEST_OUT")
            .map_or_else(|| tmp.path().join("run"), PathBuf::from);
        let _ = std::fs::remove_dir_all(&run);
        let mut w =
            super::super::metrics::JsonlWriter::append(&run.join("metrics/scalars.jsonl")).unwrap();
        let mut rng = pipeline::rng::SplitMix64::new(3);
        for step in 1..=3000u64 {
            let t = step as f64;
            let noise = rng.next_f64() - 0.5;
            let mut r = serde_json::json!({
                "step": step, "tokens_seen": step * 32768, "loss": 3.0 + 7.4 * (-t / 300.0).exp() + 0.2 * noise,
                "lr": 1.5e-3 * (t / 375.0).min(1.0), "wd": if step < 1500 { 0.1 } else { 0.0 },
                "grad_norm": 0.3 + 5.0 * (-t / 200.0).exp() + 0.05 * noise, "tokens_per_sec": 140_000.0 + 5000.0 * noise,
                "mfu": 0.3 + 0.01 * noise, "step_time_ms": 230.0,
            });
            if step.is_multiple_of(100) {
                for i in 0..8 {
                    for (j, p) in PROJECTIONS.iter().enumerate() {
                        let z = 0.33 + 0.02 * j as f64 + 0.05 * (t / 3000.0) + 0.005 * i as f64;
                        r[format!("L{i}_{p}_zero_pct")] = z.into();
                        r[format!("L{i}_{p}_neg1_pct")] = ((1.0 - z) / 2.0 - 0.01).into();
                        r[format!("L{i}_{p}_pos1_pct")] = ((1.0 - z) / 2.0 + 0.01).into();
                        r[format!("L{i}_{p}_absmean")] =
                            (0.02 - 0.001 * j as f64 + 0.00001 * t / 10.0).into();
                    }
                }
            }
            w.write(&r).unwrap();
        }
        let mut e =
            super::super::metrics::JsonlWriter::append(&run.join("eval/eval_results.jsonl"))
                .unwrap();
        for step in (0..=3000u64).step_by(500) {
            let l = 3.1 + 7.3 * (-(step as f64) / 300.0).exp();
            e.write(&serde_json::json!({"step": step, "eval_loss": l, "tokens_seen": step * 32768, "eval_ppl": l.exp(), "bits_per_byte": l / 0.693 / 4.2, "train_loss": l - 0.05, "train_eval_gap": -0.05, "eval_seconds": 3.2})).unwrap();
        }
        let out = write_report(&run).unwrap();
        let names: Vec<String> = out
            .plots
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "loss.png",
                "lr_wd.png",
                "grad_norm.png",
                "throughput.png",
                "ternary_zero.png",
                "ternary_signs.png",
                "absmean.png"
            ]
        );
        for p in &out.plots {
            assert!(
                std::fs::metadata(p).unwrap().len() > 10_000,
                "{}",
                p.display()
            );
        }
        let md = std::fs::read_to_string(&out.summary).unwrap();
        assert!(md.contains("| last step | 3000 |"), "{md}");
        assert!(md.contains("![loss.png](loss.png)"));
    }
}
