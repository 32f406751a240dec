//! The VMM's side of snapshots: `Vm` is `Snapshottable`, and a VM can be rebuilt from a
//! `snapshot::Snapshot`. The directory layout stays the snapshot crate's business.

use snapshot::{CpuidLeaf, SavedVm, Snapshot, SnapshotError, Snapshottable};

use crate::component_state::Persist;
use crate::memory::{GuestMemory, RestoreMode};
use crate::vm::{Console, RestoreConfig, Vm, VmError, VmState};

impl Snapshottable for Vm {
    type State = VmState;
    type Error = VmError;

    fn save(&self) -> Result<SavedVm<VmState>, VmError> {
        let state = Persist::save(self)?;
        let cpuid = state
            .vcpus
            .first()
            .map(|v| {
                v.cpuid
                    .iter()
                    .map(|e| CpuidLeaf {
                        function: e.function,
                        index: e.index,
                        eax: e.eax,
                        ebx: e.ebx,
                        ecx: e.ecx,
                        edx: e.edx,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(SavedVm {
            vcpus: state.vcpus.len() as u8,
            mem_mib: state.mem_mib,
            cpuid,
            state,
        })
    }

    fn guest_memory(&self) -> &GuestMemory {
        self.memory()
    }

    fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, VmError> {
        self.take_dirty_pages()
    }

    fn requeue_dirty(&self, pages: Vec<Vec<u64>>) {
        self.requeue_dirty_pages(pages)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the VM: {0}")]
    Vm(#[from] VmError),
}

/// How to bring a snapshot back.
pub struct SnapshotRestore<'a> {
    pub snapshot: &'a Snapshot,
    /// The kernel the workspace is configured with; refused if its sha256 differs.
    pub kernel: Option<&'a std::path::Path>,
    /// Re-read every file and compare digests before restoring.
    pub verify_contents: bool,
    pub memory_mode: RestoreMode,
    pub console: Console,
    pub paused: bool,
    /// A fork's own device host sides (see `RestoreConfig::devices`).
    pub devices: Option<crate::devices::DeviceConfig>,
    /// Serve memory lazily from this page server socket (see `RestoreConfig::page_server`).
    pub page_server: Option<&'a std::path::Path>,
}

impl Vm {
    /// Verifies a snapshot and rebuilds its VM.
    pub fn restore_snapshot(r: SnapshotRestore<'_>) -> Result<Vm, RestoreError> {
        let plan: snapshot::RestorePlan<VmState> =
            snapshot::restore::plan(r.snapshot, r.kernel, r.verify_contents)?;
        let config = RestoreConfig {
            memory_file: plan.base_memory,
            memory_overlays: plan.overlays,
            page_server: r.page_server.map(std::path::Path::to_path_buf),
            memory_mode: r.memory_mode,
            console: r.console,
            paused: r.paused,
            devices: r.devices,
        };
        Ok(Vm::restore(config, &plan.state)?)
    }
}
