//! Server-sent events to a client, sent by the worker as the reply arrives.
//!
//! The worker hands each event to the connection's own thread (tiny_http's `ResponseStream`),
//! which frames it as an HTTP/1.1 chunk and writes it: the client sees every event the moment
//! it is written, the worker never writes to the socket itself, and the connection stays usable
//! for the next request afterwards. A few events wait for the connection's thread at most; a
//! failed send is how a worker learns that its client has gone, hung up or stopped reading for
//! `client_timeout_secs`.

use std::io;

/// An open `text/event-stream` response.
pub struct EventStream {
    out: tiny_http::ResponseStream,
}

impl EventStream {
    /// Hands the 200 head over to the connection.
    pub fn start(request: tiny_http::Request, request_id: &str) -> EventStream {
        let headers = [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("X-Request-Id", request_id),
        ]
        .iter()
        .filter_map(|(name, value)| {
            tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
        })
        .collect();
        EventStream {
            out: request.stream(tiny_http::StatusCode(200), headers),
        }
    }

    /// Sends one event: `event: NAME` when named, then `data: DATA`.
    pub fn send(&mut self, event: Option<&str>, data: &str) -> io::Result<()> {
        let payload = match event {
            Some(name) => format!("event: {name}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        };
        self.out.send(payload.as_bytes())
    }

    /// Ends the response; the connection can carry the next request.
    pub fn finish(self) -> io::Result<()> {
        self.out.finish()
    }
}
