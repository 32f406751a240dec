//! The VMM's side of snapshots: `Vm` is `Snapshottable` (the engine captures it) and
//! `Restorable` (the engine restores it: it rebuilds itself from a decoded state and the guest
//! memory the engine built), both traits of the `snapshot-boundary` crate. Chains,
//! verification, memory files, overlays and page servers stay the snapshot engine's business:
//! this crate does not link it (the CLI calls `snapshot::restore::restore::<Vm>`).

use snapshot_boundary::{
    CpuidLeaf, RegionLayout, Restorable, RestoredMemory, SavedVm, Snapshottable,
};

use crate::component_state::Persist;
use crate::devices::DeviceConfig;
use crate::memory::{self, DirtyBitmap, GuestMemory};
use crate::vm::{Console, RestoreConfig, Vm, VmError, VmState};

impl Snapshottable for Vm {
    type State = VmState;
    type Error = VmError;
    type Memory = GuestMemory;

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

/// What the host supplies to a restored VM besides its state and memory.
pub struct RestoreArgs {
    pub console: Console,
    /// Leave the vCPUs parked after restore.
    pub paused: bool,
    /// A fork's own device host sides (see `RestoreConfig::devices`).
    pub devices: Option<DeviceConfig>,
}

impl Restorable for Vm {
    type State = VmState;
    type Error = VmError;
    type Args = RestoreArgs;
    type Bitmap = DirtyBitmap;

    fn memory_layout(state: &VmState) -> Result<Vec<RegionLayout>, VmError> {
        Ok(memory::layout(state.mem_mib)?)
    }

    fn restore(
        state: &VmState,
        memory: RestoredMemory<DirtyBitmap>,
        args: RestoreArgs,
    ) -> Result<Vm, VmError> {
        let config = RestoreConfig {
            memory,
            console: args.console,
            paused: args.paused,
            devices: args.devices,
        };
        Persist::restore(config, state)
    }
}
