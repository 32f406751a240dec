//! The guest agent: a static binary (`microagent-agent`) that runs inside a workspace and serves exec,
//! file transfer and the snapshot hooks (scrub and freeze before capture; thaw, reseed, new identity
//! and secrets after restore) over virtio-vsock, and the wire protocol and client the host reuses.
//!
//! - [`protocol`]: frames, messages, constants ([`protocol::AGENT_VSOCK_PORT`] = 1024).
//! - [`server`]: the agent itself, over any [`transport::Listener`] (vsock in the guest, a Unix
//!   socket in tests).
//! - [`client`]: the host side, over any [`transport::Connection`], including the Firecracker-style
//!   hybrid vsock Unix socket of the VMM (`CONNECT <port>\n` → `OK <hostport>\n`), with bounded
//!   reconnect-with-retry for after a restore or fork.
//!
//! # Building the static guest binary
//! No musl target is needed: glibc's static libc is enough for what the agent uses (no NSS, no DNS).
//! Pass `--target` so the flag applies only to the target and not to build scripts or proc macros:
//!
//! ```text
//! RUSTFLAGS="-C target-feature=+crt-static" \
//!     cargo build --release -p guest-agent --target x86_64-unknown-linux-gnu
//! file target/x86_64-unknown-linux-gnu/release/microagent-agent   # "statically linked"
//! ldd  target/x86_64-unknown-linux-gnu/release/microagent-agent   # "not a dynamic executable"
//! ```
//!
//! In the guest run `microagent-agent` (vsock port 1024, secrets in `/run/secrets`); on the host
//! `microagent-agent --unix PATH` serves the same protocol on a Unix socket.
//!
//! # What the host side needs
//! - The VMM: a virtio-vsock device whose host end is a hybrid Unix socket at
//!   `<workspace>/vsock.sock` answering `CONNECT <port>\n` with `OK <hostport>\n`, and on restore a
//!   transport reset (clients then get [`ClientError::Disconnected`] and reconnect with
//!   [`Client::connect_hybrid_vsock_with_retry`]).
//! - The capture sequence: [`Client::prepare_snapshot`] (scrub, sync, freeze) → pause → save →
//!   resume → [`Client::after_restore`] with `thaw: true` and the secrets (the original VM too: its
//!   secrets were scrubbed); on a restore or fork also fresh `entropy` (for example 64 bytes from the
//!   host's getrandom) and, for a fork, an [`protocol::messages::Identity`]. On first start,
//!   `after_restore` with only the secrets delivers them.
//! - The guest: the agent started by init as root, `/run/secrets` a tmpfs, and a kernel built with
//!   `CONFIG_INIT_ON_FREE_DEFAULT_ON` (kernels/linux/microvm.config) so that freed kernel buffers
//!   (vsock packets, pipe buffers, deleted tmpfs files that carried secrets) are zeroed before a
//!   capture can see them. The agent zeroes its own buffers that carried secrets, file contents or
//!   command output, and `prepare-snapshot` drops and compacts the page cache.

pub mod client;
pub mod hwaddr;
pub mod netreset;
pub mod protocol;
pub mod server;
pub mod transport;

pub use client::{Client, ClientError, RetryPolicy};
pub use protocol::AGENT_VSOCK_PORT;
pub use server::{Server, ServerConfig};

/// Overwrites `buf` with zeros, its spare capacity included, in a way the optimiser keeps (the
/// buffer is about to be freed, and glibc's allocator keeps freed memory, contents and all, in the
/// agent's heap, where a snapshot of the guest would capture it).
pub(crate) fn zeroize(buf: &mut Vec<u8>) {
    zeroize::Zeroize::zeroize(buf);
}

/// Locks a mutex, ignoring poisoning: a panicking request thread must not take the connection (or
/// the client) down.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A buffer zeroed when dropped, however its owner's code path ends.
pub(crate) struct Wiped(pub(crate) Vec<u8>);

impl Drop for Wiped {
    fn drop(&mut self) {
        zeroize(&mut self.0);
    }
}
