//! # Simple usage
//!
//! ## Creating the server
//!
//! The easiest way to create a server is to call `Server::http()`.
//!
//! The `http()` function returns an `IoResult<Server>` which will return an error
//! in the case where the server creation fails (for example if the listening port is already
//! occupied).
//!
//! ```no_run
//! let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! ```
//!
//! A newly-created `Server` will immediately start listening for incoming connections and HTTP
//! requests.
//!
//! ## Receiving requests
//!
//! Calling `server.recv()` will block until the next request is available.
//! This function returns an `IoResult<Request>`, so you need to handle the possible errors.
//!
//! ```no_run
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//!
//! loop {
//!     // blocks until the next request is received
//!     let request = match server.recv() {
//!         Ok(rq) => rq,
//!         Err(e) => { println!("error: {}", e); break }
//!     };
//!
//!     // do something with the request
//!     // ...
//! }
//! ```
//!
//! In a real-case scenario, you will probably want to spawn multiple worker tasks and call
//! `server.recv()` on all of them. Like this:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use std::thread;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! let server = Arc::new(server);
//! let mut guards = Vec::with_capacity(4);
//!
//! for _ in (0 .. 4) {
//!     let server = server.clone();
//!
//!     let guard = thread::spawn(move || {
//!         loop {
//!             let rq = server.recv().unwrap();
//!
//!             // ...
//!         }
//!     });
//!
//!     guards.push(guard);
//! }
//! ```
//!
//! If you don't want to block, you can call `server.try_recv()` instead.
//!
//! ## Handling requests
//!
//! The `Request` object returned by `server.recv()` contains informations about the client's request.
//! The most useful methods are probably `request.method()` and `request.url()` which return
//! the requested method (`GET`, `POST`, etc.) and url.
//!
//! To handle a request, you need to create a `Response` object. See the docs of this object for
//! more infos. Here is an example of creating a `Response` from a file:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! ```
//!
//! All that remains to do is call `request.respond()`:
//!
//! ```no_run
//! # use std::fs::File;
//! # use std::path::Path;
//! # let server = tiny_http::Server::http("0.0.0.0:0").unwrap();
//! # let request = server.recv().unwrap();
//! # let response = tiny_http::Response::from_file(File::open(&Path::new("image.png")).unwrap());
//! let _ = request.respond(response);
//! ```
// One function may use `unsafe`, `Connection::hung_up`: a peek that does not block, which
// std does not offer.
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]
#![allow(clippy::match_like_matches_macro)]

use std::error::Error;
use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::Write;
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use client::ClientConnection;
use connection::Connection;
use util::MessagesQueue;

pub use common::{HTTPVersion, Header, HeaderField, Method, StatusCode};
pub use connection::{ConfigListenAddr, ListenAddr, Listener};
pub use limits::{ConnectionLimits, Refusal, RefusalResponder};
pub use parse::{parse_request, ParsedRequest};
pub use request::{Request, ResponseStream};
pub use response::{Response, ResponseBox};

mod client;
mod common;
mod connection;
mod limits;
mod parse;
mod request;
mod response;
mod util;

/// The main class of this library.
///
/// Destroying this object will immediately close the listening socket and the reading
///  part of all the client's connections. Requests that have already been returned by
///  the `recv()` function will not close and the responses will be transferred to the client.
pub struct Server {
    // should be false as long as the server exists
    // when set to true, all the subtasks will close within a few hundreds ms
    close: Arc<AtomicBool>,

    // queue for messages received by child threads
    messages: Arc<MessagesQueue<Request>>,

    // result of TcpListener::local_addr()
    listening_addr: ListenAddr,

    // chatpool patch: requests handed over whose answers are not yet written
    unwritten: Arc<AtomicUsize>,
}

// The server is shared between threads.
const _: fn() = || {
    fn share_and_send<T: Sync + Send>() {}
    share_and_send::<Server>();
};

pub struct IncomingRequests<'a> {
    server: &'a Server,
}

/// Represents the parameters required to create a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The addresses to try to listen to.
    pub addr: ConfigListenAddr,
}

impl Server {
    /// Shortcut for a simple server on a specific address.
    #[inline]
    pub fn http<A>(addr: A) -> Result<Server, Box<dyn Error + Send + Sync + 'static>>
    where
        A: ToSocketAddrs,
    {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::from_socket_addrs(addr)?,
        })
    }

    #[cfg(unix)]
    #[inline]
    /// Shortcut for a UNIX socket server at a specific path
    pub fn http_unix(
        path: &std::path::Path,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Server::new(ServerConfig {
            addr: ConfigListenAddr::unix_from_path(path),
        })
    }

    /// Builds a new server that listens on the specified address.
    pub fn new(config: ServerConfig) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        let listener = config.addr.bind()?;
        Self::from_listener(listener)
    }

    /// Builds a new server using the specified TCP listener.
    ///
    /// This is useful if you've constructed TcpListener using some less usual method
    /// such as from systemd. For other cases, you probably want the `new()` function.
    pub fn from_listener<L: Into<Listener>>(
        listener: L,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::start(listener.into(), ConnectionLimits::default())
    }

    /// chatpool patch: builds a server on the listener whose connections keep to `limits`.
    pub fn from_listener_with_limits<L: Into<Listener>>(
        listener: L,
        limits: ConnectionLimits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        Self::start(listener.into(), limits)
    }

    fn start(
        listener: Listener,
        limits: ConnectionLimits,
    ) -> Result<Server, Box<dyn Error + Send + Sync + 'static>> {
        // building the "close" variable
        let close_trigger = Arc::new(AtomicBool::new(false));

        // building the TcpListener
        let (server, local_addr) = {
            let local_addr = listener.local_addr()?;
            log::debug!("Server listening on {}", local_addr);
            (listener, local_addr)
        };

        // creating a task where server.accept() is continuously called
        // and ClientConnection objects are pushed in the messages queue
        let messages = MessagesQueue::with_capacity(8);

        let inside_close_trigger = close_trigger.clone();
        let inside_messages = messages.clone();
        let unwritten = Arc::new(AtomicUsize::new(0));
        let inside_unwritten = Arc::clone(&unwritten);
        let limits = Arc::new(limits);
        let accept_thread = thread::Builder::new().name("http-accept".into());
        accept_thread.spawn(move || {
            // a tasks pool is used to dispatch the connections into threads
            let tasks_pool = util::TaskPool::new();
            let open = Arc::new(AtomicUsize::new(0));
            let mut accept_errors = util::RateLimitedLog::new(Duration::from_secs(10));

            log::debug!("Running accept thread");
            while !inside_close_trigger.load(Relaxed) {
                let (sock, _) = match server.accept() {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // chatpool patch: an accept error (most often EMFILE: out of file
                        // descriptors) used to end this loop, and with it the server. Wait a
                        // moment for connections to close, and go on.
                        accept_errors.log(|| format!("Error accepting new client: {}", e));
                        thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                };
                // chatpool patch: bound how long a client may keep the connection's thread
                // waiting, and how many connections are open at once.
                if let Err(e) = sock.set_timeouts(limits.timeout) {
                    log::debug!("Cannot set timeouts on a new connection: {}", e);
                    continue;
                }
                let slot = match util::Slot::take(&open, limits.max_connections) {
                    Some(slot) => slot,
                    None => {
                        refuse_connection(sock, &limits);
                        continue;
                    }
                };

                use util::RefinedTcpStream;
                let halves = RefinedTcpStream::new(sock);
                // chatpool patch: out of file descriptors, drop this one connection.
                let (read_closable, write_closable) = match halves {
                    Ok(halves) => halves,
                    Err(e) => {
                        accept_errors.log(|| format!("Error accepting new client: {}", e));
                        continue;
                    }
                };
                let client = ClientConnection::new(
                    write_closable,
                    read_closable,
                    limits.clone(),
                    Arc::clone(&inside_unwritten),
                );

                let messages = inside_messages.clone();
                let mut task = Some((client, slot));
                tasks_pool.spawn(Box::new(move || {
                    if let Some((client, _slot)) = task.take() {
                        client.serve(|rq| messages.push(rq));
                    }
                }));
            }
            log::debug!("Terminating accept thread");
        })?;

        // result
        Ok(Server {
            messages,
            close: close_trigger,
            listening_addr: local_addr,
            unwritten,
        })
    }

    /// Returns an iterator for all the incoming requests.
    ///
    /// The iterator will return `None` if the server socket is shutdown.
    #[inline]
    pub fn incoming_requests(&self) -> IncomingRequests<'_> {
        IncomingRequests { server: self }
    }

    /// Returns the address the server is listening to.
    #[inline]
    pub fn server_addr(&self) -> ListenAddr {
        self.listening_addr.clone()
    }

    /// Returns the number of clients currently connected to the server.
    pub fn num_connections(&self) -> usize {
        unimplemented!()
        //self.requests_receiver.lock().len()
    }

    /// Blocks until an HTTP request has been submitted and returns it.
    pub fn recv(&self) -> IoResult<Request> {
        match self.messages.pop() {
            Some(rq) => Ok(rq),
            None => Err(IoError::other("thread unblocked")),
        }
    }

    /// Same as `recv()` but doesn't block longer than timeout
    pub fn recv_timeout(&self, timeout: Duration) -> IoResult<Option<Request>> {
        match self.messages.pop_timeout(timeout) {
            Some(rq) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// Same as `recv()` but doesn't block.
    pub fn try_recv(&self) -> IoResult<Option<Request>> {
        match self.messages.try_pop() {
            Some(rq) => Ok(Some(rq)),
            None => Ok(None),
        }
    }

    /// chatpool patch: requests received whose answers their connections have not yet written
    /// (or given up on). A process that exits while this is not zero cuts those answers off.
    pub fn answers_unwritten(&self) -> usize {
        self.unwritten.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Unblock thread stuck in recv() or incoming_requests().
    /// If there are several such threads, only one is unblocked.
    /// This method allows graceful shutdown of server.
    pub fn unblock(&self) {
        self.messages.unblock();
    }
}

/// chatpool patch: answers a connection over the cap with a refusal and closes it, without
/// waiting on the client: the write goes into the new socket's empty send buffer, and the
/// accept thread does not linger to drain what the client sends.
fn refuse_connection(mut sock: Connection, limits: &ConnectionLimits) {
    let response = (limits.respond)(Refusal::TooManyConnections).with_connection_close();
    if response
        .raw_print(&mut sock, HTTPVersion(1, 1), &[], false, None)
        .is_ok()
    {
        sock.flush().ok();
    }
    sock.shutdown(Shutdown::Write).ok();
}

impl Iterator for IncomingRequests<'_> {
    type Item = Request;
    fn next(&mut self) -> Option<Request> {
        self.server.recv().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.close.store(true, Relaxed);
        // Connect briefly to ourselves to unblock the accept thread
        let maybe_stream = match &self.listening_addr {
            ListenAddr::IP(addr) => TcpStream::connect(addr).map(Connection::from),
            #[cfg(unix)]
            ListenAddr::Unix(addr) => {
                // TODO: use connect_addr when its stabilized.
                let path = addr.as_pathname().unwrap();
                std::os::unix::net::UnixStream::connect(path).map(Connection::from)
            }
        };
        if let Ok(stream) = maybe_stream {
            let _ = stream.shutdown(Shutdown::Both);
        }

        #[cfg(unix)]
        if let ListenAddr::Unix(addr) = &self.listening_addr {
            if let Some(path) = addr.as_pathname() {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
