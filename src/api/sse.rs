//! Server-sent events to a client, written by the worker as the reply arrives.
//!
//! tiny_http buffers a response until it is complete, so a streamed reply takes the raw
//! connection and frames each event as an HTTP/1.1 chunk itself: the client sees every event
//! the moment it is flushed, and the connection stays usable for the next request afterwards.
//! A failed write is how a worker learns that its client has gone.

use std::io::{self, Write};

/// An open `text/event-stream` response.
pub struct EventStream {
    out: Box<dyn Write + Send>,
}

impl EventStream {
    /// Sends the 200 head and takes over the connection.
    pub fn start(request: tiny_http::Request, request_id: &str) -> io::Result<EventStream> {
        let mut out = request.into_writer();
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
             X-Request-Id: {request_id}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )?;
        out.flush()?;
        Ok(EventStream { out })
    }

    /// Sends one event: `event: NAME` when named, then `data: DATA`.
    pub fn send(&mut self, event: Option<&str>, data: &str) -> io::Result<()> {
        let payload = match event {
            Some(name) => format!("event: {name}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        };
        write!(self.out, "{:x}\r\n{payload}\r\n", payload.len())?;
        self.out.flush()
    }

    /// Ends the response; the connection can carry the next request.
    pub fn finish(mut self) -> io::Result<()> {
        self.out.write_all(b"0\r\n\r\n")?;
        self.out.flush()
    }
}
