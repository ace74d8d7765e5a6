//! The loss curves of several runs in one SVG (training loss smoothed, validation loss marked).

use std::path::Path;

use plotters::prelude::*;

use crate::{LossLog, ModelError};

/// Steps averaged by the smoothed training curve.
const SMOOTHING: usize = 10;

/// Draws `runs` (`(label, losses)`) into an SVG at `path`, with `references` (`(label,
/// loss)`) as dashed horizontal lines.
///
/// # Errors
/// [`ModelError::Plot`] when there is nothing to draw or drawing fails.
pub fn plot_losses(
    runs: &[(&str, &LossLog)],
    references: &[(&str, f64)],
    title: &str,
    path: &Path,
) -> Result<(), ModelError> {
    let err = |e: &dyn std::fmt::Display| ModelError::Plot(e.to_string());
    let steps = runs.iter().map(|(_, l)| l.train.len()).max().unwrap_or(0);
    let values = runs
        .iter()
        .flat_map(|(_, l)| {
            l.train
                .iter()
                .copied()
                .chain(l.valid.iter().map(|&(_, v)| v))
        })
        .chain(references.iter().map(|&(_, v)| v));
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if steps == 0 || !lo.is_finite() {
        return Err(ModelError::Plot("no finite losses to draw".into()));
    }
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let pad = 0.05 * (hi - lo).max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0usize..steps, (lo - pad)..(hi + pad))
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy (nats/token)")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (label, log)) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let smoothed: Vec<(usize, f64)> = (0..log.train.len())
            .map(|s| {
                let from = (s + 1).saturating_sub(SMOOTHING);
                let window = &log.train[from..=s];
                (s + 1, window.iter().sum::<f64>() / window.len() as f64)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(smoothed, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{label}: train ({SMOOTHING}-step mean)"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(
                log.valid
                    .iter()
                    .map(|&(s, v)| Circle::new((s, v), 4, color.filled())),
            )
            .map_err(|e| err(&e))?
            .label(format!("{label}: validation"))
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    for (i, &(label, loss)) in references.iter().enumerate() {
        let color = if i == 0 {
            BLACK
        } else {
            RGBColor(128, 128, 128)
        };
        let dashes = (0..steps).step_by((steps / 60).max(1) * 2).map(move |s| {
            PathElement::new(
                [(s, loss), ((s + (steps / 60).max(1)).min(steps), loss)],
                color.stroke_width(2),
            )
        });
        chart
            .draw_series(dashes)
            .map_err(|e| err(&e))?
            .label(format!("{label}: {loss:.3}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
