//! The agent: accepts connections and serves requests, a thread per connection and per request.

mod connection;
mod entropy;
mod exec;
mod files;
pub mod freeze;
mod identity;
mod secrets;
mod snapshot_hooks;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::transport::{Connection, Listener};

pub use snapshot_hooks::SnapshotHooks;

/// Where the agent finds what it touches. The defaults are the guest's; tests point them elsewhere.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Directory holding the secrets (a tmpfs in the guest).
    pub secrets_dir: PathBuf,
    /// The mount table to read for freezing.
    pub mountinfo: PathBuf,
    /// Test hook: freeze and thaw only these mount points (never the host's own filesystems).
    /// `None` means every writable filesystem that supports freezing.
    pub freeze_only: Option<Vec<PathBuf>>,
    /// Directory holding `hostname` and `machine-id`.
    pub etc_dir: PathBuf,
    /// Also set the kernel's hostname (sethostname) when taking a new identity.
    pub set_kernel_hostname: bool,
    /// The device reseeded with host entropy.
    pub random_device: PathBuf,
    /// Where `drop_caches` and `compact_memory` are written before a capture (`/proc/sys/vm` in
    /// the guest). `None` skips both: an agent serving tests on a host must not drop the host's
    /// caches.
    pub vm_sysctl_dir: Option<PathBuf>,
    /// Connections served at once; more are closed on accept.
    pub max_connections: usize,
    /// Requests in flight on one connection; more are refused with `Busy`.
    pub max_requests_per_connection: usize,
    /// Log connection errors to stderr.
    pub log_errors: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            secrets_dir: PathBuf::from("/run/secrets"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            freeze_only: None,
            etc_dir: PathBuf::from("/etc"),
            set_kernel_hostname: true,
            random_device: PathBuf::from("/dev/urandom"),
            vm_sysctl_dir: Some(PathBuf::from("/proc/sys/vm")),
            max_connections: 64,
            max_requests_per_connection: 256,
            log_errors: true,
        }
    }
}

/// The agent. Cheap to clone; clones share the snapshot state (what is frozen).
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: ServerConfig,
    pub(crate) hooks: SnapshotHooks,
    connections: AtomicUsize,
}

impl Inner {
    pub(crate) fn log(&self, what: std::fmt::Arguments<'_>) {
        if self.config.log_errors {
            eprintln!("microagent-agent: {what}");
        }
    }
}

impl Server {
    /// An agent with `config`. Puts SIGINT and SIGQUIT back to their defaults in this process if
    /// it was started with them ignored (see `exec::restore_default_signals`).
    pub fn new(config: ServerConfig) -> Self {
        exec::restore_default_signals();
        let hooks = SnapshotHooks::new(&config);
        Self {
            inner: Arc::new(Inner {
                config,
                hooks,
                connections: AtomicUsize::new(0),
            }),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The snapshot hooks' state (what is frozen).
    pub fn hooks(&self) -> &SnapshotHooks {
        &self.inner.hooks
    }

    /// Accepts connections for ever, serving each on its own thread. Returns only if accepting
    /// fails persistently.
    pub fn serve<L: Listener>(&self, listener: L) -> io::Result<()> {
        let mut consecutive_errors = 0u32;
        loop {
            let conn = match listener.accept_conn() {
                Ok(conn) => {
                    consecutive_errors = 0;
                    conn
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    consecutive_errors += 1;
                    self.inner.log(format_args!("accept failed: {e}"));
                    if consecutive_errors > 1000 {
                        return Err(e);
                    }
                    // Out of descriptors or memory: give the other connections time to finish.
                    thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            self.spawn_connection(conn);
        }
    }

    /// Serves `listener` on a background thread.
    pub fn spawn<L: Listener>(
        &self,
        listener: L,
    ) -> io::Result<thread::JoinHandle<io::Result<()>>> {
        let server = self.clone();
        thread::Builder::new()
            .name("agent-accept".into())
            .spawn(move || server.serve(listener))
    }

    /// Serves one connection on a new thread (or closes it when too many are open).
    pub fn spawn_connection<C: Connection>(&self, conn: C) {
        let inner = Arc::clone(&self.inner);
        let open = inner.connections.fetch_add(1, Ordering::SeqCst);
        if open >= inner.config.max_connections {
            inner.connections.fetch_sub(1, Ordering::SeqCst);
            inner.log(format_args!(
                "too many connections ({open}); closing a new one"
            ));
            conn.close();
            return;
        }
        let spawned = thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                connection::serve(&inner, conn);
                inner.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.inner.connections.fetch_sub(1, Ordering::SeqCst);
            self.inner
                .log(format_args!("cannot start a connection thread: {e}"));
        }
    }

    /// Serves one connection on the calling thread until it closes.
    pub fn serve_connection<C: Connection>(&self, conn: C) {
        connection::serve(&self.inner, conn);
    }
}
