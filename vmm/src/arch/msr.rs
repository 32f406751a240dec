//! Model-specific registers: the boot set, and setting them so that a short count from KVM
//! becomes an error naming the MSR it refused (this nested KVM refuses some, e.g. 0x10a).

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

pub const MSR_IA32_TSC: u32 = 0x10;
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
pub const MSR_CSTAR: u32 = 0xc000_0083;
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("too many MSRs for one KVM call")]
    TooMany,
    #[error("KVM_SET_MSRS failed: {0}")]
    Set(#[source] kvm_ioctls::Error),
    #[error("KVM refused MSR {index:#x} (set {set} of {total}); this host's KVM cannot run this VM state")]
    Refused {
        index: u32,
        set: usize,
        total: usize,
    },
}

/// MSR values a vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

/// Sets all `entries`; KVM stops at the first MSR it refuses and returns how many it set.
pub fn set_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), MsrError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| MsrError::TooMany)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    check_count(entries, set)
}

fn check_count(entries: &[kvm_msr_entry], set: usize) -> Result<(), MsrError> {
    if set < entries.len() {
        return Err(MsrError::Refused {
            index: entries[set].index,
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_count_names_the_refused_msr() {
        let msrs = boot_msrs();
        match check_count(&msrs, 3) {
            Err(MsrError::Refused { index, set, total }) => {
                assert_eq!(index, MSR_STAR);
                assert_eq!(set, 3);
                assert_eq!(total, msrs.len());
            }
            other => panic!("expected Refused, got {other:?}"),
        }
        assert!(check_count(&msrs, msrs.len()).is_ok());
        let e = check_count(&msrs, 0).unwrap_err().to_string();
        assert!(e.contains("0x174"), "{e}");
    }
}
