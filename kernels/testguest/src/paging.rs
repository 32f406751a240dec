//! Final identity page tables, built at CPL3 (RAM is user-mapped by the boot tables) and
//! installed with one kcall.
//!
//! * RAM: present, writable, user, write-back.
//! * Below 4 GiB, non-RAM (MMIO, e.g. virtio-mmio): present, writable, user, uncached.
//! * The LAPIC's 2 MiB page (0xFEE00000): uncached, supervisor only.
//! * Above 4 GiB, non-RAM: not mapped.
//! A GiB that is uniformly RAM (or uniformly MMIO below 4 GiB) becomes a 1 GiB page when the
//! CPU has them; otherwise it gets a page directory of 2 MiB pages.

use crate::boot::{PDPT, PML4};
use crate::bootinfo::BootInfo;
use crate::cpu::LAPIC_BASE;
use crate::{alloc, fail};

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const PWT: u64 = 8;
const PCD: u64 = 0x10;
const PS: u64 = 0x80;

const GIB: u64 = 1 << 30;
const MIB2: u64 = 1 << 21;
const FOUR_GIB: u64 = 4 * GIB;

/// Attributes of the 2 MiB (or 1 GiB) page at `start`, or None if it stays unmapped.
fn attrs(bi: &BootInfo, start: u64, size: u64) -> Option<u64> {
    let end = start + size;
    if bi.overlaps_ram(start, end) {
        Some(P | RW | US | PS)
    } else if start < FOUR_GIB {
        let lapic = start <= LAPIC_BASE && LAPIC_BASE < end;
        Some(P | RW | PCD | PWT | PS | if lapic { 0 } else { US })
    } else {
        None
    }
}

/// Builds the tables; returns the physical address of the PML4 for CR3.
pub fn build(bi: &BootInfo, gbpages: bool) -> u64 {
    let top = bi.ram_top().max(FOUR_GIB).next_multiple_of(GIB);
    let ngib = top / GIB;
    if ngib > 512 {
        fail(format_args!("RAM above 512 GiB is not supported"));
    }
    unsafe {
        let pml4 = &raw mut PML4;
        let pdpt = &raw mut PDPT;
        for e in (*pml4).iter_mut() {
            *e = 0;
        }
        (*pml4)[0] = pdpt as u64 | P | RW | US;
        for g in 0..512u64 {
            let start = g * GIB;
            let mut entry = 0;
            if g < ngib {
                // Uniform GiB (all RAM, or no RAM at all): one 1 GiB page if allowed.
                let uniform = bi.is_ram(start, start + GIB) || !bi.overlaps_ram(start, start + GIB);
                let has_lapic = start <= LAPIC_BASE && LAPIC_BASE < start + GIB;
                if gbpages && uniform && !has_lapic {
                    entry = attrs(bi, start, GIB).unwrap_or(0);
                } else if start < FOUR_GIB || bi.overlaps_ram(start, start + GIB) {
                    let pd = alloc(4096, 4096) as *mut u64;
                    for i in 0..512u64 {
                        let a = start + i * MIB2;
                        pd.add(i as usize).write(attrs(bi, a, MIB2).map_or(0, |f| a | f));
                    }
                    entry = pd as u64 | P | RW | US;
                }
                if entry & PS != 0 {
                    entry |= start;
                }
            }
            (*pdpt)[g as usize] = entry;
        }
        pml4 as u64
    }
}
