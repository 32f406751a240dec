//! What KVM holds for the whole VM, saved and restored: the interrupt controllers (PICs,
//! IOAPIC), the PIT and the clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("VM: {op} failed: {source}")]
pub struct KvmStateError {
    op: &'static str,
    source: kvm_ioctls::Error,
}

/// The VM-wide interrupt controllers, timer and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmKvmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmKvmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

pub fn save(fd: &VmFd) -> Result<VmKvmState, KvmStateError> {
    let e = |op| move |source| KvmStateError { op, source };
    let chip = |id| -> Result<kvm_irqchip, KvmStateError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        fd.get_irqchip(&mut c).map_err(e("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    let mut clock = fd.get_clock().map_err(e("KVM_GET_CLOCK"))?;
    // Only the clock value is restored; flags describing this host's TSC do not carry over.
    clock.flags = 0;
    Ok(VmKvmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(e("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Restores VM state into a VM whose irqchip and PIT were just created.
pub fn restore(fd: &VmFd, s: &VmKvmState) -> Result<(), KvmStateError> {
    let e = |op| move |source| KvmStateError { op, source };
    fd.set_irqchip(&s.pic_master)
        .map_err(e("KVM_SET_IRQCHIP"))?;
    fd.set_irqchip(&s.pic_slave).map_err(e("KVM_SET_IRQCHIP"))?;
    fd.set_irqchip(&s.ioapic).map_err(e("KVM_SET_IRQCHIP"))?;
    fd.set_pit2(&s.pit).map_err(e("KVM_SET_PIT2"))?;
    fd.set_clock(&s.clock).map_err(e("KVM_SET_CLOCK"))?;
    Ok(())
}
