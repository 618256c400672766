//! One client connection, served by its own thread from the first byte to the close.
//!
//! The thread does all of the connection's I/O and nothing else touches the socket: it reads a
//! request whole (head and body, within the limits), hands it over, waits for the answer while
//! watching the socket for a hang-up, writes the answer, and only then reads the next request.
//! Whoever answers never waits on the client, and a client that pipelines requests or stops
//! reading holds only this thread.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use crate::common::HTTPVersion;
use crate::limits::{ConnectionLimits, Refusal};
use crate::parse::{self, Body, Framing, ReadError};
use crate::request::{Piece, Reply};
use crate::util::{AnswerReceiver, RefinedTcpStream, Unanswered};
use crate::Request;

/// How soon a connection waiting for an answer first looks whether its client has hung up, and
/// the longest it waits between two looks: the wait doubles from one to the other, so an answer
/// that takes a second costs four looks rather than twenty (on a busy server, thousands of
/// wake-ups a second), while a hang-up is still seen within [`WATCH_AT_MOST`].
const WATCH_FIRST: Duration = Duration::from_millis(50);
const WATCH_AT_MOST: Duration = Duration::from_millis(400);

/// The waits between looks at a waiting client's socket: [`WATCH_FIRST`], doubling up to
/// [`WATCH_AT_MOST`].
struct Watch(Duration);

impl Watch {
    fn new() -> Watch {
        Watch(WATCH_FIRST)
    }

    fn next(&mut self) -> Duration {
        let wait = self.0;
        self.0 = (wait * 2).min(WATCH_AT_MOST);
        wait
    }
}

/// What a client may still send after a refusal or an unread body, read and dropped before
/// the close, and for how long: closing a socket with unread data resets the connection, and
/// the reset can destroy the response before the client reads it.
const DRAIN_BYTES: usize = 1 << 20;
const DRAIN_FOR: Duration = Duration::from_millis(200);

/// A client connection: the buffered halves of its socket and the limits it keeps to.
pub struct ClientConnection {
    remote_addr: Option<SocketAddr>,
    reader: BufReader<RefinedTcpStream>,
    writer: BufWriter<RefinedTcpStream>,
    limits: Arc<ConnectionLimits>,
    /// Requests handed over, all connections together, whose answers are not yet written.
    unwritten: Arc<AtomicUsize>,
}

/// How an answer went out.
enum Written {
    /// Whole; the connection may carry another request.
    Reusable,
    /// Whole, but its framing ends the connection.
    Final,
    /// Not whole: the client left or stopped reading, or the answer was cut off.
    Failed,
}

impl ClientConnection {
    /// A connection over the two halves of an accepted socket.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
        limits: Arc<ConnectionLimits>,
        unwritten: Arc<AtomicUsize>,
    ) -> ClientConnection {
        ClientConnection {
            remote_addr: read_socket.peer_addr().ok().flatten(),
            reader: BufReader::with_capacity(1024, read_socket),
            writer: BufWriter::with_capacity(1024, write_socket),
            limits,
            unwritten,
        }
    }

    /// Serves the connection until it closes: each request read is given to `hand_over`, and
    /// its answer written before the next is read.
    pub fn serve(mut self, hand_over: impl Fn(Request)) {
        loop {
            let (request, answer, keep_alive) = match self.read_request() {
                Ok(read) => read,
                Err(ReadError::Refused(refusal)) => {
                    self.refuse(refusal);
                    return self.drain();
                }
                Err(ReadError::Idle | ReadError::Closed) => return,
            };
            let too_long = request.body_exceeds_limit();
            let hangup = request.hangup();
            self.unwritten.fetch_add(1, Ordering::SeqCst);
            hand_over(request);
            let written = match self.wait(&answer, &hangup) {
                Some(Reply::Whole(bytes)) => self.write(&bytes),
                Some(Reply::Stream {
                    head,
                    chunked,
                    pieces,
                }) => self.relay(&head, chunked, &pieces, &hangup),
                None => Written::Failed,
            };
            self.unwritten.fetch_sub(1, Ordering::SeqCst);
            match written {
                Written::Failed => return hangup.store(true, Ordering::SeqCst),
                _ if too_long => return self.drain(),
                Written::Final => return,
                Written::Reusable if !keep_alive => return,
                Written::Reusable => {}
            }
        }
    }

    /// Reads a request whole: (the request, where its answer arrives, whether the client
    /// keeps the connection alive after it).
    fn read_request(&mut self) -> Result<(Request, AnswerReceiver<Reply>, bool), ReadError> {
        let head = parse::read_head(&mut self.reader, self.limits.max_head_bytes)?;
        let expects_continue = head.expects_continue()?;
        let framing = parse::framing(&head)?;
        let limit = self.limits.max_body_bytes;
        let body_wanted = match framing {
            Framing::Empty => false,
            Framing::Length(n) => n <= limit as u64,
            Framing::Chunked => true,
        };
        if expects_continue && body_wanted {
            let sent = write!(self.writer, "HTTP/1.1 100 Continue\r\n\r\n")
                .and_then(|()| self.writer.flush());
            sent.map_err(|_| ReadError::Closed)?;
        }
        let body = parse::read_body(&mut self.reader, framing, limit)?;
        let keep_alive = head.keeps_alive() && body != Body::TooLong;
        let (request, answer) = Request::new(head, self.remote_addr, body);
        Ok((request, answer, keep_alive))
    }

    /// Waits for the answer, looking now and then (see [`Watch`]) whether the client has hung
    /// up; `None` if it has. An answer that comes within [`WATCH_FIRST`] costs no look at all.
    fn wait(&mut self, answer: &AnswerReceiver<Reply>, hangup: &AtomicBool) -> Option<Reply> {
        let mut watch = Watch::new();
        loop {
            match answer.recv_timeout(watch.next()) {
                Ok(reply) => return Some(reply),
                Err(Unanswered::Disconnected) => return None,
                Err(Unanswered::Timeout) if self.reader.get_ref().hung_up() => {
                    hangup.store(true, Ordering::SeqCst);
                    return None;
                }
                Err(Unanswered::Timeout) => {}
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Written {
        match self
            .writer
            .write_all(bytes)
            .and_then(|()| self.writer.flush())
        {
            Ok(()) => Written::Reusable,
            Err(_) => Written::Failed,
        }
    }

    /// Writes a streamed answer piece by piece as the pieces arrive. On failure the hang-up
    /// flag is set before the pieces' channel closes, so the sender that finds it closed also
    /// finds the flag set.
    fn relay(
        &mut self,
        head: &[u8],
        chunked: bool,
        pieces: &Receiver<Piece>,
        hangup: &AtomicBool,
    ) -> Written {
        let written = self.relay_pieces(head, chunked, pieces);
        if let Written::Failed = written {
            hangup.store(true, Ordering::SeqCst);
        }
        written
    }

    fn relay_pieces(&mut self, head: &[u8], chunked: bool, pieces: &Receiver<Piece>) -> Written {
        if let Written::Failed = self.write(head) {
            return Written::Failed;
        }
        let mut watch = Watch::new();
        loop {
            let sent = match pieces.recv_timeout(watch.next()) {
                Ok(Piece::Data(data)) if chunked => write!(self.writer, "{:x}\r\n", data.len())
                    .and_then(|()| self.writer.write_all(&data))
                    .and_then(|()| self.writer.write_all(b"\r\n")),
                Ok(Piece::Data(data)) => self.writer.write_all(&data),
                Ok(Piece::End) if chunked => return self.write(b"0\r\n\r\n"),
                Ok(Piece::End) => return Written::Final,
                Err(RecvTimeoutError::Timeout) if !self.reader.get_ref().hung_up() => continue,
                Err(RecvTimeoutError::Timeout) => return Written::Failed,
                Err(RecvTimeoutError::Disconnected) => return Written::Failed,
            };
            if sent.and_then(|()| self.writer.flush()).is_err() {
                return Written::Failed;
            }
            watch = Watch::new();
        }
    }

    /// Answers with a refusal; the connection closes after it, since where the next request
    /// would start is unknown.
    fn refuse(&mut self, refusal: Refusal) {
        let response = (self.limits.respond)(refusal).with_connection_close();
        if response
            .raw_print(&mut self.writer, HTTPVersion(1, 1), &[], false, None)
            .is_ok()
        {
            self.writer.flush().ok();
        }
    }

    /// Ends the connection after an answer the client may still be sending into: a FIN, then
    /// what the client still sends is read and dropped for a moment (see [`DRAIN_BYTES`]).
    fn drain(mut self) {
        self.writer.flush().ok();
        self.writer.get_mut().end_for_drain(DRAIN_FOR);
        let mut buf = [0u8; 8192];
        let mut drained = 0;
        while drained < DRAIN_BYTES {
            match self.reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waits_between_looks_double_from_the_first_to_the_longest() {
        let mut watch = Watch::new();
        let waits: Vec<u64> = (0..6).map(|_| watch.next().as_millis() as u64).collect();
        assert_eq!(waits, [50, 100, 200, 400, 400, 400]);
    }
}
