//! The guest-physical address map every VM shares, boot and restore alike.
//!
//! Low memory follows the Linux/Firecracker conventions so that a vmlinux and the test guest find
//! their boot data where they expect it.

/// Boot GDT (4 entries: null, code64, data, TSS).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty: the guest installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` (the "zero page"), passed in RSI.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU; the guest switches stacks early.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, one PDPT, one PD of 2 MiB pages (first 1 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room for the command line, NUL included (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table lives here and RAM in e820 stops here.
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: no RAM between these addresses (devices, IOAPIC, LAPIC).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot; each device gets `VIRTIO_MMIO_SLOT_SIZE` bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS on Intel; they must not overlap RAM or devices.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Legacy ISA IRQs the in-kernel PIC/IOAPIC route.
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ handed to virtio-mmio devices.
pub const IRQ_BASE: u32 = 5;
pub const IRQ_MAX: u32 = 23;

/// Largest guest we accept; beyond this the 4-level identity map and e820 handling are untested.
pub const MAX_MEM_MIB: u64 = 256 * 1024;
/// vCPU count bounds: the MP table and CPUID topology are laid out for at most 8.
pub const MAX_VCPUS: u8 = 8;
