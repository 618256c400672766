//! Limits on what one client connection may hold, and the refusals that enforce them.
//!
//! tiny_http 0.12.0 read a request line and headers of any length, waited for a client's bytes
//! forever, served any number of connections (each on its own thread) and stopped accepting at
//! the first accept error. These limits bound all of that.

use std::fmt;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use crate::Response;

/// Why the server answered a connection on its own, without handing a request over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request line, a header or a chunked body is malformed.
    BadRequest(&'static str),
    /// 408: the client stopped sending in the middle of a request.
    Timeout,
    /// 414: the request line is longer than the head limit.
    UriTooLong,
    /// 417: an `Expect` header other than `100-continue`.
    ExpectationFailed,
    /// 431: the headers are longer than the head limit.
    HeadersTooLarge,
    /// 501: a transfer coding other than `chunked`.
    NotImplemented(&'static str),
    /// 503: every connection slot is taken.
    TooManyConnections,
    /// 505: an HTTP version other than 1.0 and 1.1.
    VersionNotSupported,
}

impl Refusal {
    /// The HTTP status of the answer.
    pub fn status(&self) -> u16 {
        match self {
            Refusal::BadRequest(_) => 400,
            Refusal::Timeout => 408,
            Refusal::UriTooLong => 414,
            Refusal::ExpectationFailed => 417,
            Refusal::HeadersTooLarge => 431,
            Refusal::NotImplemented(_) => 501,
            Refusal::TooManyConnections => 503,
            Refusal::VersionNotSupported => 505,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::BadRequest(why) | Refusal::NotImplemented(why) => f.write_str(why),
            Refusal::Timeout => f.write_str("the request was not received in time"),
            Refusal::UriTooLong => f.write_str("the request line is too long"),
            Refusal::ExpectationFailed => f.write_str("only `Expect: 100-continue` is supported"),
            Refusal::HeadersTooLarge => f.write_str("the request headers are too large"),
            Refusal::TooManyConnections => {
                f.write_str("the server has too many open connections; retry shortly")
            }
            Refusal::VersionNotSupported => f.write_str("only HTTP/1.0 and HTTP/1.1 are supported"),
        }
    }
}

/// Builds the response sent for a [`Refusal`].
pub type RefusalResponder = Arc<dyn Fn(Refusal) -> Response<Cursor<Vec<u8>>> + Send + Sync>;

/// Limits on client connections; see [`crate::Server::from_listener_with_limits`].
#[derive(Clone)]
pub struct ConnectionLimits {
    /// Longest wait for a client's next bytes, and for it to take the bytes of a response. An
    /// unfinished request then gets a 408 and the connection closes; an idle keep-alive
    /// connection is closed without a word.
    pub timeout: Option<Duration>,
    /// Connections open at once; one more is answered with a 503 and closed.
    pub max_connections: usize,
    /// Longest request line, and longest request line plus headers, in bytes.
    pub max_head_bytes: usize,
    /// Longest body. Bodies (chunked ones too) are read whole on the connection's own thread
    /// before the request is handed over, so whoever answers it never waits on the client.
    /// Longer bodies are not read on: [`crate::Request::body_exceeds_limit`] says so and the
    /// connection closes after the response.
    pub max_body_bytes: usize,
    /// Builds the response for each refusal.
    pub respond: RefusalResponder,
}

impl fmt::Debug for ConnectionLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionLimits")
            .field("timeout", &self.timeout)
            .field("max_connections", &self.max_connections)
            .field("max_head_bytes", &self.max_head_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl Default for ConnectionLimits {
    /// No timeout, no cap on connections or heads, bodies up to 8 MiB, plain-text refusals.
    fn default() -> Self {
        ConnectionLimits {
            timeout: None,
            max_connections: usize::MAX,
            max_head_bytes: usize::MAX,
            max_body_bytes: 8 << 20,
            respond: Arc::new(|refusal| {
                Response::from_string(refusal.to_string()).with_status_code(refusal.status())
            }),
        }
    }
}
