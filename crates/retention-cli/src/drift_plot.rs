//! The decode-drift chart: the error of recurrent steps against the chunked form per block of
//! steps, one line per gate pattern and state dtype, both axes logarithmic.

use std::collections::BTreeMap;
use std::path::Path;

use plotters::prelude::*;

use crate::CliError;

/// One point of a drift curve: steps after the prefill and the block's worst relative error.
pub type DriftPoint = (f64, f64);

/// Reads the rows `retention drift` writes (`shape,gates,dtype,tokens,check,value,...`) into
/// curves keyed `"<shape>, gates <g>, <dtype> state"`, x counted from the first block's start.
///
/// # Errors
/// [`CliError::Input`] naming the line that is not such a row.
pub fn read_drift_csv(text: &str) -> Result<BTreeMap<String, Vec<DriftPoint>>, CliError> {
    let mut points = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let bad = || CliError::Input(format!("drift CSV line {}: `{line}`", n + 1));
        if f.len() < 6 {
            return Err(bad());
        }
        let tokens: usize = f[3].parse().map_err(|_| bad())?;
        let value: f64 = f[5].parse().map_err(|_| bad())?;
        points.push((curve_name(f[0], f[1], f[2]), tokens, value));
    }
    Ok(drift_curves(points))
}

/// The key of one curve: `"<shape>, gates <g>, <dtype> state"`.
pub fn curve_name(shape: &str, gates: &str, dtype: &str) -> String {
    format!("{shape}, gates {gates}, {} state", dtype.to_lowercase())
}

/// Curves from `(curve, position after the block, error)` points, x counted in steps from
/// the prefill (the first block ends one block's length after it).
pub fn drift_curves(
    points: impl IntoIterator<Item = (String, usize, f64)>,
) -> BTreeMap<String, Vec<DriftPoint>> {
    let mut curves: BTreeMap<String, Vec<(usize, f64)>> = BTreeMap::new();
    for (key, tokens, value) in points {
        curves.entry(key).or_default().push((tokens, value));
    }
    curves
        .into_iter()
        .map(|(k, mut pts)| {
            pts.sort_by_key(|p| p.0);
            let every = match pts.as_slice() {
                [a, b, ..] => b.0 - a.0,
                _ => 1,
            };
            let prefill = pts.first().map_or(0, |p| p.0.saturating_sub(every));
            let pts = pts
                .into_iter()
                .map(|(t, v)| ((t - prefill) as f64, v))
                .collect();
            (k, pts)
        })
        .collect()
}

/// Draws the curves into an SVG at `out`.
///
/// # Errors
/// [`CliError::Input`] when there is nothing to draw, [`CliError::Plot`] when drawing fails.
pub fn plot_drift(
    curves: &BTreeMap<String, Vec<DriftPoint>>,
    title: &str,
    out: &Path,
) -> Result<(), CliError> {
    let points = curves
        .values()
        .flatten()
        .filter(|p| p.0 > 0.0 && p.1 > 0.0 && p.1.is_finite());
    let (mut x_hi, mut y_lo, mut y_hi) = (1.0f64, f64::INFINITY, 0.0f64);
    for &(x, y) in points {
        x_hi = x_hi.max(x);
        y_lo = y_lo.min(y);
        y_hi = y_hi.max(y);
    }
    if y_hi == 0.0 {
        return Err(CliError::Input(
            "drift CSV: no positive errors to draw".into(),
        ));
    }
    let plot = |e: Box<dyn std::error::Error>| CliError::Plot(e.to_string());
    let root = SVGBackend::new(out, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot(Box::new(e)))?;
    let x_lo = curves
        .values()
        .flatten()
        .map(|p| p.0)
        .filter(|&x| x > 0.0)
        .fold(x_hi, f64::min);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .margin_right(40)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x_lo..x_hi).log_scale(),
            ((y_lo / 2.0)..(y_hi * 60.0)).log_scale(),
        )
        .map_err(|e| plot(Box::new(e)))?;
    chart
        .configure_mesh()
        .x_desc("decode steps after the prefill")
        .y_desc("max relative error vs chunked f32")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()
        .map_err(|e| plot(Box::new(e)))?;
    let palette = [
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(23, 190, 207),
    ];
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = palette[i % palette.len()];
        let pts: Vec<DriftPoint> = pts
            .iter()
            .copied()
            .filter(|p| p.0 > 0.0 && p.1 > 0.0 && p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| plot(Box::new(e)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| plot(Box::new(e)))?;
    root.present().map_err(|e| plot(Box::new(e)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "shape,gates,dtype,tokens,check,value,limit,passed
mha64,zero,F32,5096,decode,1e-6,0.001,true
mha64,zero,F32,6096,decode,2e-6,0.001,true
mha64,zero,BF16,5096,decode,0.1,inf,true
mha64,zero,BF16,6096,decode,0.5,inf,true
";

    #[test]
    fn curves_count_steps_from_the_prefill() {
        let curves = read_drift_csv(CSV).expect("parses");
        assert_eq!(curves.len(), 2);
        assert_eq!(
            curves["mha64, gates zero, f32 state"],
            vec![(1000.0, 1e-6), (2000.0, 2e-6)]
        );
        let out = std::env::temp_dir().join("retention-drift-test.svg");
        plot_drift(&curves, "drift", &out).expect("draws");
        let svg = std::fs::read_to_string(&out).expect("written");
        assert!(svg.contains("bf16 state") && svg.contains("<polyline"));
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = read_drift_csv("h\nmha64,zero,F32,x,decode,1e-6\n").expect_err("bad tokens");
        assert!(e.to_string().contains("line 2"), "{e}");
    }
}
