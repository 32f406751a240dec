//! A hook every long-lived VMM thread calls first thing, with its kind: the embedding program
//! uses it to narrow what that thread may do (e.g. stack a seccomp filter for its kind).
//!
//! The VMM itself knows nothing of sandboxes; without a hook installed nothing happens.

use std::sync::OnceLock;

/// What a thread does, so a sandbox can allow each kind only the system calls it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU (`KVM_RUN` and the exits it handles).
    Vcpu,
    /// The virtio device event loop (epoll, queues, backing files and sockets).
    Devices,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Installs the hook; only the first call takes effect. Install it before creating a VM.
pub fn set(hook: fn(ThreadKind)) {
    let _ = HOOK.set(hook);
}

/// Called by a thread of `kind` before it does anything else.
pub(crate) fn enter(kind: ThreadKind) {
    if let Some(h) = HOOK.get() {
        h(kind);
    }
}
