use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use crate::common::{HTTPVersion, Method};
use crate::limits::{ConnectionLimits, Refusal};
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // chatpool patch: the last request's body was over the limit and is still unread
    left_body_unread: bool,

    // chatpool patch: each request handed out notifies this channel once answered, so that
    // an idle timeout can tell a silent client from one waiting for its answer
    responded: (Sender<()>, Receiver<()>),
    unanswered: usize,

    // chatpool patch
    limits: Arc<ConnectionLimits>,
}

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    /// chatpool patch: answered with this refusal, then the connection closes.
    Refused(Refusal),
    /// chatpool patch: the client sent nothing of a next request before the timeout.
    Idle,
    /// The client closed the connection, or its socket failed.
    ReadIoError,
}

/// chatpool patch: a read that hit the socket's timeout (`WouldBlock` on Unix).
fn is_timeout(e: &IoError) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        limits: Arc<ConnectionLimits>,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            left_body_unread: false,
            responded: mpsc::channel(),
            unanswered: 0,
            limits,
        }
    }

    /// chatpool patch: counts the requests answered since the last look; with `wait`, blocks
    /// until every request handed out is answered.
    fn collect_answers(&mut self, wait: bool) {
        while self.unanswered > 0 {
            let answered = if wait {
                self.responded.1.recv().is_ok()
            } else {
                self.responded.1.try_recv().is_ok()
            };
            if !answered {
                return;
            }
            self.unanswered -= 1;
        }
    }

    /// chatpool patch: after a request whose body was too long to read, reads and drops what
    /// the client still sends, for a moment, before the connection closes. Closing a socket
    /// with unread data resets the connection, and the reset can destroy the response before
    /// the client reads it. Call once the iterator has ended (every answer is out by then).
    pub fn drain_unread_body(&mut self) {
        const DRAIN_BYTES: usize = 1 << 20;
        if !self.left_body_unread {
            return;
        }
        self.sink.with_inner(|writer| {
            writer.flush().ok();
            writer
                .get_mut()
                .end_for_drain(std::time::Duration::from_millis(200));
        });
        let mut buf = [0u8; 8192];
        let mut drained = 0;
        while drained < DRAIN_BYTES {
            match self.next_header_source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }

    /// Reads the next line from self.next_header_source, taking its bytes from `budget`.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    fn read_next_line(
        &mut self,
        budget: &mut usize,
        too_long: Refusal,
        first_of_request: bool,
    ) -> Result<AsciiString, ReadError> {
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            let byte = match self.next_header_source.by_ref().bytes().next() {
                Some(Ok(b)) => b,
                Some(Err(e)) if is_timeout(&e) => {
                    return Err(if first_of_request && buf.is_empty() {
                        ReadError::Idle
                    } else {
                        ReadError::Refused(Refusal::Timeout)
                    })
                }
                Some(Err(_)) => return Err(ReadError::ReadIoError),
                None => {
                    return Err(ReadError::ReadIoError);
                }
            };

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf).map_err(|_| {
                    ReadError::Refused(Refusal::BadRequest("the request head is not ASCII"))
                });
            }

            prev_byte_was_cr = byte == b'\r';

            *budget = budget.checked_sub(1).ok_or(ReadError::Refused(too_long))?;
            buf.push(byte);
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        let mut budget = self.limits.max_head_bytes;
        let line = self.read_next_line(&mut budget, Refusal::UriTooLong, true)?;
        let (method, path, version) = parse_request_line(line.as_str().trim())?;

        let mut headers = Vec::new();
        loop {
            let line = self.read_next_line(&mut budget, Refusal::HeadersTooLarge, false)?;
            if line.is_empty() {
                break;
            }
            headers.push(FromStr::from_str(line.as_str().trim()).map_err(|_| {
                ReadError::Refused(Refusal::BadRequest("a header line is malformed"))
            })?);
        }

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        crate::request::new_request(
            method,
            path,
            version,
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
            self.limits.max_body_bytes,
        )
        .map_err(|e| {
            use crate::request::RequestCreationError;
            match e {
                RequestCreationError::CreationIoError(e) if is_timeout(&e) => {
                    ReadError::Refused(Refusal::Timeout)
                }
                RequestCreationError::CreationIoError(_) => ReadError::ReadIoError,
                RequestCreationError::ExpectationFailed => {
                    ReadError::Refused(Refusal::ExpectationFailed)
                }
                RequestCreationError::MalformedBody => {
                    ReadError::Refused(Refusal::BadRequest("the chunked body is malformed"))
                }
            }
        })
    }

    /// chatpool patch: answers with a refusal; the connection closes after it, since where
    /// the next request would start is unknown.
    fn refuse(&mut self, refusal: Refusal) {
        let mut writer = self.sink.next().unwrap();
        let response = (self.limits.respond)(refusal).with_connection_close();
        if response
            .raw_print(&mut writer, HTTPVersion(1, 1), &[], false, None)
            .is_ok()
        {
            writer.flush().ok();
        }
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    fn next(&mut self) -> Option<Request> {
        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            // chatpool patch: the caller may close the connection once this returns
            self.collect_answers(true);
            return None;
        }
        let read = loop {
            match self.read() {
                // chatpool patch: silence while a request is still being answered is not
                // idleness; the connection is idle once every answer is out.
                Err(ReadError::Idle) => {
                    self.collect_answers(false);
                    if self.unanswered == 0 {
                        return None;
                    }
                }
                read => break read,
            }
        };
        let rq = match read {
            Ok(rq) => rq,
            Err(ReadError::Idle) | Err(ReadError::ReadIoError) => return None,
            Err(ReadError::WrongRequestLine) => {
                self.refuse(Refusal::BadRequest("the request line is malformed"));
                return None;
            }
            Err(ReadError::Refused(refusal)) => {
                self.refuse(refusal);
                return None;
            }
        };

        // checking HTTP version
        if *rq.http_version() > (1, 1) {
            let response = (self.limits.respond)(Refusal::VersionNotSupported);
            rq.respond(response.with_connection_close()).ok();
            return None;
        }

        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        if rq.body_exceeds_limit() {
            self.no_more_requests = true;
            self.left_body_unread = true;
        }

        // returning the request
        self.unanswered += 1;
        Some(rq.with_notify_sender(self.responded.0.clone()))
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
