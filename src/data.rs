//! The corpus (built in, a file, or a URL downloaded once into a SHA-256-checked cache), the
//! character vocabulary, the notebook's 90/10 split, and its window → shuffle → batch pipeline.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Where the notebook's corpus lives (the same text as the `tiny_shakespeare` dataset).
pub const TINY_SHAKESPEARE_URL: &str =
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
/// SHA-256 of that corpus: 1,115,394 characters, 65 distinct.
pub const TINY_SHAKESPEARE_SHA256: &str = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed";
/// The notebook's `shuffle(10000)`.
pub const NOTEBOOK_SHUFFLE_BUFFER: usize = 10_000;
/// The notebook's `block_size`: characters per training window.
pub const NOTEBOOK_BLOCK_SIZE: usize = 64;
/// The notebook's `batch_size`: windows per batch.
pub const NOTEBOOK_BATCH_SIZE: usize = 32;

/// A loaded corpus and where it came from.
#[derive(Debug, Clone)]
pub struct Corpus {
    pub text: String,
    /// The path or URL it was read from.
    pub source: String,
    /// SHA-256 of its bytes, hex.
    pub sha256: String,
}

/// The corpus minigpt ships with: Tiny Shakespeare (public domain), gzip-compressed in the
/// repository (`data/tinyshakespeare.txt.gz`) and in the binary, checked by its SHA-256 when used.
pub const BUILTIN: &str = "builtin:tinyshakespeare";
const BUILTIN_GZ: &[u8] = include_bytes!("../data/tinyshakespeare.txt.gz");

/// The `--data` default: `$MINIGPT_DATA`, else the built-in corpus.
pub fn default_source() -> String {
    std::env::var("MINIGPT_DATA").unwrap_or_else(|_| BUILTIN.to_string())
}

/// The built-in corpus's bytes, verified.
fn builtin_bytes() -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(1 << 21);
    flate2::read::GzDecoder::new(BUILTIN_GZ).read_to_end(&mut bytes).context("decompressing the built-in corpus")?;
    let got = sha256_hex(&bytes);
    ensure!(
        got == TINY_SHAKESPEARE_SHA256,
        "the built-in corpus has SHA-256 {got}, expected {TINY_SHAKESPEARE_SHA256}"
    );
    Ok(bytes)
}

/// An error for a `builtin:` name minigpt does not have.
fn check_builtin(source: &str) -> Result<()> {
    ensure!(
        !source.starts_with("builtin:") || source == BUILTIN,
        "{source} is not a built-in corpus: minigpt has {BUILTIN} (Tiny Shakespeare)"
    );
    Ok(())
}

/// Limits of a download: its size and how long the server may stay silent.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    /// For connecting, and for each wait for more of the answer.
    pub timeout: Duration,
}

/// `--download-timeout`'s default, in seconds.
pub const DEFAULT_DOWNLOAD_TIMEOUT: u64 = 30;

static DOWNLOAD_TIMEOUT: OnceLock<Duration> = OnceLock::new();

/// Sets how long downloads of this process wait for a server (`--download-timeout`), once.
pub fn set_download_timeout(timeout: Duration) {
    let _ = DOWNLOAD_TIMEOUT.set(timeout);
}

impl Default for Limits {
    /// A corpus: at most [`MAX_CORPUS_BYTES`], the process's download timeout.
    fn default() -> Self {
        let timeout = *DOWNLOAD_TIMEOUT.get().unwrap_or(&Duration::from_secs(DEFAULT_DOWNLOAD_TIMEOUT));
        Self { max_bytes: MAX_CORPUS_BYTES, timeout }
    }
}

/// Loads a corpus: the built-in one ([`BUILTIN`]), a path, or an `http(s)://` URL (downloaded
/// through the cache).
pub fn load_corpus(source: &str) -> Result<Corpus> {
    check_builtin(source)?;
    if source == BUILTIN {
        let bytes = builtin_bytes()?;
        let sha256 = sha256_hex(&bytes);
        let text = String::from_utf8(bytes).context("the built-in corpus is not UTF-8")?;
        return Ok(Corpus { text, source: source.to_string(), sha256 });
    }
    let path = local_path(source)?;
    let text = crate::files::read_text(&path, "corpus", MAX_CORPUS_BYTES)?;
    let sha256 = sha256_hex(text.as_bytes());
    ensure!(!text.is_empty(), "corpus {} is empty", path.display());
    // A file is recorded by its absolute path: `--resume` and `eval` find it from any folder.
    let source = match is_url(source) {
        true => source.to_string(),
        false => std::path::absolute(&path).ok().and_then(|p| p.to_str().map(str::to_string)).unwrap_or(source.into()),
    };
    Ok(Corpus { text, source, sha256 })
}

/// The largest corpus minigpt reads: its ids take four times as much memory again.
pub const MAX_CORPUS_BYTES: u64 = 1 << 30;

/// The local file behind a source: a URL is downloaded into the cache first, the built-in corpus
/// written there (for tools that read a file, such as the Python side of `make parity`).
pub fn local_path(source: &str) -> Result<PathBuf> {
    check_builtin(source)?;
    if source == BUILTIN {
        let dir = cache_dir()?;
        let path = dir.join("tinyshakespeare.txt");
        if !fs::read(&path).is_ok_and(|b| sha256_hex(&b) == TINY_SHAKESPEARE_SHA256) {
            fs::create_dir_all(&dir).with_context(|| format!("creating cache folder {}", dir.display()))?;
            crate::files::write_atomic(&path, &builtin_bytes()?)?;
        }
        return Ok(path);
    }
    if is_url(source) {
        let expected = (source == TINY_SHAKESPEARE_URL).then_some(TINY_SHAKESPEARE_SHA256);
        fetch_cached(source, expected, &cache_dir()?, &Limits::default())
    } else {
        Ok(PathBuf::from(source))
    }
}

pub fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The download cache: `$MINIGPT_CACHE`, else `$XDG_CACHE_HOME/minigpt`, else `~/.cache/minigpt`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MINIGPT_CACHE") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("minigpt"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache/minigpt")),
        None => bail!("no cache folder: set MINIGPT_CACHE or HOME"),
    }
}

/// Returns the cached copy of `url`, downloading it first if needed, within `limits`. The download
/// goes to a temporary file in the cache folder (removed if it fails) and is renamed into place
/// only when complete and, if `expected_sha256` is given, verified; a cached copy is reused with
/// no network access.
pub fn fetch_cached(url: &str, expected_sha256: Option<&str>, cache: &Path, limits: &Limits) -> Result<PathBuf> {
    let name = url.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("download");
    let key = &sha256_hex(url.as_bytes())[..16];
    let path = cache.join(format!("{key}-{name}"));
    if path.exists() {
        if let Some(want) = expected_sha256 {
            let got = sha256_hex(&fs::read(&path).with_context(|| format!("reading {}", path.display()))?);
            ensure!(
                got == want,
                "cached {} has SHA-256 {got}, expected {want}: delete it to download again",
                path.display()
            );
        }
        return Ok(path);
    }
    fs::create_dir_all(cache).with_context(|| format!("creating cache folder {}", cache.display()))?;
    let offline = "(offline? omit --data for the built-in Tiny Shakespeare, or give --data PATH)";
    let seconds = limits.timeout.as_secs_f64();
    let silent =
        |e: &dyn std::fmt::Display| format!("downloading {url}: no answer for {seconds} s (--download-timeout) ({e})");
    let mut response = reqwest::blocking::Client::builder()
        .connect_timeout(limits.timeout)
        .timeout(limits.timeout) // each wait for the server: connecting, the answer, each read
        .build()?
        .get(url)
        .send()
        .map_err(|e| match e.is_timeout() {
            true => anyhow::anyhow!(silent(&e)),
            false => anyhow::Error::new(e).context(format!("downloading {url} {offline}")),
        })?;
    ensure!(response.status().is_success(), "downloading {url}: HTTP {}", response.status());
    let max = limits.max_bytes;
    let too_large =
        |size: u64| format!("downloading {url}: {size} bytes or more, more than minigpt reads ({max} bytes)");
    if let Some(size) = response.content_length().filter(|&size| size > max) {
        bail!(too_large(size));
    }
    let mut tmp = tempfile::NamedTempFile::new_in(cache)?;
    // Drawn on stderr only when it is a terminal.
    let bar = indicatif::ProgressBar::new(response.content_length().unwrap_or(0)).with_style(
        indicatif::ProgressStyle::with_template(
            "downloading {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(url.rsplit('/').next().unwrap_or(url).to_string());
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = response.read(&mut buf).map_err(|e| {
            let timed_out = e.kind() == std::io::ErrorKind::TimedOut
                || e.get_ref().and_then(|e| e.downcast_ref::<reqwest::Error>()).is_some_and(|e| e.is_timeout());
            match timed_out {
                true => anyhow::anyhow!(silent(&e)),
                false => anyhow::Error::new(e).context(format!("downloading {url}")),
            }
        })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        ensure!(total <= max, too_large(total));
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let got = hex::encode(hasher.finalize());
    if let Some(want) = expected_sha256 {
        ensure!(got == want, "downloaded {url} has SHA-256 {got}, expected {want}");
    }
    crate::files::set_readable(tmp.as_file())?;
    tmp.persist(&path).with_context(|| format!("saving {}", path.display()))?;
    Ok(path)
}

/// Raised when text holds characters the vocabulary lacks.
#[derive(Debug, thiserror::Error)]
#[error("characters not in the vocabulary: {}", .0.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", "))]
pub struct UnknownChars(pub Vec<char>);

/// The notebook's character vocabulary: `sorted(set(text))`, ids in that order.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    chars: Vec<char>,
    index: HashMap<char, i32>,
}

impl Vocab {
    /// `sorted(set(text))`, in memory proportional to the vocabulary, not the text.
    pub fn from_text(text: &str) -> Self {
        let mut seen = vec![false; char::MAX as usize + 1];
        for c in text.chars() {
            seen[c as usize] = true;
        }
        Self::from_sorted((0..seen.len() as u32).filter(|&c| seen[c as usize]).filter_map(char::from_u32).collect())
    }

    /// A vocabulary in the given id order (as stored in a run or a SavedModel).
    pub fn from_chars(chars: Vec<char>) -> Result<Self> {
        ensure!(!chars.is_empty(), "the vocabulary is empty");
        let vocab = Self::from_sorted(chars);
        ensure!(vocab.index.len() == vocab.chars.len(), "the vocabulary repeats a character");
        Ok(vocab)
    }

    fn from_sorted(chars: Vec<char>) -> Self {
        let index = chars.iter().enumerate().map(|(i, &c)| (c, i as i32)).collect();
        Self { chars, index }
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    /// The vocabulary as one-character strings, the JSON form used on disk.
    pub fn to_strings(&self) -> Vec<String> {
        self.chars.iter().map(|c| c.to_string()).collect()
    }

    pub fn from_strings(strings: &[String]) -> Result<Self> {
        let chars = strings
            .iter()
            .map(|s| {
                let mut it = s.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) => Ok(c),
                    _ => bail!("vocabulary entry {s:?} is not a single character"),
                }
            })
            .collect::<Result<Vec<char>>>()?;
        Self::from_chars(chars)
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i32>, UnknownChars> {
        let mut unknown: Vec<char> = Vec::new();
        let ids = text
            .chars()
            .map(|c| match self.index.get(&c) {
                Some(&i) => i,
                None => {
                    if !unknown.contains(&c) {
                        unknown.push(c);
                    }
                    -1
                }
            })
            .collect();
        if unknown.is_empty() {
            Ok(ids)
        } else {
            Err(UnknownChars(unknown))
        }
    }

    /// Ids outside the vocabulary decode to U+FFFD.
    pub fn decode(&self, ids: &[i32]) -> String {
        ids.iter()
            .map(|&i| usize::try_from(i).ok().and_then(|i| self.chars.get(i)).copied().unwrap_or('\u{FFFD}'))
            .collect()
    }
}

/// The notebook's split: `split_idx = int(0.9 * len(encoded))`.
pub fn split(encoded: &[i32]) -> (&[i32], &[i32]) {
    let split_idx = (0.9 * encoded.len() as f64) as usize;
    encoded.split_at(split_idx)
}

/// How window starts are ordered within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shuffle {
    /// tf.data's `shuffle(buffer)`: local shuffling, as the notebook does (buffer 10000).
    Buffer(usize),
    /// A full random permutation of all windows each epoch.
    Global,
    /// In order, as `window(..., shift=1)` produces them.
    None,
}

/// Number of windows of `block_size + 1` tokens with shift 1 (tf.data's `drop_remainder=True`).
pub fn num_windows(data_len: usize, block_size: usize) -> usize {
    data_len.saturating_sub(block_size)
}

/// The RNG of one epoch: a function of the seed and the epoch only, so any epoch can be replayed.
fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch);
    rng
}

/// The window starts of one epoch, in the order the shuffle emits them.
pub struct WindowOrder {
    next_input: usize,
    n_windows: usize,
    kind: OrderKind,
}

#[allow(clippy::large_enum_variant)] // one value per epoch
enum OrderKind {
    InOrder,
    Permuted(Vec<u32>),
    Buffered { buffer: Vec<u32>, capacity: usize, rng: ChaCha8Rng },
}

impl WindowOrder {
    pub fn new(n_windows: usize, shuffle: Shuffle, seed: u64, epoch: u64) -> Self {
        let mut rng = epoch_rng(seed, epoch);
        let kind = match shuffle {
            Shuffle::None => OrderKind::InOrder,
            Shuffle::Global => {
                let mut perm: Vec<u32> = (0..n_windows as u32).collect();
                for i in (1..perm.len()).rev() {
                    perm.swap(i, rng.random_range(0..=i));
                }
                OrderKind::Permuted(perm)
            }
            Shuffle::Buffer(capacity) => {
                OrderKind::Buffered { buffer: Vec::with_capacity(capacity.min(n_windows)), capacity, rng }
            }
        };
        Self { next_input: 0, n_windows, kind }
    }
}

impl Iterator for WindowOrder {
    type Item = usize;

    /// tf.data's shuffle: keep the buffer full; emit a uniformly chosen slot and refill that
    /// slot with the next input element; once the input ends, drain the buffer at random.
    fn next(&mut self) -> Option<usize> {
        match &mut self.kind {
            OrderKind::InOrder | OrderKind::Permuted(_) if self.next_input >= self.n_windows => None,
            OrderKind::InOrder => {
                self.next_input += 1;
                Some(self.next_input - 1)
            }
            OrderKind::Permuted(perm) => {
                self.next_input += 1;
                Some(perm[self.next_input - 1] as usize)
            }
            OrderKind::Buffered { buffer, capacity, rng } => {
                while buffer.len() < *capacity && self.next_input < self.n_windows {
                    buffer.push(self.next_input as u32);
                    self.next_input += 1;
                }
                if buffer.is_empty() {
                    return None;
                }
                let slot = rng.random_range(0..buffer.len());
                let out = buffer[slot] as usize;
                if self.next_input < self.n_windows {
                    buffer[slot] = self.next_input as u32;
                    self.next_input += 1;
                } else {
                    buffer.swap_remove(slot);
                }
                Some(out)
            }
        }
    }
}

/// One epoch of `(x, y)` batches: `x = window[:-1]`, `y = window[1:]`, `batch_size` windows each,
/// the last partial batch dropped.
pub struct Batches<'a> {
    data: &'a [i32],
    block_size: usize,
    batch_size: usize,
    order: WindowOrder,
}

impl<'a> Batches<'a> {
    pub fn new(data: &'a [i32], block_size: usize, batch_size: usize, shuffle: Shuffle, seed: u64, epoch: u64) -> Self {
        let order = WindowOrder::new(num_windows(data.len(), block_size), shuffle, seed, epoch);
        Self { data, block_size, batch_size, order }
    }

    /// Batches in one epoch.
    pub fn len(data_len: usize, block_size: usize, batch_size: usize) -> usize {
        num_windows(data_len, block_size) / batch_size
    }

    /// Skips `n` batches, as if filled (to resume an epoch part-way).
    pub fn skip(&mut self, n: usize) {
        for _ in 0..n * self.batch_size {
            if self.order.next().is_none() {
                break;
            }
        }
    }

    /// Writes the next batch into `x` and `y` (each `[batch_size * block_size]`, row-major
    /// `[B, T]`); false at the end of the epoch.
    pub fn fill(&mut self, x: &mut [i32], y: &mut [i32]) -> bool {
        let t = self.block_size;
        debug_assert!(x.len() == self.batch_size * t && y.len() == x.len());
        for b in 0..self.batch_size {
            let Some(start) = self.order.next() else { return false };
            x[b * t..(b + 1) * t].copy_from_slice(&self.data[start..start + t]);
            y[b * t..(b + 1) * t].copy_from_slice(&self.data[start + 1..start + t + 1]);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_shakespeare_is_built_in_with_the_expected_shape() {
        let corpus = load_corpus(BUILTIN).unwrap();
        assert_eq!(corpus.sha256, TINY_SHAKESPEARE_SHA256);
        assert_eq!(corpus.text.chars().count(), 1_115_394);
        let vocab = Vocab::from_text(&corpus.text);
        assert_eq!(vocab.len(), 65);
        assert_eq!(vocab.chars()[0], '\n');
        assert_eq!(vocab.chars()[1], ' ');
        let encoded = vocab.encode(&corpus.text).unwrap();
        let (train, val) = split(&encoded);
        assert_eq!((train.len(), val.len()), (1_003_854, 111_540));
        assert_eq!(Batches::len(train.len(), 64, 32), 31_368);
    }

    #[test]
    fn vocab_round_trips_any_unicode() {
        let text = "héllo wörld — 你好, 🦀!\n";
        let vocab = Vocab::from_text(text);
        let ids = vocab.encode(text).unwrap();
        assert_eq!(vocab.decode(&ids), text);
        let mut sorted = vocab.chars().to_vec();
        sorted.sort();
        assert_eq!(sorted, vocab.chars());
        let err = vocab.encode("hello, Zürich?").unwrap_err();
        assert_eq!(err.0, vec!['e', 'Z', 'ü', 'i', 'c', '?']);
        assert_eq!(Vocab::from_strings(&vocab.to_strings()).unwrap(), vocab);
    }

    #[test]
    fn split_is_int_of_nine_tenths() {
        let data: Vec<i32> = (0..1001).collect();
        let (a, b) = split(&data);
        assert_eq!((a.len(), b.len()), (900, 101));
    }

    fn epoch_windows(n: usize, shuffle: Shuffle, epoch: u64) -> Vec<usize> {
        WindowOrder::new(n, shuffle, 7, epoch).collect()
    }

    #[test]
    fn every_shuffle_visits_each_window_once() {
        for shuffle in [Shuffle::None, Shuffle::Global, Shuffle::Buffer(10), Shuffle::Buffer(1000), Shuffle::Buffer(1)]
        {
            let mut got = epoch_windows(537, shuffle, 0);
            got.sort();
            assert_eq!(got, (0..537).collect::<Vec<_>>(), "{shuffle:?}");
        }
        assert_eq!(epoch_windows(5, Shuffle::Buffer(1), 0), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn buffer_shuffle_is_local_seeded_and_new_each_epoch() {
        let a = epoch_windows(50_000, Shuffle::Buffer(100), 0);
        assert_eq!(a, epoch_windows(50_000, Shuffle::Buffer(100), 0));
        assert_ne!(a, epoch_windows(50_000, Shuffle::Buffer(100), 1));
        // An element leaves the buffer at or after it enters: position i holds a window < i + 100.
        assert!(a.iter().enumerate().all(|(i, &w)| w < i + 100));
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let data: Vec<i32> = (0..100).collect();
        let (t, bs) = (8, 4);
        let mut batches = Batches::new(&data, t, bs, Shuffle::Global, 1, 0);
        let (mut x, mut y) = (vec![0; t * bs], vec![0; t * bs]);
        let mut n = 0;
        while batches.fill(&mut x, &mut y) {
            for row in 0..bs {
                let xs = &x[row * t..(row + 1) * t];
                let ys = &y[row * t..(row + 1) * t];
                assert!(xs.windows(2).all(|w| w[1] == w[0] + 1));
                assert!(xs.iter().zip(ys).all(|(a, b)| *b == a + 1));
            }
            n += 1;
        }
        assert_eq!(n, Batches::len(data.len(), t, bs)); // 92 windows -> 23 batches
        assert_eq!(n, 23);
    }
}
