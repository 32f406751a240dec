//! Counter mode (CPL3, every vCPU): verify the vCPU's region against pattern(count), bump the
//! count (kept in guest memory), rewrite the region with pattern(count + 1), print now and then.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::bootinfo::BootInfo;
use crate::cpu::{self, inb, outb, pause, rdtsc};
use crate::smp::CpuList;
use crate::{fail, println, MAX_CPUS};
use crate::run as shared;

/// Per-vCPU state in guest memory (a snapshot captures it). `layout=1` prints its address.
#[repr(C)]
pub struct CpuState {
    /// Completed rounds; the region holds pattern(count) unless `phase` is 1.
    pub count: AtomicU64,
    /// 0: region == pattern(count); 1: rewriting the region from pattern(count - 1) to pattern(count).
    pub phase: AtomicU64,
    pub region: AtomicU64,
    pub words: AtomicU64,
    pub apic: AtomicU64,
    /// Set by the vCPU once it runs at CPL3.
    pub up: AtomicU64,
    /// Set by an AP once it has stopped for good (after STOP).
    pub stopped: AtomicU64,
    _pad: u64,
}

#[no_mangle]
pub static STATE: [CpuState; MAX_CPUS] = unsafe { core::mem::zeroed() };

static GO: AtomicU32 = AtomicU32::new(0);
static STOP: AtomicU32 = AtomicU32::new(0);

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

/// Word `index` of `cpu`'s region after `count` rounds.
#[inline(always)]
pub fn pattern(count: u64, index: u64, cpu: u64) -> u64 {
    (count << 32 | index) ^ (cpu + 1).wrapping_mul(MIX)
}

pub fn init_state(cpu: usize, apic: u8, base: u64, bytes: u64) {
    let s = &STATE[cpu];
    s.count.store(0, Ordering::Relaxed);
    s.phase.store(1, Ordering::Relaxed);
    s.region.store(base, Ordering::Relaxed);
    s.words.store(bytes / 8, Ordering::Relaxed);
    s.apic.store(apic as u64, Ordering::Relaxed);
}

/// First fit, in RAM above everything allocated so far, one region of `mib` MiB per vCPU.
pub fn place_regions(bi: &BootInfo, n: usize, mib: u64) -> [(u64, u64); MAX_CPUS] {
    let mut out = [(0u64, 0u64); MAX_CPUS];
    let bytes = match mib.checked_mul(1 << 20) {
        Some(b) if b > 0 => b,
        _ => fail(format_args!("bad mem={}", mib)),
    };
    let mut floor = crate::BUMP.load(Ordering::Relaxed).next_multiple_of(4096);
    let mut placed = 0;
    for r in bi.ram() {
        let mut a = r.start.max(floor).next_multiple_of(4096);
        while placed < n && a.checked_add(bytes).is_some_and(|e| e <= r.end) {
            out[placed] = (a, bytes);
            placed += 1;
            a += bytes;
            floor = a;
        }
    }
    if placed < n {
        let total: u64 = bi.ram().iter().map(|r| r.end - r.start).sum();
        fail(format_args!(
            "not enough RAM for mem={} MiB x {} vcpus (RAM {} MiB, placed {})",
            mib,
            n,
            total >> 20,
            placed
        ));
    }
    out
}

/// TSC ticks per millisecond at CPL0 (kcall KC_CALIBRATE_TSC): PIT channel 2, else the KVM
/// CPUID leaf 0x40000010 (TSC kHz), else None.
pub fn calibrate_tsc() -> Option<u64> {
    calibrate_pit().or_else(tsc_khz_from_cpuid)
}

fn tsc_khz_from_cpuid() -> Option<u64> {
    let sig = cpu::cpuid(0x4000_0000);
    if sig[1..] != [0x4b4d_564b, 0x564b_4d56, 0x4d] || sig[0] < 0x4000_0010 {
        return None; // not "KVMKVMKVM\0\0\0"
    }
    let khz = cpu::cpuid(0x4000_0010)[0] as u64;
    (100_000..20_000_000).contains(&khz).then_some(khz)
}

/// Measured against PIT channel 2 over ~10 ms (a few hundred reads of port 0x61, whose bit 5
/// is channel 2's output; KVM's in-kernel PIT emulates it with KVM_PIT_SPEAKER_DUMMY).
///
/// Every port access is a VM exit and the CPL0 loop is emulated here, so a run can be
/// stretched by the host: each run brackets the start and the end of the interval with TSC
/// reads, and a run whose brackets are wider than 1% is repeated (best of 4 kept).
fn calibrate_pit() -> Option<u64> {
    let mut best: Option<(u64, u64)> = None; // (uncertainty, ticks per 10 ms)
    for _ in 0..4 {
        let Some(m) = pit_run() else { return None };
        if best.is_none_or(|b| m.0 < b.0) {
            best = Some(m);
        }
        if m.0 * 100 <= m.1 {
            break;
        }
    }
    let (_, ticks) = best?;
    let per_ms = ticks / 10;
    (100_000..20_000_000).contains(&per_ms).then_some(per_ms) // 100 MHz .. 20 GHz
}

/// One 10 ms PIT interval: (uncertainty, estimate), both in TSC ticks.
fn pit_run() -> Option<(u64, u64)> {
    const LATCH: u64 = 11932; // 10 ms at 1.193182 MHz
    let v = inb(0x61);
    outb(0x61, (v & !0x02) | 0x01); // gate high, speaker off
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0, binary
    outb(0x42, LATCH as u8);
    let s0 = rdtsc();
    outb(0x42, (LATCH >> 8) as u8); // counting starts with this write
    let s1 = rdtsc();
    let mut polls = 0u32;
    let mut last_low = s1; // the last read that still saw OUT low started after this
    loop {
        let a = rdtsc();
        let out = inb(0x61) & 0x20;
        let b = rdtsc();
        if out != 0 {
            // OUT went high in [last_low, b]; counting started in [s0, s1].
            if polls < 3 {
                return None; // high at once: channel 2 is not counting
            }
            let lo = last_low - s1;
            let hi = b - s0;
            return Some((hi - lo, (lo + hi) / 2));
        }
        last_low = a;
        polls += 1;
        if polls > 20_000 {
            return None;
        }
    }
}

pub fn ap_up(cpu: usize) {
    STATE[cpu].up.store(1, Ordering::Release);
    while GO.load(Ordering::Acquire) == 0 {
        pause();
    }
}

pub fn go() {
    GO.store(1, Ordering::Release);
}

/// BSP: wait until every AP runs at CPL3 (about 1 s at most).
pub fn wait_for_aps(cpus: &CpuList) {
    let per_ms = shared().tsc_per_ms;
    let t0 = rdtsc();
    let mut spins = 0u64;
    for i in 1..cpus.n {
        while STATE[i].up.load(Ordering::Acquire) == 0 {
            pause();
            spins += 1;
            let late = if per_ms != 0 { rdtsc() - t0 > 2000 * per_ms } else { spins > 2_000_000_000 };
            if late {
                let stage = unsafe { (crate::boot::AP_PROGRESS as *const u32).read_volatile() };
                fail(format_args!("cpu{} (apic {}) did not start (AP stage {})", i, cpus.apic[i], stage));
            }
        }
    }
}

pub fn print_layout(cpu: usize) {
    let s = &STATE[cpu];
    println!(
        "testguest: layout cpu={} apic={} region={:#x} bytes={:#x} state={:#x}",
        cpu,
        s.apic.load(Ordering::Relaxed),
        s.region.load(Ordering::Relaxed),
        s.words.load(Ordering::Relaxed) * 8,
        s as *const CpuState as u64
    );
}

#[inline(never)]
fn fill(base: *mut u64, words: u64, count: u64, cpu: u64) {
    for i in 0..words {
        unsafe { base.add(i as usize).write_volatile(pattern(count, i, cpu)) };
    }
}

#[inline(never)]
fn verify(base: *const u64, words: u64, count: u64, cpu: u64) {
    for i in 0..words {
        let found = unsafe { base.add(i as usize).read_volatile() };
        let expected = pattern(count, i, cpu);
        if found != expected {
            fail_mismatch(cpu, count, base as u64 + 8 * i, expected, found);
        }
    }
}

#[cold]
fn fail_mismatch(cpu: u64, count: u64, addr: u64, expected: u64, found: u64) -> ! {
    let mut l = crate::serial::Line::new();
    let _ = core::fmt::Write::write_fmt(
        &mut l,
        format_args!(
            "testguest: ERROR memory mismatch cpu={} count={} addr={:#x} expected={:#x} found={:#x}\n",
            cpu, count, addr, expected, found
        ),
    );
    crate::serial::emit_emergency(&l);
    cpu::crash()
}

/// The counter loop of vCPU `cpu` (0 = BSP). Never returns.
pub fn run(cpu: usize) -> ! {
    let r = shared();
    let s = &STATE[cpu];
    let base = s.region.load(Ordering::Relaxed) as *mut u64;
    let words = s.words.load(Ordering::Relaxed);
    let c = cpu as u64;
    let tick = r.tsc_per_ms.saturating_mul(r.cfg.tick_ms);
    let limit = r.cfg.count;

    if s.phase.load(Ordering::Relaxed) == 1 && s.count.load(Ordering::Relaxed) == 0 {
        fill(base, words, 0, c);
        s.phase.store(0, Ordering::Release);
    }
    let hot_words = (words * r.cfg.hot_pct / 100).max(1);
    let idle = idle_ticks();
    if idle != 0 {
        cpu::kcall(cpu::KC_TIMER_INIT, 0, 0);
    }
    let mut last = rdtsc();
    loop {
        let round_start = rdtsc();
        let n = s.count.load(Ordering::Relaxed);
        // Round 0 covers the whole region; later rounds only its hot part (which alone then
        // holds the current pattern: the rest keeps pattern 1).
        let w = if n == 0 { words } else { hot_words };
        verify(base, w, n, c);
        s.phase.store(1, Ordering::Relaxed);
        s.count.store(n + 1, Ordering::Release);
        fill(base, w, n + 1, c);
        s.phase.store(0, Ordering::Release);

        let now = rdtsc();
        if tick == 0 || now.wrapping_sub(last) >= tick {
            last = now;
            println!("cpu{} count={}", cpu, n + 1);
        }
        if idle != 0 {
            idle_until(round_start.wrapping_add(idle));
        }
        if cpu == 0 {
            if limit != 0 && n + 1 >= limit {
                finish();
            }
        } else if STOP.load(Ordering::Acquire) != 0 {
            s.stopped.store(1, Ordering::Release);
            loop {
                pause();
            }
        }
    }
}

/// TSC ticks from one idle round's start to the next: 0 when not idle, or when there is no
/// calibrated TSC or no TSC-deadline timer to wake the vCPU (then the rounds spin as before).
pub fn idle_ticks() -> u64 {
    let r = shared();
    if r.cfg.idle_ms == 0 || !cpu::has_tsc_deadline() {
        return 0;
    }
    r.tsc_per_ms.saturating_mul(r.cfg.idle_ms)
}

/// Halts (at CPL0, interrupts on) until the TSC reaches `deadline`. A wake-up before it (a
/// spurious one, or a restore that lets the vCPU run on) halts again.
fn idle_until(deadline: u64) {
    while (deadline.wrapping_sub(rdtsc()) as i64) > 0 {
        cpu::kcall(cpu::KC_IDLE, deadline, 0);
    }
}

/// BSP: stop the APs, collect their final counts, print the done line, reset.
fn finish() -> ! {
    let n = shared().ncpus;
    STOP.store(1, Ordering::Release);
    for i in 1..n {
        while STATE[i].stopped.load(Ordering::Acquire) == 0 {
            pause();
        }
    }
    let mut l = crate::serial::Line::new();
    let _ = core::fmt::Write::write_str(&mut l, "testguest: done");
    for i in 0..n {
        let _ = core::fmt::Write::write_fmt(
            &mut l,
            format_args!(" cpu{}={}", i, STATE[i].count.load(Ordering::Acquire)),
        );
    }
    let _ = core::fmt::Write::write_str(&mut l, "\n");
    crate::serial::emit(&l);
    cpu::reset()
}
