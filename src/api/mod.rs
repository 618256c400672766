//! The HTTP API: routing, request parsing, the handlers the workers run, and the responses.
//!
//! The acceptor uses [`route()`] to decide where a request goes; workers run [`Handler`] on the
//! [`Job`]s it queues. Responses are built here and nowhere else, so every one carries
//! `X-Request-Id` and every error has the contract's shape.

pub mod error;
mod handler;
pub mod openai;
pub mod request;
mod responder;
pub mod responses;
pub mod route;
mod sse;
mod turn;
mod usage;

pub use error::ApiError;
pub use handler::{Handler, Job};
pub use route::{route, Ops, Route, Target};

use std::io::Cursor;

/// A response with its body in memory.
pub type HttpResponse = tiny_http::Response<Cursor<Vec<u8>>>;

/// A JSON response.
pub fn json_response(status: u16, body: &serde_json::Value) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    // The length is known, so say it rather than let tiny_http chunk large bodies.
    let response = tiny_http::Response::from_data(bytes)
        .with_status_code(status)
        .with_chunked_threshold(usize::MAX);
    with_header(response, "Content-Type", "application/json")
}

/// The contract's error response for `error`.
pub fn error_response(error: &ApiError, request_id: &str) -> HttpResponse {
    let (status, _) = error.status_and_type();
    let mut response = json_response(status, &error.body(request_id));
    for (name, value) in error.headers() {
        response = with_header(response, name, &value);
    }
    response
}

/// Adds a header whose name and value are known to be valid.
pub fn with_header(response: HttpResponse, name: &str, value: &str) -> HttpResponse {
    match tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
        Ok(header) => response.with_header(header),
        Err(()) => response,
    }
}

/// Sends `response` with the request id; a client that has gone away is only worth a debug line.
pub fn respond(request: tiny_http::Request, response: HttpResponse, request_id: &str) {
    let response = with_header(response, "X-Request-Id", request_id);
    if let Err(e) = request.respond(response) {
        log::debug!("request_id={request_id}: could not send the response: {e}");
    }
}

/// A fresh request id, for a request that did not bring a sane one.
pub fn new_request_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// The value of a request header, by case-insensitive name.
pub fn header<'a>(request: &'a tiny_http::Request, name: &'static str) -> Option<&'a str> {
    request
        .headers()
        .iter()
        .find(|h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// Every value of a request header, by case-insensitive name, in the order sent.
pub fn headers<'a>(
    request: &'a tiny_http::Request,
    name: &'static str,
) -> impl Iterator<Item = &'a str> {
    request
        .headers()
        .iter()
        .filter(move |h| h.field.equiv(name))
        .map(|h| h.value.as_str())
}

/// The one info line logged per API request.
pub fn log_request(method: &str, url: &str, status: u16, millis: f64, request_id: &str) {
    log::info!("{method} {url} {status} {millis:.1}ms request_id={request_id}");
}
