//! `minigpt info`: what a run directory or a SavedModel holds, in a few lines.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{ensure, Result};

use crate::model::parameters;
use crate::run::{self, RunDir};
use crate::saved_model::{self, Declared};
use crate::text::thousands;

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
    // What is reported must be what the newest checkpoint holds, as every other command checks.
    let vars = m.variables()?;
    if let Some(newest) = dir.checkpoints().ok().and_then(|c| c.into_iter().next()) {
        dir.check_variables(&vars, &newest)?;
    }
    let mut out = String::new();
    writeln!(out, "run:          {}", path.display())?;
    writeln!(out, "model:        {}", m.describe())?;
    writeln!(out, "parameters:   {}", thousands(parameters(&vars)))?;
    writeln!(out, "vocabulary:   {} characters", config.vocab.len())?;
    let t = &config.train;
    // config.json is written after the checkpoint state: a process killed in between leaves it a
    // checkpoint behind. The newest checkpoint's step is what a resume continues from.
    let newest = dir.checkpoints().ok().and_then(|c| run::checkpoint_step(c.first()?));
    let steps = newest.unwrap_or(0).max(config.steps_done);
    writeln!(
        out,
        "trained:      {} steps, {} of {} epochs (block {}, batch {}, lr {}, seed {})",
        steps, config.epochs_done, t.epochs, t.block_size, t.batch_size, t.adam.learning_rate, t.seed
    )?;
    match dir.read_metrics() {
        Ok(rows) => match rows.iter().rev().find_map(|r| r.val_loss.map(|v| (r, v))) {
            Some((row, val)) => writeln!(out, "last losses:  train {:.4}, val {val:.4} (step {})", row.loss, row.step)?,
            None => writeln!(out, "last losses:  none recorded")?,
        },
        Err(e) => writeln!(out, "last losses:  unknown ({})", crate::text::error_line(&e))?,
    }
    if let Some(best) = config.best {
        writeln!(out, "best:         val {:.4} at step {} (ckpt/best)", best.val_loss, best.step)?;
    }
    writeln!(out, "data:         {} (SHA-256 {})", config.data.source, config.data.sha256)?;
    let checkpoints = dir.checkpoints().map(|c| {
        c.iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(", ")
    });
    writeln!(out, "checkpoints:  {}", checkpoints.unwrap_or_else(|e| format!("none ({e})")))?;
    Ok(out)
}

fn describe_saved_model(path: &Path) -> Result<String> {
    let mut out = String::new();
    writeln!(out, "savedmodel:   {}", path.display())?;
    match saved_model::vocabulary(path, None) {
        Ok(v) => writeln!(out, "vocabulary:   {} characters (assets.extra/vocab.json)", v.len())?,
        Err(_) if !saved_model::carries_vocabulary(path) => {
            writeln!(out, "vocabulary:   none (give --vocab FILE to generate or eval)")?
        }
        // A vocabulary that is there but broken is an error, as for every other command.
        Err(e) => return Err(e),
    }
    let declared = Declared::read(path)?.unwrap_or_default();
    match &declared.model {
        Some(m) => {
            // The model minigpt.json declares must be the one the variables hold, as for
            // `train --init-from`.
            let vars = m.variables()?;
            let held = saved_model::weight_elements(path)?;
            ensure!(
                parameters(&vars) <= held,
                "{}: its assets.extra/minigpt.json declares a model ({}) of {} parameters; its variables hold {}",
                path.display(),
                m.describe(),
                thousands(parameters(&vars)),
                thousands(held)
            );
            saved_model::import_weights(path, &vars).map_err(|e| {
                anyhow::anyhow!(
                    "{}: its assets.extra/minigpt.json declares a model ({}) its variables do not hold: {}",
                    path.display(),
                    m.describe(),
                    crate::text::error_line(&e)
                )
            })?;
            writeln!(out, "model:        {} (assets.extra/minigpt.json)", m.describe())?;
            writeln!(out, "parameters:   {}", thousands(parameters(&vars)))?;
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
    match saved_model::object_graph_restores(path)? {
        0 => writeln!(out, "variables:    restored by its saver")?,
        n => writeln!(
            out,
            "variables:    {n} restored through its object graph (TensorFlow's C++ loader leaves them uninitialized)"
        )?,
    }
    if let Some(steps) = declared.steps_done {
        writeln!(out, "trained:      {steps} steps")?;
    }
    if let Some(data) = &declared.data {
        writeln!(out, "data:         {} (SHA-256 {})", data.source, data.sha256)?;
    }
    Ok(out)
}
