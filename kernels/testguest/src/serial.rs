//! COM1 (8250/16550 at 0x3f8), polled. Whole lines are written under a spinlock in guest
//! memory so that lines from different vCPUs never interleave.

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::cpu::{self, inb, outb, pause};

const COM1: u16 = 0x3f8;

static PRINT_LOCK: AtomicU32 = AtomicU32::new(0);

/// Minimal set-up: 115200 8N1, no interrupts.
pub fn init() {
    outb(COM1 + 3, 0x80); // LCR: DLAB
    outb(COM1, 1); // divisor 1 (115200)
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03); // LCR: 8N1
    outb(COM1 + 1, 0); // IER: off
}

fn put(b: u8) {
    // LSR bit 5: transmit holding register empty. Bounded, so a missing UART cannot hang us.
    let mut n = 0u32;
    while inb(COM1 + 5) & 0x20 == 0 && n < 100_000 {
        n += 1;
    }
    outb(COM1, b);
}

/// A line being formatted (no allocation); longer output is truncated.
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line { buf: [0; 256], len: 0 }
    }
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

fn lock(max_spins: u64) -> bool {
    let mut n = 0u64;
    loop {
        if PRINT_LOCK.compare_exchange_weak(0, 1, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            return true;
        }
        while PRINT_LOCK.load(Ordering::Relaxed) != 0 {
            pause();
            n += 1;
            if n >= max_spins {
                return false;
            }
        }
    }
}

fn unlock() {
    PRINT_LOCK.store(0, Ordering::Release);
}

/// Direct port I/O (CPL0, or CPL3 with a working IOPL).
pub fn write_raw(b: &[u8]) {
    for &c in b {
        put(c);
    }
}

fn write_bytes(b: &[u8]) {
    if cpu::io_direct() {
        write_raw(b);
    } else {
        cpu::kcall(cpu::KC_SERIAL_WRITE, b.as_ptr() as u64, b.len() as u64);
    }
}

/// Print a whole line (it must end in '\n') atomically with respect to other vCPUs.
pub fn emit(l: &Line) {
    lock(u64::MAX);
    write_bytes(l.bytes());
    unlock();
}

/// For panics and exceptions: do not wait forever for a lock that may never be released.
pub fn emit_emergency(l: &Line) {
    let locked = lock(20_000);
    if !locked {
        write_bytes(b"\n");
    }
    write_bytes(l.bytes());
    if locked {
        unlock();
    }
}

/// `println!`-like helper: formats into a Line and emits it with a trailing '\n'.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut l = $crate::serial::Line::new();
        let _ = write!(l, $($arg)*);
        let _ = l.write_str("\n");
        $crate::serial::emit(&l);
    }};
}
