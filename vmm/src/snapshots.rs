//! The VMM's side of snapshots: `Vm` is `Snapshottable`, and a VM can be rebuilt from a
//! `snapshot::Snapshot`. The directory layout stays the snapshot crate's business.

use snapshot::{CpuidLeaf, SavedVm, Snapshot, SnapshotError, Snapshottable, VerifyOptions};

use crate::memory::{GuestMemory, RestoreMode};
use crate::vm::{Console, RestoreConfig, Vm, VmError, VmState};

impl Snapshottable for Vm {
    type State = VmState;
    type Error = VmError;

    fn save(&self) -> Result<SavedVm<VmState>, VmError> {
        let state = self.save_state()?;
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
}

impl Vm {
    /// Verifies a snapshot and rebuilds its VM.
    pub fn restore_snapshot(r: SnapshotRestore<'_>) -> Result<Vm, RestoreError> {
        r.snapshot.verify(&VerifyOptions {
            kernel: r.kernel,
            contents: r.verify_contents,
        })?;
        let state: VmState = r.snapshot.load_state()?;
        Ok(Vm::restore(RestoreConfig {
            state,
            memory_file: r.snapshot.memory_path(),
            memory_mode: r.memory_mode,
            console: r.console,
            paused: r.paused,
            devices: r.devices,
        })?)
    }
}
