//! The sockets under one worker's ureq agent, which wait in slices so a call can be abandoned.
//!
//! ureq blocks in `read` until the upstream answers. To abandon a call whose client left, or
//! whose deadline passed, while the upstream is still thinking, every socket here carries a
//! short timeout ([`SLICE`]) and loops on it, looking at the worker's [`CallSlot`] between
//! slices; connecting does the same ([`connect`]). The timeouts are set once per connection,
//! not before every read, and the check that a pooled connection is still alive is one
//! non-blocking peek: the system calls per request stay close to the reads and writes
//! themselves. TLS, for an `https` base URL, is ureq's rustls connector layered on top, so it
//! waits the same way.
//!
//! ureq 3 resolves the host of every request before it looks for a kept-alive connection, so
//! [`CachedResolver`] keeps the answer for [`RESOLVED_FOR`]: a host name in `base_url` costs a
//! lookup twice a minute, not one per call.

use super::buffers::GrowingBuffers;
use super::cancel::{Cancel, SLICE};
use super::connect;
use parking_lot::Mutex;
use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// How long a resolved address is used before the host is looked up again.
const RESOLVED_FOR: Duration = Duration::from_secs(30);

const MIN_WAIT: Duration = Duration::from_millis(1);

/// What the call in progress on one worker allows its sockets: how long they may wait, and
/// whether the call is still wanted at all. Shared by the worker's client and its connections.
#[derive(Default)]
pub(crate) struct CallSlot {
    current: Mutex<Limits>,
}

#[derive(Default)]
struct Limits {
    cancel: Cancel,
    deadline: Option<Instant>,
}

/// Why a socket stopped waiting early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The call's client went away.
    Cancelled,
    /// The call's deadline passed.
    Deadline,
}

impl CallSlot {
    /// Makes `cancel` and `deadline` the limits of every wait until [`CallSlot::end`].
    pub(crate) fn begin(&self, cancel: &Cancel, deadline: Instant) {
        *self.current.lock() = Limits {
            cancel: cancel.clone(),
            deadline: Some(deadline),
        };
    }

    /// The call is over; its flag is released.
    pub(crate) fn end(&self) {
        *self.current.lock() = Limits::default();
    }

    /// Why the current call should stop now, if it should.
    pub(crate) fn stopped(&self) -> Option<Stop> {
        self.allowance().err()
    }

    /// The time left until the deadline (`None`: no deadline), unless the call should stop.
    fn left(&self) -> Result<Option<Duration>, Stop> {
        let limits = self.current.lock();
        if limits.cancel.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        let Some(deadline) = limits.deadline else {
            return Ok(None);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Stop::Deadline);
        }
        Ok(Some(left))
    }

    /// How long a socket may block before it looks again.
    fn allowance(&self) -> Result<Duration, Stop> {
        // Never zero: a zero socket timeout would mean "block forever".
        Ok(self
            .left()?
            .map_or(SLICE, |left| left.clamp(MIN_WAIT, SLICE)))
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::Cancelled => "the call was cancelled",
            Stop::Deadline => "the call's deadline passed",
        })
    }
}

impl std::error::Error for Stop {}

impl From<Stop> for ureq::Error {
    fn from(stop: Stop) -> ureq::Error {
        // Not `Interrupted`: readers such as `BufRead::read_line` retry on that.
        let kind = match stop {
            Stop::Cancelled => io::ErrorKind::Other,
            Stop::Deadline => io::ErrorKind::TimedOut,
        };
        ureq::Error::Io(io::Error::new(kind, stop))
    }
}

/// Opens plain TCP connections for one worker's agent.
pub(crate) struct SlicedConnector {
    slot: Arc<CallSlot>,
    connect_timeout: Duration,
}

impl SlicedConnector {
    pub(crate) fn new(slot: Arc<CallSlot>, connect_timeout: Duration) -> SlicedConnector {
        SlicedConnector {
            slot,
            connect_timeout,
        }
    }

    /// Tries each resolved address in turn, within the connect timeout and the call's deadline.
    fn open(&self, addrs: &[SocketAddr]) -> Result<TcpStream, ureq::Error> {
        let mut last = None;
        for addr in addrs {
            let timeout = self.slot.left()?.map_or(self.connect_timeout, |left| {
                left.min(self.connect_timeout).max(MIN_WAIT)
            });
            match connect::connect(addr, timeout, || self.slot.allowance())? {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address to connect to"))
            .into())
    }
}

impl Connector<()> for SlicedConnector {
    type Out = SlicedTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _: Option<()>,
    ) -> Result<Option<SlicedTransport>, ureq::Error> {
        let stream = self.open(&details.addrs)?;
        stream.set_nodelay(true)?;
        let config = details.config;
        Ok(Some(SlicedTransport {
            stream,
            buffers: GrowingBuffers::new(config.input_buffer_size(), config.output_buffer_size()),
            slot: Arc::clone(&self.slot),
            read_timeout: None,
            write_timeout: None,
            held: Vec::new(),
            used: false,
        }))
    }
}

impl fmt::Debug for SlicedConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlicedConnector").finish_non_exhaustive()
    }
}

/// One connection to the upstream.
pub(crate) struct SlicedTransport {
    stream: TcpStream,
    buffers: GrowingBuffers,
    slot: Arc<CallSlot>,
    // What the socket's timeouts are set to, so they are set only when they change.
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    /// Output ureq handed over but not yet sent: a request's head waits here for its body so
    /// that both leave in one system call.
    held: Vec<u8>,
    /// Whether the connection carried a call since its last look for a hang-up.
    used: bool,
}

/// Whether a socket error only says that a slice ran out.
fn slice_ran_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl SlicedTransport {
    /// Sends what is held, then the first `amount` bytes of ureq's output buffer, slice by
    /// slice like every other wait; nothing stays held afterwards, whatever the outcome.
    fn send_held(&mut self, amount: usize) -> Result<(), ureq::Error> {
        let held = std::mem::take(&mut self.held);
        let sent = self.send_both(&held, amount);
        // Keep the allocation for the next request's head.
        self.held = held;
        self.held.clear();
        sent
    }

    fn send_both(&mut self, first: &[u8], amount: usize) -> Result<(), ureq::Error> {
        let total = first.len() + amount;
        let mut sent = 0;
        while sent < total {
            let wait = self.slot.allowance()?;
            if self.write_timeout != Some(wait) {
                self.stream.set_write_timeout(Some(wait))?;
                self.write_timeout = Some(wait);
            }
            let second = &self.buffers.output()[..amount];
            let parts = match first.get(sent..) {
                Some(rest) if !rest.is_empty() => [IoSlice::new(rest), IoSlice::new(second)],
                _ => [
                    IoSlice::new(&second[sent - first.len()..]),
                    IoSlice::new(&[]),
                ],
            };
            match (&self.stream).write_vectored(&parts) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => sent += n,
                Err(e) if slice_ran_out(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.buffers.sent(amount);
        Ok(())
    }
}

impl Transport for SlicedTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    // ureq's own timeouts are not configured; the call's deadline is in the slot.
    //
    // ureq hands over a request's head, then its body, each in a call of its own. The head is
    // held until the body comes, or until ureq turns to reading, and both go in one `writev`:
    // one system call a request instead of two.
    fn transmit_output(&mut self, amount: usize, _: NextTimeout) -> Result<(), ureq::Error> {
        self.used = true;
        if self.held.is_empty() {
            self.held
                .extend_from_slice(&self.buffers.output()[..amount]);
            return Ok(());
        }
        self.send_held(amount)
    }

    fn await_input(&mut self, _: NextTimeout) -> Result<bool, ureq::Error> {
        self.used = true;
        if !self.held.is_empty() {
            self.send_held(0)?;
        }
        loop {
            let wait = self.slot.allowance()?;
            if self.read_timeout != Some(wait) {
                self.stream.set_read_timeout(Some(wait))?;
                self.read_timeout = Some(wait);
            }
            match self.stream.read(self.buffers.input_append_buf()) {
                Ok(n) => {
                    self.buffers.input_appended(n);
                    return Ok(n > 0);
                }
                Err(e) if slice_ran_out(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Open means nothing to read and no end of stream: one peek that never blocks.
    ///
    /// ureq asks twice per call: when the connection goes back to its pool, and when it is
    /// taken out for the next call. Only the second look peeks. Whatever the first would find
    /// (bytes past the response, or the upstream closing) is still there for the second, which
    /// refuses the connection just the same, one system call a request sooner.
    fn is_open(&mut self) -> bool {
        if std::mem::take(&mut self.used) {
            return true;
        }
        let mut byte = 0u8;
        // SAFETY: recv(2) into one byte we own, on a descriptor the stream keeps open.
        let n = unsafe {
            libc::recv(
                self.stream.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock
    }
}

impl fmt::Debug for SlicedTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlicedTransport")
            .field("peer", &self.stream.peer_addr().ok())
            .finish()
    }
}

/// A resolver (ureq's own by default), asked again only once its last answer is
/// [`RESOLVED_FOR`] old.
#[derive(Debug, Default)]
pub(crate) struct CachedResolver<R = DefaultResolver> {
    inner: R,
    last: Mutex<Option<Resolved>>,
}

#[derive(Debug)]
struct Resolved {
    uri: Uri,
    at: Instant,
    addrs: ResolvedSocketAddrs,
}

impl<R: Resolver> Resolver for CachedResolver<R> {
    fn resolve(
        &self,
        uri: &Uri,
        config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let same_host =
            |r: &Resolved| r.uri.scheme() == uri.scheme() && r.uri.authority() == uri.authority();
        if let Some(last) = self.last.lock().as_ref() {
            if same_host(last) && last.at.elapsed() < RESOLVED_FOR {
                return Ok(last.addrs.clone());
            }
        }
        let addrs = self.inner.resolve(uri, config, timeout)?;
        *self.last.lock() = Some(Resolved {
            uri: uri.clone(),
            at: Instant::now(),
            addrs: addrs.clone(),
        });
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug, Default)]
    struct Counting(AtomicUsize);

    impl Resolver for Counting {
        fn resolve(
            &self,
            uri: &Uri,
            config: &Config,
            timeout: NextTimeout,
        ) -> Result<ResolvedSocketAddrs, ureq::Error> {
            self.0.fetch_add(1, Ordering::Relaxed);
            DefaultResolver::default().resolve(uri, config, timeout)
        }
    }

    #[test]
    fn a_host_is_resolved_once_for_many_calls_and_again_for_another_host() {
        let resolver = CachedResolver::<Counting>::default();
        let config = Config::default();
        let resolve = |uri: &str| {
            let uri: Uri = uri.parse().unwrap();
            resolver
                .resolve(&uri, &config, NextTimeout::default())
                .unwrap()
        };
        let first = resolve("http://127.0.0.1:9/v1/chat/completions");
        for _ in 0..5 {
            assert_eq!(resolve("http://127.0.0.1:9/v1/chat/completions"), first);
        }
        assert_eq!(resolver.inner.0.load(Ordering::Relaxed), 1);
        let other = resolve("http://127.0.0.2:9/v1/chat/completions");
        assert_ne!(other, first);
        assert_eq!(resolver.inner.0.load(Ordering::Relaxed), 2);
    }
}
