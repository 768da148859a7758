//! The run directory: `config.json` (a [`RunConfig`], validated when read), `ckpt/` (TensorFlow
//! V2 checkpoints with a `checkpoint` state file, as `tf.train.CheckpointManager` keeps them),
//! `metrics.csv` (rows of [`MetricsRow`]), and loading a run's newest checkpoint into a graph.
//! Every file is written to a temporary name and renamed into place.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::{Shuffle, Vocab};
use crate::device::{DeviceChoice, SessionConfig};
use crate::files::{path_str, write_atomic};
use crate::graph::{GraphOptions, Purpose, Runner};
use crate::model::ModelConfig;
use crate::optim::AdamConfig;
use crate::sampler::SamplerConfig;
use crate::text::one_line;
use crate::tfx::{CheckpointReader, Var};

/// Everything `train` writes in a run directory.
const RUN_FILES: [&str; 6] = ["ckpt", "lock", "config.json", "metrics.csv", "loss.png", "events"];

/// Checkpoints kept in `ckpt/` unless `--keep` says otherwise.
pub const KEEP_CHECKPOINTS: usize = 3;

/// Training hyperparameters, as given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSettings {
    pub epochs: u64,
    pub max_steps: Option<u64>,
    pub block_size: usize,
    pub batch_size: usize,
    pub adam: AdamConfig,
    pub shuffle: Shuffle,
    pub seed: u64,
    pub device: DeviceChoice,
    /// Also checkpoint every this many steps (besides each epoch's end and the run's).
    #[serde(default)]
    pub save_every: Option<u64>,
    /// Also evaluate every this many steps (besides each epoch's end and the run's).
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Checkpoints kept.
    #[serde(default = "default_keep")]
    pub keep: usize,
}

fn default_keep() -> usize {
    KEEP_CHECKPOINTS
}

impl TrainSettings {
    /// The rules the command line applies, and `config.json` when read back.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.block_size > 0, "--block-size must be at least 1");
        ensure!(self.batch_size > 0, "--batch-size must be at least 1");
        ensure!(self.epochs > 0, "--epochs must be at least 1");
        ensure!(self.max_steps != Some(0), "--max-steps must be at least 1");
        ensure!(self.save_every != Some(0), "--save-every must be at least 1");
        ensure!(self.eval_every != Some(0), "--eval-every must be at least 1");
        ensure!(self.keep > 0, "--keep must be at least 1");
        ensure!(self.shuffle != Shuffle::Buffer(0), "the shuffle buffer must hold at least 1 window");
        self.adam.validate()
    }
}

/// Where the training text came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataInfo {
    pub source: String,
    pub sha256: String,
}

/// `config.json`: everything needed to rebuild and use the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub train: TrainSettings,
    /// One-character strings in id order.
    pub vocab: Vec<String>,
    pub data: DataInfo,
    pub steps_done: u64,
    pub epochs_done: u64,
    /// The lowest validation loss so far and its step; `ckpt/best` holds those weights.
    #[serde(default)]
    pub best: Option<Best>,
    /// The workers of the last `train --cluster` of this run (none: trained in one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Vec<String>>,
    pub minigpt_version: String,
}

/// The best evaluation of a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub val_loss: f64,
    pub step: u64,
}

impl RunConfig {
    /// Everything the command line checks, and that the vocabulary fits the model.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        self.train.validate()?;
        if let Some(context) = self.model.context_limit() {
            ensure!(
                self.train.block_size as u64 <= context,
                "--block-size {} exceeds the model's {context} positions",
                self.train.block_size
            );
        }
        self.vocab().map(|_| ())
    }

    pub fn vocab(&self) -> Result<Vocab> {
        let vocab = Vocab::from_strings(&self.vocab)?;
        ensure!(
            vocab.len() as u64 == self.model.vocab_size,
            "config.json: vocabulary has {} characters but model.vocab_size is {}",
            vocab.len(),
            self.model.vocab_size
        );
        Ok(vocab)
    }
}

/// One line of `metrics.csv`: a logged training loss (`val_loss` empty), or an evaluation
/// (`loss` the last training loss before it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricsRow {
    pub step: u64,
    /// 1-based.
    pub epoch: u64,
    pub loss: f32,
    pub val_loss: Option<f64>,
}

/// What a run is loaded for.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    /// Evaluation and generation (with `sampler`, the bigram's in-graph loop).
    Inference { sampler: Option<SamplerConfig> },
    /// More training or an export: every variable, the optimizer's too.
    Training { summaries: bool },
}

pub struct RunDir {
    pub path: PathBuf,
}

/// Held while a process trains in a run directory: an advisory lock (`flock`) on `RUN_DIR/lock`,
/// released when the process ends however it ends, so a crash leaves nothing stale.
pub struct RunLock {
    _file: fs::File,
}

impl RunDir {
    /// Creates a new run directory. A folder that exists is taken only if it is empty or holds
    /// nothing but what minigpt writes in a run (recognised by its `config.json`, which must read
    /// as a run's): a run stopped before its first checkpoint (a `config.json`, no checkpoint) is
    /// started afresh; a run with checkpoints is refused (`--resume` continues it), and so is
    /// anything else (the user's files, a SavedModel, `--out .`).
    pub fn create(path: &Path) -> Result<Self> {
        let dir = Self::check_new(path)?;
        fs::create_dir_all(dir.ckpt_dir()).with_context(|| format!("creating run directory {}", path.display()))?;
        Ok(dir)
    }

    /// [`RunDir::create`]'s checks alone, making nothing: `train` runs them before it reads (or
    /// downloads) the corpus.
    pub fn check_new(path: &Path) -> Result<Self> {
        let dir = Self { path: path.to_path_buf() };
        // TensorFlow takes the checkpoint and event paths as UTF-8.
        path_str(path).context("--out")?;
        dir.check_contained()?;
        if path.exists() {
            ensure!(path.is_dir(), "--out {} is not a folder", path.display());
            dir.check_only_ours()?;
        }
        Ok(dir)
    }

    /// Refuses an existing folder that holds anything but a run minigpt can start afresh.
    fn check_only_ours(&self) -> Result<()> {
        let path = &self.path;
        let listing = |dir: &Path| -> Result<Vec<String>> {
            let mut names = Vec::new();
            for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
                names.push(
                    entry.with_context(|| format!("reading {}", dir.display()))?.file_name().to_string_lossy().into(),
                );
            }
            names.sort();
            Ok(names)
        };
        // What a run writes, and what a run that died may leave (temporary files, a partial plot).
        let ours = |name: &str| RUN_FILES.contains(&name) || name.starts_with(".tmp") || name == ".loss-partial.png";
        let foreign: Vec<String> = listing(path)?.into_iter().filter(|n| !ours(n)).collect();
        if !foreign.is_empty() {
            let shown = foreign.iter().take(3).map(String::as_str).collect::<Vec<_>>().join(", ");
            let more = if foreign.len() > 3 { format!(" and {} more", foreign.len() - 3) } else { String::new() };
            bail!(
                "--out {} holds files minigpt did not write there ({shown}{more}): give a new or empty folder",
                path.display()
            );
        }
        let checkpoints: Vec<String> = match self.ckpt_dir().is_dir() {
            true => listing(&self.ckpt_dir())?.into_iter().filter(|n| !n.starts_with(".partial-")).collect(),
            false => Vec::new(),
        };
        if !self.config_path().exists() {
            ensure!(
                checkpoints.is_empty(),
                "{} holds checkpoints (ckpt/) that no minigpt run accounts for (no config.json): choose another --out, \
                 or move them away",
                path.display()
            );
            let made = ["metrics.csv", "loss.png", "events"].iter().find(|n| path.join(n).exists());
            ensure!(
                made.is_none(),
                "--out {} holds {} but no config.json: it is not a minigpt run; give a new or empty folder",
                path.display(),
                made.unwrap_or(&"")
            );
            return Ok(());
        }
        let config = self.read_config().map_err(|e| {
            anyhow::anyhow!(
                "--out {} holds a config.json that is not a minigpt run's ({}): give a new or empty folder",
                path.display(),
                crate::text::error_line(&e)
            )
        })?;
        ensure!(
            checkpoints.is_empty(),
            "{} already holds a run{}: choose another --out (or delete it), or continue it with --resume",
            path.display(),
            match self.ckpt_dir().join("checkpoint").exists() {
                true => String::new(),
                false => format!(" (checkpoints in ckpt/, {} steps done)", config.steps_done),
            }
        );
        Ok(())
    }

    /// Opens an existing run directory.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = Self { path: path.to_path_buf() };
        ensure!(!path.is_file(), "{} is a file, not a run directory or a SavedModel", path.display());
        ensure!(path.is_dir(), "{} is not a run directory (it does not exist)", path.display());
        ensure!(dir.config_path().exists(), "{} is not a run directory (no config.json)", path.display());
        Ok(dir)
    }

    /// Refuses a run directory whose files lead out of it: minigpt writes only inside a run.
    fn check_contained(&self) -> Result<()> {
        for name in RUN_FILES {
            let path = self.path.join(name);
            let link = fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
            ensure!(
                !link,
                "{} is a symbolic link: minigpt writes a run's files only inside its directory; replace it by \
                 what it points to",
                path.display()
            );
        }
        Ok(())
    }

    /// Takes the run's lock; fails at once, naming the holder, if another process has it.
    pub fn lock(&self) -> Result<RunLock> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        self.check_contained()?;
        let path = self.path.join("lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a file descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok();
            bail!(
                "{} is in use by another minigpt process (pid {}): wait for it to finish or stop it",
                self.path.display(),
                holder.trim()
            );
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        // Whoever held the lock before is gone: what it was writing when it died is garbage.
        remove_checkpoint_files(&self.ckpt_dir(), ".partial-");
        let _ = fs::remove_file(self.path.join(".loss-partial.png"));
        Ok(RunLock { _file: file })
    }

    pub fn config_path(&self) -> PathBuf {
        self.path.join("config.json")
    }

    pub fn ckpt_dir(&self) -> PathBuf {
        self.path.join("ckpt")
    }

    pub fn metrics_path(&self) -> PathBuf {
        self.path.join("metrics.csv")
    }

    /// `config.json`, checked by the same rules as the command line's.
    pub fn read_config(&self) -> Result<RunConfig> {
        let path = self.config_path();
        let text = crate::files::read_text(&path, "run config", crate::files::MAX_SMALL_FILE)?;
        let config: RunConfig =
            serde_json::from_str(&text).with_context(|| format!("{} is not a valid run config", path.display()))?;
        config.validate().with_context(|| format!("{} is not a valid run config", path.display()))?;
        Ok(config)
    }

    /// The rows of `metrics.csv` (none if there is no such file yet).
    pub fn read_metrics(&self) -> Result<Vec<MetricsRow>> {
        let path = self.metrics_path();
        if !path.exists() {
            return Ok(Vec::new());
        }
        let mut reader = csv::Reader::from_path(&path).with_context(|| format!("reading {}", path.display()))?;
        let rows = reader.deserialize().collect::<Result<Vec<MetricsRow>, _>>();
        rows.with_context(|| format!("{} is damaged", path.display()))
    }

    pub fn write_metrics(&self, rows: &[MetricsRow]) -> Result<()> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        for row in rows {
            writer.serialize(row)?;
        }
        if rows.is_empty() {
            writer.write_record(["step", "epoch", "loss", "val_loss"])?;
        }
        write_atomic(&self.metrics_path(), &writer.into_inner().context("writing metrics")?)
    }

    /// Builds the graph of the run for `what` and restores its newest usable checkpoint.
    /// The model computes in `session.precision` if given, else in the run's own.
    pub fn load(&self, what: Load, session: SessionConfig) -> Result<(RunConfig, Runner)> {
        let mut config = self.read_config()?;
        config.model.precision = session.precision.unwrap_or(config.model.precision);
        let opts = match what {
            Load::Inference { sampler: Some(sampler) } => GraphOptions::sampling(sampler),
            Load::Inference { sampler: None } => GraphOptions::inference(0),
            Load::Training { summaries } => GraphOptions {
                purpose: Purpose::Training { adam: config.train.adam, summaries },
                ..GraphOptions::inference(config.train.seed as i64)
            },
        };
        let runner = Runner::new(&config.model, &opts, session)?;
        let restored = self.restore_latest(&runner)?;
        // config.json is written after the checkpoint: while a run trains, the newest checkpoint
        // may be a step ahead of it. What was restored is what an export or a sample is of.
        if let Some(step) = checkpoint_step(&restored) {
            config.steps_done = step;
        }
        Ok((config, runner))
    }

    pub fn write_config(&self, config: &RunConfig) -> Result<()> {
        let mut json = serde_json::to_string_pretty(config)?;
        json.push('\n');
        write_atomic(&self.config_path(), json.as_bytes())
    }

    /// The checkpoints `ckpt/checkpoint` lists, newest first.
    pub fn checkpoints(&self) -> Result<Vec<PathBuf>> {
        let state = self.ckpt_dir().join("checkpoint");
        ensure!(state.exists(), "{} has no checkpoint (no {})", self.path.display(), state.display());
        let text = read_state(&state)?;
        let mut names = checkpoint_paths(&text);
        ensure!(!names.is_empty(), "{} names no checkpoint", state.display());
        names.reverse();
        Ok(names.into_iter().map(|n| self.ckpt_dir().join(n)).collect())
    }

    /// Restores the newest checkpoint that reads back whole. A damaged one (truncated, corrupt,
    /// missing a file) is named in a warning on stderr and the one before it is tried. One whose
    /// variables do not have the shapes `config.json`'s model gives them is an error naming the
    /// variable (config.json does not describe it). A checkpoint rotated away while it was being
    /// read (another process trains in the run) is not damage: the state file is read again.
    pub fn restore_latest(&self, runner: &Runner) -> Result<PathBuf> {
        let mut damaged = Vec::new();
        let mut listed = self.checkpoints()?;
        let mut rereads = 0;
        let mut i = 0;
        while i < listed.len() {
            let prefix = listed[i].clone();
            let whole = |prefix: &str| -> Result<()> {
                let reader = CheckpointReader::open(prefix).with_context(|| format!("reading {prefix}"))?;
                reader.verify().with_context(|| format!("reading {prefix}"))?;
                runner.restore(prefix)
            };
            // (A restore assigns whatever shape it reads: check first, or a wrong config.json
            // fails later as a shape error deep in TensorFlow.)
            self.check_variables(&runner.variables(), &prefix)?;
            match whole(path_str(&prefix)?) {
                Ok(()) => {
                    if !damaged.is_empty() {
                        eprintln!("warning: using {} instead", prefix.display());
                    }
                    return Ok(prefix);
                }
                Err(e) => {
                    let now = self.checkpoints().unwrap_or_default();
                    if now != listed && rereads < 10 {
                        // Rotated away by a writer: start again from the newest.
                        (listed, i, rereads) = (now, 0, rereads + 1);
                        damaged.clear();
                        continue;
                    }
                    eprintln!("warning: checkpoint {} is damaged: {}", prefix.display(), one_line(&format!("{e:#}")));
                    damaged.push(prefix.display().to_string());
                }
            }
            i += 1;
        }
        bail!("no usable checkpoint in {}: {} damaged", self.ckpt_dir().display(), damaged.join(", "))
    }

    /// An error naming the first variable of the graph that `prefix` lacks or holds in another
    /// shape (a config.json that does not describe the checkpoint), if it can be read that far.
    /// Checks that checkpoint `prefix` holds every one of `vars` (config.json's model's
    /// variables) in its shape: an error naming the first that differs. A checkpoint that cannot
    /// be read is left to the restore, which names the damage.
    pub fn check_variables(&self, vars: &[Var], prefix: &Path) -> Result<()> {
        let Ok(entries) = CheckpointReader::open(path_str(prefix)?).and_then(|r| r.entries()) else { return Ok(()) };
        let config = self.config_path();
        for var in vars {
            let want: Vec<i64> = var.shape.iter().map(|&d| d as i64).collect();
            match entries.iter().find(|e| e.key == var.name) {
                None => bail!(
                    "{} does not match checkpoint {}: the model it describes has a variable {} {want:?} that the \
                     checkpoint lacks",
                    config.display(),
                    prefix.display(),
                    var.name
                ),
                Some(e) if e.shape != want => bail!(
                    "{} does not match checkpoint {}: {} is {:?} there, {want:?} by config.json's model",
                    config.display(),
                    prefix.display(),
                    var.name,
                    e.shape
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Saves the weights (and the rest of the checkpoint) as `ckpt/best`, apart from the
    /// rotation: written under a temporary prefix and renamed into place.
    pub fn save_best(&self, runner: &Runner, position: [i64; 2]) -> Result<PathBuf> {
        self.write_checkpoint_files(runner, "best", position)?;
        Ok(self.ckpt_dir().join("best"))
    }

    /// Writes `ckpt/<name>.{data-00000-of-00001,index}` under a temporary prefix, then renames
    /// them into place (the data file first: a checkpoint is found by its index). On failure
    /// the partial files are removed.
    fn write_checkpoint_files(&self, runner: &Runner, name: &str, position: [i64; 2]) -> Result<()> {
        let dir = self.ckpt_dir();
        let partial = format!(".partial-{name}");
        remove_checkpoint_files(&dir, &partial);
        let written = runner.save(path_str(&dir.join(&partial))?, position).and_then(|()| {
            for suffix in [".data-00000-of-00001", ".index"] {
                let (from, to) = (dir.join(format!("{partial}{suffix}")), dir.join(format!("{name}{suffix}")));
                fs::rename(&from, &to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
            }
            Ok(())
        });
        if written.is_err() {
            remove_checkpoint_files(&dir, &partial);
        }
        written
    }

    /// Rewrites `ckpt/checkpoint` listing `kept` (oldest first, the last the newest); none: removes it.
    fn write_state(&self, kept: &[String]) -> Result<()> {
        let state = self.ckpt_dir().join("checkpoint");
        let Some(newest) = kept.last() else {
            return fs::remove_file(&state).with_context(|| format!("removing {}", state.display()));
        };
        let mut text = format!("model_checkpoint_path: {newest:?}\n");
        for n in kept {
            text.push_str(&format!("all_model_checkpoint_paths: {n:?}\n"));
        }
        write_atomic(&state, text.as_bytes())
    }

    /// Takes `ckpt/ckpt-<step>` out of the rotation (a non-finite loss came from its weights):
    /// the checkpoint before it becomes the newest. Nothing is deleted: its files are kept as
    /// `ckpt/diverged-ckpt-<step>.*`, out of the way of a resumed run.
    pub fn discard_checkpoint(&self, step: u64) -> Result<Option<PathBuf>> {
        let dir = self.ckpt_dir();
        let name = format!("ckpt-{step}");
        let state = dir.join("checkpoint");
        let Ok(text) = read_state(&state) else { return Ok(None) };
        let mut kept = checkpoint_paths(&text);
        if !kept.contains(&name) {
            return Ok(None);
        }
        kept.retain(|n| n != &name);
        self.write_state(&kept)?;
        for suffix in [".data-00000-of-00001", ".index"] {
            let (from, to) = (dir.join(format!("{name}{suffix}")), dir.join(format!("diverged-{name}{suffix}")));
            fs::rename(&from, &to).with_context(|| format!("renaming {} to {}", from.display(), to.display()))?;
        }
        Ok(Some(dir.join(format!("diverged-{name}"))))
    }

    /// Saves `ckpt/ckpt-<step>` with the data `position`, makes it the latest, and deletes all
    /// but the newest `keep`. The checkpoint is written under a temporary prefix and its files
    /// renamed into place; the state file changes only after that, so an interrupted save leaves
    /// the previous checkpoint the latest.
    pub fn save_checkpoint(&self, runner: &Runner, step: u64, position: [i64; 2], keep: usize) -> Result<PathBuf> {
        let dir = self.ckpt_dir();
        let name = format!("ckpt-{step}");
        if let Err(e) = self.write_checkpoint_files(runner, &name, position) {
            let previous = self.checkpoints().ok().and_then(|c| c.into_iter().next());
            let kept = previous.map_or("no earlier checkpoint exists".to_string(), |p| {
                format!("the newest checkpoint is still {}", p.display())
            });
            return Err(e.context(format!("writing checkpoint {name} failed ({kept})")));
        }
        let prefix = dir.join(&name);
        let state = dir.join("checkpoint");
        let mut kept = read_state(&state).map(|t| checkpoint_paths(&t)).unwrap_or_default();
        kept.retain(|n| n != &name);
        kept.push(name.clone());
        let dropped: Vec<String> = kept.drain(..kept.len().saturating_sub(keep.max(1))).collect();
        self.write_state(&kept)?;
        for n in dropped {
            remove_checkpoint_files(&dir, &n);
        }
        Ok(prefix)
    }
}

/// The text of a `ckpt/checkpoint` state file.
/// The step a rotated checkpoint was saved at: N of `ckpt/ckpt-N`.
pub fn checkpoint_step(prefix: &Path) -> Option<u64> {
    prefix.file_name()?.to_str()?.strip_prefix("ckpt-")?.parse().ok()
}

fn read_state(state: &Path) -> Result<String> {
    crate::files::read_text(state, "checkpoint state", crate::files::MAX_SMALL_FILE)
}

/// Paths listed in a `checkpoint` state file, oldest first.
fn checkpoint_paths(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("all_model_checkpoint_paths:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}

/// Removes `dir/<name>.*`; a `name` ending in `-` removes every `<name>*.*`.
fn remove_checkpoint_files(dir: &Path, name: &str) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let file = entry.file_name();
            let file = file.to_string_lossy();
            let matches = match name.ends_with('-') {
                true => file.starts_with(name),
                false => file.strip_prefix(name).is_some_and(|rest| rest.starts_with('.')),
            };
            if matches {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}
