//! `minigpt serve`: TensorFlow Serving's REST API for the models minigpt loads, and streamed text
//! generation with continuous batching ([`model`]), over HTTP ([`http`]).
//!
//! The server listens where `--listen` says (127.0.0.1:8501 by default) and nowhere else; beyond
//! loopback without `--token-file` it says once, on stderr, that anyone who reaches it can use
//! its models. SIGTERM or Ctrl-C: no new requests; running ones finish, for up to
//! `--drain-seconds`; then the process exits 0.

pub mod http;
pub mod json;
pub mod model;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::listen;
use model::{Model, Settings};

/// What `minigpt serve` does, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Each model's name and path.
    pub models: Vec<(String, PathBuf)>,
    /// `HOST:PORT` (port 0: any free port, printed at start).
    pub listen: String,
    pub poll: Duration,
    pub max_concurrent: usize,
    pub max_chars: usize,
    pub max_body_bytes: usize,
    pub drain: Duration,
    /// Non-streaming requests (predict, generate) answered within this, else 504.
    pub timeout: Duration,
    /// For a request body to arrive.
    pub read_timeout: Duration,
    /// Every request but `/health` needs `Authorization: Bearer <token>`.
    pub token: Option<String>,
    pub settings: Settings,
}

/// `NAME=PATH` of `--model`: a name TensorFlow Serving would take in a URL.
pub fn parse_model(text: &str) -> Result<(String, PathBuf)> {
    let (name, path) = text.split_once('=').with_context(|| format!("--model {text:?}: expected NAME=PATH"))?;
    ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')),
        "--model {text:?}: a model name is letters, digits, '_', '-' and '.'"
    );
    ensure!(!path.is_empty(), "--model {text:?}: the path is empty");
    Ok((name.to_string(), PathBuf::from(path)))
}

/// The token of `--token-file`: its content, surrounding whitespace removed.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let text = crate::files::read_text(path, "token", crate::files::MAX_SMALL_FILE)?;
    let token = text.trim().to_string();
    ensure!(!token.is_empty(), "{}: the token file is empty", path.display());
    ensure!(
        token.chars().all(|c| c.is_ascii_graphic()),
        "{}: a token is printable ASCII without spaces (it goes into an HTTP header)",
        path.display()
    );
    Ok(token)
}

/// `minigpt serve`.
pub fn run(cfg: &ServeConfig) -> Result<()> {
    let (bind, _) = listen::resolve_bind(&cfg.listen).context("--listen")?;
    let listener = listen::bind_tcp(bind, &cfg.listen)?;
    let mut models = Vec::new();
    for (name, path) in &cfg.models {
        ensure!(models.iter().all(|m: &Arc<Model>| &m.name != name), "--model {name} is given twice");
        let model = Model::open(name, path, cfg.settings)?;
        let version = model.current();
        eprintln!("model {name}: version {} from {}: {}", version.number, version.path.display(), version.describe);
        models.push(model);
    }
    for model in models.iter().filter(|m| m.versioned) {
        let (model, poll) = (model.clone(), cfg.poll);
        std::thread::Builder::new().name(format!("poll {}", model.name)).spawn(move || loop {
            std::thread::sleep(poll);
            model.poll();
        })?;
    }
    if let Some(warning) = exposure(listener.local_addr()?, cfg.token.is_some()) {
        eprintln!("{warning}");
    }
    http::serve(listener, models, cfg)
}

/// The `warning:` line of a server other machines can reach without a token, if it is one.
fn exposure(local: SocketAddr, token: bool) -> Option<String> {
    (!listen::is_loopback(local.ip()) && !token).then(|| {
        format!(
            "warning: minigpt serve listens on {local}, beyond this machine, without authentication: anyone who \
             reaches it can use its models; give --token-file, or use it only on a network you trust"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_server_beyond_loopback_without_a_token_warns() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert_eq!(exposure(at("127.0.0.1:8501"), false), None);
        assert_eq!(exposure(at("[::1]:8501"), false), None);
        assert_eq!(exposure(at("10.1.2.3:8501"), true), None);
        let warning = exposure(at("0.0.0.0:8501"), false).unwrap();
        assert!(warning.starts_with("warning: minigpt serve listens on 0.0.0.0:8501, beyond this machine"));
        assert!(exposure(at("10.1.2.3:8501"), false).unwrap().contains("without authentication"));
    }

    #[test]
    fn model_names_are_url_safe() {
        assert_eq!(parse_model("gpt-2.v1=runs/x").unwrap(), ("gpt-2.v1".to_string(), PathBuf::from("runs/x")));
        for bad in ["runs/x", "=x", "a:b=x", "a/b=x", "a="] {
            assert!(parse_model(bad).is_err(), "{bad}");
        }
    }
}
