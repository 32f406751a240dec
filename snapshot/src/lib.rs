//! Snapshots of microagent VMs: the manifest and state formats (versioned, checksummed), capture
//! of guest memory (sparse) and the rootfs copy, verification before restore, and listing.
//!
//! The VMM implements [`Snapshottable`] (capture) and [`Restorable`] (restore); this crate never
//! reaches into its internals, and the VMM never learns the layout of a snapshot directory.

pub mod archive;
pub mod atomic_file;
pub mod capture;
pub mod digest;
pub mod error;
#[cfg(test)]
mod fake;
pub mod faults;
pub mod file_lock;
pub mod hostcpu;
pub mod live;
pub mod manifest;
pub mod memfile;
pub mod open;
pub mod pagedigest;
pub mod pageserver;
pub mod prune;
pub mod residue;
pub mod restore;
pub mod rootfs;
pub mod stamp;
pub mod vmstate;

pub use capture::{capture, capture_disk, sweep_leftovers, CaptureRequest, Progress, SecretCheck};
pub use error::{Refusal, SnapshotError};
pub use manifest::{CpuidLeaf, Kind, Manifest};
pub use open::{list, Snapshot, VerifyOptions};
pub use restore::{Restorable, RestorePlan};

use serde::Serialize;

/// The guest memory the engine's own tests capture: the VMM's kind (mmap regions with a
/// bitmap for device writes), which the VMM defines for itself.
#[cfg(test)]
pub(crate) type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// What a paused VM hands to a capture.
pub struct SavedVm<S> {
    pub state: S,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The CPUID the guest was given (vCPU 0), recorded in the manifest.
    pub cpuid: Vec<CpuidLeaf>,
}

/// The one narrow interface between a VM and its snapshots.
pub trait Snapshottable {
    type State: Serialize;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The VM's complete state besides guest memory. The VM must be paused.
    fn save(&self) -> Result<SavedVm<Self::State>, Self::Error>;

    /// The VM's own guest memory type: the engine reads it through vm-memory's interface
    /// (regions, host slices, bounds-checked reads) and never names the type.
    type Memory: vm_memory::GuestMemoryBackend + Sync;

    /// Guest RAM, regions in address order.
    fn guest_memory(&self) -> &Self::Memory;

    /// The pages written since the previous capture (per region, one bit per 4 KiB page), or
    /// `None` when the VM does not track them. Taking them clears them.
    fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, Self::Error>;

    /// Gives back pages from `take_dirty` when a capture failed.
    fn requeue_dirty(&self, pages: Vec<Vec<u64>>);
}
