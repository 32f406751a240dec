//! Snapshots of microagent VMs: the manifest and state formats (versioned, checksummed), capture
//! of guest memory (sparse) and the rootfs copy, verification before restore, and listing.
//!
//! The VMM implements [`Snapshottable`]; this crate never reaches into its internals, and the VMM
//! never learns the layout of a snapshot directory.

pub mod archive;
pub mod capture;
pub mod digest;
pub mod error;
pub mod faults;
pub mod hostcpu;
pub mod manifest;
pub mod memfile;
pub mod open;
pub mod pageserver;
pub mod rootfs;
pub mod vmstate;

pub use capture::{capture, sweep_leftovers, CaptureRequest, Progress};
pub use error::{Refusal, SnapshotError};
pub use manifest::{CpuidLeaf, Kind, Manifest};
pub use open::{list, Snapshot, VerifyOptions};

use serde::Serialize;
use vm_memory::GuestMemoryMmap;

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

    /// Guest RAM, regions in address order.
    fn guest_memory(&self) -> &GuestMemoryMmap<()>;
}
