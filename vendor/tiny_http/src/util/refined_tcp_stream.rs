use std::io::Result as IoResult;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};

use crate::connection::Connection;

/// One direction of a client's socket: dropping it shuts that direction down.
pub struct RefinedTcpStream {
    stream: Connection,
    close_read: bool,
    close_write: bool,
}

impl RefinedTcpStream {
    /// The reading and the writing half of `stream`. Cloning a socket takes a file descriptor,
    /// which the process may not have (EMFILE): that is an error, not a panic.
    pub(crate) fn new(stream: Connection) -> IoResult<(RefinedTcpStream, RefinedTcpStream)> {
        let (read, write) = (stream.try_clone()?, stream);

        let read = RefinedTcpStream {
            stream: read,
            close_read: true,
            close_write: false,
        };

        let write = RefinedTcpStream {
            stream: write,
            close_read: false,
            close_write: true,
        };

        Ok((read, write))
    }

    /// Sends the client a FIN and bounds every further read by `timeout`, so what it still
    /// sends can be read and dropped for a moment before the socket closes.
    pub(crate) fn end_for_drain(&mut self, timeout: std::time::Duration) {
        self.stream.shutdown(Shutdown::Write).ok();
        self.stream.set_timeouts(Some(timeout)).ok();
    }

    /// Whether the client has closed its side (or reset the connection), without reading
    /// what it has sent.
    pub(crate) fn hung_up(&self) -> bool {
        self.stream.hung_up()
    }

    pub(crate) fn peer_addr(&mut self) -> IoResult<Option<SocketAddr>> {
        self.stream.peer_addr()
    }
}

impl Drop for RefinedTcpStream {
    fn drop(&mut self) {
        if self.close_read {
            self.stream.shutdown(Shutdown::Read).ok();
        }

        if self.close_write {
            self.stream.shutdown(Shutdown::Write).ok();
        }
    }
}

impl Read for RefinedTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> IoResult<usize> {
        self.stream.read(buf)
    }
}

impl Write for RefinedTcpStream {
    fn write(&mut self, buf: &[u8]) -> IoResult<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> IoResult<()> {
        self.stream.flush()
    }
}
