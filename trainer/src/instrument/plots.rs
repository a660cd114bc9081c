//! PNG charts with plotters: panels of line series (the report), histograms and grouped bar
//! charts (anomaly dumps). Text is drawn with DejaVu Sans embedded in the binary
//! (`trainer/assets/`, see its README for the license), so the output does not depend on the
//! fonts of the machine.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bytes are a valid TTF compiled into the binary; failure would be a build defect.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            tracing::error!(
                "embedded DejaVuSans.ttf was rejected by ab_glyph; plots will lack text"
            );
        }
    });
}

fn pe<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e}")
}

/// Distinct, print-friendly colors (Tableau 10).
pub const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// How the x axis labels its values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XAxis {
    /// Token counts: 12.3M, 1.97B.
    Tokens,
    /// Plain integers (steps).
    Steps,
}

#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    /// Line width in pixels; 0 draws markers only.
    pub width: u32,
    /// Opacity of the line (raw noisy series are drawn faint under their average).
    pub alpha: f64,
    /// Dashed line (a second quantity in the same color).
    pub dashed: bool,
}

impl Series {
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>, color: RGBColor) -> Self {
        Series {
            label: label.into(),
            points,
            color,
            width: 2,
            alpha: 1.0,
            dashed: false,
        }
    }

    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }

    pub fn faint(mut self) -> Self {
        self.width = 1;
        self.alpha = 0.25;
        self
    }

    pub fn markers(mut self) -> Self {
        self.width = 0;
        self
    }
}

#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub x_axis: XAxis,
    /// Plot log10(y) with labels in y units (grad norm spans decades).
    pub log_y: bool,
    /// Fixed y range instead of the data range (fractions: 0..1).
    pub y_range: Option<(f64, f64)>,
    /// Draw the legend (grids of like panels show it once).
    pub legend: bool,
    pub series: Vec<Series>,
}

impl Panel {
    pub fn new(title: impl Into<String>, x_desc: &str, y_desc: &str, x_axis: XAxis) -> Self {
        Panel {
            title: title.into(),
            x_desc: x_desc.into(),
            y_desc: y_desc.into(),
            x_axis,
            log_y: false,
            y_range: None,
            legend: true,
            series: Vec::new(),
        }
    }
}

/// `950`, `12.3k`, `4.5M`, `1.97B`.
pub fn si_label(x: f64) -> String {
    let a = x.abs();
    let (v, unit) = if a >= 1e9 {
        (x / 1e9, "B")
    } else if a >= 1e6 {
        (x / 1e6, "M")
    } else if a >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{unit}")
}

/// Compact tick label for y values from 1e-6 to 1e6.
pub fn y_label(v: f64) -> String {
    let a = v.abs();
    // Tick values are sums of float steps: 2.7e-20 is a zero that lost its bits.
    if a < 1e-12 {
        "0".into()
    } else if (1e4..1e6).contains(&a) {
        format!("{:.1}k", v / 1e3)
    } else if (1e6..1e9).contains(&a) {
        format!("{:.2}M", v / 1e6)
    } else if !(1e-2..1e4).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn padded_range(lo: f64, hi: f64) -> (f64, f64) {
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let d = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        return (lo - d, hi + d);
    }
    let d = (hi - lo) * 0.05;
    (lo - d, hi + d)
}

/// Draws `panels` in a `rows` x `cols` grid into a PNG of `size` pixels.
pub fn draw_panels(
    path: &Path,
    size: (u32, u32),
    title: Option<&str>,
    panels: &[Panel],
    grid: (usize, usize),
) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let body = match title {
        Some(t) => {
            let (top, rest) = root.split_vertically(44);
            top.titled(t, (FAMILY, 26).into_font().style(FontStyle::Bold))
                .map_err(pe)?;
            rest
        }
        None => root.clone(),
    };
    let areas = body.split_evenly(grid);
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, panel, grid.0 * grid.1 > 2)?;
    }
    root.present()
        .map_err(pe)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    p: &Panel,
    small: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let ty = |y: f64| if p.log_y { y.max(1e-12).log10() } else { y };
    let finite = |(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!p.log_y || *y > 0.0);
    let pts: Vec<(f64, f64)> = p
        .series
        .iter()
        .flat_map(|s| {
            s.points
                .iter()
                .filter(|q| finite(q))
                .map(|&(x, y)| (x, ty(y)))
        })
        .collect();
    let (x0, x1) = pts
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| {
            (a.min(q.0), b.max(q.0))
        });
    let (y0, y1) = match p.y_range {
        Some((a, b)) => (ty(a), ty(b)),
        None => {
            let (a, b) = pts
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), q| {
                    (a.min(q.1), b.max(q.1))
                });
            padded_range(a, b)
        }
    };
    let (x0, x1) = if x0.is_finite() && x1 > x0 {
        (x0, x1)
    } else {
        padded_range(x0, x1)
    };
    let (cap, lab, desc) = if small { (18, 13, 14) } else { (24, 16, 18) };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, cap))
        .margin(10)
        .margin_right(28)
        .x_label_area_size(if small { 36 } else { 48 })
        .y_label_area_size(if small { 56 } else { 76 })
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(pe)?;
    let x_fmt = |x: &f64| match p.x_axis {
        XAxis::Tokens => si_label(*x),
        XAxis::Steps => format!("{}", x.round() as i64),
    };
    let y_fmt = |y: &f64| {
        if p.log_y {
            y_label(10f64.powf(*y))
        } else {
            y_label(*y)
        }
    };
    chart
        .configure_mesh()
        .x_desc(&p.x_desc)
        .y_desc(&p.y_desc)
        .x_labels(if small { 5 } else { 8 })
        .y_labels(if small { 5 } else { 8 })
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .label_style((FAMILY, lab))
        .axis_desc_style((FAMILY, desc))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(210, 210, 210))
        .draw()
        .map_err(pe)?;
    let mut labelled = false;
    for s in &p.series {
        let points: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|q| finite(q))
            .map(|&(x, y)| (x, ty(y)))
            .collect();
        let points = if s.width > 0 {
            decimate(points, MAX_LINE_POINTS)
        } else {
            points
        };
        let has_points = !points.is_empty();
        let color = s.color.mix(s.alpha);
        let legend_color = s.color;
        let anno = if s.width == 0 {
            chart
                .draw_series(points.iter().map(|&q| Circle::new(q, 4, color.filled())))
                .map_err(pe)?
        } else if s.dashed {
            chart
                .draw_series(DashedLineSeries::new(
                    points,
                    8,
                    5,
                    color.stroke_width(s.width),
                ))
                .map_err(pe)?
        } else {
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(s.width)))
                .map_err(pe)?
        };
        if !s.label.is_empty() && p.legend && has_points {
            labelled = true;
            let dashed = s.dashed;
            anno.label(&s.label).legend(move |(x, y)| {
                let style = legend_color.stroke_width(3);
                // Two segments; a gap between them marks a dashed series.
                let second = if dashed { 11 } else { 7 };
                EmptyElement::at((x, y))
                    + PathElement::new(vec![(0, 0), (7, 0)], style)
                    + PathElement::new(vec![(second, 0), (18, 0)], style)
            });
        }
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(160, 160, 160))
            .label_font((FAMILY, lab))
            .draw()
            .map_err(pe)?;
    }
    Ok(())
}

/// Lines with more points than pixels turn into solid bands; longer series are drawn through
/// this many points.
const MAX_LINE_POINTS: usize = 3000;

/// Keeps the min and the max of each of `max / 2` buckets (in x order), so spikes survive.
fn decimate(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points;
    }
    let per = points.len().div_ceil(max / 2);
    let mut out = Vec::with_capacity(max + 2);
    for chunk in points.chunks(per) {
        let lo = chunk
            .iter()
            .enumerate()
            .min_by(|a, b| a.1.1.total_cmp(&b.1.1))
            .map(|(i, _)| i);
        let hi = chunk
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.1.total_cmp(&b.1.1))
            .map(|(i, _)| i);
        if let (Some(lo), Some(hi)) = (lo, hi) {
            let (a, b) = if lo <= hi { (lo, hi) } else { (hi, lo) };
            out.push(chunk[a]);
            if b != a {
                out.push(chunk[b]);
            }
        }
    }
    out
}

/// Summary of a value list for a histogram caption and the dump's JSON.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ValueStats {
    pub count: u64,
    pub nonfinite: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
    pub abs_max: f64,
}

impl ValueStats {
    pub fn of(values: &[f32]) -> Self {
        let mut n = 0u64;
        let mut bad = 0u64;
        let (mut lo, mut hi, mut s, mut s2) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0.0);
        for &v in values {
            if !v.is_finite() {
                bad += 1;
                continue;
            }
            let v = v as f64;
            n += 1;
            lo = lo.min(v);
            hi = hi.max(v);
            s += v;
            s2 += v * v;
        }
        let mean = if n > 0 { s / n as f64 } else { 0.0 };
        let var = if n > 0 {
            (s2 / n as f64 - mean * mean).max(0.0)
        } else {
            0.0
        };
        ValueStats {
            count: n,
            nonfinite: bad,
            min: if n > 0 { lo } else { 0.0 },
            max: if n > 0 { hi } else { 0.0 },
            mean,
            std: var.sqrt(),
            abs_max: if n > 0 { lo.abs().max(hi.abs()) } else { 0.0 },
        }
    }
}

/// Bin counts of the finite values over [min, max] of the data: (left edges, width, counts).
pub fn bin(values: &[f32], bins: usize) -> (Vec<f64>, f64, Vec<u64>) {
    let st = ValueStats::of(values);
    let bins = bins.max(1);
    let (lo, hi) = if st.max > st.min {
        (st.min, st.max)
    } else {
        (st.min - 0.5, st.min + 0.5)
    };
    let w = (hi - lo) / bins as f64;
    let mut counts = vec![0u64; bins];
    for &v in values {
        if v.is_finite() {
            let i = (((v as f64 - lo) / w) as usize).min(bins - 1);
            counts[i] += 1;
        }
    }
    ((0..bins).map(|i| lo + i as f64 * w).collect(), w, counts)
}

/// A 100-bin histogram of `values` with its statistics in the subtitle. Counts on a log10 axis:
/// activation tails (the outliers that precede a divergence) are invisible on a linear one.
pub fn histogram(path: &Path, title: &str, values: &[f32]) -> Result<ValueStats> {
    register_font();
    let st = ValueStats::of(values);
    let (edges, w, counts) = bin(values, 100);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let sub = format!(
        "n={}  mean={}  std={}  min={}  max={}  non-finite={}",
        st.count,
        y_label(st.mean),
        y_label(st.std),
        y_label(st.min),
        y_label(st.max),
        st.nonfinite
    );
    let (top, rest) = root.split_vertically(60);
    top.draw(&Text::new(
        title.to_owned(),
        (12, 6),
        (FAMILY, 22).into_font().style(FontStyle::Bold),
    ))
    .map_err(pe)?;
    top.draw(&Text::new(sub, (12, 34), (FAMILY, 15)))
        .map_err(pe)?;
    let ymax = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let x0 = edges.first().copied().unwrap_or(0.0);
    let x1 = x0 + w * counts.len() as f64;
    let mut chart = ChartBuilder::on(&rest)
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, 0f64..(ymax.log10() + 0.3))
        .map_err(pe)?;
    chart
        .configure_mesh()
        .x_desc("value")
        .y_desc("count (log scale)")
        .x_label_formatter(&|x| y_label(*x))
        .y_label_formatter(&|y| si_label(10f64.powf(*y).round()))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(pe)?;
    chart
        .draw_series(
            edges
                .iter()
                .zip(&counts)
                .filter(|(_, c)| **c > 0)
                .map(|(&e, &c)| {
                    // log10(1) = 0 would draw nothing; lift single counts to a visible sliver.
                    let h = (c as f64).log10().max(0.05);
                    Rectangle::new([(e, 0.0), (e + w, h)], COLORS[0].filled())
                }),
        )
        .map_err(pe)?;
    root.present()
        .map_err(pe)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(st)
}

/// Grouped bars: for each group (x label) one bar per category, heights in [0, 1].
pub fn grouped_bars(
    path: &Path,
    title: &str,
    groups: &[String],
    categories: &[&str],
    values: &[Vec<f64>],
) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(pe)?;
    let n = groups.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FAMILY, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n - 0.5), 0f64..1.05)
        .map_err(pe)?;
    let names = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len().max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("fraction of weights")
        .y_label_formatter(&|y| format!("{y:.1}"))
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(pe)?;
    let k = categories.len().max(1) as f64;
    let bw = 0.8 / k;
    for (c, cat) in categories.iter().enumerate() {
        let color = COLORS[c % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().map(|(g, vals)| {
                let x = g as f64 - 0.4 + c as f64 * bw;
                Rectangle::new(
                    [
                        (x + 0.01, 0.0),
                        (x + bw - 0.01, vals.get(c).copied().unwrap_or(0.0)),
                    ],
                    color.filled(),
                )
            }))
            .map_err(pe)?
            .label(*cat)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(160, 160, 160))
        .label_font((FAMILY, 15))
        .draw()
        .map_err(pe)?;
    root.present()
        .map_err(pe)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(si_label(1_966_080_000.0), "1.97B");
        assert_eq!(si_label(12_300_000.0), "12.3M");
        assert_eq!(si_label(950.0), "950");
        assert_eq!(y_label(0.0015), "1.50e-3");
        assert_eq!(y_label(1.5e-5), "1.50e-5");
        assert_eq!(y_label(2.7e-20), "0");
        assert_eq!(y_label(0.125), "0.125");
        assert_eq!(y_label(140_400.0), "140.4k");
        assert_eq!(y_label(3.25), "3.25");
    }

    #[test]
    fn decimation_keeps_extremes_and_order() {
        let pts: Vec<(f64, f64)> = (0..10_000)
            .map(|i| (i as f64, if i == 4321 { 99.0 } else { (i % 7) as f64 }))
            .collect();
        let d = decimate(pts.clone(), 1000);
        assert!(d.len() <= 1002);
        assert!(d.iter().any(|p| p.1 == 99.0));
        assert!(d.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(decimate(pts[..10].to_vec(), 1000).len(), 10);
    }

    #[test]
    fn binning_counts_every_finite_value() {
        let v = [0.0f32, 0.5, 1.0, 1.0, f32::NAN];
        let (edges, w, counts) = bin(&v, 4);
        assert_eq!(counts.iter().sum::<u64>(), 4);
        assert_eq!(counts, vec![1, 0, 1, 2]);
        assert_eq!(edges[0], 0.0);
        assert!((w - 0.25).abs() < 1e-12);
        let st = ValueStats::of(&v);
        assert_eq!((st.count, st.nonfinite), (4, 1));
        assert!((st.mean - 0.625).abs() < 1e-12);
    }

    #[test]
    fn charts_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = Panel::new("loss", "tokens", "loss", XAxis::Tokens);
        p.series.push(Series::line(
            "train",
            (0..50)
                .map(|i| (i as f64 * 1e6, 10.0 / (1.0 + i as f64)))
                .collect(),
            COLORS[0],
        ));
        p.series
            .push(Series::line("eval", vec![(0.0, 10.0), (4.9e7, 1.0)], COLORS[1]).markers());
        let path = dir.path().join("a.png");
        draw_panels(&path, (800, 500), Some("title"), &[p.clone(), p], (1, 2)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let v: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let st = histogram(&dir.path().join("h.png"), "L0 attn", &v).unwrap();
        assert_eq!(st.count, 1000);
        grouped_bars(
            &dir.path().join("b.png"),
            "L0",
            &["qkv".into(), "out".into()],
            &["-1", "0", "+1"],
            &[vec![0.3, 0.4, 0.3], vec![0.2, 0.6, 0.2]],
        )
        .unwrap();
        for f in ["h.png", "b.png"] {
            assert!(std::fs::metadata(dir.path().join(f)).unwrap().len() > 1000);
        }
    }
}
