//! A TCP connect that waits in slices, so a cancelled call does not sit out the connect timeout.
//!
//! `TcpStream::connect_timeout` blocks for up to the whole timeout on an upstream that does not
//! answer its SYN. This does the same non-blocking connect and `poll` that it does, but polls in
//! slices and asks between them whether the call is still wanted.

use std::io;
use std::mem;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

/// Connects to `addr` within `timeout`; `wait` says how long the next slice may be, or why to
/// stop now.
pub(super) fn connect<E>(
    addr: &SocketAddr,
    timeout: Duration,
    mut wait: impl FnMut() -> Result<Duration, E>,
) -> Result<io::Result<TcpStream>, E> {
    let stream = match start(addr) {
        Ok(Some(stream)) => stream,
        Ok(None) => return Ok(Err(io::ErrorKind::ConnectionRefused.into())),
        Err(e) => return Ok(Err(e)),
    };
    let until = Instant::now().checked_add(timeout);
    loop {
        let left = until.map_or(timeout, |t| t.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            return Ok(Err(io::ErrorKind::TimedOut.into()));
        }
        let slice = wait()?.min(left);
        match writable(&stream, slice) {
            Ok(false) => continue,
            Ok(true) => {}
            Err(e) => return Ok(Err(e)),
        }
        return Ok(match stream.take_error() {
            Ok(Some(e)) | Err(e) => Err(e),
            Ok(None) => stream.set_nonblocking(false).map(|()| stream),
        });
    }
}

/// A non-blocking socket with its connect under way; `None` if `addr` cannot be connected to.
fn start(addr: &SocketAddr) -> io::Result<Option<TcpStream>> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socket(2) takes no pointers; a valid descriptor is owned by the stream at once.
    let fd = unsafe { libc::socket(family, kind, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a sockaddr of `len` bytes for this family, alive for the call.
    let rc = unsafe { libc::connect(fd, (&storage as *const libc::sockaddr_storage).cast(), len) };
    if rc == 0 {
        return Ok(Some(stream));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINPROGRESS) => Ok(Some(stream)),
        Some(libc::EAFNOSUPPORT) => Ok(None),
        _ => Err(e),
    }
}

/// Whether the socket became writable (its connect finished, either way) within `slice`.
fn writable(stream: &TcpStream, slice: Duration) -> io::Result<bool> {
    let mut watch = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = slice.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: poll(2) on one pollfd we own, for a descriptor the stream keeps open.
    match unsafe { libc::poll(&mut watch, 1, ms) } {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            }
        }
    }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero bytes are a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe {
                (&mut storage as *mut libc::sockaddr_storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn connects_and_reports_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let never = || Ok::<_, ()>(Duration::from_millis(100));
        let stream = connect(&addr, Duration::from_secs(5), never)
            .unwrap()
            .unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        drop(listener);
        let refused = connect(&addr, Duration::from_secs(5), never).unwrap();
        assert_eq!(
            refused.unwrap_err().kind(),
            io::ErrorKind::ConnectionRefused
        );
    }

    #[test]
    fn a_stop_between_slices_ends_the_wait() {
        // A listener whose queue is full drops further SYNs, so a connect to it hangs.
        let listener = full_listener();
        let addr = listener.local_addr().unwrap();
        let _queued: Vec<_> = (0..4).filter_map(|_| short_connect(&addr)).collect();
        let mut slices = 0;
        let stop_on_third = || {
            slices += 1;
            if slices < 3 {
                Ok(Duration::from_millis(50))
            } else {
                Err("stopped")
            }
        };
        let started = Instant::now();
        match connect(&addr, Duration::from_secs(30), stop_on_third) {
            Err(stop) => assert_eq!(stop, "stopped"),
            // The kernel took the connection after all: nothing to show on this machine.
            Ok(Ok(_)) => return,
            Ok(Err(e)) => panic!("the connect failed instead of stopping: {e}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    fn short_connect(addr: &SocketAddr) -> Option<TcpStream> {
        let wait = || Ok::<_, ()>(Duration::from_millis(100));
        connect(addr, Duration::from_millis(200), wait).ok()?.ok()
    }

    /// A listener with a backlog of 0 that never accepts.
    fn full_listener() -> TcpListener {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        // SAFETY: listen(2) on the listener's own descriptor.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        listener
    }
}
