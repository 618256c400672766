//! The LLM client: one blocking call per chat turn, made on the worker thread that serves it.
//!
//! Every worker holds its own clone of one [`LlmClient`], with its own ureq agent and keep-alive
//! connection, so a busy pool never reconnects and no worker waits on another's pool. One
//! deadline, `request_timeout_ms`, covers every attempt and every backoff of a call, and a
//! [`Cancel`] flag abandons it within a fraction of a second when its client leaves
//! ([`transport`] makes the sockets wait in slices for that). Every wait that comes from outside,
//! a `Retry-After` or a configured duration, is clamped before it meets a clock.

mod breaker;
mod buffers;
pub mod cancel;
mod connect;
pub mod mock;
pub mod prompt;
mod transport;
pub mod wire;

pub use cancel::Cancel;

use crate::config::{LlmConfig, Provider};
use crate::metrics::Metrics;
use breaker::{Breaker, Outcome};
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use transport::{CachedResolver, CallSlot, SlicedConnector, Stop};
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{Connector, RustlsConnector};
use wire::{ChatMessage, Completion, CompletionRequest, Sampling, StreamFailure, StreamOptions};

/// The longest `Retry-After` taken as given; no call waits that long anyway.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// Where [`later`] lands when a wait would run off the clock.
const FAR_FUTURE: Duration = Duration::from_secs(365 * 24 * 3600);
/// First backoff ceiling; doubles per retry up to [`MAX_BACKOFF`], with full jitter.
const BASE_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a call to the LLM failed, after any retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// The LLM answered with an HTTP error status.
    Status {
        /// The HTTP status.
        status: u16,
        /// What its body said, shortened: for the log only, since it may echo a key.
        detail: String,
        /// Calls made.
        attempts: u32,
    },
    /// No answer within `request_timeout_ms`.
    Timeout {
        /// The deadline that passed.
        after: Duration,
    },
    /// No connection could be made, or it broke before the answer was read.
    Transport {
        /// What went wrong, in chatpool's words, naming nothing of the upstream's.
        reason: String,
        /// What went wrong, with the upstream's address: for the log only.
        detail: String,
        /// Calls made.
        attempts: u32,
    },
    /// A 200 whose body is not a text reply.
    Malformed {
        /// What was wrong with it, in chatpool's words, quoting nothing the upstream said.
        reason: String,
        /// What was wrong with it, with what the upstream said: for the log only.
        detail: String,
    },
    /// The client went away; the call was abandoned and its connection closed.
    Cancelled,
    /// The LLM failed repeatedly just now; calls are paused (the breaker is open).
    Paused {
        /// When a call may go out again.
        retry_after: Duration,
    },
}

impl UpstreamError {
    /// What this says about the LLM's health: unwell (counts towards opening the breaker),
    /// well but refusing this particular request, or nothing at all.
    fn outcome(&self) -> Outcome {
        match self {
            UpstreamError::Status { status, .. } if *status == 429 || *status >= 500 => {
                Outcome::Failed
            }
            UpstreamError::Status { .. } | UpstreamError::Paused { .. } => Outcome::Succeeded,
            UpstreamError::Cancelled => Outcome::Inconclusive,
            _ => Outcome::Failed,
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tries = |n: &u32| {
            if *n == 1 {
                "1 attempt".to_string()
            } else {
                format!("{n} attempts")
            }
        };
        match self {
            UpstreamError::Status {
                status,
                detail,
                attempts,
            } => {
                write!(
                    f,
                    "the LLM answered HTTP {status} after {}: {detail}",
                    tries(attempts)
                )
            }
            UpstreamError::Timeout { after } => {
                write!(f, "the LLM did not answer within {} ms", after.as_millis())
            }
            UpstreamError::Transport {
                detail, attempts, ..
            } => {
                write!(
                    f,
                    "could not reach the LLM after {}: {detail}",
                    tries(attempts)
                )
            }
            UpstreamError::Malformed { detail, .. } => f.write_str(detail),
            UpstreamError::Cancelled => {
                f.write_str("the client went away; the LLM call was abandoned")
            }
            UpstreamError::Paused { retry_after } => write!(
                f,
                "the LLM failed repeatedly just now; calls to it are paused for {} more seconds",
                retry_after.as_secs_f64().ceil()
            ),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// The result of one attempt, before retry decisions.
enum AttemptError {
    Status {
        status: u16,
        detail: String,
        retry_after: Option<Duration>,
    },
    Transport {
        reason: String,
        detail: String,
    },
    Timeout,
    Malformed {
        reason: String,
        detail: String,
    },
    Cancelled,
}

impl AttemptError {
    fn retryable(&self) -> bool {
        match self {
            AttemptError::Status { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            AttemptError::Transport { .. } => true,
            AttemptError::Timeout | AttemptError::Malformed { .. } | AttemptError::Cancelled => {
                false
            }
        }
    }

    /// A connection that failed; `detail` names the upstream, so the client never sees it.
    fn transport(detail: String) -> AttemptError {
        AttemptError::Transport {
            reason: "could not reach the LLM".into(),
            detail,
        }
    }

    /// An answer that is not a reply: worth another try only when a stream was cut short.
    /// The client's reason never quotes the upstream: not an error object's message (an echoed
    /// key, a path on the model server), nor the parser's quote of what it could not read.
    fn unusable(e: wire::Unusable) -> AttemptError {
        let detail = e.to_string();
        let reason = match &e {
            wire::Unusable::Error(_) => "the LLM reported an error instead of a reply".into(),
            // "<chatpool's sentence>: <the parser's error>"; keep the sentence.
            wire::Unusable::Malformed(m) => m.split(": ").next().unwrap_or(m).to_string(),
            _ => detail.clone(),
        };
        match e {
            wire::Unusable::Truncated => AttemptError::Transport { reason, detail },
            _ => AttemptError::Malformed { reason, detail },
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            AttemptError::Status { status: 429, .. } => "rate_limited",
            AttemptError::Status { status, .. } if *status >= 500 => "server_error",
            AttemptError::Status { .. } => "client_error",
            AttemptError::Transport { .. } => "transport_error",
            AttemptError::Timeout => "timeout",
            AttemptError::Malformed { .. } => "malformed",
            AttemptError::Cancelled => "cancelled",
        }
    }
}

/// A handle on the configured LLM; one per worker.
///
/// Cloning gives a handle for another worker: it shares the breaker, the settings and the
/// metrics, and has its own connections to the upstream (a keep-alive pool of one, since a worker
/// makes one call at a time) and its own [`CallSlot`], through which a call's [`Cancel`] reaches
/// those connections.
pub struct LlmClient {
    shared: Arc<Shared>,
    link: Option<Link>,
}

/// What every worker's handle shares.
struct Shared {
    model: String,
    endpoint: Option<Endpoint>,
    mock_latency: Duration,
    request_timeout: Duration,
    max_retries: u32,
    breaker: Breaker,
    metrics: Arc<Metrics>,
}

/// Where an OpenAI-compatible upstream is and how to call it.
struct Endpoint {
    url: String,
    /// The URL without any credentials in it, for the log.
    shown: String,
    authorization: Option<String>,
    connect_timeout: Duration,
}

/// The most a worker's upstream connection's buffers grow to (they start at 4 KiB: see
/// `buffers`), kept with the connection. ureq's defaults, 128 KiB each and taken whole at the
/// first call, made 1,024 busy workers take 365 MB instead of 157 (README, Memory); a response
/// head must fit the input buffer, and is refused past [`UPSTREAM_MAX_HEAD`], 16 KiB as for a
/// client's request head.
const UPSTREAM_INPUT_BUFFER: usize = 32 << 10;
const UPSTREAM_OUTPUT_BUFFER: usize = 16 << 10;
const UPSTREAM_MAX_HEAD: usize = 16 << 10;

/// One worker's way to the upstream.
struct Link {
    agent: ureq::Agent,
    slot: Arc<CallSlot>,
}

impl Link {
    fn new(endpoint: &Endpoint) -> Link {
        let slot = Arc::new(CallSlot::default());
        let connector = SlicedConnector::new(Arc::clone(&slot), endpoint.connect_timeout)
            .chain(RustlsConnector::default());
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_idle_connections(1)
            .max_idle_connections_per_host(1)
            .input_buffer_size(UPSTREAM_INPUT_BUFFER)
            .output_buffer_size(UPSTREAM_OUTPUT_BUFFER)
            .max_response_header_size(UPSTREAM_MAX_HEAD)
            .user_agent(concat!("chatpool/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::with_parts(
            config,
            connector,
            CachedResolver::<DefaultResolver>::default(),
        );
        Link { agent, slot }
    }
}

impl Clone for LlmClient {
    fn clone(&self) -> LlmClient {
        LlmClient {
            shared: Arc::clone(&self.shared),
            link: self.shared.endpoint.as_ref().map(Link::new),
        }
    }
}

impl LlmClient {
    /// A client for the configured provider. The API key is read once, from the environment
    /// variable the config names.
    pub fn new(config: &LlmConfig, metrics: Arc<Metrics>) -> LlmClient {
        let endpoint = (config.provider == Provider::Openai).then(|| {
            let base = config.base_url.trim_end_matches('/');
            let key = std::env::var(&config.api_key_env)
                .ok()
                .filter(|k| !k.is_empty());
            Endpoint {
                url: format!("{base}/chat/completions"),
                shown: format!("{}/chat/completions", without_credentials(base)),
                authorization: key.map(|k| format!("Bearer {k}")),
                connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            }
        });
        let link = endpoint.as_ref().map(Link::new);
        let shared = Shared {
            model: config.model.clone(),
            endpoint,
            mock_latency: Duration::from_millis(config.mock_latency_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            max_retries: config.max_retries,
            breaker: Breaker::new(
                config.breaker_failures,
                Duration::from_millis(config.breaker_cooldown_ms),
            ),
            metrics,
        };
        LlmClient {
            shared: Arc::new(shared),
            link,
        }
    }

    /// Whether an API key was found, for the start-up log.
    pub fn has_key(&self) -> bool {
        self.shared
            .endpoint
            .as_ref()
            .is_some_and(|e| e.authorization.is_some())
    }

    /// The configured model name.
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// Asks the LLM for the next message of `messages`, retrying what is worth retrying within
    /// the deadline, unless the breaker has paused calls.
    ///
    /// With a `sink`, the reply is streamed: each piece goes to the sink as it arrives, and a
    /// call is only retried while nothing has reached the sink yet. Once `cancel` is set (by
    /// whoever sees the client leave, the sink included) the call is abandoned within
    /// [`cancel::SLICE`], its upstream connection closed, and it ends as
    /// [`UpstreamError::Cancelled`].
    pub fn complete(
        &self,
        messages: &[ChatMessage],
        sampling: Sampling,
        sink: Option<&mut Sink<'_>>,
        cancel: &Cancel,
    ) -> Result<Completion, UpstreamError> {
        let pass = self
            .shared
            .breaker
            .admit(Instant::now())
            .map_err(|retry_after| {
                self.shared.metrics.upstream_outcome("paused");
                UpstreamError::Paused { retry_after }
            })?;
        let result = match (&self.shared.endpoint, &self.link) {
            (Some(endpoint), Some(link)) => {
                let deadline = later(Instant::now(), self.shared.request_timeout);
                link.slot.begin(cancel, deadline);
                let result = self.call(endpoint, link, messages, sampling, sink, cancel);
                link.slot.end();
                result
            }
            _ => self.call_mock(messages, sink, cancel),
        };
        pass.record(match &result {
            Ok(_) => Outcome::Succeeded,
            Err(e) => e.outcome(),
        });
        result
    }

    /// The built-in mock: a reply made from the request after the configured latency.
    fn call_mock(
        &self,
        messages: &[ChatMessage],
        sink: Option<&mut Sink<'_>>,
        cancel: &Cancel,
    ) -> Result<Completion, UpstreamError> {
        let metrics = &self.shared.metrics;
        let completion = mock::reply(messages, &self.shared.model, 0);
        let mut cancelled = !cancel.sleep(self.shared.mock_latency);
        if let Some(sink) = sink {
            for piece in completion.content.split_inclusive(' ') {
                if cancelled {
                    break;
                }
                sink(piece);
                cancelled = cancel.is_cancelled();
            }
        }
        if cancelled {
            metrics.upstream_outcome("cancelled");
            return Err(UpstreamError::Cancelled);
        }
        metrics.upstream_outcome("ok");
        Ok(completion)
    }

    fn call(
        &self,
        endpoint: &Endpoint,
        link: &Link,
        messages: &[ChatMessage],
        sampling: Sampling,
        mut sink: Option<&mut Sink<'_>>,
        cancel: &Cancel,
    ) -> Result<Completion, UpstreamError> {
        let shared = &*self.shared;
        let body = serde_json::to_vec(&CompletionRequest {
            model: &shared.model,
            messages,
            temperature: sampling.temperature,
            max_tokens: sampling.max_tokens,
            passthrough: &sampling.passthrough,
            stream: sink.is_some(),
            stream_options: sink.is_some().then_some(StreamOptions {
                include_usage: true,
            }),
        })
        .map_err(|e| UpstreamError::Malformed {
            reason: "chatpool could not encode the request".into(),
            detail: format!("cannot encode the request: {e}"),
        })?;
        let deadline = later(Instant::now(), shared.request_timeout);
        let mut attempts = 0;
        let mut forwarded = false;
        loop {
            attempts += 1;
            let reply = Reply {
                sink: sink.as_deref_mut(),
                forwarded: &mut forwarded,
                cancel,
            };
            let error = match self.attempt(endpoint, link, &body, reply) {
                Ok(completion) => {
                    shared.metrics.upstream_outcome("ok");
                    return Ok(completion);
                }
                Err(e) => e,
            };
            shared.metrics.upstream_outcome(error.outcome());
            let wait = backoff(attempts, &error);
            let in_time = wait < deadline.saturating_duration_since(Instant::now());
            // Once a piece reached the client, a retry would send it a second, different start.
            if !error.retryable() || attempts > shared.max_retries || !in_time || forwarded {
                return Err(self.give_up(error, attempts));
            }
            shared.metrics.upstream_retry();
            if !cancel.sleep(wait) {
                return Err(UpstreamError::Cancelled);
            }
        }
    }

    fn give_up(&self, error: AttemptError, attempts: u32) -> UpstreamError {
        match error {
            AttemptError::Status { status, detail, .. } => UpstreamError::Status {
                status,
                detail,
                attempts,
            },
            AttemptError::Transport { reason, detail } => UpstreamError::Transport {
                reason,
                detail,
                attempts,
            },
            AttemptError::Timeout => UpstreamError::Timeout {
                after: self.shared.request_timeout,
            },
            AttemptError::Malformed { reason, detail } => {
                UpstreamError::Malformed { reason, detail }
            }
            AttemptError::Cancelled => UpstreamError::Cancelled,
        }
    }

    fn attempt(
        &self,
        endpoint: &Endpoint,
        link: &Link,
        body: &[u8],
        reply: Reply<'_, '_>,
    ) -> Result<Completion, AttemptError> {
        let mut request = link
            .agent
            .post(&endpoint.url)
            .header("Content-Type", "application/json");
        if let Some(authorization) = &endpoint.authorization {
            request = request.header("Authorization", authorization);
        }
        let lost = |e: ureq::Error| lost(e, link, endpoint);
        let (head, body) = request.send(body).map_err(lost)?.into_parts();
        if !head.status.is_success() {
            return Err(refused(head, body));
        }
        let body = body.into_reader();
        if let Some(sink) = reply.sink {
            return self
                .read_stream(body, sink, reply.forwarded, reply.cancel)
                .map_err(|e| match e {
                    StreamFailure::Io(e) => lost(e.into()),
                    StreamFailure::Cancelled => AttemptError::Cancelled,
                    StreamFailure::Unusable(e) => AttemptError::unusable(e),
                });
        }
        let mut bytes = Vec::new();
        body.take(wire::MAX_BODY_BYTES)
            .read_to_end(&mut bytes)
            .map_err(|e| lost(e.into()))?;
        if bytes.len() as u64 == wire::MAX_BODY_BYTES {
            return Err(AttemptError::unusable(wire::Unusable::TooLong));
        }
        wire::parse_completion(&bytes, &self.shared.model).map_err(AttemptError::unusable)
    }
}

/// An answer with an error status: its `Retry-After` (clamped) and what its body says.
fn refused(head: ureq::http::response::Parts, body: ureq::Body) -> AttemptError {
    let retry_after = head
        .headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()));
    let mut bytes = Vec::new();
    // The body only explains the status; a failure to read it changes nothing.
    let _ = body.into_reader().take(64 << 10).read_to_end(&mut bytes);
    AttemptError::Status {
        status: head.status.as_u16(),
        detail: wire::error_detail(&bytes),
        retry_after,
    }
}

/// What a failed send or read means: the call was stopped (cancelled or out of time), or the
/// connection failed. The detail names the upstream for the log.
fn lost(e: ureq::Error, link: &Link, endpoint: &Endpoint) -> AttemptError {
    match (link.slot.stopped(), e) {
        (Some(Stop::Cancelled), _) => AttemptError::Cancelled,
        (Some(Stop::Deadline), _) | (None, ureq::Error::Timeout(_)) => AttemptError::Timeout,
        (None, e) => AttemptError::transport(format!("{}: {e}", endpoint.shown)),
    }
}

/// `url` with any `user:password@` taken out.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if scheme.is_empty() {
        format!("{host}{path}")
    } else {
        format!("{scheme}://{host}{path}")
    }
}

/// Where a streamed reply goes, piece by piece. A sink that finds its client gone sets the
/// call's [`Cancel`] flag.
pub type Sink<'a> = dyn FnMut(&str) + 'a;

/// The streaming side of one attempt: the sink, whether anything reached it yet, and the flag
/// that says its client is gone.
struct Reply<'s, 'f> {
    sink: Option<&'s mut Sink<'f>>,
    forwarded: &'s mut bool,
    cancel: &'s Cancel,
}

impl LlmClient {
    /// Reads an event stream, handing each piece to the sink as it arrives.
    fn read_stream(
        &self,
        body: impl Read,
        sink: &mut Sink<'_>,
        forwarded: &mut bool,
        cancel: &Cancel,
    ) -> Result<Completion, StreamFailure> {
        let mut forward = |piece: &str| {
            sink(piece);
            *forwarded = true;
            !cancel.is_cancelled()
        };
        wire::read_stream(
            std::io::BufReader::new(body),
            &self.shared.model,
            &mut forward,
        )
    }
}

/// How long to wait before the next attempt: the upstream's `Retry-After` when it gave one,
/// else exponential backoff with full jitter.
fn backoff(attempts: u32, error: &AttemptError) -> Duration {
    if let AttemptError::Status {
        retry_after: Some(wait),
        ..
    } = error
    {
        return *wait;
    }
    let ceiling = BASE_BACKOFF
        .saturating_mul(1 << attempts.min(16))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(fastrand::f64())
}

/// `Retry-After` as seconds or as an HTTP date, at most [`MAX_RETRY_AFTER`].
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// `now + wait` for a wait that may come from outside: one too long for the clock lands far
/// in the future instead of panicking.
pub(crate) fn later(now: Instant, wait: Duration) -> Instant {
    now.checked_add(wait)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(7));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(7)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(7));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn waits_from_outside_are_clamped_before_they_meet_a_clock() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let huge = parse_retry_after("10000000000000000000", now);
        assert_eq!(huge, Some(MAX_RETRY_AFTER));
        let far = parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now);
        assert_eq!(far, Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("-5", now), None);
        let t = Instant::now();
        assert!(later(t, Duration::MAX) > t);
        assert_eq!(later(t, Duration::from_secs(3)), t + Duration::from_secs(3));
    }

    #[test]
    fn credentials_in_the_base_url_are_not_shown() {
        assert_eq!(
            without_credentials("http://user:pass@10.0.0.1:8000/v1"),
            "http://10.0.0.1:8000/v1"
        );
        assert_eq!(
            without_credentials("https://api.openai.com/v1"),
            "https://api.openai.com/v1"
        );
        assert_eq!(without_credentials("a:b@host"), "host");
    }

    #[test]
    fn what_the_upstream_said_is_kept_from_the_clients_reason() {
        let said = |e| match AttemptError::unusable(e) {
            AttemptError::Malformed { reason, detail } => (reason, detail),
            _ => panic!("not malformed"),
        };
        let (reason, detail) = said(wire::Unusable::Error("sk-abcd is wrong".into()));
        assert!(!reason.contains("sk-abcd") && detail.contains("sk-abcd"));
        let quoted = "the LLM's answer is not a chat completion: invalid type: string \"sk-abcd\"";
        let (reason, detail) = said(wire::Unusable::Malformed(quoted.into()));
        assert_eq!(reason, "the LLM's answer is not a chat completion");
        assert_eq!(detail, quoted);
    }

    #[test]
    fn backoff_is_jittered_under_a_growing_ceiling() {
        let err = AttemptError::transport("x".into());
        for attempts in 1..6 {
            let ceiling = BASE_BACKOFF.saturating_mul(1 << attempts).min(MAX_BACKOFF);
            assert!(backoff(attempts, &err) <= ceiling);
        }
        let limited = AttemptError::Status {
            status: 429,
            detail: String::new(),
            retry_after: Some(Duration::from_secs(2)),
        };
        assert_eq!(backoff(1, &limited), Duration::from_secs(2));
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |s| AttemptError::Status {
            status: s,
            detail: String::new(),
            retry_after: None,
        };
        for s in [429, 500, 502, 503, 504] {
            assert!(status(s).retryable(), "{s}");
        }
        for s in [400, 401, 404, 501] {
            assert!(!status(s).retryable(), "{s}");
        }
        assert!(AttemptError::transport("reset".into()).retryable());
        assert!(!AttemptError::unusable(wire::Unusable::Malformed("x".into())).retryable());
        assert!(AttemptError::unusable(wire::Unusable::Truncated).retryable());
    }
}
