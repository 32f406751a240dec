//! Snapshots of microagent VMs: the manifest and state formats (versioned, checksummed), capture
//! of guest memory (sparse) and the rootfs copy, verification before restore, and listing.
//!
//! The VMM implements [`Snapshottable`] (capture) and [`Restorable`] (restore), both from the
//! `snapshot-boundary` crate: this crate never reaches into the VMM, and the VMM never links this
//! crate (nor learns the layout of a snapshot directory).

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
pub mod untrusted;
pub mod vmstate;

pub use capture::{capture, capture_disk, sweep_leftovers, CaptureRequest, Progress, SecretCheck};
pub use error::{Refusal, SnapshotError};
pub use manifest::{CpuidLeaf, Kind, Manifest};
pub use open::{list, Snapshot, VerifyOptions};
pub use restore::{Restorable, RestorePlan};

/// The guest memory the engine's own tests capture: the VMM's kind (mmap regions with a
/// bitmap for device writes), which the VMM defines for itself.
#[cfg(test)]
pub(crate) type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

pub use snapshot_boundary::{SavedVm, Snapshottable};
