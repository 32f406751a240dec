//! The Intel MultiProcessor Specification table that tells a guest how many vCPUs it has and
//! how the legacy IRQs reach the IOAPIC. Written as bytes: the layout is fixed by the spec.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, IRQ_MAX, MAX_VCPUS};
use crate::memory::GuestMemory;

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;

const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Family 6 signature and the FPU + APIC feature flags, as a plain modern CPU reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("MP table supports 1 to {max} vCPUs, got {0}", max = MAX_VCPUS)]
    VcpuCount(u8),
    #[error("cannot write the MP table into guest memory")]
    Write,
}

/// Where the table goes: the last KiB of base memory, which Linux scans.
pub const MPTABLE_START: u64 = EBDA_START;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for `num_cpus` vCPUs at `start`.
pub fn build(num_cpus: u8, start: u64) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut t = Vec::with_capacity(1024);
    let mut entries: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        t.extend_from_slice(&[ENTRY_CPU, cpu, APIC_VERSION, flags]);
        t.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        t.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        t.extend_from_slice(&[0u8; 8]);
        entries += 1;
    }
    t.extend_from_slice(&[ENTRY_BUS, 0]);
    t.extend_from_slice(b"ISA   ");
    entries += 1;
    t.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    t.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // Polarity and trigger "conforming to the bus" (0): edge, active high on ISA.
        t.extend_from_slice(&[ENTRY_INTSRC, IRQ_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        entries += 1;
    }
    // LINT0 of every LAPIC is ExtINT (the PIC), LINT1 is NMI.
    t.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    t.extend_from_slice(&[ENTRY_LINTSRC, IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    entries += 2;

    let table_len = (MPC_HEADER_SIZE + t.len()) as u16;
    let mut mpc = Vec::with_capacity(table_len as usize);
    mpc.extend_from_slice(b"PCMP");
    mpc.extend_from_slice(&table_len.to_le_bytes());
    mpc.push(4); // spec revision 1.4
    mpc.push(0); // checksum, below
    mpc.extend_from_slice(b"MICROAGT");
    mpc.extend_from_slice(b"000000000000");
    mpc.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    mpc.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    mpc.extend_from_slice(&entries.to_le_bytes());
    mpc.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    mpc.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    debug_assert_eq!(mpc.len(), MPC_HEADER_SIZE);
    mpc.extend_from_slice(&t);
    mpc[7] = checksum(&mpc);

    let mut mpf = Vec::with_capacity(MPF_SIZE);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((start + MPF_SIZE as u64) as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = the table is present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&mpc);
    Ok(mpf)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMemory, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_header_are_valid() {
        let b = build(2, MPTABLE_START).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as u64,
            MPTABLE_START + 16
        );
        assert_eq!(b[8], 1);
        assert_eq!(sum(&b[..16]), 0, "floating pointer checksum");
        let mpc = &b[16..];
        assert_eq!(&mpc[0..4], b"PCMP");
        let len = u16::from_le_bytes([mpc[4], mpc[5]]) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(sum(mpc), 0, "config table checksum");
        // 2 CPUs + bus + IOAPIC + 24 IRQs + 2 LINTs.
        assert_eq!(u16::from_le_bytes([mpc[34], mpc[35]]), 2 + 1 + 1 + 24 + 2);
        assert_eq!(
            u32::from_le_bytes(mpc[36..40].try_into().unwrap()) as u64,
            APIC_START
        );
        assert_eq!(len, 44 + 2 * 20 + 8 * (1 + 1 + 24 + 2));
    }

    #[test]
    fn processor_entries_enable_every_vcpu_and_mark_the_bsp() {
        let n = 4;
        let b = build(n, MPTABLE_START).unwrap();
        let cpus = &b[16 + 44..];
        for i in 0..n as usize {
            let e = &cpus[i * 20..i * 20 + 20];
            assert_eq!(e[0], ENTRY_CPU);
            assert_eq!(e[1], i as u8, "APIC id");
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, i == 0);
        }
        let after = &cpus[n as usize * 20..];
        assert_eq!(
            &after[0..8],
            &[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']
        );
        assert_eq!(&after[8..12], &[ENTRY_IOAPIC, n + 1, IOAPIC_VERSION, 1]);
        assert_eq!(&after[12..16], &0xfec0_0000u32.to_le_bytes());
        // IRQ 4 (serial) goes to IOAPIC pin 4.
        let irq4 = &after[16 + 4 * 8..16 + 5 * 8];
        assert_eq!(irq4, &[ENTRY_INTSRC, IRQ_TYPE_INT, 0, 0, 0, 4, n + 1, 4]);
    }

    #[test]
    fn vcpu_bounds() {
        assert!(matches!(build(0, 0), Err(MptableError::VcpuCount(0))));
        assert!(matches!(build(9, 0), Err(MptableError::VcpuCount(9))));
        assert!(
            build(8, MPTABLE_START).unwrap().len() < 0x400,
            "fits below 640 KiB"
        );
    }
}
