//! The HTTP side of `minigpt serve` (axum on tokio): TensorFlow Serving's REST API
//! (`GET /v1/models/NAME[/versions/N][/metadata]`, `POST …:predict`), generation
//! (`POST /v1/models/NAME:generate`, `:generate_stream` as Server-Sent Events), Prometheus metrics
//! at TensorFlow Serving's path, `/health`. Errors are `{"error": "…"}` with TensorFlow Serving's
//! status codes. No TensorFlow call runs here: work goes to the model's thread ([`super::model`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::stream::{self, Stream};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tensorflow::DataType;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::json::{self as tensors};
use super::model::{Event, Job, Model, Request as Generation, Version};
use super::ServeConfig;
use crate::sampler::SamplerConfig;
use crate::saved_model::{Signature, TensorSpec, SERVING};

/// What every handler shares.
struct App {
    models: BTreeMap<String, Arc<Model>>,
    /// A permit per running stream or prediction (`--max-concurrent`).
    slots: Arc<Semaphore>,
    max_concurrent: usize,
    max_chars: usize,
    max_body_bytes: usize,
    timeout: Duration,
    read_timeout: Duration,
    token: Option<String>,
    /// Set once SIGTERM or Ctrl-C came: new work is refused with 503.
    draining: AtomicBool,
    metrics: PrometheusHandle,
}

/// An error answer: `{"error": message}` with its status.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "application/json")], json!({ "error": self.1 }).to_string()).into_response()
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

/// TensorFlow Serving's HTTP status for a TensorFlow error code.
fn status_of(code: tensorflow::Code) -> StatusCode {
    use tensorflow::Code::*;
    match code {
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        NotFound => StatusCode::NOT_FOUND,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A failed run's answer: TensorFlow's status mapped, else (minigpt's own checks of the
/// request) 400.
fn run_error(e: &anyhow::Error) -> ApiError {
    let message = crate::text::error_line(e);
    match e.chain().find_map(|c| c.downcast_ref::<tensorflow::Status>()) {
        Some(status) => ApiError(status_of(status.code()), message),
        None => bad(message),
    }
}

/// Serves `models` on `listener` until SIGTERM or Ctrl-C, then drains.
pub fn serve(listener: std::net::TcpListener, models: Vec<Arc<Model>>, cfg: &ServeConfig) -> Result<()> {
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".into()),
            &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("minigpt_batch_size".into()),
            &[1., 2., 4., 8., 16., 32., 64., 128., 256.],
        )?
        .install_recorder()
        .context("starting the metrics recorder")?;
    let app = Arc::new(App {
        models: models.into_iter().map(|m| (m.name.clone(), m)).collect(),
        slots: Arc::new(Semaphore::new(cfg.max_concurrent)),
        max_concurrent: cfg.max_concurrent,
        max_chars: cfg.max_chars,
        max_body_bytes: cfg.max_body_bytes,
        timeout: cfg.timeout,
        read_timeout: cfg.read_timeout,
        token: cfg.token.clone(),
        draining: AtomicBool::new(false),
        metrics,
    });
    let drain = cfg.drain;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let local = listener.local_addr()?;
        let router = Router::new()
            .route("/v1/models/{*rest}", get(model_get).post(model_post))
            .route("/monitoring/prometheus/metrics", get(prometheus))
            .route("/health", get(health))
            .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
            .layer(middleware::from_fn_with_state(app.clone(), guard))
            .with_state(app.clone());
        // The signals are caught from here on, before the server says it is ready.
        let mut signals = Signals::new()?;
        let (stopping_tx, stopping_rx) = oneshot::channel();
        let server = tokio::spawn(connections(listener, router, app.read_timeout, stopping_rx));
        // Histograms keep their samples until rendered: folded in every few seconds, whether or
        // not anything reads the metrics.
        let metrics = app.metrics.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                metrics.run_upkeep();
            }
        });
        crate::output::line(format_args!("listening on http://{local}"))?;
        let signal = signals.next().await;
        app.draining.store(true, Ordering::SeqCst);
        let running = || app.max_concurrent - app.slots.available_permits();
        eprintln!("{signal}: no new requests; {} running finish (at most {}s)", running(), drain.as_secs());
        let _ = stopping_tx.send(());
        tokio::select! {
            done = tokio::time::timeout(drain, server) => match done {
                Ok(done) => done.context("serving")?,
                Err(_) => stop_now(&format!("warning: {} requests still running after --drain-seconds: stopped", running()), 0),
            },
            again = signals.next() => stop_now(&format!("{again} again: stopped with {} requests running", running()), 130),
        }
        Ok(())
    })
}

/// Serves `router` on each connection `listener` accepts until `stop`; then accepts no more, and
/// waits for the open connections to end their running requests (hyper's graceful shutdown).
/// Every connection writes at once (TCP_NODELAY: each event is sent as soon as it is drawn,
/// not after the client's delayed ACK, 40 ms on Linux), and a request's headers must arrive
/// within `read_timeout` or the connection is closed.
async fn connections(
    listener: tokio::net::TcpListener,
    router: Router,
    read_timeout: Duration,
    stop: oneshot::Receiver<()>,
) {
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    // Out of file descriptors, most likely: let some connections end first.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new()).header_read_timeout(read_timeout);
        let connection = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router.clone()));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Exits at once with `code`, after `line` on stderr: model threads may be inside TensorFlow,
/// whose static destructors must not run under them.
fn stop_now(line: &str, code: i32) -> ! {
    eprintln!("{line}");
    // SAFETY: `_exit` ends the process without running destructors or exit handlers.
    unsafe { libc::_exit(code) }
}

/// SIGTERM and SIGINT, caught from creation on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).context("catching SIGTERM")?;
        Ok(Self { term, int: signal(SignalKind::interrupt()).context("catching SIGINT")? })
    }

    /// The name of the next one.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Every request: the bearer token (all but `/health`), then metrics of the answer.
async fn guard(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let path = request.uri().path().to_string();
    let endpoint = endpoint(&path);
    let response = match &app.token {
        Some(token) if path != "/health" && !authorized(request.headers(), token) => {
            let mut r = ApiError(StatusCode::UNAUTHORIZED, "missing or wrong `Authorization: Bearer <token>`".into())
                .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            r
        }
        _ => next.run(request).await,
    };
    let status = response.status().as_u16().to_string();
    metrics::counter!("minigpt_requests_total", "endpoint" => endpoint, "status" => status).increment(1);
    metrics::histogram!("minigpt_request_seconds", "endpoint" => endpoint).record(started.elapsed().as_secs_f64());
    response
}

fn authorized(headers: &HeaderMap, token: &str) -> bool {
    use subtle::ConstantTimeEq;
    let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(token.trim_start())
    });
    given.is_some_and(|given| bool::from(given.as_bytes().ct_eq(token.as_bytes())))
}

/// The metrics label of a path.
fn endpoint(path: &str) -> &'static str {
    match path {
        "/health" => "health",
        "/monitoring/prometheus/metrics" => "metrics",
        p if !p.starts_with("/v1/models/") => "other",
        p if p.ends_with(":predict") => "predict",
        p if p.ends_with(":generate") => "generate",
        p if p.ends_with(":generate_stream") => "generate_stream",
        p if p.ends_with("/metadata") => "metadata",
        _ => "status",
    }
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.draining.load(Ordering::SeqCst) {
        false => axum::Json(json!({"status": "ok"})).into_response(),
        true => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "draining"}))).into_response(),
    }
}

/// What a `/v1/models/…` path asks for.
#[derive(Debug, PartialEq)]
enum Target {
    Status,
    Metadata,
    Predict,
    Generate,
    Stream,
}

/// `NAME[/versions/N][/metadata]` or `NAME[/versions/N]:VERB`.
fn parse_path(rest: &str) -> Result<(&str, Option<u64>, Target), ApiError> {
    let not_found = || ApiError(StatusCode::NOT_FOUND, format!("no such endpoint: /v1/models/{rest}"));
    let (path, verb) = match rest.rsplit_once(':') {
        Some((path, verb)) if !verb.contains('/') => (path, Some(verb)),
        _ => (rest, None),
    };
    let parts: Vec<&str> = path.split('/').collect();
    let (name, version, metadata) = match parts[..] {
        [name] => (name, None, false),
        [name, "metadata"] => (name, None, true),
        [name, "versions", n] => (name, Some(n), false),
        [name, "versions", n, "metadata"] => (name, Some(n), true),
        [_, "labels", ..] => return Err(ApiError(StatusCode::NOT_FOUND, "version labels are not supported".into())),
        _ => return Err(not_found()),
    };
    let version =
        version.map(|n| n.parse::<u64>().map_err(|_| bad(format!("version {n:?} is not a number")))).transpose()?;
    let target = match (verb, metadata) {
        (None, false) => Target::Status,
        (None, true) => Target::Metadata,
        (Some("predict"), false) => Target::Predict,
        (Some("generate"), false) => Target::Generate,
        (Some("generate_stream"), false) => Target::Stream,
        (Some(verb), false) => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("unknown method {verb:?}: predict, generate or generate_stream"),
            ))
        }
        _ => return Err(not_found()),
    };
    Ok((name, version, target))
}

impl App {
    /// The version a request names (the serving one if none), as TensorFlow Serving says it.
    fn version(&self, name: &str, number: Option<u64>) -> Result<Arc<Version>, ApiError> {
        let servable =
            |what: String| ApiError(StatusCode::NOT_FOUND, format!("Servable not found for request: {what}"));
        let model = self.models.get(name).ok_or_else(|| match number {
            Some(n) => servable(format!("Specific({name}, {n})")),
            None => servable(format!("Latest({name})")),
        })?;
        let version = model.current();
        match number {
            Some(n) if n != version.number => Err(servable(format!("Specific({name}, {n})"))),
            _ => Ok(version),
        }
    }

    /// A slot for a stream or a prediction, or 503 (stopping) or 429 (all taken).
    fn slot(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping".into()));
        }
        self.slots.clone().try_acquire_owned().map_err(|_| {
            ApiError(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the server is running {} requests, its --max-concurrent: try again later",
                    self.max_concurrent
                ),
            )
        })
    }

    /// The body as a JSON object: 413 above `--max-body-bytes`, 408 if it does not arrive within
    /// `--read-timeout-seconds`.
    async fn object(&self, headers: &HeaderMap, body: Body) -> Result<Map<String, Value>, ApiError> {
        let limit = self.max_body_bytes;
        let too_large = || ApiError(StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {limit} bytes"));
        let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let read = tokio::time::timeout(self.read_timeout, axum::body::to_bytes(body, limit)).await.map_err(|_| {
            let within = self.read_timeout.as_secs_f64();
            ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {within}s (--read-timeout-seconds)"),
            )
        })?;
        let bytes = read.map_err(|e| {
            match std::error::Error::source(&e).is_some_and(|s| s.to_string().contains("length limit exceeded")) {
                true => too_large(),
                false => bad(format!("reading the request body: {e}")),
            }
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Err(bad("the request body must be a JSON object")),
            Err(e) => Err(bad(format!("the request body is not JSON: {e}"))),
        }
    }
}

async fn model_get(State(app): State<Arc<App>>, Path(rest): Path<String>) -> Result<Response, ApiError> {
    let (name, number, target) = parse_path(&rest)?;
    let version = app.version(name, number)?;
    match target {
        Target::Status => Ok(axum::Json(json!({
            "model_version_status": [{
                "version": version.number.to_string(),
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }]
        }))
        .into_response()),
        Target::Metadata => Ok(axum::Json(json!({
            "model_spec": {"name": name, "signature_name": "", "version": version.number.to_string()},
            "metadata": {"signature_def": {"signature_def": signature_defs(&version.signatures)}},
        }))
        .into_response()),
        _ => Err(ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("POST /v1/models/{rest}, not GET"))),
    }
}

async fn model_post(
    State(app): State<Arc<App>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let (name, number, target) = parse_path(&rest)?;
    let version = app.version(name, number)?;
    if matches!(target, Target::Status | Target::Metadata) {
        return Err(ApiError(StatusCode::METHOD_NOT_ALLOWED, format!("GET /v1/models/{rest}, not {}", Method::POST)));
    }
    // The slot first: bodies are read and parsed by requests that have one.
    let permit = app.slot()?;
    let body = app.object(&headers, body).await?;
    match target {
        Target::Predict => predict(&app, &version, body, permit).await,
        _ => generate(&app, &version, body, target == Target::Stream, received, permit).await,
    }
}

async fn predict(
    app: &App,
    version: &Version,
    body: Map<String, Value>,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let signature = match body.get("signature_name") {
        None => SERVING.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(bad(format!("\"signature_name\" must be a string, got {other}"))),
    };
    let sig = version.signatures.get(&signature).ok_or_else(|| {
        bad(format!(
            "Serving signature name: {signature:?} not found in signature def (it has: {})",
            tensors::list(&version.signatures)
        ))
    })?;
    // JSON to tensors and back off the async threads: a large batch takes a while.
    let sig = sig.clone();
    let (format, inputs) = blocking(move || tensors::request(&body, &sig)).await?.map_err(bad)?;
    let (reply, answer) = oneshot::channel();
    version
        .submit(Job::Predict { signature, inputs, reply, permit })
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let outputs = match tokio::time::timeout(app.timeout, answer).await {
        Err(_) => return Err(deadline(app.timeout)),
        Ok(Err(_)) => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the model's thread has stopped".into())),
        Ok(Ok(result)) => result.map_err(|e| run_error(&e))?,
    };
    let text = blocking(move || tensors::answer(format, &outputs)).await?.map_err(bad)?;
    Ok(([(header::CONTENT_TYPE, "application/json")], text).into_response())
}

/// `work` on tokio's blocking threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("a worker thread failed: {e}")))
}

fn deadline(timeout: Duration) -> ApiError {
    ApiError(StatusCode::GATEWAY_TIMEOUT, format!("no answer within {}s (--timeout-seconds)", timeout.as_secs_f64()))
}

/// The body of `:generate` and `:generate_stream`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    prompt: String,
    /// 200, or `--max-chars` if lower.
    #[serde(default)]
    max_chars: Option<usize>,
    #[serde(default = "default_temperature")]
    temperature: f32,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
}

fn default_temperature() -> f32 {
    1.0
}

async fn generate(
    app: &App,
    version: &Version,
    body: Map<String, Value>,
    streaming: bool,
    received: Instant,
    permit: OwnedSemaphorePermit,
) -> Result<Response, ApiError> {
    let body: GenerateBody =
        serde_path_to_error::deserialize(Value::Object(body)).map_err(|e| match e.path().to_string().as_str() {
            "." => bad(e.inner().to_string()),
            path => bad(format!("{path}: {}", e.inner())),
        })?;
    if body.prompt.is_empty() {
        return Err(bad("prompt: the prompt is empty: give at least one character"));
    }
    let prompt = version.vocab.encode(&body.prompt).map_err(|e| bad(format!("prompt: {e}")))?;
    let max_chars = body.max_chars.unwrap_or(app.max_chars.min(200));
    if max_chars > app.max_chars {
        return Err(bad(format!(
            "max_chars: {max_chars} is above this server's limit, {} (--max-chars)",
            app.max_chars
        )));
    }
    let seed = body.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    let sampler = SamplerConfig { seed: seed as i64, temperature: body.temperature, top_k: body.top_k };
    if let Some((setting, what)) = sampler.invalid() {
        return Err(bad(format!("{setting}: {what}")));
    }
    let (events, mut rx) = mpsc::unbounded_channel();
    let request = Generation { prompt, max_chars, sampler, events, received, permit: Some(permit) };
    version
        .submit(Job::Generate(Box::new(request)))
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    if streaming {
        return Ok(Sse::new(sse(rx, seed)).keep_alive(KeepAlive::default()).into_response());
    }
    let collect = async {
        let mut text = String::new();
        let mut chars = 0;
        loop {
            match rx.recv().await {
                Some(Event::Text(c)) => {
                    text.push_str(&c);
                    chars += 1;
                }
                Some(Event::Done) => return Ok((text, chars)),
                Some(Event::Failed(e)) => return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, e)),
                None => return Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, "the model's thread has stopped".into())),
            }
        }
    };
    let (text, chars) = tokio::time::timeout(app.timeout, collect).await.map_err(|_| deadline(app.timeout))??;
    Ok(axum::Json(json!({"text": text, "generated_chars": chars, "seed": seed, "finish_reason": "length"}))
        .into_response())
}

/// A stream's events: `{"index", "token": {"text"}, "generated_text": null}` per character, then
/// one with the whole text and its details (`token` null); an `error` event if it fails.
fn sse(
    rx: mpsc::UnboundedReceiver<Event>,
    seed: u64,
) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    stream::unfold(Some((rx, String::new(), 0usize)), move |state| async move {
        let (mut rx, mut text, index) = state?;
        let event = match rx.recv().await {
            Some(Event::Text(c)) => {
                text.push_str(&c);
                let data = json!({"index": index + 1, "token": {"text": c}, "generated_text": null, "details": null});
                return Some((Ok(SseEvent::default().data(data.to_string())), Some((rx, text, index + 1))));
            }
            Some(Event::Done) => SseEvent::default().data(
                json!({
                    "index": index,
                    "token": null,
                    "generated_text": text,
                    "details": {"finish_reason": "length", "generated_chars": index, "seed": seed},
                })
                .to_string(),
            ),
            Some(Event::Failed(e)) => SseEvent::default().event("error").data(json!({ "error": e }).to_string()),
            None => {
                SseEvent::default().event("error").data(json!({"error": "the model's thread has stopped"}).to_string())
            }
        };
        Some((Ok(event), None))
    })
}

/// Signatures as TensorFlow Serving's metadata writes them (the protobuf JSON of `SignatureDef`).
fn signature_defs(signatures: &BTreeMap<String, Signature>) -> Value {
    let tensors = |m: &BTreeMap<String, TensorSpec>| -> Value {
        m.iter()
            .map(|(k, t)| {
                let shape = match &t.dims {
                    None => json!({"dim": [], "unknown_rank": true}),
                    Some(dims) => json!({
                        "dim": dims.iter().map(|d| json!({"size": d.to_string(), "name": ""})).collect::<Vec<_>>(),
                        "unknown_rank": false,
                    }),
                };
                (k.clone(), json!({"dtype": dtype_name(t.dtype), "tensor_shape": shape, "name": t.name}))
            })
            .collect::<Map<_, _>>()
            .into()
    };
    signatures
        .iter()
        .map(|(name, s)| {
            let def = json!({"inputs": tensors(&s.inputs), "outputs": tensors(&s.outputs), "method_name": s.method_name, "defaults": {}});
            (name.clone(), def)
        })
        .collect::<Map<_, _>>()
        .into()
}

/// The `DT_…` name of a type.
fn dtype_name(dtype: DataType) -> &'static str {
    match dtype {
        DataType::Float => "DT_FLOAT",
        DataType::Double => "DT_DOUBLE",
        DataType::Int32 => "DT_INT32",
        DataType::Int64 => "DT_INT64",
        DataType::Bool => "DT_BOOL",
        DataType::String => "DT_STRING",
        DataType::Half => "DT_HALF",
        DataType::BFloat16 => "DT_BFLOAT16",
        DataType::Int8 => "DT_INT8",
        DataType::Int16 => "DT_INT16",
        DataType::UInt8 => "DT_UINT8",
        DataType::UInt16 => "DT_UINT16",
        DataType::UInt32 => "DT_UINT32",
        DataType::UInt64 => "DT_UINT64",
        DataType::Resource => "DT_RESOURCE",
        DataType::Variant => "DT_VARIANT",
        _ => "DT_INVALID",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_tensorflow_servings() {
        fn ok(rest: &str) -> (&str, Option<u64>, Target) {
            parse_path(rest).unwrap()
        }
        assert_eq!(ok("m"), ("m", None, Target::Status));
        assert_eq!(ok("m/versions/3"), ("m", Some(3), Target::Status));
        assert_eq!(ok("m/metadata"), ("m", None, Target::Metadata));
        assert_eq!(ok("m/versions/3/metadata"), ("m", Some(3), Target::Metadata));
        assert_eq!(ok("m:predict"), ("m", None, Target::Predict));
        assert_eq!(ok("m/versions/12:predict"), ("m", Some(12), Target::Predict));
        assert_eq!(ok("m.v2:generate_stream"), ("m.v2", None, Target::Stream));
        for (rest, status) in [
            ("m:classify", 404),
            ("m/versions/x:predict", 400),
            ("m/labels/stable", 404),
            ("m/metadata:predict", 404),
            ("m/other", 404),
        ] {
            assert_eq!(parse_path(rest).unwrap_err().0.as_u16(), status, "{rest}");
        }
    }

    #[test]
    fn tensorflow_errors_map_as_tensorflow_serving_maps_them() {
        use tensorflow::Code;
        for (code, status) in [
            (Code::InvalidArgument, 400),
            (Code::NotFound, 404),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::DeadlineExceeded, 504),
            (Code::Internal, 500),
        ] {
            assert_eq!(status_of(code).as_u16(), status);
        }
    }
}
