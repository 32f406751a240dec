//! What KVM holds for one vCPU, saved and restored: registers, LAPIC, MSRs, CPUID, events, TSC
//! rate. The order of the set calls on restore follows what KVM requires.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::arch::msr;

const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {vcpu}: {op} failed: {source}")]
    Vcpu {
        vcpu: u8,
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("VM: KVM_GET_MSR_INDEX_LIST failed: {0}")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("vCPU {vcpu}: KVM read only {got} of {want} MSRs; MSR {index:#x} cannot be saved on this host")]
    MsrRead {
        vcpu: u8,
        got: usize,
        want: usize,
        index: u32,
    },
    #[error("vCPU {vcpu}: {source}")]
    MsrWrite { vcpu: u8, source: msr::MsrError },
    #[error("vCPU {vcpu}: saved state has {len} {what} entries, more than KVM accepts")]
    TooMany {
        vcpu: u8,
        what: &'static str,
        len: usize,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    /// Guest TSC frequency; restored where KVM allows setting it.
    pub tsc_khz: Option<u32>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs worth saving on this host: KVM's saveable list, minus those this KVM will not read
/// back, with the TSC deadline after the TSC (a deadline set before the TSC is lost).
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VcpuStateError::MsrIndexList)?;
    let mut out: Vec<u32> = Vec::with_capacity(list.as_slice().len());
    for &index in list.as_slice() {
        let entry = [kvm_msr_entry {
            index,
            ..Default::default()
        }];
        let Ok(mut one) = Msrs::from_entries(&entry) else {
            continue;
        };
        // Some listed MSRs depend on CPUID bits the guest lacks; KVM refuses to read those.
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            out.push(index);
        }
    }
    out.sort_by_key(|&i| i == MSR_IA32_TSC_DEADLINE);
    Ok(out)
}

/// Saves a (paused) vCPU. MP state first: reading other state may change it.
pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let e = |op| {
        move |source| VcpuStateError::Vcpu {
            vcpu: id,
            op,
            source,
        }
    };
    let mp_state = fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(e("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, id, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(e("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

fn read_msrs(fd: &VcpuFd, id: u8, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            vcpu: id,
            what: "MSR",
            len: entries.len(),
        })?;
        let got = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Vcpu {
                vcpu: id,
                op: "KVM_GET_MSRS",
                source,
            })?;
        if got < chunk.len() {
            return Err(VcpuStateError::MsrRead {
                vcpu: id,
                got,
                want: chunk.len(),
                index: chunk[got],
            });
        }
        out.extend_from_slice(msrs.as_slice());
    }
    Ok(out)
}

/// Restores a vCPU created fresh (not yet run). CPUID first; REGS before VCPU_EVENTS; SREGS
/// (APIC base) before LAPIC; LAPIC before MSRs; MP state last.
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    let id = s.id;
    let e = |op| {
        move |source| VcpuStateError::Vcpu {
            vcpu: id,
            op,
            source,
        }
    };
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| VcpuStateError::TooMany {
        vcpu: id,
        what: "CPUID",
        len: s.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        // Hosts without TSC scaling refuse a slower frequency (EINVAL); the same or a faster
        // one is accepted (KVM catches the TSC up). A snapshot taken on another host model then runs at this host's TSC rate, as
        // QEMU does after a migration without scaling: the guest continues exactly, only a clock
        // it calibrated against the TSC at boot runs fast or slow. Said, not refused, so
        // snapshots move between hosts of a fleet.
        let host = fd.get_tsc_khz().ok();
        if host != Some(khz) {
            if let Err(err) = fd.set_tsc_khz(khz) {
                if id == 0 {
                    let host = host.map_or("an unknown rate".into(), |h| format!("{h} kHz"));
                    tracing::warn!(
                        "the snapshot's TSC ran at {khz} kHz, this host's runs \
                         at {host} and KVM cannot scale it ({err}): the guest's TSC now runs at \
                         this host's rate"
                    );
                }
            }
        }
    }
    fd.set_regs(&s.regs).map_err(e("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(e("KVM_SET_SREGS"))?;
    // SAFETY: the buffer is a kvm_xsave of the legacy 4 KiB size that KVM_GET_XSAVE produced.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(e("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debugregs)
        .map_err(e("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(e("KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        msr::set_msrs(fd, chunk).map_err(|source| VcpuStateError::MsrWrite { vcpu: id, source })?;
    }
    fd.set_vcpu_events(&s.vcpu_events)
        .map_err(e("KVM_SET_VCPU_EVENTS"))?;
    fd.set_mp_state(s.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    Ok(())
}
