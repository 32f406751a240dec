//! Entry points, descriptor tables, boot page tables, exception/kcall stubs and the AP
//! real-mode trampoline. Everything here is assembly; the rest of the guest is Rust.
//!
//! Two ways in:
//! * `_start64` (ELF e_entry): Linux 64-bit boot protocol, long mode, CPL0, RSI = boot_params.
//! * `_start_pvh` (PVH ELF note): 32-bit protected mode, paging off, EBX = hvm_start_info.
//! Both reach `common64`, which loads our GDT and the static boot page tables (first GiB,
//! 2 MiB pages, U bit set) and calls `bsp_init0(info, kind)` at CPL0.

use crate::cpu::{KSTACK_SIZE, USTACK_SIZE};
use crate::MAX_CPUS;

/// Where the AP trampoline is copied (SIPI vector = TRAMP_BASE >> 12).
pub const TRAMP_BASE: u64 = 0x8000;
/// The last start-up stage any AP reached (1 real, 2 protected, 3 long mode, 4 our entry),
/// for the "did not start" error.
pub const AP_PROGRESS: u64 = TRAMP_BASE + 0xFF0;

core::arch::global_asm!(
    r#"
/* ---------------------------------------------------------------- PVH note */
.pushsection .note.Xen, "a", @note
.balign 4
.long 4                 /* namesz */
.long 8                 /* descsz */
.long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
.asciz "Xen"
.balign 4
.quad _start_pvh
.balign 4
.popsection

/* ---------------------------------------------------------------- entries */
.pushsection .text.boot, "ax"
.code64
.global _start64
_start64:
    cli
    cld
    movq %rsi, %rdi             /* boot_params */
    xorl %esi, %esi             /* kind 0: Linux boot protocol */
    jmp common64

.code32
.global _start_pvh
_start_pvh:
    cli
    cld
    movl %ebx, %edi             /* hvm_start_info */
    lgdt GDTR
    movl $0x10, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    movl $0x20, %eax            /* CR4.PAE */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx      /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG | PE */
    movl %eax, %cr0
    ljmp $0x08, $pvh64

.code64
pvh64:
    movl %edi, %edi
    movl $1, %esi               /* kind 1: PVH */

common64:
    leaq BSP_KSTACK_TOP(%rip), %rsp
    lgdt GDTR(%rip)
    movl $0x10, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xorl %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:
    movl $0x20, %eax            /* CR4 = PAE only (no TSD, SMEP, SMAP, UMIP) */
    movq %rax, %cr4
    leaq boot_pml4(%rip), %rax
    movq %rax, %cr3
    call bsp_init0
    ud2

/* AP, arriving from the trampoline: long mode, CPL0, our GDT and final page tables. */
.global ap_entry64
ap_entry64:
    movl $0xFEE00020, %ebx      /* LAPIC ID register */
    movl (%rbx), %eax
    shrl $24, %eax
    shll $5, %eax               /* sizeof(ApSlot) == 32 */
    leaq AP_SLOTS(%rip), %rbx
    addq %rax, %rbx
    movq 8(%rbx), %rsp          /* kernel stack */
    testq %rsp, %rsp            /* no slot: not an enabled CPU of ours, park */
    jz 2f
    movl $4, ({progress})
    lidt IDTR(%rip)
    movzwl 16(%rbx), %eax       /* TSS selector */
    ltr %ax
    pushq $0x1b                 /* SS: user data */
    pushq 24(%rbx)              /* RSP: user stack */
    pushq $0x3002               /* RFLAGS: IOPL=3, IF=0 */
    pushq $0x23                 /* CS: user code */
    leaq ap_main(%rip), %rax
    pushq %rax
    movq (%rbx), %rdi           /* cpu index */
    iretq
2:
    cli
    hlt
    jmp 2b

/* ---------------------------------------------------------------- exceptions */
.macro isr_noerr n
isr_\n:
    pushq $0
    pushq $\n
    jmp isr_common
.endm
.macro isr_err n
isr_\n:
    pushq $\n
    jmp isr_common
.endm
isr_noerr 0
isr_noerr 1
isr_noerr 2
isr_noerr 3
isr_noerr 4
isr_noerr 5
/* #UD doubles as the CPL3 -> CPL0 call gate: this KVM turns `int n` at CPL3 into #UD, so
   user code calls the kernel with `ud2` and rax = KCALL_MAGIC (see cpu::kcall). */
isr_6:
    testb $3, 8(%rsp)           /* from CPL3? */
    jz 1f
    cmpq ${kmagic}, %rax
    jne 1f
    pushq %rax
    movq 8(%rsp), %rax          /* rip */
    cmpw $0x0B0F, (%rax)        /* ud2 */
    popq %rax
    jne 1f
    addq $2, (%rsp)             /* return after the ud2 */
    jmp kcall_entry
1:
    pushq $0
    pushq $6
    jmp isr_common
isr_noerr 7
isr_err 8
isr_noerr 9
isr_err 10
isr_err 11
isr_err 12
isr_err 13
isr_err 14
isr_noerr 15
isr_noerr 16
isr_err 17
isr_noerr 18
isr_noerr 19
isr_noerr 20
isr_err 21
isr_noerr 22
isr_noerr 23
isr_noerr 24
isr_noerr 25
isr_noerr 26
isr_noerr 27
isr_noerr 28
isr_err 29
isr_err 30
isr_noerr 31

isr_common:
    cld
    movq %rsp, %rdi             /* &ExceptionFrame */
    andq $-16, %rsp
    call exception_handler
    ud2

/* The idle timer (TSC deadline), taken only inside the kcall's sti; hlt: acknowledge it. */
.global isr_timer
isr_timer:
    pushq %rax
    movl $0xFEE000B0, %eax      /* LAPIC EOI */
    movl $0, (%rax)
    popq %rax
    iretq

/* A spurious interrupt needs no EOI. */
.global isr_spurious
isr_spurious:
    iretq

/* kcall from CPL3: rdi = op, rsi, rdx = args, result in rax. Caller-saved registers
   are clobbered (the user-side wrapper declares that). */
kcall_entry:
    cld
    subq $8, %rsp
    call kcall_dispatch
    addq $8, %rsp
    iretq
.popsection

/* ---------------------------------------------------------------- AP trampoline */
/* Copied to TRAMP_BASE and entered in real mode at CS:IP = (TRAMP_BASE >> 4):0. */
.pushsection .text.boot, "ax"
.balign 16
.global ap_tramp_start
ap_tramp_start:
.code16
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw $1, ({progress})
    lgdtl ({tramp} + tramp_gdtr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x28, $({tramp} + tramp32 - ap_tramp_start)
.code32
tramp32:
    movl $0x10, %eax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    movl $2, ({progress})
    movl $0x20, %eax
    movl %eax, %cr4
    movl $PML4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x08, $({tramp} + tramp64 - ap_tramp_start)
.code64
tramp64:
    movl $3, ({progress})
    movabsq $ap_entry64, %rax
    jmpq *%rax
.balign 8
tramp_gdtr:
    .word GDT_END - GDT - 1
    .long GDT
.global ap_tramp_end
ap_tramp_end:
.popsection

/* ---------------------------------------------------------------- tables */
.pushsection .data.tables, "aw"
.balign 16
.global GDT
GDT:
    .quad 0
    .quad 0x00AF9A000000FFFF    /* 0x08 kernel code 64 */
    .quad 0x00CF92000000FFFF    /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF    /* 0x18 user data (0x1b) */
    .quad 0x00AFFA000000FFFF    /* 0x20 user code 64 (0x23) */
    .quad 0x00CF9A000000FFFF    /* 0x28 kernel code 32 (PVH, trampoline) */
    .fill 2 * {max_cpus}, 8, 0  /* 0x30 + 16 * cpu: TSS descriptors */
GDT_END:
.balign 8
.global GDTR
GDTR:
    .word GDT_END - GDT - 1
    .quad GDT

.balign 16
.global IDT
IDT:
    .fill 512, 8, 0
.global IDTR
IDTR:
    .word 256 * 16 - 1
    .quad IDT

.balign 8
.global ISR_TABLE
ISR_TABLE:
    .quad isr_0, isr_1, isr_2, isr_3, isr_4, isr_5, isr_6, isr_7
    .quad isr_8, isr_9, isr_10, isr_11, isr_12, isr_13, isr_14, isr_15
    .quad isr_16, isr_17, isr_18, isr_19, isr_20, isr_21, isr_22, isr_23
    .quad isr_24, isr_25, isr_26, isr_27, isr_28, isr_29, isr_30, isr_31

/* Indexed by LAPIC ID: cpu index, kernel stack top, TSS selector, user stack top. */
.balign 8
.global AP_SLOTS
AP_SLOTS:
    .fill 256 * 4, 8, 0

/* Boot page tables: first GiB, 2 MiB pages, present|writable|user. */
.balign 4096
boot_pml4:
    .quad boot_pdpt + 7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 7
    .fill 511, 8, 0
boot_pd:
    .set i, 0
    .rept 512
    .quad (i << 21) + 0x87
    .set i, i + 1
    .endr
.popsection

/* ---------------------------------------------------------------- scratch (not in the file) */
.pushsection .scratch, "aw", @nobits
.balign 4096
.global PML4
PML4:
    .skip 4096
.global PDPT
PDPT:
    .skip 4096
    .skip {kstack}
.global BSP_KSTACK_TOP
BSP_KSTACK_TOP:
    .skip {ustack}
.global BSP_USTACK_TOP
BSP_USTACK_TOP:
.popsection
"#,
    tramp = const TRAMP_BASE,
    progress = const AP_PROGRESS,
    max_cpus = const MAX_CPUS,
    kstack = const KSTACK_SIZE,
    ustack = const USTACK_SIZE,
    kmagic = const crate::cpu::KCALL_MAGIC,
    options(att_syntax)
);

extern "C" {
    pub fn isr_timer();
    pub fn isr_spurious();
    pub static mut GDT: [u64; 6 + 2 * MAX_CPUS];
    pub static mut IDT: [u64; 512];
    pub static IDTR: [u8; 10];
    pub static ISR_TABLE: [u64; 32];
    pub static mut AP_SLOTS: [ApSlot; 256];
    pub static mut PML4: [u64; 512];
    pub static mut PDPT: [u64; 512];
    pub static BSP_KSTACK_TOP: u8;
    pub static BSP_USTACK_TOP: u8;
    pub static ap_tramp_start: u8;
    pub static ap_tramp_end: u8;
    pub static __image_start: u8;
    pub static _end: u8;
}

/// Per-LAPIC-ID start-up data for an AP, read by `ap_entry64`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ApSlot {
    pub cpu: u64,
    pub kstack_top: u64,
    pub tss_sel: u64,
    pub ustack_top: u64,
}

pub fn addr_of_sym(s: &u8) -> u64 {
    s as *const u8 as u64
}
