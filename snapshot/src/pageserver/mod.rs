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
//! The first VMM's first touches are recorded as the snapshot's working set
//! ([`workingset`], `workingset.bin` next to the snapshot); later VMMs get that set prefetched in
//! the background while their faults are served first.
//!
//! The open socket is the liveness signal: if the server dies or closes it, the client's
//! [`Watchdog`] reports [`ServerGone`] so the VMM stops with a clear error. The VMM keeps its
//! userfaultfd open meanwhile, so a pending fault is never silently answered with zeros.

pub mod client;
mod handler;
pub mod protocol;
pub mod server;
pub mod sys;
pub mod workingset;

pub use client::{
    create_uffd, probe, Client, ClientError, ClientOptions, Features, GoneReason, ServerGone,
    Watchdog,
};
pub use handler::AfterRemove;
pub use protocol::{Accept, Counters, Layout, RefuseCode, Region, SessionStats};
pub use server::{
    ClientStats, PageServer, ServerConfig, ServerError, ServerStats, WorkingSetInfo,
    DEFAULT_CHUNK_BYTES,
};
pub use workingset::{WorkingSet, WorkingSetError};
