//! A served model: each loaded version in a thread of its own, which makes every TensorFlow call
//! for it (none runs on the HTTP server's threads). Between steps the thread takes new work:
//! predictions run at once, generation requests join the running streams; each step is one
//! batched forward pass over every running stream (up to `--max-batch`), after which each stream
//! draws its character with a sampler of its own (continuous batching). A stream's text depends
//! only on its prompt, parameters and seed: its sampler is `minigpt generate`'s (`Multinomial`,
//! seeded by the request), and the model is causal, so the positions padded after a shorter
//! window do not change its logits.
//!
//! A transformer's streams keep their attention keys and values in slots of a [`Decoder`]
//! between steps: a step computes one position of each stream whose window is still filling (a
//! new stream's prompt at once), and passes over the whole window only of those whose window
//! slides (the notebook's crop: every position moves). Its logits are checked against the
//! model's own at load.
//!
//! A TensorFlow Serving base path (`PATH/<version>/`) serves its highest version; a poller loads
//! a new one beside the old, swaps it in, and the old version's thread ends with its last stream.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use tensorflow::Tensor;
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use crate::data::Vocab;
use crate::device::SessionConfig;
use crate::graph::{Decoder, Part};
use crate::model::ModelConfig;
use crate::sampler::{Sampler, SamplerConfig};
use crate::saved_model::{self, OpenOptions, Signature, Source};
use crate::tfx::AnyTensor;

/// How versions are loaded and run.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub session: SessionConfig,
    /// Streams per forward pass, at most.
    pub max_batch: usize,
    /// Streams running at once, at most (`--max-concurrent`): the attention caches' slots.
    pub max_streams: usize,
}

/// The attention caches of a version take this much memory at most (fewer slots than streams
/// beyond it: the streams without one pass over their whole window each step).
const CACHE_BYTES: u64 = 256 << 20;

/// Work for a version's thread.
pub enum Job {
    Predict {
        signature: String,
        inputs: Vec<(String, AnyTensor)>,
        reply: oneshot::Sender<Result<Vec<(String, AnyTensor)>>>,
        /// Its slot of `--max-concurrent`, held until it has run.
        permit: OwnedSemaphorePermit,
    },
    Generate(Box<Request>),
}

/// Jobs a version's thread takes between two steps, at most: a steady flow of new work does not
/// hold the running streams back.
const JOBS_PER_STEP: usize = 8;

/// A generation request, validated: its characters go to `events` as they are drawn.
pub struct Request {
    pub prompt: Vec<i32>,
    pub max_chars: usize,
    pub sampler: SamplerConfig,
    pub events: tokio::sync::mpsc::UnboundedSender<Event>,
    pub received: Instant,
    /// Its slot of `--max-concurrent`, held until the stream ends (given back before its last
    /// event, so that a client may send its next request as soon as it has it).
    pub permit: Option<OwnedSemaphorePermit>,
}

/// What a stream produces.
#[derive(Debug)]
pub enum Event {
    /// The next character.
    Text(String),
    /// All `max_chars` characters were drawn.
    Done,
    Failed(String),
}

/// A loaded version, as the HTTP side sees it.
pub struct Version {
    pub number: u64,
    pub path: PathBuf,
    pub signatures: BTreeMap<String, Signature>,
    pub vocab: Vocab,
    /// One line: what model this is.
    pub describe: String,
    jobs: mpsc::Sender<Job>,
}

impl Version {
    /// Loads `path` in a new thread, which then serves it until this value is dropped and its
    /// last stream has ended.
    fn load(model: &str, number: u64, path: &Path, settings: Settings) -> Result<Arc<Self>> {
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (label, at) = (model.to_string(), path.to_path_buf());
        std::thread::Builder::new()
            .name(format!("{model}/{number}"))
            .spawn(move || {
                let opened = Source::open(&at, &OpenOptions { session: settings.session, ..Default::default() })
                    .and_then(|source| {
                        let ready = describe(&source)?;
                        Ok((source, ready))
                    });
                let (source, (signatures, vocab, text)) = match opened {
                    Ok(opened) => opened,
                    Err(e) => return drop(ready_tx.send(Err(e))),
                };
                let context = source.next_logits().context_size();
                let decoder = decoder(&source, &at, &settings).unwrap_or_else(|e| {
                    let e = crate::text::one_line(&format!("{e:#}"));
                    eprintln!(
                        "warning: model {label}: no cached decoding ({e}): each character is a pass over its window"
                    );
                    None
                });
                let text = match &decoder {
                    Some(d) => format!("{text}; attention caches for {} streams", d.capacity),
                    None => text,
                };
                let _ = ready_tx.send(Ok((signatures, vocab.clone(), text)));
                let free =
                    Rc::new(RefCell::new(decoder.as_ref().map_or(Vec::new(), |d| (0..d.capacity).rev().collect())));
                let max_batch = settings.max_batch;
                Worker { source, vocab, context, max_batch, model: label, decoder, free }.run(jobs_rx);
            })
            .context("starting a model thread")?;
        let (signatures, vocab, describe) = ready_rx.recv().context("the model thread ended while loading")??;
        Ok(Arc::new(Self { number, path: path.to_path_buf(), signatures, vocab, describe, jobs: jobs_tx }))
    }

    /// Hands `job` to the version's thread.
    pub fn submit(&self, job: Job) -> Result<()> {
        self.jobs.send(job).ok().context("the model's thread has stopped")
    }
}

/// A loaded source's signatures, vocabulary and one-line description.
fn describe(source: &Source) -> Result<(BTreeMap<String, Signature>, Vocab, String)> {
    let text = match source {
        Source::Run { config, .. } => {
            format!("{} (run directory, {} steps)", config.model.describe(), config.steps_done)
        }
        Source::Saved(loaded) => match loaded.declared.as_ref().and_then(|d| d.model.as_ref()) {
            Some(model) => format!("{} (SavedModel)", model.describe()),
            None => "SavedModel".to_string(),
        },
    };
    Ok((source.signatures()?, source.vocab()?, text))
}

/// The decoder of a transformer `source` (from `path`), with as many slots as streams may run
/// (within [`CACHE_BYTES`]), if its logits are the model's own; `None` for other models.
fn decoder(source: &Source, path: &Path, settings: &Settings) -> Result<Option<Decoder>> {
    let (config, weights): (&ModelConfig, _) = match source {
        Source::Run { config, runner } => (&config.model, runner.weights::<f32>()?),
        Source::Saved(loaded) => match loaded.declared.as_ref().and_then(|d| d.model.as_ref()) {
            Some(model) if model.decodes_cached() => (model, saved_model::import_weights(path, &model.variables()?)?),
            _ => return Ok(None),
        },
    };
    if !config.decodes_cached() {
        return Ok(None);
    }
    let per_slot = config.cache_bytes_per_stream();
    let slots = settings.max_streams.min((CACHE_BYTES / per_slot.max(1)) as usize);
    if slots == 0 {
        return Ok(None);
    }
    let Some(decoder) = Decoder::new(config, &weights, slots, settings.session)? else { return Ok(None) };
    // A whole window (the shape a sliding stream's passes have: nothing more to compile) through
    // the model's own pass, against one decoding step.
    let v = config.vocab_size as i32;
    let probe: Vec<i32> = (0..decoder.context as i32).map(|i| (i * 7 + 3) % v).collect();
    let tokens = Tensor::new(&[1, probe.len() as u64]).with_values(&probe)?;
    let whole = source.logits(&tokens)?;
    let want = &whole[whole.len() - v as usize..];
    let got = decoder.step(&[Part { slot: 0, from: 0, tokens: &probe }])?.remove(0);
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    let diff = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    let within = config.precision.logits_tolerance() * scale.max(1.0);
    ensure!(diff <= within, "its logits differ from the model's by {diff:e} (largest {scale:e})");
    Ok(Some(decoder))
}

/// A stream's slot of the [`Decoder`]'s caches, given back when the stream ends.
struct Slot {
    index: usize,
    free: Rc<RefCell<Vec<usize>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.free.borrow_mut().push(self.index);
    }
}

/// A running stream: its window (at most the model's context) and how many characters it drew.
struct Stream {
    window: Vec<i32>,
    /// Its slot of the caches, if it has one, and how many positions of its window the slot holds.
    slot: Option<Slot>,
    cached: usize,
    generated: usize,
    request: Request,
    sampler: Sampler,
    model: String,
}

impl Stream {
    /// Ends the stream with its last event; its slot is free before the client reads it.
    fn end(mut self, event: Event) {
        self.request.permit.take();
        let _ = self.request.events.send(event);
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        metrics::gauge!("minigpt_active_streams", "model" => self.model.clone()).decrement(1.0);
    }
}

/// A version's thread.
struct Worker {
    source: Source,
    vocab: Vocab,
    /// Trailing characters the next one depends on (`None`: all).
    context: Option<usize>,
    max_batch: usize,
    model: String,
    decoder: Option<Decoder>,
    /// The decoder's free slots.
    free: Rc<RefCell<Vec<usize>>>,
}

impl Worker {
    fn run(self, jobs: mpsc::Receiver<Job>) {
        let mut active: VecDeque<Stream> = VecDeque::new();
        loop {
            active.retain(|s| {
                let gone = s.request.events.is_closed();
                if gone {
                    self.cancelled();
                }
                !gone
            });
            if active.is_empty() {
                // Idle: wait for work; the version is gone when every sender is.
                match jobs.recv() {
                    Ok(job) => self.take(job, &mut active),
                    Err(_) => return,
                }
            }
            for job in jobs.try_iter().take(JOBS_PER_STEP) {
                self.take(job, &mut active);
            }
            if !active.is_empty() {
                self.step(&mut active);
            }
        }
    }

    fn cancelled(&self) {
        metrics::counter!("minigpt_streams_cancelled_total", "model" => self.model.clone()).increment(1);
    }

    fn take(&self, job: Job, active: &mut VecDeque<Stream>) {
        match job {
            Job::Predict { signature, inputs, reply, permit } => {
                // A client gone (or timed out) leaves nothing to answer.
                if !reply.is_closed() {
                    let _ = reply.send(self.source.predict(&signature, &inputs));
                }
                drop(permit);
            }
            Job::Generate(mut request) => {
                if request.events.is_closed() {
                    return self.cancelled();
                }
                if request.max_chars == 0 {
                    request.permit.take();
                    let _ = request.events.send(Event::Done);
                    return;
                }
                match Sampler::new(&request.sampler) {
                    Ok(sampler) => {
                        metrics::gauge!("minigpt_active_streams", "model" => self.model.clone()).increment(1.0);
                        let prompt = std::mem::take(&mut request.prompt);
                        let keep = prompt.len().saturating_sub(self.context.unwrap_or(usize::MAX));
                        let window = prompt[keep..].to_vec();
                        let model = self.model.clone();
                        let slot = self.slot();
                        let stream =
                            Stream { window, slot, cached: 0, generated: 0, request: *request, sampler, model };
                        active.push_back(stream);
                    }
                    Err(e) => {
                        request.permit.take();
                        let _ = request.events.send(Event::Failed(format!("{e:#}")));
                    }
                }
            }
        }
    }

    /// A free slot of the decoder's caches, zeroed, if there is one.
    fn slot(&self) -> Option<Slot> {
        let decoder = self.decoder.as_ref()?;
        let slot = Slot { index: self.free.borrow_mut().pop()?, free: self.free.clone() };
        decoder.clear(&[slot.index]).ok()?;
        Some(slot)
    }

    /// One step over the first `max_batch` streams: their next-character logits (from their
    /// caches where they can, else a pass over their windows), then a character for each; those
    /// not done go to the back of the queue.
    fn step(&self, active: &mut VecDeque<Stream>) {
        let mut batch: Vec<Stream> = active.drain(..self.max_batch.min(active.len())).collect();
        metrics::histogram!("minigpt_batch_size", "model" => self.model.clone()).record(batch.len() as f64);
        let mut rows: Vec<Option<Result<Vec<f32>, String>>> =
            self.decode(&mut batch).into_iter().map(|row| row.map(Ok)).collect();
        let whole: Vec<usize> = (0..batch.len()).filter(|&i| rows[i].is_none()).collect();
        if !whole.is_empty() {
            let windows: Vec<&[i32]> = whole.iter().map(|&i| batch[i].window.as_slice()).collect();
            for (&i, row) in whole.iter().zip(self.rows(&windows)) {
                rows[i] = Some(row);
                batch[i].cached = 0; // the slot does not hold this window
            }
        }
        let steps = |pass: &'static str, n: usize| {
            metrics::counter!("minigpt_stream_steps_total", "model" => self.model.clone(), "pass" => pass)
                .increment(n as u64);
        };
        steps("cached", batch.len() - whole.len());
        steps("window", whole.len());
        for (stream, row) in batch.into_iter().zip(rows) {
            if let Some(stream) = self.advance(stream, row.unwrap_or_else(|| Err("no logits".into()))) {
                active.push_back(stream);
            }
        }
    }

    /// The logits of the streams that take this step from their caches, in one decoding step
    /// (`None` for the others). A step that fails leaves them all to a pass over their windows.
    fn decode(&self, batch: &mut [Stream]) -> Vec<Option<Vec<f32>>> {
        let mut rows = vec![None; batch.len()];
        let decoded: Vec<usize> = (0..batch.len()).filter(|&i| self.decodes(&batch[i])).collect();
        let Some(decoder) = self.decoder.as_ref().filter(|_| !decoded.is_empty()) else { return rows };
        let parts: Vec<Part> = decoded
            .iter()
            .map(|&i| {
                let s = &batch[i];
                let slot = s.slot.as_ref().map_or(0, |slot| slot.index);
                Part { slot, from: s.cached, tokens: &s.window[s.cached..] }
            })
            .collect();
        if let Ok(logits) = decoder.step(&parts) {
            for (i, row) in decoded.into_iter().zip(logits) {
                rows[i] = Some(row);
                batch[i].cached = batch[i].window.len();
            }
        }
        rows
    }

    /// Whether `stream`'s next logits come from its slot: it has one, and its window is not a
    /// whole new one of the model's context (which a pass over it computes at once).
    fn decodes(&self, stream: &Stream) -> bool {
        self.decoder.is_some()
            && stream.slot.is_some()
            && !(stream.cached == 0 && self.context.is_some_and(|c| stream.window.len() >= c))
    }

    /// The next-character logits [V] of each window. A model with a fixed context runs them in
    /// one pass, each window right-padded to that width, as the in-graph sampling loop of
    /// `generate` feeds it (one shape per batch size: TensorFlow prepares its kernels once per
    /// shape); the model is causal, so the padding does not change what it computes for a window.
    /// A model whose context is not known runs each window alone, at its own length. A pass that
    /// fails is run again window by window, so that each stream gets its own error.
    fn rows(&self, windows: &[&[i32]]) -> Vec<Result<Vec<f32>, String>> {
        let Some(width) = self.context else {
            return windows.iter().map(|w| self.alone(w)).collect();
        };
        match self.logits(windows, width) {
            Ok(logits) => {
                let v = self.vocab.len();
                let at = |i: usize, w: &[i32]| (i * width + w.len() - 1) * v;
                windows.iter().enumerate().map(|(i, w)| Ok(logits[at(i, w)..at(i, w) + v].to_vec())).collect()
            }
            Err(_) if windows.len() > 1 => windows.iter().map(|w| self.alone(w)).collect(),
            Err(e) => vec![Err(format!("{e:#}"))],
        }
    }

    fn alone(&self, window: &[i32]) -> Result<Vec<f32>, String> {
        let width = self.context.unwrap_or(window.len());
        let logits = self.logits(&[window], width).map_err(|e| format!("{e:#}"))?;
        let v = self.vocab.len();
        Ok(logits[(window.len() - 1) * v..window.len() * v].to_vec())
    }

    /// Draws `stream`'s next character from `row` and sends it: the stream, unless it ended.
    fn advance(&self, mut stream: Stream, row: Result<Vec<f32>, String>) -> Option<Stream> {
        let drawn = row.and_then(|row| {
            if !row.iter().all(|x| x.is_finite()) {
                return Err(format!(
                    "the model's logits are NaN or infinite at generated character {}: its weights are broken",
                    stream.generated + 1
                ));
            }
            stream.sampler.draw(&row).map_err(|e| format!("{e:#}"))
        });
        let id = match drawn {
            Ok(id) => id,
            Err(e) => {
                stream.end(Event::Failed(e));
                return None;
            }
        };
        if stream.generated == 0 {
            let first = stream.request.received.elapsed().as_secs_f64();
            metrics::histogram!("minigpt_time_to_first_char_seconds", "model" => self.model.clone()).record(first);
        }
        metrics::counter!("minigpt_generated_chars_total", "model" => self.model.clone()).increment(1);
        stream.generated += 1;
        if self.context.is_some_and(|c| stream.window.len() >= c) {
            stream.window.remove(0);
            stream.cached = 0; // every position moved
        }
        stream.window.push(id);
        let sent = stream.request.events.send(Event::Text(self.vocab.decode(&[id])));
        if stream.generated >= stream.request.max_chars {
            stream.end(Event::Done);
            return None;
        }
        if sent.is_err() {
            self.cancelled();
            return None;
        }
        Some(stream)
    }

    /// logits [B, W, V] of the windows, each padded with 0 to `width`.
    fn logits(&self, windows: &[&[i32]], width: usize) -> Result<Tensor<f32>> {
        let mut tokens = Tensor::<i32>::new(&[windows.len() as u64, width as u64]);
        for (row, w) in tokens.chunks_mut(width).zip(windows) {
            row[..w.len()].copy_from_slice(w);
        }
        let logits = self.source.logits(&tokens)?;
        ensure!(
            logits.len() == windows.len() * width * self.vocab.len(),
            "the model returned {} logits for {} windows of {width} positions and {} classes",
            logits.len(),
            windows.len(),
            self.vocab.len()
        );
        Ok(logits)
    }
}

/// A model served under a name: a path minigpt opens (version 1), or a TensorFlow Serving base
/// path, whose highest version is served.
pub struct Model {
    pub name: String,
    pub base: PathBuf,
    pub versioned: bool,
    current: RwLock<Arc<Version>>,
    settings: Settings,
    /// Versions that failed to load, with what their folder held then (tried again once it changes).
    failed: Mutex<HashMap<u64, Fingerprint>>,
}

impl Model {
    pub fn open(name: &str, base: &Path, settings: Settings) -> Result<Arc<Self>> {
        let opens_as_is = saved_model::is_saved_model(base) || base.join("config.json").is_file();
        let (number, path, versioned) = if opens_as_is {
            (1, base.to_path_buf(), false)
        } else {
            ensure!(base.is_dir(), "{}: no such folder", base.display());
            let versions = versions(base)?;
            let Some((number, path)) = versions.last().cloned() else {
                bail!(
                    "{}: not a run directory, a SavedModel, or a TensorFlow Serving base path with a version folder \
                     (PATH/<integer>/saved_model.pb)",
                    base.display()
                );
            };
            (number, path, true)
        };
        let version = Version::load(name, number, &path, settings).with_context(|| format!("model {name}"))?;
        Ok(Arc::new(Self {
            name: name.to_string(),
            base: base.to_path_buf(),
            versioned,
            current: RwLock::new(version),
            settings,
            failed: Mutex::new(HashMap::new()),
        }))
    }

    /// The version serving now.
    pub fn current(&self) -> Arc<Version> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Looks at the base path once: a newest version other than the one serving is loaded and
    /// swapped in; one that fails to load leaves the current one serving, with a warning (once
    /// per state of its folder).
    pub fn poll(&self) {
        let Ok(versions) = versions(&self.base) else { return };
        let Some((number, path)) = versions.last() else { return };
        let current = self.current();
        if *number == current.number {
            return;
        }
        let print = fingerprint(path);
        let failed = || self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed().get(number) == Some(&print) {
            return;
        }
        match Version::load(&self.name, *number, path, self.settings) {
            Ok(version) => {
                eprintln!(
                    "model {}: serving version {number} ({}), was version {}",
                    self.name,
                    path.display(),
                    current.number
                );
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = version;
                failed().clear();
            }
            Err(e) => {
                let e = crate::text::one_line(&format!("{e:#}"));
                eprintln!(
                    "warning: model {}: version {number} ({}) does not load: {e}; version {} keeps serving",
                    self.name,
                    path.display(),
                    current.number
                );
                failed().insert(*number, print);
            }
        }
    }
}

/// The version folders of a base path (integer names holding a SavedModel or a run), lowest first.
fn versions(base: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(base)
        .with_context(|| format!("reading {}", base.display()))?
        .flatten()
        .filter_map(|e| {
            let number = e.file_name().to_str()?.parse::<u64>().ok()?;
            let path = e.path();
            (saved_model::is_saved_model(&path) || path.join("config.json").is_file()).then_some((number, path))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// What a folder holds: files, bytes, newest change.
type Fingerprint = (usize, u64, Option<SystemTime>);

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut print: Fingerprint = (0, 0, None);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            }
            print.0 += 1;
            print.1 += meta.len();
            print.2 = print.2.max(meta.modified().ok());
        }
    }
    print
}
