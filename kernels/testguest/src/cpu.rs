//! CPU plumbing: port I/O, TSS/IDT set-up, the CPL3 -> CPL0 "kcall" gate, exceptions, reset.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::boot::{self, GDT, IDT};
use crate::serial::{self, Line};
use crate::MAX_CPUS;
use core::fmt::Write;

pub const KSTACK_SIZE: usize = 16 * 1024;
pub const USTACK_SIZE: usize = 64 * 1024;

pub const SEL_KCODE: u64 = 0x08;
pub const SEL_TSS0: u64 = 0x30;

pub const LAPIC_BASE: u64 = 0xFEE0_0000;

/// The LAPIC timer's vector (TSC-deadline mode, idle rounds) and the spurious vector.
pub const TIMER_VECTOR: usize = 0x40;
pub const SPURIOUS_VECTOR: usize = 0xFF;
const MSR_TSC_DEADLINE: u32 = 0x6E0;

/// kcall operations (CPL3 -> CPL0, see `kcall`).
pub const KC_SET_CR3: u64 = 1;
pub const KC_SEND_IPI: u64 = 2;
pub const KC_LAPIC_ID: u64 = 3;
pub const KC_RESET: u64 = 4;
pub const KC_CRASH: u64 = 7;
pub const KC_SERIAL_WRITE: u64 = 5;
pub const KC_CALIBRATE_TSC: u64 = 6;
pub const KC_TIMER_INIT: u64 = 8;
pub const KC_IDLE: u64 = 9;
/// rax value that marks a `ud2` as a kcall ("kcall" in ASCII).
pub const KCALL_MAGIC: i32 = 0x6b63_6c6c;

// ---------------------------------------------------------------- port I/O
//
// Port I/O is direct at CPL0, and at CPL3 when RFLAGS.IOPL really is 3 (hardware KVM). The
// nested KVM here silently runs CPL3 with IOPL=0, so there CPL3 goes through a kcall instead.

static DIRECT_USER_IO: AtomicBool = AtomicBool::new(false);

/// At CPL3: does this CPU honour IOPL=3 (in/out allowed)? Same answer on every vCPU.
pub fn probe_user_io() {
    let flags: u64;
    unsafe { asm!("pushfq", "pop {0}", out(reg) flags, options(preserves_flags)) }
    DIRECT_USER_IO.store(flags & 0x3000 == 0x3000, Ordering::Relaxed);
}

/// Can this code execute in/out right now?
pub fn io_direct() -> bool {
    cpl() == 0 || DIRECT_USER_IO.load(Ordering::Relaxed)
}

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

#[inline(always)]
pub fn pause() {
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

pub fn cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, 0);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Current privilege level (from CS).
pub fn cpl() -> u16 {
    let cs: u16;
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) }
    cs & 3
}

// ---------------------------------------------------------------- TSS

#[repr(C, packed)]
pub struct Tss {
    _r0: u32,
    rsp0: u64,
    _rsp12: [u64; 2],
    _r1: u64,
    _ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap_base: u16,
}

const _: () = assert!(core::mem::size_of::<Tss>() == 104);

#[no_mangle]
static mut TSS: [Tss; MAX_CPUS] = unsafe { core::mem::zeroed() };

/// Fill cpu's TSS (RSP0) and its GDT descriptor. Works at CPL0 or CPL3 (RAM is user-mapped).
pub fn setup_tss(cpu: usize, kstack_top: u64) -> u64 {
    unsafe {
        let tss = &raw mut TSS[cpu];
        (&raw mut (*tss).rsp0).write_unaligned(kstack_top);
        (&raw mut (*tss).iomap_base).write_unaligned(104);
        let base = tss as u64;
        let lo = 103u64 | (base & 0xFF_FFFF) << 16 | 0x89u64 << 40 | ((base >> 24) & 0xFF) << 56;
        let idx = 6 + 2 * cpu;
        let gdt = &raw mut GDT;
        (*gdt)[idx] = lo;
        (*gdt)[idx + 1] = base >> 32;
    }
    SEL_TSS0 + 16 * cpu as u64
}

/// CPL0 only.
pub fn load_tss(sel: u64) {
    unsafe { asm!("ltr {0:x}", in(reg) sel as u16, options(nostack, preserves_flags)) }
}

// ---------------------------------------------------------------- IDT

fn set_gate(vec: usize, handler: u64, dpl: u64) {
    let lo = (handler & 0xFFFF)
        | SEL_KCODE << 16
        | (0x8E | dpl << 5) << 40
        | ((handler >> 16) & 0xFFFF) << 48;
    unsafe {
        let idt = &raw mut IDT;
        (*idt)[2 * vec] = lo;
        (*idt)[2 * vec + 1] = handler >> 32;
    }
}

/// CPL0: fill the IDT (exceptions 0-31, the timer and spurious vectors) and load it.
pub fn setup_idt() {
    for v in 0..32 {
        set_gate(v, unsafe { boot::ISR_TABLE[v] }, 0);
    }
    set_gate(TIMER_VECTOR, boot::isr_timer as *const () as u64, 0);
    set_gate(SPURIOUS_VECTOR, boot::isr_spurious as *const () as u64, 0);
    unsafe { asm!("lidt [{0}]", in(reg) &raw const boot::IDTR, options(nostack, preserves_flags)) }
}

/// CPL0: iretq to `entry(arg)` at CPL3 on `stack_top` with IOPL=3, IF=0.
pub fn enter_user(entry: u64, stack_top: u64, arg: u64) -> ! {
    unsafe {
        asm!(
            "push 0x1b",
            "push {rsp}",
            "push 0x3002",
            "push 0x23",
            "push {rip}",
            "iretq",
            rsp = in(reg) stack_top - 8,
            rip = in(reg) entry,
            in("rdi") arg,
            options(noreturn)
        )
    }
}

// ---------------------------------------------------------------- kcall

/// CPL3 -> CPL0 call. This KVM raises #UD for `int n` at CPL3, so the call is a `ud2` with
/// rax = KCALL_MAGIC, which the #UD handler recognises (boot.rs, isr_6).
pub fn kcall(op: u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    unsafe {
        asm!("ud2",
            inlateout("rax") KCALL_MAGIC as u64 => ret,
            inlateout("rdi") op => _, inlateout("rsi") a => _, inlateout("rdx") b => _,
            clobber_abi("C"))
    }
    ret
}

fn lapic_read(reg: u64) -> u32 {
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

fn lapic_write(reg: u64, v: u32) {
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(v) }
}

#[no_mangle]
extern "C" fn kcall_dispatch(op: u64, a: u64, b: u64) -> u64 {
    match op {
        KC_SET_CR3 => {
            unsafe { asm!("mov cr3, {0}", in(reg) a, options(nostack, preserves_flags)) }
            0
        }
        KC_SEND_IPI => {
            lapic_write(0x310, (a as u32) << 24);
            lapic_write(0x300, b as u32);
            // Delivery status (bit 12): the in-kernel LAPIC reports idle at once.
            let mut n = 0;
            while lapic_read(0x300) & (1 << 12) != 0 && n < 1000 {
                n += 1;
            }
            0
        }
        KC_LAPIC_ID => (lapic_read(0x20) >> 24) as u64,
        KC_RESET => reset(),
        KC_CRASH => triple_fault(),
        KC_SERIAL_WRITE => {
            serial::write_raw(unsafe { core::slice::from_raw_parts(a as *const u8, b as usize) });
            0
        }
        KC_CALIBRATE_TSC => crate::counter::calibrate_tsc().unwrap_or(0),
        KC_TIMER_INIT => {
            // LAPIC software-enabled, its timer in TSC-deadline mode, unmasked.
            lapic_write(0xF0, 0x100 | SPURIOUS_VECTOR as u32);
            lapic_write(0x320, 0b10 << 17 | TIMER_VECTOR as u32);
            0
        }
        KC_IDLE => {
            wrmsr(MSR_TSC_DEADLINE, a);
            // The interrupt shadow of `sti` covers `hlt`: a deadline already past wakes it too.
            unsafe { asm!("sti", "hlt", "cli", options(nostack)) }
            0
        }
        _ => u64::MAX,
    }
}

/// Does the LAPIC offer the TSC-deadline timer (CPUID.1:ECX[24])?
pub fn has_tsc_deadline() -> bool {
    cpuid(1)[2] & (1 << 24) != 0
}

fn wrmsr(msr: u32, v: u64) {
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
            options(nomem, nostack, preserves_flags))
    }
}

// ---------------------------------------------------------------- reset

/// Reset the machine: i8042 reset line (the VMM turns it into a clean exit), then a triple
/// fault for machines without an i8042 (qemu microvm).
pub fn reset() -> ! {
    if cpl() != 0 {
        kcall(KC_RESET, 0, 0);
    }
    outb(0x64, 0xFE);
    triple_fault()
}

/// Stop the machine as a failure: a triple fault, which the VMM reports as a guest crash
/// (non-zero exit), so an ERROR line can never pass for a clean run.
pub fn crash() -> ! {
    if cpl() != 0 {
        kcall(KC_CRASH, 0, 0);
    }
    triple_fault()
}

fn triple_fault() -> ! {
    let null_idt = [0u8; 10];
    unsafe {
        asm!("lidt [{0}]", "ud2", in(reg) &null_idt, options(noreturn));
    }
}

// ---------------------------------------------------------------- exceptions

#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

static IN_EXCEPTION: AtomicU32 = AtomicU32::new(0);

/// CPL0: report the exception and crash.
#[no_mangle]
extern "C" fn exception_handler(f: &ExceptionFrame) -> ! {
    let cr2: u64;
    let tr: u16;
    unsafe {
        asm!("mov {0}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags));
        asm!("str {0:x}", out(reg) tr, options(nomem, nostack, preserves_flags));
    }
    let tr = tr as u64;
    let cpu = if tr >= SEL_TSS0 { (tr - SEL_TSS0) / 16 } else { 0 };
    if IN_EXCEPTION.fetch_add(1, Ordering::SeqCst) == 0 {
        let mut l = Line::new();
        let _ = write!(
            l,
            "testguest: exception {} rip={:#x} err={:#x} cr2={:#x} cpu={}\n",
            f.vector, f.rip, f.error, cr2, cpu
        );
        serial::emit_emergency(&l);
    }
    triple_fault()
}
