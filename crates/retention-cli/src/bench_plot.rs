//! `retention plot`: benchmark rows (the anchor script's CSV schema,
//! `impl,mode,shape,b,t,hq,hk,d,chunk,ms,tokens_per_s,tflops`) as SVG charts with PNG copies
//! ([`chart_png`](crate::chart_png)), per head shape:
//! time against the sequence length (log-log), tokens/s, achieved TFLOP/s (with the matmul peak
//! of the same machine as lines where the CSV has `matmul` rows), and the decode step's
//! latency (or a model's time per generated token, mode `generate`) against the context.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::CliError;
use crate::chart_png::png_of;

/// One CSV row, the columns the charts use.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotRow {
    /// `burn_retention`, `retention_triton`, `sdpa`, `torch_matmul`, `burn_matmul`, …
    pub implementation: String,
    /// `fwd`, `fwd+bwd`, `decode`, `decode_window`, `matmul`.
    pub mode: String,
    /// `mha64`, `brumby`.
    pub shape: String,
    /// Batch.
    pub b: usize,
    /// Sequence length (decode: the context).
    pub t: usize,
    /// Milliseconds per call.
    pub ms: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Achieved TFLOP/s.
    pub tflops: f64,
}

/// Parses CSV text in the anchor schema (header first; columns found by name).
///
/// # Errors
/// [`CliError::Input`] naming the line and column that is missing or not a number.
pub fn parse_rows(text: &str) -> Result<Vec<PlotRow>, CliError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or_else(|| CliError::Input("benchmark CSV: empty".into()))?;
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let column = |name: &str| {
        columns.iter().position(|c| *c == name).ok_or_else(|| {
            CliError::Input(format!("benchmark CSV: no column `{name}` in the header"))
        })
    };
    let at = [
        column("impl")?,
        column("mode")?,
        column("shape")?,
        column("b")?,
        column("t")?,
        column("ms")?,
        column("tokens_per_s")?,
        column("tflops")?,
    ];
    lines
        .map(|(n, line)| {
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let field = |i: usize| {
                fields.get(at[i]).copied().ok_or_else(|| {
                    CliError::Input(format!(
                        "benchmark CSV line {}: {} fields, expected {}",
                        n + 1,
                        fields.len(),
                        columns.len()
                    ))
                })
            };
            let number = |i: usize| -> Result<f64, CliError> {
                let text = field(i)?;
                text.parse::<f64>().map_err(|_| {
                    CliError::Input(format!(
                        "benchmark CSV line {}: `{text}` in column `{}` is not a number",
                        n + 1,
                        columns[at[i]]
                    ))
                })
            };
            Ok(PlotRow {
                implementation: field(0)?.to_string(),
                mode: field(1)?.to_string(),
                shape: field(2)?.to_string(),
                b: number(3)? as usize,
                t: number(4)? as usize,
                ms: number(5)?,
                tokens_per_s: number(6)?,
                tflops: number(7)?,
            })
        })
        .collect()
}

/// How a series is drawn: the implementation's colour, and a dashed line with triangles for the
/// second kind of row (`fwd+bwd`, or batch 32 of the decode chart).
#[derive(Debug, Clone, Copy)]
struct Style {
    color: RGBColor,
    second: bool,
}

/// A chart's series: label → style and points `(x, y)` sorted by `x`.
type Series = BTreeMap<String, (Style, Vec<(f64, f64)>)>;

/// What a chart draws, and how.
struct Chart<'a> {
    /// File name part: `<shape>-<name>.svg`.
    name: &'a str,
    /// The value drawn against `t`.
    value: fn(&PlotRow) -> f64,
    /// Decode rows (against the context) instead of fwd / fwd+bwd rows.
    decode: bool,
    title: String,
    x_desc: &'a str,
    y_desc: &'a str,
    log_y: bool,
    /// Horizontal reference lines: `(label, y)`.
    lines: Vec<(String, f64)>,
}

/// Draws the charts of every shape in `rows` into `dir` (created if needed), each as SVG and
/// as PNG; returns the files written (each SVG followed by its PNG).
///
/// # Errors
/// [`CliError::Input`] when no row can be drawn; [`CliError::Io`] when the directory cannot be
/// made; [`CliError::Plot`] when drawing or writing a chart fails.
pub fn plot_rows(rows: &[PlotRow], dir: &Path) -> Result<Vec<PathBuf>, CliError> {
    std::fs::create_dir_all(dir).map_err(|source| CliError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let mut shapes: Vec<&str> = rows.iter().map(|r| r.shape.as_str()).collect();
    shapes.sort_unstable();
    shapes.dedup();
    let mut written = Vec::new();
    for shape in shapes {
        let of_shape: Vec<&PlotRow> = rows.iter().filter(|r| r.shape == shape).collect();
        let label = |r: &PlotRow| format!("{} {}", display_name(&r.implementation), r.mode);
        let sequence_rows = |r: &&&PlotRow| matches!(r.mode.as_str(), "fwd" | "fwd+bwd");
        let peaks: Vec<(String, f64)> = of_shape
            .iter()
            .filter(|r| r.mode == "matmul")
            .map(|r| {
                (
                    format!("{} {}³", display_name(&r.implementation), r.t),
                    r.tflops,
                )
            })
            .collect();
        let charts = [
            Chart {
                name: "time",
                value: |r| r.ms,
                decode: false,
                title: format!("{shape}: time per call (64k tokens)"),
                x_desc: "sequence length t",
                y_desc: "ms per call",
                log_y: true,
                lines: Vec::new(),
            },
            Chart {
                name: "throughput",
                value: |r| r.tokens_per_s,
                decode: false,
                title: format!("{shape}: throughput"),
                x_desc: "sequence length t",
                y_desc: "tokens / s",
                log_y: true,
                lines: Vec::new(),
            },
            Chart {
                name: "tflops",
                value: |r| r.tflops,
                decode: false,
                title: format!("{shape}: achieved TFLOP/s"),
                x_desc: "sequence length t",
                y_desc: "TFLOP/s",
                log_y: false,
                lines: peaks,
            },
            Chart {
                name: "decode",
                value: |r| r.ms,
                decode: true,
                title: format!("{shape}: decode step latency"),
                x_desc: "context (tokens)",
                y_desc: "ms per step",
                log_y: true,
                lines: Vec::new(),
            },
        ];
        for chart in charts {
            let (name, value, decode) = (chart.name, chart.value, chart.decode);
            let mut series = Series::new();
            for r in of_shape.iter().filter(|r| {
                if decode {
                    r.mode.starts_with("decode") || r.mode == "generate"
                } else {
                    sequence_rows(r)
                }
            }) {
                let (key, style) = if decode {
                    let style = Style {
                        color: color_of(&r.implementation, r.mode == "decode_window"),
                        second: r.b > 1,
                    };
                    let key = if r.mode == "generate" {
                        display_name(&r.implementation).to_string()
                    } else {
                        format!("{} b={}", label(r), r.b)
                    };
                    (key, style)
                } else {
                    let style = Style {
                        color: color_of(&r.implementation, false),
                        second: r.mode == "fwd+bwd",
                    };
                    (label(r), style)
                };
                let y = value(r);
                if y.is_finite() && y > 0.0 {
                    series
                        .entry(key)
                        .or_insert_with(|| (style, Vec::new()))
                        .1
                        .push((r.t as f64, y));
                }
            }
            if series.is_empty() {
                continue;
            }
            for (_, points) in series.values_mut() {
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                // a later row for the same x replaces an earlier one
                points.dedup_by(|later, earlier| {
                    let same = later.0 == earlier.0;
                    if same {
                        *earlier = *later;
                    }
                    same
                });
            }
            let path = dir.join(format!("{shape}-{name}.svg"));
            draw(&chart, &series, &path)?;
            let png = png_of(&path)?;
            written.extend([path, png]);
        }
    }
    if written.is_empty() {
        return Err(CliError::Input(
            "benchmark CSV: no fwd, fwd+bwd or decode rows to draw".into(),
        ));
    }
    Ok(written)
}

/// An implementation's colour (`alternate`: the second decode mode).
fn color_of(implementation: &str, alternate: bool) -> RGBColor {
    match (implementation, alternate) {
        ("burn_retention", false) => RGBColor(214, 39, 40),
        ("burn_retention", true) => RGBColor(255, 127, 14),
        ("retention_triton", _) => RGBColor(31, 119, 180),
        ("sdpa", _) => RGBColor(44, 160, 44),
        ("burn_reference", _) => RGBColor(148, 103, 189),
        ("power_retention", _) => RGBColor(214, 39, 40),
        ("attention", _) => RGBColor(44, 160, 44),
        _ => RGBColor(127, 127, 127),
    }
}

/// Axis labels: `1k`, `64k`, `1M` for token counts; three significant digits otherwise.
fn tokens_label(x: &f64) -> String {
    if *x >= 1_048_576.0 {
        format!("{}M", (x / 1_048_576.0).round())
    } else if *x >= 1024.0 {
        format!("{}k", (x / 1024.0).round())
    } else {
        format!("{x:.0}")
    }
}

fn value_label(y: &f64) -> String {
    let y = *y;
    if y == 0.0 {
        "0".to_string()
    } else if y >= 1e6 {
        format!("{:.0}M", y / 1e6)
    } else if y >= 1e3 {
        format!("{:.0}k", y / 1e3)
    } else if y >= 10.0 {
        format!("{y:.0}")
    } else if y >= 1.0 {
        format!("{y:.1}")
    } else {
        format!("{y:.3}")
    }
}

/// The legend's name of an implementation.
fn display_name(implementation: &str) -> &str {
    match implementation {
        "burn_retention" => "ours",
        "burn_reference" => "ours (reference)",
        "retention_triton" => "Manifest Triton",
        "sdpa" => "SDPA (flash)",
        "torch_matmul" => "torch matmul",
        "burn_matmul" => "Burn matmul",
        "power_retention" => "power retention (state)",
        "attention" => "attention (key/value cache)",
        other => other,
    }
}

fn draw(chart: &Chart<'_>, series: &Series, path: &Path) -> Result<(), CliError> {
    let err = |e: &dyn std::fmt::Display| CliError::Plot(e.to_string());
    let points = || series.values().flat_map(|(_, p)| p);
    let (x_lo, x_hi) = points().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| {
        (lo.min(p.0), hi.max(p.0))
    });
    let ys = points().map(|p| p.1).chain(chart.lines.iter().map(|l| l.1));
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, 0.0f64), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let x_range = (x_lo / 1.3)..(x_hi * 1.3);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(&chart.title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(64);
    // headroom above the data for the legend
    if chart.log_y {
        let mut c = builder
            .build_cartesian_2d(
                x_range.log_scale(),
                ((y_lo / 1.5)..(y_hi * 8.0)).log_scale(),
            )
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .x_label_formatter(&tokens_label)
            .y_label_formatter(&value_label)
            .draw()
            .map_err(|e| err(&e))?;
        draw_series(&mut c, chart, series, (x_lo / 1.3, x_hi * 1.3))?;
    } else {
        let mut c = builder
            .build_cartesian_2d(x_range.log_scale(), 0.0..(y_hi * 1.6))
            .map_err(|e| err(&e))?;
        c.configure_mesh()
            .x_desc(chart.x_desc)
            .y_desc(chart.y_desc)
            .x_label_formatter(&tokens_label)
            .y_label_formatter(&value_label)
            .draw()
            .map_err(|e| err(&e))?;
        draw_series(&mut c, chart, series, (x_lo / 1.3, x_hi * 1.3))?;
    }
    root.present().map_err(|e| err(&e))
}

fn draw_series<'a, X, Y>(
    c: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    chart: &Chart<'_>,
    series: &Series,
    (x_lo, x_hi): (f64, f64),
) -> Result<(), CliError>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    let err = |e: &dyn std::fmt::Display| CliError::Plot(e.to_string());
    for (label, (style, points)) in series {
        let color = style.color;
        let line = color.stroke_width(2);
        if style.second {
            c.draw_series(DashedLineSeries::new(points.iter().copied(), 8, 5, line))
                .map_err(|e| err(&e))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new([(0, 0), (20, 0)], line)
                        + TriangleMarker::new((10, 0), 4, color.filled())
                });
            c.draw_series(
                points
                    .iter()
                    .map(|&(x, y)| TriangleMarker::new((x, y), 4, color.filled())),
            )
            .map_err(|e| err(&e))?;
        } else {
            c.draw_series(LineSeries::new(points.iter().copied(), line))
                .map_err(|e| err(&e))?
                .label(label.clone())
                .legend(move |(x, y)| {
                    EmptyElement::at((x, y))
                        + PathElement::new([(0, 0), (20, 0)], line)
                        + Circle::new((10, 0), 3, color.filled())
                });
            c.draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
            )
            .map_err(|e| err(&e))?;
        }
    }
    for (label, y) in &chart.lines {
        let y = *y;
        c.draw_series(LineSeries::new(
            [(x_lo, y), (x_hi, y)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| err(&e))?
        .label(format!("{label}: {y:.0}"))
        .legend(move |(x, yy)| PathElement::new([(x, yy), (x + 20, yy)], BLACK));
    }
    c.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "impl,mode,shape,b,t,hq,hk,d,chunk,ms,tokens_per_s,tflops
burn_retention,fwd,mha64,64,1024,8,8,64,-,1.1,58689432,61.5
burn_retention,fwd,mha64,32,2048,8,8,64,1024,5.4,12006365,63.7
retention_triton,fwd,mha64,32,2048,8,8,64,1024,5.9,11006365,58.1
burn_retention,decode,mha64,1,1024,8,8,64,-,0.07,14394,0.1
burn_retention,decode,mha64,1,65536,8,8,64,-,0.066,15221,0.1
torch_matmul,matmul,mha64,1,8192,0,0,0,-,1.4,0,780.0
";

    #[test]
    fn rows_parse_by_column_name() {
        let rows = parse_rows(CSV).expect("parses");
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[2].implementation, "retention_triton");
        assert_eq!(rows[1].t, 2048);
        assert!((rows[0].tflops - 61.5).abs() < 1e-12);
    }

    #[test]
    fn a_bad_number_names_its_line_and_column() {
        let text = "impl,mode,shape,b,t,ms,tokens_per_s,tflops\nx,fwd,mha64,1,1024,fast,1,1\n";
        match parse_rows(text) {
            Err(CliError::Input(msg)) => {
                assert!(msg.contains("line 2") && msg.contains("`ms`"), "{msg}")
            }
            other => panic!("expected an input error, got {other:?}"),
        }
        assert!(matches!(
            parse_rows("impl,mode\n"),
            Err(CliError::Input(msg)) if msg.contains("`shape`")
        ));
    }

    #[test]
    fn charts_are_written_per_shape_and_kind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let written = plot_rows(&parse_rows(CSV).expect("parses"), dir.path()).expect("draws");
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "mha64-time.svg",
                "mha64-time.png",
                "mha64-throughput.svg",
                "mha64-throughput.png",
                "mha64-tflops.svg",
                "mha64-tflops.png",
                "mha64-decode.svg",
                "mha64-decode.png"
            ]
        );
        // the PNG copy: the SVG's 900 × 560, with the chart drawn on it (axes, grid and
        // lines: a few percent of the pixels are not white, with or without a font)
        let png =
            resvg::tiny_skia::Pixmap::load_png(dir.path().join("mha64-time.png")).expect("a PNG");
        assert_eq!((png.width(), png.height()), (900, 560));
        let drawn = png
            .pixels()
            .iter()
            .filter(|p| (p.red(), p.green(), p.blue()) != (255, 255, 255))
            .count();
        let share = drawn as f64 / png.pixels().len() as f64;
        assert!((0.01..0.5).contains(&share), "drawn share {share}");
        let tflops = std::fs::read_to_string(dir.path().join("mha64-tflops.svg")).expect("svg");
        assert!(tflops.contains("torch matmul 8192"), "ceiling line drawn");
        assert!(tflops.contains("Manifest Triton fwd"));
    }

    #[test]
    fn nothing_to_draw_is_an_error() {
        let text = "impl,mode,shape,b,t,ms,tokens_per_s,tflops\nx,other,mha64,1,1024,1,1,1\n";
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            plot_rows(&parse_rows(text).expect("parses"), dir.path()),
            Err(CliError::Input(_))
        ));
    }
}
