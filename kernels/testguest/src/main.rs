//! microagent test guest: a bare-metal x86_64 program that does a few thousand instructions of
//! set-up at CPL0 (GDT/IDT/TSS, boot page tables) and everything else at CPL3 (IOPL=3), where
//! nested KVM runs it natively. See README.md for the boot contract and the output formats.

#![no_std]
#![no_main]

mod blk;
mod boot;
mod bootinfo;
mod counter;
mod cpu;
mod paging;
mod serial;
mod smp;
mod virtio;
mod vsock;

use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering};

use bootinfo::{BootInfo, Config};

pub const MAX_CPUS: usize = 64;
/// What the static boot page tables map (first GiB).
pub const BOOT_MAPPED: u64 = 1 << 30;

/// Written once at CPL0 by the BSP.
static mut BOOT_INFO: u64 = 0;
static mut BOOT_KIND: u64 = 0;
/// TSC at the first Rust instruction (for the `layout=1` info line).
static mut TSC_ENTRY: u64 = 0;

/// Bump allocator over the RAM right after the image (page tables, AP stacks, regions).
static BUMP: AtomicU64 = AtomicU64::new(0);
static BUMP_LIMIT: AtomicU64 = AtomicU64::new(0);

pub fn alloc(size: u64, align: u64) -> u64 {
    let a = BUMP.load(Ordering::Relaxed).next_multiple_of(align);
    let end = a + size;
    if end > BUMP_LIMIT.load(Ordering::Relaxed) {
        fail(format_args!("out of memory after the image (need {:#x} bytes at {:#x})", size, a));
    }
    BUMP.store(end, Ordering::Relaxed);
    a
}

/// Print `testguest: ERROR <msg>` and crash (a triple fault: the VM exits non-zero).
pub fn fail(msg: core::fmt::Arguments) -> ! {
    let mut l = serial::Line::new();
    let _ = write!(l, "testguest: ERROR {}\n", msg);
    serial::emit_emergency(&l);
    cpu::crash()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut l = serial::Line::new();
    let _ = write!(l, "testguest: panic: {}", info.message());
    if let Some(loc) = info.location() {
        let _ = write!(l, " at {}:{}", loc.file(), loc.line());
    }
    let _ = l.write_str("\n");
    serial::emit_emergency(&l);
    cpu::crash()
}

/// BSP at CPL0, from `common64` (our GDT and the boot page tables are loaded).
#[no_mangle]
extern "C" fn bsp_init0(info: u64, kind: u64) -> ! {
    let tsc = cpu::rdtsc();
    serial::init();
    unsafe {
        TSC_ENTRY = tsc;
        BOOT_INFO = info;
        BOOT_KIND = kind;
    }
    let sel = cpu::setup_tss(0, boot::addr_of_sym(unsafe { &boot::BSP_KSTACK_TOP }));
    cpu::load_tss(sel);
    cpu::setup_idt();
    let ustack = boot::addr_of_sym(unsafe { &boot::BSP_USTACK_TOP });
    cpu::enter_user(bsp_main as *const () as u64, ustack, 0)
}

/// The shared state of a run, written by the BSP before it releases the APs.
pub struct Run {
    pub cfg: Config,
    pub ncpus: usize,
    pub tsc_per_ms: u64,
}

pub static mut RUN: Run = Run {
    cfg: Config::DEFAULT,
    ncpus: 1,
    tsc_per_ms: 0,
};

pub fn run() -> &'static Run {
    unsafe { &*(&raw const RUN) }
}

/// BSP at CPL3.
extern "C" fn bsp_main() -> ! {
    cpu::probe_user_io();
    let (info, kind) = unsafe { (BOOT_INFO, BOOT_KIND) };
    let bi = BootInfo::parse(info, kind);
    let cfg = Config::parse(bi.cmdline);
    let device_mode = match cfg.mode() {
        "counter" => false,
        "blk" | "vsock" => true,
        m => fail(format_args!("unknown mode={}", m)),
    };

    // Memory after the image must be RAM; everything we allocate comes from there.
    let image_start = boot::addr_of_sym(unsafe { &boot::__image_start });
    let image_end = boot::addr_of_sym(unsafe { &boot::_end });
    let Some(r) = bi.ram().iter().find(|r| r.start <= image_start && image_end <= r.end) else {
        fail(format_args!("the image at {:#x}-{:#x} is not in RAM", image_start, image_end));
    };
    BUMP.store(image_end, Ordering::Relaxed);
    BUMP_LIMIT.store(r.end.min(BOOT_MAPPED), Ordering::Relaxed);

    let gb = cfg.gbpages && cpu::cpuid(0x8000_0000)[0] >= 0x8000_0001 && cpu::cpuid(0x8000_0001)[3] & (1 << 26) != 0;
    let cr3 = paging::build(&bi, gb);
    cpu::kcall(cpu::KC_SET_CR3, cr3, 0);

    let (cpus, cpu_source) = smp::discover(smp::bsp_apic_id(), bi.rsdp);
    let tsc_per_ms = cpu::kcall(cpu::KC_CALIBRATE_TSC, 0, 0);
    if device_mode {
        // Device modes: the BSP alone drives the devices by polling; APs are not started.
        unsafe {
            let run = &raw mut RUN;
            (*run).cfg = cfg;
            (*run).ncpus = 1;
            (*run).tsc_per_ms = tsc_per_ms;
        }
        let run = run();
        if run.cfg.layout {
            print_info(cpu_source, gb);
        }
        println!("testguest: ready vcpus={} mode={} mem={}", cpus.n, run.cfg.mode(), run.cfg.mem_mib);
        match run.cfg.mode() {
            "blk" => blk::run(),
            _ => vsock::run(),
        }
    }
    smp::prepare_aps(&cpus);
    let regions = counter::place_regions(&bi, cpus.n, cfg.mem_mib);

    unsafe {
        let run = &raw mut RUN;
        (*run).cfg = cfg;
        (*run).ncpus = cpus.n;
        (*run).tsc_per_ms = tsc_per_ms;
        for (i, &(base, bytes)) in regions[..cpus.n].iter().enumerate() {
            counter::init_state(i, cpus.apic[i], base, bytes);
        }
    }
    smp::start_aps(&cpus);
    counter::wait_for_aps(&cpus);

    let run = run();
    if run.cfg.layout {
        print_info(cpu_source, gb);
        for i in 0..cpus.n {
            counter::print_layout(i);
        }
    }
    if run.cfg.idle_ms != 0 {
        let timer = if counter::idle_ticks() != 0 { "tsc-deadline" } else { "none" };
        println!("testguest: idle ms={} timer={}", run.cfg.idle_ms, timer);
    }
    println!("testguest: ready vcpus={} mode={} mem={}", cpus.n, run.cfg.mode(), run.cfg.mem_mib);
    match run.cfg.crash {
        bootinfo::CRASH_PF => unsafe {
            // Above all RAM and the 4 GiB device window: not mapped.
            ((bi.ram_top().max(1 << 32) + (1 << 30)) as *mut u64).write_volatile(1)
        },
        bootinfo::CRASH_UD => unsafe { core::arch::asm!("ud2") },
        bootinfo::CRASH_PANIC => panic!("crash=panic requested"),
        _ => {}
    }
    counter::go();
    counter::run(0)
}

fn print_info(cpu_source: &str, gb: bool) {
    let run = run();
    let since_entry = cpu::rdtsc() - unsafe { TSC_ENTRY };
    println!(
        "testguest: info boot={} cpus_from={} tsc_khz={} gbpages={} user_io={} entry_to_here_us={}",
        match unsafe { BOOT_KIND } { bootinfo::KIND_LINUX => "linux64", _ => "pvh" },
        cpu_source,
        run.tsc_per_ms,
        gb as u8,
        if cpu::io_direct() { "direct" } else { "kcall" },
        if run.tsc_per_ms != 0 { since_entry * 1000 / run.tsc_per_ms } else { 0 }
    );
}

/// AP at CPL3, from `ap_entry64`.
#[no_mangle]
extern "C" fn ap_main(cpu: u64) -> ! {
    counter::ap_up(cpu as usize);
    counter::run(cpu as usize)
}
