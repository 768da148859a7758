//! `RUN_DIR/loss.png`: the training and validation loss against the step, redrawn at every
//! evaluation so it can be opened mid-run. Drawn with plotters; the font (DejaVu Sans) is
//! embedded, so no system fonts are needed.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::run::MetricsRow;

const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    ok.then_some(()).ok_or_else(|| anyhow!("the embedded font could not be loaded"))
}

/// (step, loss) points of a curve.
pub type Points = Vec<(f64, f64)>;

/// The logged training losses and the validation losses.
pub fn series(rows: &[MetricsRow]) -> (Points, Points) {
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for row in rows {
        match row.val_loss {
            Some(v) => val.push((row.step as f64, v)),
            None => train.push((row.step as f64, row.loss as f64)),
        }
    }
    (train, val)
}

/// Draws `rows` into the PNG `path` (written beside it, then renamed into place).
pub fn write_loss_plot(rows: &[MetricsRow], path: &Path) -> Result<()> {
    register_font()?;
    let (train, val) = series(rows);
    let points = train.iter().chain(&val).filter(|(_, l)| l.is_finite());
    let (mut max_step, mut lo, mut hi) = (1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(s, l) in points {
        max_step = max_step.max(s);
        lo = lo.min(l);
        hi = hi.max(l);
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(0.01);
    let tmp = path.with_file_name(".loss-partial.png");
    {
        let root = BitMapBackend::new(&tmp, (960, 540)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("minigpt: cross-entropy loss", (FONT, 24))
            .margin(16)
            .margin_right(40)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..max_step, (lo - pad)..(hi + pad))
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("loss (nats per character)")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 17))
            .draw()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        chart
            .draw_series(LineSeries::new(train.iter().copied(), BLUE.stroke_width(2)))
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?
            .label("train (logged steps)")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)).point_size(4))
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?
            .label("validation")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .label_font((FONT, 16))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
        root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
