//! The LLM client: one blocking call per chat turn, made on the worker thread that serves it.
//!
//! Every worker holds a clone of one [`LlmClient`]; clones share one ureq agent, whose
//! keep-alive pool keeps a connection for every worker so a busy pool never reconnects. One
//! deadline, `request_timeout_ms`, covers every attempt and every backoff of a call.

mod breaker;
pub mod mock;
pub mod prompt;
pub mod wire;

use crate::config::{LlmConfig, Provider};
use crate::metrics::Metrics;
use breaker::Breaker;
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use wire::{ChatMessage, Completion, CompletionRequest, Sampling, StreamFailure, StreamOptions};
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
        /// What its body said, shortened.
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
        /// What went wrong.
        detail: String,
        /// Calls made.
        attempts: u32,
    },
    /// A 200 whose body is not a chat completion.
    Malformed {
        /// What was wrong with it.
        detail: String,
    },
    /// The client went away while the reply streamed; the call was abandoned.
    Cancelled,
    /// The LLM failed repeatedly just now; calls are paused (the breaker is open).
    Paused {
        /// When a call may go out again.
        retry_after: Duration,
    },
}

impl UpstreamError {
    /// Whether this says the LLM is unwell (and counts towards opening the breaker), rather
    /// than that it refused this particular request.
    fn is_failure(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => *status == 429 || *status >= 500,
            UpstreamError::Paused { .. } | UpstreamError::Cancelled => false,
            _ => true,
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
            UpstreamError::Transport { detail, attempts } => {
                write!(
                    f,
                    "could not reach the LLM after {}: {detail}",
                    tries(attempts)
                )
            }
            UpstreamError::Malformed { detail } => f.write_str(detail),
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
    Transport(String),
    Timeout,
    Malformed(String),
    Cancelled,
}

impl AttemptError {
    /// An answer that is not a reply: worth another try only when a stream was cut short.
    fn unusable(e: wire::Unusable) -> AttemptError {
        match e {
            wire::Unusable::Truncated => AttemptError::Transport(e.to_string()),
            e => AttemptError::Malformed(e.to_string()),
        }
    }

    fn retryable(&self) -> bool {
        match self {
            AttemptError::Status { status, .. } => matches!(status, 429 | 500 | 502 | 503 | 504),
            AttemptError::Transport(_) => true,
            AttemptError::Timeout | AttemptError::Malformed(_) | AttemptError::Cancelled => false,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            AttemptError::Status { status: 429, .. } => "rate_limited",
            AttemptError::Status { status, .. } if *status >= 500 => "server_error",
            AttemptError::Status { .. } => "client_error",
            AttemptError::Transport(_) => "transport_error",
            AttemptError::Timeout => "timeout",
            AttemptError::Malformed(_) => "malformed",
            AttemptError::Cancelled => "cancelled",
        }
    }
}

/// A handle on the configured LLM; cheap to clone, one clone per worker.
#[derive(Clone)]
pub struct LlmClient {
    backend: Backend,
    model: Arc<str>,
    request_timeout: Duration,
    max_retries: u32,
    breaker: Arc<Breaker>,
    metrics: Arc<Metrics>,
}

#[derive(Clone)]
enum Backend {
    Mock {
        latency: Duration,
    },
    OpenAi {
        agent: ureq::Agent,
        url: Arc<str>,
        authorization: Option<Arc<str>>,
    },
}

impl LlmClient {
    /// A client for the configured provider, sized for `workers` concurrent calls. The API key
    /// is read once, from the environment variable the config names.
    pub fn new(config: &LlmConfig, workers: usize, metrics: Arc<Metrics>) -> LlmClient {
        let backend = match config.provider {
            Provider::Mock => Backend::Mock {
                latency: Duration::from_millis(config.mock_latency_ms),
            },
            Provider::Openai => {
                let agent = ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_millis(config.connect_timeout_ms))
                    .max_idle_connections(workers.max(1))
                    .max_idle_connections_per_host(workers.max(1))
                    .user_agent(concat!("chatpool/", env!("CARGO_PKG_VERSION")))
                    .build();
                let key = std::env::var(&config.api_key_env)
                    .ok()
                    .filter(|k| !k.is_empty());
                Backend::OpenAi {
                    agent,
                    url: format!("{}/chat/completions", config.base_url.trim_end_matches('/'))
                        .into(),
                    authorization: key.map(|k| format!("Bearer {k}").into()),
                }
            }
        };
        LlmClient {
            backend,
            model: config.model.as_str().into(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            max_retries: config.max_retries,
            breaker: Arc::new(Breaker::new(
                config.breaker_failures,
                Duration::from_millis(config.breaker_cooldown_ms),
            )),
            metrics,
        }
    }

    /// Whether an API key was found, for the start-up log.
    pub fn has_key(&self) -> bool {
        matches!(
            &self.backend,
            Backend::OpenAi {
                authorization: Some(_),
                ..
            }
        )
    }

    /// The configured model name.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Asks the LLM for the next message of `messages`, retrying what is worth retrying within
    /// the deadline, unless the breaker has paused calls.
    ///
    /// With a `sink`, the reply is streamed: each piece goes to the sink as it arrives (the sink
    /// returns `false` when its client has gone, which abandons the call), and a call is only
    /// retried while nothing has reached the sink yet.
    pub fn complete(
        &self,
        messages: &[ChatMessage],
        sampling: Sampling,
        sink: Option<&mut Sink<'_>>,
    ) -> Result<Completion, UpstreamError> {
        let permit = self.breaker.admit(Instant::now()).map_err(|retry_after| {
            self.metrics.upstream_outcome("paused");
            UpstreamError::Paused { retry_after }
        })?;
        let result = self.call(messages, sampling, sink);
        let succeeded = match &result {
            Ok(_) => true,
            Err(e) => !e.is_failure(),
        };
        self.breaker.record(permit, succeeded, Instant::now());
        result
    }

    fn call(
        &self,
        messages: &[ChatMessage],
        sampling: Sampling,
        mut sink: Option<&mut Sink<'_>>,
    ) -> Result<Completion, UpstreamError> {
        let (agent, url, authorization) = match &self.backend {
            Backend::Mock { latency } => {
                std::thread::sleep(*latency);
                let completion = mock::reply(messages, &self.model, 0);
                if let Some(sink) = sink {
                    for piece in completion.content.split_inclusive(' ') {
                        if !sink(piece) {
                            self.metrics.upstream_outcome("cancelled");
                            return Err(UpstreamError::Cancelled);
                        }
                    }
                }
                self.metrics.upstream_outcome("ok");
                return Ok(completion);
            }
            Backend::OpenAi {
                agent,
                url,
                authorization,
            } => (agent, url, authorization.as_deref()),
        };
        let body = serde_json::to_vec(&CompletionRequest {
            model: &self.model,
            messages,
            temperature: sampling.temperature,
            max_tokens: sampling.max_tokens,
            stream: sink.is_some(),
            stream_options: sink.is_some().then_some(StreamOptions {
                include_usage: true,
            }),
            passthrough: &sampling.passthrough,
        })
        .map_err(|e| UpstreamError::Malformed {
            detail: format!("cannot encode the request: {e}"),
        })?;
        let deadline = Instant::now() + self.request_timeout;
        let mut attempts = 0;
        let mut forwarded = false;
        loop {
            attempts += 1;
            let reply = Reply {
                sink: sink.as_deref_mut(),
                forwarded: &mut forwarded,
            };
            let error = match self.attempt(agent, url, authorization, &body, deadline, reply) {
                Ok(completion) => {
                    self.metrics.upstream_outcome("ok");
                    return Ok(completion);
                }
                Err(e) => e,
            };
            self.metrics.upstream_outcome(error.outcome());
            let wait = backoff(attempts, &error);
            let in_time = Instant::now() + wait < deadline;
            // Once a piece reached the client, a retry would send it a second, different start.
            if !error.retryable() || attempts > self.max_retries || !in_time || forwarded {
                return Err(self.give_up(error, attempts));
            }
            self.metrics.upstream_retry();
            std::thread::sleep(wait);
        }
    }

    fn give_up(&self, error: AttemptError, attempts: u32) -> UpstreamError {
        match error {
            AttemptError::Status { status, detail, .. } => UpstreamError::Status {
                status,
                detail,
                attempts,
            },
            AttemptError::Transport(detail) => UpstreamError::Transport { detail, attempts },
            AttemptError::Timeout => UpstreamError::Timeout {
                after: self.request_timeout,
            },
            AttemptError::Malformed(detail) => UpstreamError::Malformed { detail },
            AttemptError::Cancelled => UpstreamError::Cancelled,
        }
    }

    fn attempt(
        &self,
        agent: &ureq::Agent,
        url: &str,
        authorization: Option<&str>,
        body: &[u8],
        deadline: Instant,
        reply: Reply<'_, '_>,
    ) -> Result<Completion, AttemptError> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(AttemptError::Timeout);
        }
        let mut request = agent
            .post(url)
            .timeout(remaining)
            .set("Content-Type", "application/json");
        if let Some(authorization) = authorization {
            request = request.set("Authorization", authorization);
        }
        let timed_out = || Instant::now() >= deadline;
        let read_error = |e: std::io::Error| {
            if timed_out() {
                AttemptError::Timeout
            } else {
                AttemptError::Transport(e.to_string())
            }
        };
        match request.send_bytes(body) {
            Ok(response) => {
                let body = response.into_reader();
                if let Some(sink) = reply.sink {
                    return self
                        .read_stream(body, sink, reply.forwarded)
                        .map_err(|e| match e {
                            StreamFailure::Io(e) => read_error(e),
                            StreamFailure::Cancelled => AttemptError::Cancelled,
                            StreamFailure::Unusable(e) => AttemptError::unusable(e),
                        });
                }
                let mut bytes = Vec::new();
                body.take(wire::MAX_BODY_BYTES)
                    .read_to_end(&mut bytes)
                    .map_err(read_error)?;
                if bytes.len() as u64 == wire::MAX_BODY_BYTES {
                    return Err(AttemptError::unusable(wire::Unusable::TooLong));
                }
                wire::parse_completion(&bytes, &self.model).map_err(AttemptError::unusable)
            }
            Err(ureq::Error::Status(status, response)) => {
                let retry_after = response
                    .header("retry-after")
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let mut bytes = Vec::new();
                // The body only explains the status; a failure to read it changes nothing.
                let _ = response
                    .into_reader()
                    .take(64 << 10)
                    .read_to_end(&mut bytes);
                Err(AttemptError::Status {
                    status,
                    detail: wire::error_detail(&bytes),
                    retry_after,
                })
            }
            Err(ureq::Error::Transport(_)) if timed_out() => Err(AttemptError::Timeout),
            Err(ureq::Error::Transport(t)) => Err(AttemptError::Transport(t.to_string())),
        }
    }
}

/// Where a streamed reply goes, piece by piece; returns `false` once its client is gone.
pub type Sink<'a> = dyn FnMut(&str) -> bool + 'a;

/// The streaming side of one attempt: the sink, and whether anything reached it yet.
struct Reply<'s, 'f> {
    sink: Option<&'s mut Sink<'f>>,
    forwarded: &'s mut bool,
}

impl LlmClient {
    /// Reads an event stream, handing each piece to the sink as it arrives.
    fn read_stream(
        &self,
        body: impl Read,
        sink: &mut Sink<'_>,
        forwarded: &mut bool,
    ) -> Result<Completion, StreamFailure> {
        let mut forward = |piece: &str| {
            let open = sink(piece);
            *forwarded |= open;
            open
        };
        wire::read_stream(std::io::BufReader::new(body), &self.model, &mut forward)
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

/// `Retry-After` as seconds or as an HTTP date.
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
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
    fn backoff_is_jittered_under_a_growing_ceiling() {
        let err = AttemptError::Transport("x".into());
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
        assert!(AttemptError::Transport("reset".into()).retryable());
        assert!(!AttemptError::Malformed("x".into()).retryable());
    }
}
