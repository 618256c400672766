//! Listening sockets: what chatpool's server and its mock LLM both ask of the kernel beyond what
//! std's `TcpListener::bind` sets.

use std::net::TcpListener;
use std::os::fd::AsRawFd;

/// How many finished handshakes the kernel holds for an accept loop (capped by
/// `net.core.somaxconn`). std's 128 overflows when a load generator, a proxy or reconnecting
/// clients open hundreds of connections at once; the overflow's handshakes are dropped and
/// retried by the client a second later.
const LISTEN_BACKLOG: libc::c_int = 4096;

/// Widens a listening socket's backlog to [`LISTEN_BACKLOG`] by calling listen(2) again,
/// which Linux allows.
pub fn widen_backlog(listener: &TcpListener) -> std::io::Result<()> {
    // SAFETY: a valid listening socket fd owned by `listener` for the call.
    if unsafe { libc::listen(listener.as_raw_fd(), LISTEN_BACKLOG) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Sets TCP_NODELAY on the listening socket; Linux hands it down to every accepted connection.
/// tiny_http offers no way to set it per connection, and without it the small writes of a
/// streamed reply wait on the client's delayed ACK (Nagle's algorithm), up to 40 ms a piece.
pub fn set_nodelay(listener: &TcpListener) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket fd owned by `listener` for the call, and a pointer to an int that
    // lives across it, with its size.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
