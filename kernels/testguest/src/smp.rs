//! vCPU discovery (Intel MP table, else ACPI MADT) and AP start-up (INIT + SIPI + SIPI through
//! the LAPIC ICR).

use crate::boot::{self, ApSlot, TRAMP_BASE};
use crate::cpu::{self, kcall, KC_LAPIC_ID, KC_SEND_IPI, KSTACK_SIZE, USTACK_SIZE};
use crate::{alloc, MAX_CPUS};

/// Enabled processors as LAPIC IDs: the BSP first, then table order. cpu<i> is index i.
pub struct CpuList {
    pub apic: [u8; MAX_CPUS],
    pub n: usize,
}

unsafe fn rd<T: Copy>(addr: u64) -> T {
    (addr as *const T).read_unaligned()
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut s = 0u8;
    for i in 0..len {
        s = s.wrapping_add(unsafe { rd::<u8>(addr + i) });
    }
    s == 0
}

/// Search [start, end) on 16-byte boundaries for a valid MP floating pointer.
fn scan(start: u64, end: u64) -> Option<u64> {
    let mut a = start;
    while a + 16 <= end {
        if unsafe { rd::<u32>(a) } == u32::from_le_bytes(*b"_MP_") && checksum_ok(a, 16) {
            return Some(a);
        }
        a += 16;
    }
    None
}

fn find_mpf() -> Option<u64> {
    // First KiB of the EBDA (segment at 0x40E), the last KiB of base memory, the BIOS ROM.
    let ebda = (unsafe { rd::<u16>(0x40E) } as u64) << 4;
    if (0x80000..0xA0000).contains(&ebda) {
        if let Some(a) = scan(ebda, ebda + 1024) {
            return Some(a);
        }
    }
    let base_kib = unsafe { rd::<u16>(0x413) } as u64;
    let base_top = if (512..=640).contains(&base_kib) { base_kib * 1024 } else { 0xA0000 };
    scan(base_top - 1024, base_top)
        .or_else(|| if base_top != 0xA0000 { scan(0x9FC00, 0xA0000) } else { None })
        .or_else(|| scan(0xF0000, 0x100000))
}

impl CpuList {
    fn add(&mut self, apic: u8) {
        if !self.apic[..self.n].contains(&apic) && self.n < MAX_CPUS {
            self.apic[self.n] = apic;
            self.n += 1;
        }
    }
}

/// Enabled processors from the MP table, else from the ACPI MADT (qemu microvm has no MP
/// table), else just the BSP. CPL3, after the final page tables. `bsp_apic` comes first.
pub fn discover(bsp_apic: u8, rsdp_hint: u64) -> (CpuList, &'static str) {
    let mut l = CpuList { apic: [0; MAX_CPUS], n: 1 };
    l.apic[0] = bsp_apic;
    if mp_table(&mut l) {
        return (l, "mptable");
    }
    if madt(&mut l, rsdp_hint) {
        return (l, "acpi");
    }
    (l, "none")
}

fn mp_table(l: &mut CpuList) -> bool {
    let Some(mpf) = find_mpf() else { return false };
    let cfg = unsafe { rd::<u32>(mpf + 4) } as u64;
    let feature1 = unsafe { rd::<u8>(mpf + 11) };
    if cfg == 0 || feature1 != 0 || cfg >= crate::BOOT_MAPPED {
        return false; // default configurations: not used by VMMs
    }
    if unsafe { rd::<u32>(cfg) } != u32::from_le_bytes(*b"PCMP") {
        return false;
    }
    let len = unsafe { rd::<u16>(cfg + 4) } as u64;
    // Walk by the table length, as Linux does (qboot leaves the entry count at 0).
    let mut p = cfg + 44;
    let end = cfg + len;
    while p < end {
        let typ = unsafe { rd::<u8>(p) };
        if typ == 0 {
            let id = unsafe { rd::<u8>(p + 1) };
            let flags = unsafe { rd::<u8>(p + 3) };
            if flags & 1 != 0 {
                l.add(id);
            }
            p += 20;
        } else if typ <= 4 {
            p += 8;
        } else {
            break;
        }
    }
    true
}

fn find_rsdp(hint: u64) -> Option<u64> {
    let sig = u64::from_le_bytes(*b"RSD PTR ");
    if hint != 0 && unsafe { rd::<u64>(hint) } == sig {
        return Some(hint);
    }
    let mut a = 0xE0000;
    while a < 0x100000 {
        if unsafe { rd::<u64>(a) } == sig && checksum_ok(a, 20) {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// ACPI MADT processor local APIC entries (type 0, enabled or online-capable).
fn madt(l: &mut CpuList, rsdp_hint: u64) -> bool {
    let Some(rsdp) = find_rsdp(rsdp_hint) else { return false };
    let rev = unsafe { rd::<u8>(rsdp + 15) };
    let xsdt = if rev >= 2 { unsafe { rd::<u64>(rsdp + 24) } } else { 0 };
    let (sdt, width) = if xsdt != 0 { (xsdt, 8) } else { ((unsafe { rd::<u32>(rsdp + 16) }) as u64, 4) };
    if sdt == 0 {
        return false;
    }
    let len = unsafe { rd::<u32>(sdt + 4) } as u64;
    let mut p = sdt + 36;
    while p + width <= sdt + len {
        let t = if width == 8 { unsafe { rd::<u64>(p) } } else { (unsafe { rd::<u32>(p) }) as u64 };
        p += width;
        if t == 0 || unsafe { rd::<u32>(t) } != u32::from_le_bytes(*b"APIC") {
            continue;
        }
        let tlen = unsafe { rd::<u32>(t + 4) } as u64;
        let mut e = t + 44;
        while e + 2 <= t + tlen {
            let (typ, elen) = unsafe { (rd::<u8>(e), rd::<u8>(e + 1) as u64) };
            if elen < 2 {
                break;
            }
            if typ == 0 && elen >= 8 {
                let flags = unsafe { rd::<u32>(e + 4) };
                if flags & 3 != 0 {
                    l.add(unsafe { rd::<u8>(e + 3) });
                }
            }
            e += elen;
        }
        return true;
    }
    false
}

pub fn bsp_apic_id() -> u8 {
    kcall(KC_LAPIC_ID, 0, 0) as u8
}

/// CPL3: per-AP stacks, TSS and GDT descriptors, and the trampoline at TRAMP_BASE.
pub fn prepare_aps(cpus: &CpuList) {
    if cpus.n < 2 {
        return;
    }
    unsafe {
        let src = boot::addr_of_sym(&boot::ap_tramp_start) as *const u8;
        let len = boot::addr_of_sym(&boot::ap_tramp_end) - src as u64;
        if len > boot::AP_PROGRESS - TRAMP_BASE {
            crate::fail(format_args!("AP trampoline too large ({} bytes)", len));
        }
        core::ptr::copy_nonoverlapping(src, TRAMP_BASE as *mut u8, len as usize);
        (boot::AP_PROGRESS as *mut u32).write_volatile(0);
        let slots = &raw mut boot::AP_SLOTS;
        for cpu in 1..cpus.n {
            let kstack = alloc(KSTACK_SIZE as u64, 4096) + KSTACK_SIZE as u64;
            let ustack = alloc(USTACK_SIZE as u64, 4096) + USTACK_SIZE as u64;
            let sel = cpu::setup_tss(cpu, kstack);
            (*slots)[cpus.apic[cpu] as usize] =
                ApSlot { cpu: cpu as u64, kstack_top: kstack, tss_sel: sel, ustack_top: ustack - 8 };
        }
    }
}

/// CPL3: INIT, STARTUP, STARTUP to all APs at once (ICR shorthand "all excluding self").
/// Needs the final page tables (LAPIC mapped).
///
/// Broadcast rather than per-APIC-ID: on the nested KVM here, an IPI addressed to a fresh AP by
/// its APIC ID is lost unless the VMM has done KVM_SET_LAPIC on that vCPU (measured: 0/10
/// starts without it, 10/10 with it or with the broadcast). An AP whose APIC ID has no slot
/// (not listed as enabled) parks itself in `ap_entry64`.
pub fn start_aps(cpus: &CpuList) {
    if cpus.n < 2 {
        return;
    }
    core::sync::atomic::fence(core::sync::atomic::Ordering::SeqCst);
    const ALL_BUT_SELF: u64 = 0b11 << 18;
    let vector = TRAMP_BASE >> 12;
    kcall(KC_SEND_IPI, 0, ALL_BUT_SELF | 0x4500); // INIT, level assert
    kcall(KC_SEND_IPI, 0, ALL_BUT_SELF | 0x4600 | vector); // STARTUP
    kcall(KC_SEND_IPI, 0, ALL_BUT_SELF | 0x4600 | vector); // STARTUP again (ignored if running)
}
