use std::fmt;
use std::io::{self, Cursor, ErrorKind, Read};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};

use crate::util::{answer, AnswerReceiver, AnswerSender};
use std::sync::Arc;

use crate::parse::{Body, Head};
use crate::response::write_message_header;
use crate::{HTTPVersion, Header, Method, Response, StatusCode};

/// An HTTP request made by a client, read whole (head and body) by its connection's thread.
///
/// A `Request` is `Send`: hand it to whichever thread answers it. Answering never touches the
/// client's socket: [`Request::respond`] renders the response and hands it back to the
/// connection's thread, which writes it, so no one but that thread ever waits on a slow or
/// absent client. A connection reads its next request only once the previous one is answered
/// and written: pipelined requests wait in the client's socket, one at a time.
///
/// While a request waits for its answer, its connection watches the socket: a client that hangs
/// up sets the request's [`hangup`](Request::hangup) flag, so whoever works on it can stop.
///
/// A `Request` dropped without an answer is answered with an empty 500.
pub struct Request {
    method: Method,
    path: String,
    http_version: HTTPVersion,
    headers: Vec<Header>,
    remote_addr: Option<SocketAddr>,
    body: Cursor<Vec<u8>>,
    body_length: Option<usize>,
    body_exceeds_limit: bool,
    /// Where the answer goes; `None` once answered.
    reply: Option<AnswerSender<Reply>>,
    hangup: Arc<AtomicBool>,
}

/// An answer on its way to the connection's thread.
pub(crate) enum Reply {
    /// A whole response, rendered.
    Whole(Vec<u8>),
    /// A response head, then its body piece by piece.
    Stream {
        head: Vec<u8>,
        /// Whether each piece goes out as an HTTP/1.1 chunk (else the connection closes after
        /// the last, for an HTTP/1.0 client).
        chunked: bool,
        pieces: Receiver<Piece>,
    },
}

/// A piece of a streamed body.
pub(crate) enum Piece {
    Data(Vec<u8>),
    /// The body is complete.
    End,
}

/// Pieces of a streamed body waiting for the connection's thread; past them,
/// [`ResponseStream::send`] waits.
const STREAM_PIECES: usize = 16;

impl Request {
    /// A request read off a connection, and the receiving end of its answer.
    pub(crate) fn new(
        head: Head,
        remote_addr: Option<SocketAddr>,
        body: Body,
    ) -> (Request, AnswerReceiver<Reply>) {
        let (reply, answer) = answer();
        let (body, body_exceeds_limit) = match body {
            Body::Whole(body) => (body, false),
            Body::TooLong => (Vec::new(), true),
        };
        let request = Request {
            method: head.method,
            path: head.path,
            http_version: head.version,
            headers: head.headers,
            remote_addr,
            body_length: (!body_exceeds_limit).then_some(body.len()),
            body: Cursor::new(body),
            body_exceeds_limit,
            reply: Some(reply),
            hangup: Arc::new(AtomicBool::new(false)),
        };
        (request, answer)
    }

    /// Returns the method requested by the client (eg. `GET`, `POST`, etc.).
    #[inline]
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// Returns the resource requested by the client.
    #[inline]
    pub fn url(&self) -> &str {
        &self.path
    }

    /// Returns a list of all headers sent by the client.
    #[inline]
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// Returns the HTTP version of the request.
    #[inline]
    pub fn http_version(&self) -> &HTTPVersion {
        &self.http_version
    }

    /// The length of the body in bytes; `None` when it was over the limit and not read.
    #[inline]
    pub fn body_length(&self) -> Option<usize> {
        self.body_length
    }

    /// Whether the body is longer than the server's body limit (declared so by
    /// `Content-Length`, or found so while reading a chunked body). Such a body is not read, the
    /// request's reader is empty, and the connection closes after the response.
    #[inline]
    pub fn body_exceeds_limit(&self) -> bool {
        self.body_exceeds_limit
    }

    /// The address of the client (`None` on a UNIX socket). Behind a proxy, the proxy's.
    #[inline]
    pub fn remote_addr(&self) -> Option<&SocketAddr> {
        self.remote_addr.as_ref()
    }

    /// The body, already read whole.
    #[inline]
    pub fn as_reader(&mut self) -> &mut dyn Read {
        &mut self.body
    }

    /// Set once the client hangs up while this request waits for its answer, or while a
    /// streamed answer is being written; the answer then goes nowhere, so work on it can stop.
    pub fn hangup(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.hangup)
    }

    /// Whether the client has hung up (see [`Request::hangup`]).
    pub fn client_gone(&self) -> bool {
        self.hangup.load(Ordering::SeqCst)
    }

    /// Answers the request: renders `response` (reading its body whole) and hands it to the
    /// connection's thread, without waiting for the client. Fails only if the body cannot be
    /// read; a client that has gone away is not an error.
    pub fn respond<R: Read>(mut self, response: Response<R>) -> io::Result<()> {
        let Some(reply) = self.reply.take() else {
            return Ok(());
        };
        let rendered = self.render(response)?;
        // The connection's thread is gone only with its client.
        let _ = reply.send(Reply::Whole(rendered));
        Ok(())
    }

    fn render<R: Read>(&self, response: Response<R>) -> io::Result<Vec<u8>> {
        let response = if self.body_exceeds_limit {
            response.with_connection_close()
        } else {
            response
        };
        let mut rendered = Vec::new();
        response.raw_print(
            &mut rendered,
            self.http_version.clone(),
            &self.headers,
            self.method == Method::Head,
            None,
        )?;
        Ok(rendered)
    }

    /// Answers with a body sent piece by piece as it is produced (an event stream, say): the
    /// head now, then each [`ResponseStream::send`]. `headers` must not frame the body; the
    /// stream is chunked for HTTP/1.1 clients, and ends the connection for HTTP/1.0 ones.
    pub fn stream(mut self, status: StatusCode, mut headers: Vec<Header>) -> ResponseStream {
        let Some(reply) = self.reply.take() else {
            return ResponseStream { pieces: None };
        };
        let chunked = self.http_version >= (1, 1);
        let framing = if chunked {
            ("Transfer-Encoding", "chunked")
        } else {
            ("Connection", "close")
        };
        if let Ok(header) = Header::from_bytes(framing.0, framing.1) {
            headers.push(header);
        }
        let mut head = Vec::new();
        let (tx, pieces) = mpsc::sync_channel(STREAM_PIECES);
        if write_message_header(&mut head, &self.http_version, &status, &headers).is_err()
            || reply
                .send(Reply::Stream {
                    head,
                    chunked,
                    pieces,
                })
                .is_err()
        {
            return ResponseStream { pieces: None };
        }
        ResponseStream { pieces: Some(tx) }
    }
}

/// The body of a streamed response, sent piece by piece through its connection's thread.
///
/// Dropped without [`finish`](ResponseStream::finish), the response is cut off: the connection
/// closes without the end of the body, so the client sees it incomplete.
pub struct ResponseStream {
    pieces: Option<SyncSender<Piece>>,
}

impl ResponseStream {
    /// Sends one piece. Waits while the connection's thread has pieces still to write, which
    /// it gives up on when the client stops reading for the timeout or hangs up; then, and
    /// from then on, this fails with `BrokenPipe`.
    pub fn send(&mut self, data: &[u8]) -> io::Result<()> {
        self.push(Piece::Data(data.to_vec()))
    }

    /// Ends the body; the connection may carry the client's next request.
    pub fn finish(mut self) -> io::Result<()> {
        self.push(Piece::End)
    }

    fn push(&mut self, piece: Piece) -> io::Result<()> {
        let sent = self.pieces.as_ref().map(|pieces| pieces.send(piece));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => {
                self.pieces = None;
                Err(io::Error::new(
                    ErrorKind::BrokenPipe,
                    "the client connection has closed",
                ))
            }
        }
    }
}

impl fmt::Debug for Request {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> Result<(), fmt::Error> {
        write!(
            formatter,
            "Request({} {} from {:?})",
            self.method, self.path, self.remote_addr
        )
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Some(reply) = self.reply.take() {
            if let Ok(rendered) = self.render(Response::empty(500)) {
                let _ = reply.send(Reply::Whole(rendered));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, version: &str) -> (Request, AnswerReceiver<Reply>) {
        let bytes = format!("{method} /x {version}\r\nContent-Length: 2\r\n\r\nhi");
        let mut reader = bytes.as_bytes();
        let head = crate::parse::read_head(&mut reader, 1024).unwrap();
        Request::new(head, None, Body::Whole(b"hi".to_vec()))
    }

    fn whole(answer: &AnswerReceiver<Reply>) -> String {
        match answer.recv_timeout(std::time::Duration::ZERO) {
            Ok(Reply::Whole(bytes)) => String::from_utf8(bytes).unwrap(),
            _ => panic!("no whole reply"),
        }
    }

    #[test]
    fn respond_hands_the_rendered_response_over_without_a_socket() {
        let (mut rq, answer) = request("GET", "HTTP/1.1");
        let mut body = String::new();
        rq.as_reader().read_to_string(&mut body).unwrap();
        assert_eq!(body, "hi");
        rq.respond(Response::from_string("hello")).unwrap();
        let text = whole(&answer);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nhello"), "{text}");
        let (rq, answer) = request("HEAD", "HTTP/1.1");
        rq.respond(Response::from_string("hello")).unwrap();
        assert!(whole(&answer).ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_dropped_request_is_a_500_and_a_gone_client_no_error() {
        let (rq, answer) = request("GET", "HTTP/1.1");
        drop(rq);
        assert!(whole(&answer).starts_with("HTTP/1.1 500 "));
        let (rq, answer) = request("GET", "HTTP/1.1");
        drop(answer);
        rq.respond(Response::from_string("nobody")).unwrap();
    }

    #[test]
    fn a_stream_sends_its_pieces_and_fails_once_the_connection_gives_up() {
        let (rq, answer) = request("GET", "HTTP/1.1");
        let mut stream = rq.stream(StatusCode(200), Vec::new());
        let Ok(Reply::Stream {
            head,
            chunked,
            pieces,
        }) = answer.recv_timeout(std::time::Duration::ZERO)
        else {
            panic!("no stream");
        };
        assert!(chunked);
        assert!(String::from_utf8(head)
            .unwrap()
            .contains("Transfer-Encoding: chunked"));
        stream.send(b"one").unwrap();
        assert!(matches!(pieces.try_recv(), Ok(Piece::Data(d)) if d == b"one"));
        drop(pieces);
        assert_eq!(
            stream.send(b"two").unwrap_err().kind(),
            ErrorKind::BrokenPipe
        );
        assert!(stream.finish().is_err());

        let (rq, answer) = request("GET", "HTTP/1.0");
        let _stream = rq.stream(StatusCode(200), Vec::new());
        assert!(matches!(
            answer.recv_timeout(std::time::Duration::ZERO),
            Ok(Reply::Stream { chunked: false, .. })
        ));
    }
}
