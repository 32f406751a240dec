//! Byte-stream transports: what the server accepts and the client talks over.
//!
//! The protocol runs over any bidirectional stream that can be split into a reading and a writing
//! handle (both share the socket) and shut down from either: Unix sockets (tests, the host side of
//! the VMM's hybrid vsock socket) and AF_VSOCK sockets (the guest).

pub mod hybrid;
pub mod vsock;

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

pub use vsock::{VsockListener, VsockStream};

/// A connected byte stream.
pub trait Connection: Read + Write + Send + Sized + 'static {
    /// Another handle on the same stream (one thread reads, others write).
    fn clone_handle(&self) -> io::Result<Self>;
    /// Shuts both directions down, waking any thread blocked on the stream.
    fn close(&self);
    /// Bounds each read (`None`: block for ever).
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

/// A source of connections.
pub trait Listener: Send + 'static {
    /// The connections it yields.
    type Conn: Connection;
    /// Waits for the next connection.
    fn accept_conn(&self) -> io::Result<Self::Conn>;
}

impl Connection for UnixStream {
    fn clone_handle(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn close(&self) {
        let _ = self.shutdown(Shutdown::Both);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn accept_conn(&self) -> io::Result<UnixStream> {
        self.accept().map(|(stream, _)| stream)
    }
}
