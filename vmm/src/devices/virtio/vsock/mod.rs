//! virtio-vsock implemented in the VMM (no vhost), with Firecracker's hybrid host side: one Unix
//! socket per VM.
//!
//! * Host-initiated: a client connects to `uds_path`, writes `CONNECT <port>\n`; once the guest's
//!   listener on `<port>` accepts, the client reads `OK <hostport>\n` and then has a byte stream
//!   to it. If the guest refuses (RST), the client's socket is closed.
//! * Guest-initiated: a guest connection to host port P is connected to the Unix socket
//!   `<uds_path>_P` when something listens there, else refused with RST.

pub mod connection;
mod device;
pub mod packet;

pub use device::{Vsock, VsockError, VsockState, MAX_CONNECTIONS, QUEUE_SIZE};

#[cfg(test)]
mod tests;
