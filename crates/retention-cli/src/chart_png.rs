//! PNG copies of the SVG charts: each SVG that plotters writes is rasterised by `resvg` at its
//! own size, so the two formats come from one drawing. The charts' `sans-serif` text is
//! set in the first of a few common system fonts found (Debian: `fonts-dejavu-core`); without
//! any system font the PNGs carry no text, and [`has_fonts`] says so.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use resvg::{tiny_skia, usvg};

use crate::CliError;

/// Families tried, in order, for the charts' `sans-serif` text.
const SANS_SERIF: [&str; 4] = ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"];

/// Pixels per SVG unit.
const SCALE: f32 = 1.0;

/// The system's fonts, loaded once per process.
fn fonts() -> Arc<usvg::fontdb::Database> {
    static FONTS: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = usvg::fontdb::Database::new();
            db.load_system_fonts();
            let found = SANS_SERIF.into_iter().find(|name| {
                db.faces()
                    .any(|face| face.families.iter().any(|(family, _)| family == name))
            });
            let fallback = db
                .faces()
                .next()
                .and_then(|face| face.families.first())
                .map(|(family, _)| family.clone());
            if let Some(family) = found.map(str::to_string).or(fallback) {
                db.set_sans_serif_family(family);
            }
            Arc::new(db)
        })
        .clone()
}

/// Whether a system font was found for the PNGs' text.
pub fn has_fonts() -> bool {
    !fonts().is_empty()
}

/// Writes the PNG copy of the chart `svg` beside it (same name, `.png`); returns its path.
///
/// # Errors
/// [`CliError::Io`] when the SVG cannot be read; [`CliError::Plot`] when it cannot be parsed,
/// is empty, or the PNG cannot be written.
pub fn png_of(svg: &Path) -> Result<PathBuf, CliError> {
    let data = std::fs::read(svg).map_err(|source| CliError::Io {
        path: svg.display().to_string(),
        source,
    })?;
    let err = |what: &dyn std::fmt::Display| CliError::Plot(format!("{}: {what}", svg.display()));
    let options = usvg::Options {
        fontdb: fonts(),
        ..usvg::Options::default()
    };
    let tree = usvg::Tree::from_data(&data, &options).map_err(|e| err(&e))?;
    let size = tree.size();
    let (width, height) = (
        (size.width() * SCALE).ceil() as u32,
        (size.height() * SCALE).ceil() as u32,
    );
    let mut pixmap = tiny_skia::Pixmap::new(width, height).ok_or_else(|| err(&"empty chart"))?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(SCALE, SCALE),
        &mut pixmap.as_mut(),
    );
    let png = svg.with_extension("png");
    pixmap.save_png(&png).map_err(|e| err(&e))?;
    Ok(png)
}
