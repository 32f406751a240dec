//! CPUID for each vCPU: KVM's supported table, normalised so the guest sees its own APIC id, a
//! topology of `count` single-threaded cores in one package, and the hypervisor bit.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
const LEAF_EXT_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

/// KVM paravirt features whose guest side issues `vmcall`, which hangs on nested page-table KVM.
pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
pub const VMCALL_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;

/// What shapes a vCPU's CPUID besides KVM's table.
#[derive(Debug, Clone, Copy)]
pub struct CpuidConfig {
    pub vcpu_id: u8,
    pub vcpu_count: u8,
    /// Hide the `vmcall`-based KVM paravirt features (needed on nested page-table KVM).
    pub hide_vmcall_features: bool,
    /// The in-kernel LAPIC supports the TSC-deadline timer.
    pub tsc_deadline: bool,
}

/// Smallest `s` with `1 << s >= n`.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Normalises `cpuid` in place for one vCPU.
pub fn normalize(cpuid: &mut CpuId, cfg: CpuidConfig) {
    let id = u32::from(cfg.vcpu_id);
    let count = u32::from(cfg.vcpu_count.max(1));
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        normalize_entry(e, id, count, core_bits, cfg);
    }
}

fn normalize_entry(
    e: &mut kvm_cpuid_entry2,
    id: u32,
    count: u32,
    core_bits: u32,
    cfg: CpuidConfig,
) {
    match e.function {
        LEAF_FEATURES => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package, [15:8] CLFLUSH
            // line size in quadwords.
            e.ebx = (id << 24) | (count << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            if cfg.tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            } else {
                e.ecx &= !ECX_TSC_DEADLINE;
            }
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        LEAF_PMU => {
            // No virtual PMU: its state is not captured in snapshots.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
            // Level 0: SMT (one thread per core); level 1: cores; higher levels: invalid.
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = count;
                    e.ecx = (2 << 8) | 1;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
            e.edx = id;
        }
        LEAF_KVM_FEATURES if cfg.hide_vmcall_features => {
            e.eax &= !VMCALL_FEATURES;
        }
        LEAF_EXT_SIZES => {
            // ECX[7:0]: cores - 1; [15:12]: APIC id bits for cores.
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
        }
        _ => {}
    }
}

/// True when the host's CPU (as this process sees it) lacks VMX and SVM: our KVM then runs nested
/// on a page-table based implementation that hangs on guest `vmcall`.
pub fn host_is_nested_pagetable_kvm() -> bool {
    let l1 = core::arch::x86_64::__cpuid(1);
    let ext = core::arch::x86_64::__cpuid(0x8000_0001);
    let vmx = l1.ecx & (1 << 5) != 0;
    let svm = ext.ecx & (1 << 2) != 0;
    !(vmx || svm)
}

/// The host CPU's vendor string (e.g. "GenuineIntel").
pub fn host_vendor() -> String {
    let l0 = core::arch::x86_64::__cpuid(0);
    let mut v = Vec::with_capacity(12);
    for r in [l0.ebx, l0.edx, l0.ecx] {
        v.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&v).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn table() -> CpuId {
        let mut l1 = entry(LEAF_FEATURES, 0);
        l1.ebx = 0xffff_ffff;
        let mut l4 = entry(LEAF_CACHE, 3);
        l4.eax = !(0x7 << 5) | (3 << 5);
        let mut kvm = entry(LEAF_KVM_FEATURES, 0);
        kvm.eax = 0xffff_ffff;
        let mut pmu = entry(LEAF_PMU, 0);
        pmu.eax = 0x0804_0602;
        CpuId::from_entries(&[
            l1,
            l4,
            pmu,
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_TOPOLOGY, 2),
            kvm,
            entry(LEAF_EXT_SIZES, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_topology() {
        for id in 0..3u8 {
            let mut c = table();
            normalize(
                &mut c,
                CpuidConfig {
                    vcpu_id: id,
                    vcpu_count: 3,
                    hide_vmcall_features: false,
                    tsc_deadline: true,
                },
            );
            let l1 = find(&c, LEAF_FEATURES, 0);
            assert_eq!(l1.ebx >> 24, id as u32);
            assert_eq!((l1.ebx >> 16) & 0xff, 3);
            assert_eq!((l1.ebx >> 8) & 0xff, 8);
            assert_eq!(l1.ebx & 0xff, 0xff, "brand index kept");
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);

            let smt = find(&c, LEAF_TOPOLOGY, 0);
            assert_eq!(
                (smt.eax, smt.ebx, smt.ecx, smt.edx),
                (0, 1, 0x100, id as u32)
            );
            let core = find(&c, LEAF_TOPOLOGY, 1);
            // 3 cores need 2 bits of APIC id.
            assert_eq!(
                (core.eax, core.ebx, core.ecx, core.edx),
                (2, 3, 0x201, id as u32)
            );
            let invalid = find(&c, LEAF_TOPOLOGY, 2);
            assert_eq!((invalid.eax, invalid.ebx, invalid.ecx), (0, 0, 2));

            let l4 = find(&c, LEAF_CACHE, 3);
            assert_eq!(l4.eax >> 26, 2);
            assert_eq!((l4.eax >> 14) & 0xfff, 2);
            let ext = find(&c, LEAF_EXT_SIZES, 0);
            assert_eq!(ext.ecx & 0xff, 2);
            assert_eq!((ext.ecx >> 12) & 0xf, 2);
            assert_eq!(find(&c, LEAF_PMU, 0).eax, 0);
        }
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = table();
        normalize(
            &mut c,
            CpuidConfig {
                vcpu_id: 0,
                vcpu_count: 1,
                hide_vmcall_features: false,
                tsc_deadline: false,
            },
        );
        let l1 = find(&c, LEAF_FEATURES, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&c, LEAF_TOPOLOGY, 1).eax, 0);
    }

    #[test]
    fn vmcall_features_hidden_only_when_asked() {
        let cfg = CpuidConfig {
            vcpu_id: 0,
            vcpu_count: 2,
            hide_vmcall_features: true,
            tsc_deadline: true,
        };
        let mut c = table();
        normalize(&mut c, cfg);
        let kvm = find(&c, LEAF_KVM_FEATURES, 0);
        assert_eq!(kvm.eax & VMCALL_FEATURES, 0);
        assert_eq!(
            kvm.eax | VMCALL_FEATURES,
            0xffff_ffff,
            "other features kept"
        );

        let mut c = table();
        normalize(
            &mut c,
            CpuidConfig {
                hide_vmcall_features: false,
                ..cfg
            },
        );
        assert_eq!(find(&c, LEAF_KVM_FEATURES, 0).eax, 0xffff_ffff);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }
}
