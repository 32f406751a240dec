//! A VM without KVM for the engine's tests: plain guest memory and a text for its state, so
//! capture, verification and restore planning run where there is no /dev/kvm.

use std::cell::RefCell;

use crate::{CpuidLeaf, GuestMemory, SavedVm, Snapshottable};

/// CBOR keeps a text's bytes as they are, so a secret put in the state lands in vmstate.bin
/// verbatim, as a device's buffer would.
pub struct FakeVm {
    pub mem: GuestMemory,
    pub state: RefCell<String>,
}

impl FakeVm {
    pub fn new(mem: GuestMemory, state: impl Into<String>) -> Self {
        Self {
            mem,
            state: RefCell::new(state.into()),
        }
    }
}

impl Snapshottable for FakeVm {
    type State = String;
    type Error = std::io::Error;
    fn save(&self) -> Result<SavedVm<String>, std::io::Error> {
        Ok(SavedVm {
            state: self.state.borrow().clone(),
            vcpus: 1,
            mem_mib: 1,
            cpuid: Vec::<CpuidLeaf>::new(),
        })
    }
    fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }
    // No dirty log: diffs find their pages by content, as after a restore.
    fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, std::io::Error> {
        Ok(None)
    }
    fn requeue_dirty(&self, _: Vec<Vec<u64>>) {}
}
