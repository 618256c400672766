//! API errors: every way a request can fail, and the one place each maps to the contract's
//! status, `type` and headers.

use crate::llm::UpstreamError;
use crate::store::StoreError;
use crate::tenants::Limited;
use crate::validate::Invalid;
use std::fmt;

/// A request that cannot be answered with success.
#[derive(Debug)]
pub enum ApiError {
    /// 400 `invalid_json`: empty body, not JSON, or not UTF-8.
    InvalidJson(String),
    /// 400 `invalid_request`: JSON of the wrong shape, or a bad path or query value.
    InvalidRequest(String),
    /// 400 `invalid_request` about one field of the body, named in the body's `param` (and
    /// `code`, where OpenAI's API gives one) as well as in the message, as OpenAI answers.
    InvalidParam {
        /// The field, as OpenAI names it (`input[1].content[0].type`).
        param: String,
        /// OpenAI's `code`, such as `previous_response_not_found`.
        code: Option<&'static str>,
        /// What is wrong with it.
        message: String,
    },
    /// 401 `unauthorized`: auth is on and the bearer token is missing or wrong.
    Unauthorized(&'static str),
    /// 404 `not_found`: no such route or chat.
    NotFound(String),
    /// 405 `method_not_allowed`, with the methods the path takes.
    MethodNotAllowed {
        /// Value of the `Allow` header.
        allow: &'static str,
    },
    /// 409 `chat_busy`: the chat has a message queued or in progress.
    ChatBusy,
    /// 422 `idempotency_key_reused`: the key already stands for a different message.
    IdempotencyKeyReused,
    /// 413 `payload_too_large`.
    PayloadTooLarge {
        /// `max_body_bytes`.
        limit: usize,
    },
    /// 429 `rate_limited`: the calling tenant is over one of its limits (the server is not).
    RateLimited(Limited),
    /// 503 `overloaded`: every worker busy and the queue full.
    Overloaded,
    /// 503 `shutting_down`: the server is draining.
    ShuttingDown,
    /// 502 `upstream_error` or 504 `upstream_timeout`.
    Upstream(UpstreamError),
    /// 503 `storage_unavailable` while the database is locked, full or read-only (a fault that
    /// clears by itself or by an operator); 500 `internal` for any other database failure.
    Store(StoreError),
    /// Refused by the HTTP layer before a request could be read whole: a malformed or
    /// oversized head, a client too slow, too many connections.
    Refused(tiny_http::Refusal),
    /// 500 `internal`: anything else.
    Internal(String),
}

impl ApiError {
    /// A 400 `invalid_request` saying what to change.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::InvalidRequest(message.into())
    }

    /// The HTTP status and the contract's error `type`.
    pub fn status_and_type(&self) -> (u16, &'static str) {
        match self {
            ApiError::InvalidJson(_) => (400, "invalid_json"),
            ApiError::InvalidRequest(_) | ApiError::InvalidParam { .. } => (400, "invalid_request"),
            ApiError::Unauthorized(_) => (401, "unauthorized"),
            ApiError::NotFound(_) => (404, "not_found"),
            ApiError::MethodNotAllowed { .. } => (405, "method_not_allowed"),
            ApiError::ChatBusy => (409, "chat_busy"),
            ApiError::PayloadTooLarge { .. } => (413, "payload_too_large"),
            ApiError::IdempotencyKeyReused => (422, "idempotency_key_reused"),
            ApiError::RateLimited(_) => (429, "rate_limited"),
            ApiError::Overloaded => (503, "overloaded"),
            ApiError::ShuttingDown => (503, "shutting_down"),
            ApiError::Upstream(UpstreamError::Timeout { .. }) => (504, "upstream_timeout"),
            ApiError::Upstream(UpstreamError::Paused { .. }) => (503, "upstream_unavailable"),
            ApiError::Upstream(_) => (502, "upstream_error"),
            ApiError::Store(StoreError::Busy | StoreError::Unavailable(_)) => {
                (503, "storage_unavailable")
            }
            ApiError::Store(_) | ApiError::Internal(_) => (500, "internal"),
            ApiError::Refused(refusal) => {
                use tiny_http::Refusal::*;
                let kind = match refusal {
                    BadRequest(_) => "invalid_request",
                    Timeout => "request_timeout",
                    UriTooLong => "uri_too_long",
                    ExpectationFailed => "expectation_failed",
                    HeadersTooLarge => "headers_too_large",
                    NotImplemented(_) => "not_implemented",
                    TooManyConnections => "overloaded",
                    VersionNotSupported => "http_version_not_supported",
                };
                (refusal.status(), kind)
            }
        }
    }

    /// Headers the contract asks for beside the body.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            ApiError::MethodNotAllowed { allow } => vec![("Allow", allow.to_string())],
            ApiError::Unauthorized(_) => vec![("WWW-Authenticate", "Bearer".into())],
            ApiError::ChatBusy
            | ApiError::Overloaded
            | ApiError::Store(StoreError::Busy | StoreError::Unavailable(_))
            | ApiError::Refused(tiny_http::Refusal::TooManyConnections) => {
                vec![("Retry-After", "1".into())]
            }
            ApiError::ShuttingDown => vec![("Retry-After", "5".into())],
            ApiError::RateLimited(limited) => {
                vec![("Retry-After", retry_after_secs(limited.retry_after))]
            }
            ApiError::Upstream(UpstreamError::Paused { retry_after }) => {
                vec![("Retry-After", retry_after_secs(*retry_after))]
            }
            _ => Vec::new(),
        }
    }

    /// The JSON body: `{"error": {"type", "message", "request_id"}}`.
    pub fn body(&self, request_id: &str) -> serde_json::Value {
        let (_, kind) = self.status_and_type();
        let mut body = serde_json::json!({
            "error": {"type": kind, "message": self.to_string(), "request_id": request_id}
        });
        if let ApiError::InvalidParam { param, code, .. } = self {
            body["error"]["param"] = param.as_str().into();
            body["error"]["code"] = (*code).into();
        }
        body
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::InvalidJson(m) | ApiError::InvalidRequest(m) | ApiError::NotFound(m) => f.write_str(m),
            ApiError::InvalidParam { message, .. } => f.write_str(message),
            ApiError::Unauthorized(m) => f.write_str(m),
            ApiError::MethodNotAllowed { allow } => write!(f, "method not allowed here; allowed: {allow}"),
            ApiError::ChatBusy => f.write_str(
                "this chat already has a message queued or in progress; retry when it has been answered",
            ),
            ApiError::PayloadTooLarge { limit } => write!(f, "the request body is larger than {limit} bytes"),
            ApiError::IdempotencyKeyReused => f.write_str(
                "this Idempotency-Key was already used in this chat for a different message; \
                 a new message needs a new key",
            ),
            ApiError::RateLimited(limited) => limited.fmt(f),
            ApiError::Overloaded => f.write_str("every worker is busy and the queue is full; retry shortly"),
            ApiError::ShuttingDown => f.write_str("the server is shutting down; retry against another instance or later"),
            ApiError::Upstream(e) => f.write_str(&upstream_reason(e)),
            ApiError::Refused(refusal) => refusal.fmt(f),
            ApiError::Store(StoreError::Busy | StoreError::Unavailable(_)) => f.write_str(
                "the database is unavailable just now (locked, full or read-only); retry shortly",
            ),
            // Details of server faults go to the log under the request id, not to the client.
            ApiError::Store(_) | ApiError::Internal(_) => {
                f.write_str("internal error; the server log has the details under this request id")
            }
        }
    }
}

/// What a client is told about an upstream failure: the upstream's status and chatpool's own
/// reason. Never the upstream's address (its host, port and any credentials in `base_url`) nor
/// its words (an error body may echo the key, `sk-…abcd`): every tenant reads these messages,
/// and the details are in the log under the request id ([`log_detail`]).
fn upstream_reason(e: &UpstreamError) -> String {
    let tries = |n: u32| match n {
        1 => "1 attempt".to_string(),
        n => format!("{n} attempts"),
    };
    match e {
        UpstreamError::Status {
            status, attempts, ..
        } => format!("the LLM answered HTTP {status} after {}", tries(*attempts)),
        UpstreamError::Transport {
            reason, attempts, ..
        } => format!("{reason} after {}", tries(*attempts)),
        UpstreamError::Malformed { reason, .. } => reason.clone(),
        UpstreamError::Timeout { .. } | UpstreamError::Cancelled | UpstreamError::Paused { .. } => {
            e.to_string()
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError::InvalidRequest(e.0)
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        ApiError::Upstream(e)
    }
}

/// A wait as `Retry-After` gives it: whole seconds, rounded up, at least one.
fn retry_after_secs(wait: std::time::Duration) -> String {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1).to_string()
}

/// The detail of a server fault for the log; `None` for client errors.
pub fn log_detail(e: &ApiError) -> Option<String> {
    match e {
        ApiError::Upstream(u) => Some(u.to_string()),
        ApiError::Store(s) => Some(s.to_string()),
        ApiError::Internal(m) => Some(m.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Cause;
    use std::time::Duration;

    #[test]
    fn upstream_errors_map_to_502_or_504_and_name_the_status() {
        let e = ApiError::from(UpstreamError::Status {
            status: 500,
            detail: "boom".into(),
            attempts: 3,
        });
        assert_eq!(e.status_and_type(), (502, "upstream_error"));
        assert!(e.to_string().contains("HTTP 500"), "{e}");
        let e = ApiError::from(UpstreamError::Timeout {
            after: Duration::from_secs(2),
        });
        assert_eq!(e.status_and_type(), (504, "upstream_timeout"));
    }

    #[test]
    fn upstream_words_and_address_stay_out_of_the_body_and_go_to_the_log() {
        let errors = [
            UpstreamError::Status {
                status: 401,
                detail: "Incorrect API key provided: sk-test-abcd".into(),
                attempts: 1,
            },
            UpstreamError::Transport {
                reason: "could not reach the LLM".into(),
                detail: "http://llm.internal:9000/v1/chat/completions: connection refused".into(),
                attempts: 3,
            },
            UpstreamError::Malformed {
                reason: "the LLM reported an error instead of a reply".into(),
                detail: "the LLM reported an error: /srv/models/secret.bin: out of memory".into(),
            },
        ];
        for (error, secret) in errors.into_iter().zip(["sk-test", "llm.internal", "/srv"]) {
            let e = ApiError::from(error);
            assert_eq!(e.status_and_type(), (502, "upstream_error"));
            let body = e.body("r1").to_string();
            assert!(!body.contains(secret), "{body}");
            assert!(body.contains("LLM"), "{body}");
            assert!(log_detail(&e).unwrap().contains(secret));
        }
    }

    #[test]
    fn internal_details_stay_out_of_the_body() {
        let e = ApiError::Internal("secret path /var/x".into());
        let body = e.body("r1");
        assert_eq!(body["error"]["type"], "internal");
        assert_eq!(body["error"]["request_id"], "r1");
        assert!(!body.to_string().contains("/var/x"));
        assert_eq!(log_detail(&e).as_deref(), Some("secret path /var/x"));
    }

    #[test]
    fn storage_faults_that_clear_are_503_and_the_rest_500() {
        let locked = ApiError::from(StoreError::Busy);
        assert_eq!(locked.status_and_type(), (503, "storage_unavailable"));
        assert_eq!(locked.headers(), [("Retry-After", "1".to_string())]);
        let full = ApiError::from(StoreError::Unavailable(Cause::message(
            "database or disk is full",
        )));
        assert_eq!(full.status_and_type(), (503, "storage_unavailable"));
        assert!(!full.body("r").to_string().contains("disk is full"));
        let broken = ApiError::from(StoreError::Sqlite(Cause::message(
            "no such table: messages",
        )));
        assert_eq!(broken.status_and_type(), (500, "internal"));
    }

    #[test]
    fn http_refusals_keep_their_status_and_get_a_type() {
        use tiny_http::Refusal;
        for (refusal, status, kind) in [
            (Refusal::BadRequest("x"), 400, "invalid_request"),
            (Refusal::Timeout, 408, "request_timeout"),
            (Refusal::HeadersTooLarge, 431, "headers_too_large"),
            (Refusal::NotImplemented("x"), 501, "not_implemented"),
            (Refusal::TooManyConnections, 503, "overloaded"),
        ] {
            assert_eq!(ApiError::Refused(refusal).status_and_type(), (status, kind));
        }
    }

    #[test]
    fn shedding_errors_carry_retry_after() {
        assert_eq!(
            ApiError::Overloaded.headers(),
            [("Retry-After", "1".to_string())]
        );
        let paused = ApiError::from(UpstreamError::Paused {
            retry_after: Duration::from_millis(2100),
        });
        assert_eq!(paused.status_and_type(), (503, "upstream_unavailable"));
        assert_eq!(paused.headers(), [("Retry-After", "3".to_string())]);
        assert_eq!(ApiError::ChatBusy.status_and_type(), (409, "chat_busy"));
        let limited = ApiError::RateLimited(crate::tenants::Limited {
            limit: crate::tenants::Limit::RequestsPerMinute(5),
            retry_after: Duration::from_millis(14_001),
        });
        assert_eq!(limited.status_and_type(), (429, "rate_limited"));
        assert_eq!(limited.headers(), [("Retry-After", "15".to_string())]);
        assert!(
            limited.to_string().contains("requests_per_minute"),
            "{limited}"
        );
        assert_eq!(
            ApiError::IdempotencyKeyReused.status_and_type(),
            (422, "idempotency_key_reused")
        );
        assert_eq!(
            ApiError::MethodNotAllowed { allow: "GET" }.headers(),
            [("Allow", "GET".to_string())]
        );
    }
}
