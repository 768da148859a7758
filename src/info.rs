//! `minigpt info`: what a run directory or a SavedModel holds, in a few lines.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::checkpoint::RunDir;
use crate::graph::{GraphOptions, ModelGraph};
use crate::model::ModelConfig;
use crate::saved_model;

/// Trainable parameters of a model, counted from the variables its graph builder makes.
pub fn parameter_count(model: &ModelConfig) -> Result<u64> {
    Ok(crate::model::parameters(ModelGraph::build(model, &GraphOptions::new(0))?.model.as_ref()))
}

/// 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The description `minigpt info` prints.
pub fn describe(path: &Path) -> Result<String> {
    if saved_model::is_saved_model(path) {
        describe_saved_model(path)
    } else {
        describe_run(path)
    }
}

fn describe_run(path: &Path) -> Result<String> {
    let dir = RunDir::open(path)?;
    let config = dir.read_config()?;
    let m = &config.model;
    let mut out = String::new();
    writeln!(out, "run:          {}", path.display())?;
    writeln!(out, "model:        {}", m.describe())?;
    writeln!(out, "parameters:   {}", thousands(parameter_count(m)?))?;
    writeln!(out, "vocabulary:   {} characters", config.vocab.len())?;
    let t = &config.train;
    writeln!(out, "trained:      {} steps, {} of {} epochs (block {}, batch {}, lr {}, seed {})", config.steps_done, config.epochs_done, t.epochs, t.block_size, t.batch_size, t.adam.learning_rate, t.seed)?;
    let metrics = std::fs::read_to_string(dir.metrics_path()).unwrap_or_default();
    let last_eval = metrics.lines().skip(1).filter(|l| !l.ends_with(',')).last();
    match last_eval.map(|l| l.split(',').collect::<Vec<_>>()) {
        Some(f) if f.len() == 4 => writeln!(out, "last losses:  train {}, val {} (step {})", short(f[2]), short(f[3]), f[0])?,
        _ => writeln!(out, "last losses:  none recorded")?,
    }
    if let Some(best) = config.best {
        writeln!(out, "best:         val {:.4} at step {} (ckpt/best)", best.val_loss, best.step)?;
    }
    writeln!(out, "data:         {} (SHA-256 {})", config.data.source, config.data.sha256)?;
    let checkpoints = dir.checkpoints().map(|c| c.iter().map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned()).collect::<Vec<_>>().join(", "));
    writeln!(out, "checkpoints:  {}", checkpoints.unwrap_or_else(|e| format!("none ({e})")))?;
    Ok(out)
}

fn short(x: &str) -> String {
    x.parse::<f64>().map(|v| format!("{v:.4}")).unwrap_or_else(|_| x.to_string())
}

fn describe_saved_model(path: &Path) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "savedmodel:   {}", path.display())?;
    let vocab = saved_model::vocabulary(path, None);
    match &vocab {
        Ok(v) => writeln!(out, "vocabulary:   {} characters (assets.extra/vocab.json)", v.len())?,
        Err(_) => writeln!(out, "vocabulary:   none (give --vocab FILE to generate or eval)")?,
    }
    let config: Option<serde_json::Value> =
        std::fs::read_to_string(path.join("assets.extra/minigpt.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let model: Option<ModelConfig> = config.as_ref().and_then(|c| serde_json::from_value(c["model"].clone()).ok());
    match &model {
        Some(m) => {
            writeln!(out, "model:        {} (assets.extra/minigpt.json)", m.describe())?;
            writeln!(out, "parameters:   {}", thousands(parameter_count(m)?))?;
        }
        None => {
            // No configuration: list what the variables checkpoint holds.
            let mut entries = saved_model::variables_reader(path)?.entries()?;
            entries.sort_by(|a, b| a.key.cmp(&b.key));
            writeln!(out, "model:        unknown (no assets.extra/minigpt.json); its variables:")?;
            for e in entries.iter().filter(|e| !e.key.starts_with('_')) {
                writeln!(out, "  {} {:?}", e.key, e.shape)?;
            }
        }
    }
    if let Some(c) = &config {
        if let Some(steps) = c.get("steps_done") {
            writeln!(out, "trained:      {steps} steps")?;
        }
        if let Some(data) = c.get("data") {
            writeln!(out, "data:         {} (SHA-256 {})", data["source"].as_str().unwrap_or("?"), data["sha256"].as_str().unwrap_or("?"))?;
        }
    }
    Ok(out)
}
