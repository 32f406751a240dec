//! The userfaultfd page server: lazy restore of guest memory from a snapshot's `memory.bin`.
//!
//! One [`PageServer`] per snapshot maps the memory file read-only once and serves every VMM
//! restored from it. A VMM ([`Client`]) creates a userfaultfd (probing the kernel's features),
//! registers its fresh anonymous guest memory in MISSING mode and hands the descriptor and its
//! layout to the server over a Unix seqpacket socket ([`protocol`]). The server answers each
//! fault with the chunk around it: data pages with UFFDIO_COPY, holes of the sparse file with
//! UFFDIO_ZEROPAGE (found once with SEEK_DATA/SEEK_HOLE), already-present pages skipped, retrying
//! while the VMM's address space changes, and following remove/unmap events (balloon,
//! MADV_DONTNEED, munmap).
//!
//! The memory file may also be filled while it is served ([`backing`]): a snapshot forked
//! straight from a remote has a sparse `memory.bin` that the server fills one unit (a remote
//! chunk, verified against its digest) at a time, before any page of that unit is copied into a
//! VM; a unit that cannot be had fails the fault, and the VM stops with the source's error.
//!
//! The first VMM's first touches are recorded as the snapshot's working set
//! ([`workingset`], `workingset.bin` next to the snapshot); later VMMs get that set prefetched in
//! the background while their faults are served first.
//!
//! The open socket is the liveness signal: if the server dies or closes it, the client's
//! [`Watchdog`] reports [`ServerGone`] so the VMM stops with a clear error. The VMM keeps its
//! userfaultfd open meanwhile, so a pending fault is never silently answered with zeros.
//!
//! # What the VMM must do
//!
//! - Guest RAM must be fresh anonymous private memory (`MAP_PRIVATE | MAP_ANONYMOUS |
//!   MAP_NORESERVE`, what `GuestMemoryMmap::from_ranges` maps), laid out as the memory file's
//!   regions back to back ([`Layout::from_guest_memory`]).
//! - Nothing may read or write guest RAM before [`Client::connect`] returns: a page already
//!   present is never served (the client refuses memory with resident pages).
//! - Connect before any vCPU runs, register [`Watchdog::on_gone`] (or poll
//!   [`Watchdog::eventfd`]), and on [`ServerGone`] report it and exit the process: vCPU threads
//!   blocked on a fault cannot be joined, and closing the userfaultfd would let the kernel answer
//!   their faults with zeros.
//! - Keep the [`Client`] for the life of the VM; call [`Client::finish`] only once no thread
//!   touches guest memory. Dropping it without `finish` keeps the registration and the
//!   descriptor until the process exits.
//! - Creating a userfaultfd that handles KVM's (kernel-mode) faults needs root or
//!   CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd=1`, or access to `/dev/userfaultfd`.
//!
//! # Serving policy (measured: `cargo bench -p snapshot --bench uffd`)
//!
//! On the development machines (nested KVM, 2 cores, shared) one fault round trip costs
//! ~6-15 us for a host thread (~100 us for a guest, see PLATFORM.md), far more than copying a
//! page. Touching a 256 MiB file page by page in order, per page against a MAP_PRIVATE write
//! first touch: 4 KiB chunks ~2.3-3x, 16 KiB ~1.1x, 64 KiB ~0.7-0.8x, 256 KiB ~0.6x. But
//! touching 5% of the pages scattered, large fixed chunks lose: 4 KiB ~1.5-2.5x, 64 KiB ~5-9x
//! and 11x the memory placed, 256 KiB ~7-13x and 19x the memory. Adaptive chunks (the default)
//! serve an isolated fault with one page and grow x4 per sequential fault up to 256 KiB: in
//! order ~0.45-0.6x with as few faults as 256 KiB chunks, scattered like 4 KiB chunks with no
//! over-fetch. One thread per VMM: 1, 2, 4, 8 VMMs faulting at once keep the per-page cost
//! flat or better (0.5-1x of one VMM).

pub mod backing;
pub mod client;
mod handler;
pub mod protocol;
pub mod server;
pub mod sys;
pub mod workingset;

pub use backing::{LazyInfo, UnitSource};
pub use client::{
    create_uffd, probe, Client, ClientError, ClientOptions, Features, GoneReason, ServerGone,
    Watchdog,
};
pub use handler::{AfterRemove, Streams};
pub use protocol::{Accept, Counters, Layout, RefuseCode, Region, SessionStats};
pub use server::{
    ClientStats, PageServer, ServerConfig, ServerError, ServerStats, WorkingSetInfo,
    DEFAULT_CHUNK_BYTES,
};
pub use workingset::{WorkingSet, WorkingSetError};

/// Locks a mutex, ignoring poisoning: a session thread that panicked must not take the server
/// (or the client's watchdog) down with it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
