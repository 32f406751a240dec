//! Boot information: Linux `boot_params` (64-bit boot protocol) or PVH `hvm_start_info`,
//! reduced to a RAM map and a command line; plus command-line parsing.

use crate::fail;

pub const KIND_LINUX: u64 = 0;
pub const KIND_PVH: u64 = 1;

const PVH_MAGIC: u32 = 0x336e_c578;
const MAX_RAM: usize = 64;

#[derive(Clone, Copy)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

pub struct BootInfo {
    pub ram: [Range; MAX_RAM],
    pub nram: usize,
    pub cmdline: &'static [u8],
    /// ACPI RSDP from PVH start info (0 if unknown).
    pub rsdp: u64,
}

unsafe fn rd<T: Copy>(addr: u64) -> T {
    (addr as *const T).read_unaligned()
}

impl BootInfo {
    /// Parse what the loader handed us. Only the first GiB is mapped at this point.
    pub fn parse(info: u64, kind: u64) -> BootInfo {
        let mut bi = BootInfo { ram: [Range { start: 0, end: 0 }; MAX_RAM], nram: 0, cmdline: &[], rsdp: 0 };
        if info == 0 || info >= crate::BOOT_MAPPED {
            fail(format_args!("boot info at {:#x} is not in the first GiB", info));
        }
        let cmdline_addr: u64;
        unsafe {
            if kind == KIND_PVH {
                let magic: u32 = rd(info);
                if magic != PVH_MAGIC {
                    fail(format_args!("bad hvm_start_info magic {:#x}", magic));
                }
                let version: u32 = rd(info + 4);
                cmdline_addr = rd(info + 24);
                bi.rsdp = rd(info + 32);
                let (map, n): (u64, u32) =
                    if version >= 1 { (rd(info + 40), rd(info + 48)) } else { (0, 0) };
                if map == 0 || n == 0 {
                    fail(format_args!("PVH start info has no memory map"));
                }
                for i in 0..n as u64 {
                    let e = map + 24 * i;
                    bi.add(rd(e), rd(e + 8), rd(e + 16));
                }
            } else {
                let lo: u32 = rd(info + 0x228);
                let hi: u32 = rd(info + 0x0c8);
                cmdline_addr = (hi as u64) << 32 | lo as u64;
                let n: u8 = rd(info + 0x1e8);
                for i in 0..n as u64 {
                    let e = info + 0x2d0 + 20 * i;
                    bi.add(rd(e), rd(e + 8), rd(e + 16));
                }
            }
        }
        if bi.nram == 0 {
            fail(format_args!("no RAM in the memory map"));
        }
        // Sort (the maps are tiny) and merge adjacent ranges.
        for i in 1..bi.nram {
            let mut j = i;
            while j > 0 && bi.ram[j - 1].start > bi.ram[j].start {
                bi.ram.swap(j - 1, j);
                j -= 1;
            }
        }
        let mut w = 0;
        for i in 1..bi.nram {
            if bi.ram[i].start <= bi.ram[w].end {
                bi.ram[w].end = bi.ram[w].end.max(bi.ram[i].end);
            } else {
                w += 1;
                bi.ram[w] = bi.ram[i];
            }
        }
        bi.nram = w + 1;
        if cmdline_addr != 0 {
            if cmdline_addr >= crate::BOOT_MAPPED {
                fail(format_args!("command line at {:#x} is not in the first GiB", cmdline_addr));
            }
            let p = cmdline_addr as *const u8;
            let mut len = 0;
            while len < 4096 && unsafe { p.add(len).read_volatile() } != 0 {
                len += 1;
            }
            bi.cmdline = unsafe { core::slice::from_raw_parts(p, len) };
        }
        bi
    }

    fn add(&mut self, addr: u64, size: u64, typ: u32) {
        if typ == 1 && size != 0 && self.nram < MAX_RAM {
            self.ram[self.nram] = Range { start: addr, end: addr.saturating_add(size) };
            self.nram += 1;
        }
    }

    pub fn ram(&self) -> &[Range] {
        &self.ram[..self.nram]
    }

    pub fn is_ram(&self, start: u64, end: u64) -> bool {
        self.ram().iter().any(|r| r.start <= start && end <= r.end)
    }

    pub fn overlaps_ram(&self, start: u64, end: u64) -> bool {
        self.ram().iter().any(|r| r.start < end && start < r.end)
    }

    pub fn ram_top(&self) -> u64 {
        self.ram[self.nram - 1].end
    }
}

// ---------------------------------------------------------------- command line

pub const CRASH_PF: u8 = 1;
pub const CRASH_UD: u8 = 2;
pub const CRASH_PANIC: u8 = 3;

pub struct Config {
    pub mode: [u8; 32],
    pub mode_len: usize,
    pub mem_mib: u64,
    pub count: u64,
    pub tick_ms: u64,
    /// Counter mode: after the first round only the first `hot_pct` percent of the region is
    /// verified and rewritten (an idle guest that keeps touching a small working set).
    pub hot_pct: u64,
    /// Counter mode: a round starts every `idle_ms` milliseconds and the vCPU halts until then
    /// (a mostly idle sandbox); 0 spins from round to round.
    pub idle_ms: u64,
    pub layout: bool,
    pub gbpages: bool,
    /// `crash=pf|ud|panic`: fail on purpose after the ready line (tests the error paths).
    pub crash: u8,
    /// mode=blk: sectors [0, N) are read and checksummed, the result goes to sector N.
    pub blk_sectors: u64,
    /// mode=blk: the benchmark instead (whole-disk read, then a write of `blk_write_mib`).
    pub blk_bench: bool,
    pub blk_write_mib: u64,
    /// Requests in flight (1..=16).
    pub blk_depth: u64,
    /// mode=vsock: the port the guest listens on (echo), and whether it listens at all.
    pub vsock_port: u64,
    pub vsock_listen: bool,
    /// mode=vsock: connect to this host port first (0: no).
    pub vsock_connect: u64,
    /// Device modes: re-notify a queue whose kick was suppressed (NO_NOTIFY) after this many
    /// milliseconds without progress (see virtio::Queue::rescue).
    pub rescue_ms: u64,
}

impl Config {
    pub const DEFAULT: Config = Config {
        mode: [0; 32],
        mode_len: 0,
        mem_mib: 1,
        count: 0,
        tick_ms: 10,
        hot_pct: 100,
        idle_ms: 0,
        layout: false,
        gbpages: true,
        crash: 0,
        blk_sectors: 2048,
        blk_bench: false,
        blk_write_mib: 64,
        blk_depth: 8,
        vsock_port: 5000,
        vsock_listen: true,
        vsock_connect: 0,
        rescue_ms: 20,
    };
}

impl Config {
    pub fn mode(&self) -> &str {
        core::str::from_utf8(&self.mode[..self.mode_len]).unwrap_or("?")
    }

    /// `key=value` words separated by spaces; unknown keys are ignored.
    pub fn parse(cmdline: &[u8]) -> Config {
        let mut c = Config { mode_len: 7, ..Config::DEFAULT };
        c.mode[..7].copy_from_slice(b"counter");
        for word in cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n') {
            let Some(eq) = word.iter().position(|&b| b == b'=') else { continue };
            let (key, val) = (&word[..eq], &word[eq + 1..]);
            match key {
                b"mode" => {
                    let n = val.len().min(c.mode.len());
                    c.mode[..n].copy_from_slice(&val[..n]);
                    c.mode_len = n;
                }
                b"mem" => c.mem_mib = number(key, val),
                b"count" => c.count = number(key, val),
                b"tick_ms" => c.tick_ms = number(key, val),
                b"hot_pct" => c.hot_pct = number(key, val).clamp(1, 100),
                b"idle" => c.idle_ms = number(key, val),
                b"layout" => c.layout = number(key, val) != 0,
                b"gbpages" => c.gbpages = number(key, val) != 0,
                b"blk_sectors" => c.blk_sectors = number(key, val),
                b"blk_bench" => c.blk_bench = number(key, val) != 0,
                b"blk_write_mib" => c.blk_write_mib = number(key, val),
                b"blk_depth" => c.blk_depth = number(key, val).clamp(1, 16),
                b"vsock_port" => c.vsock_port = number(key, val),
                b"vsock_listen" => c.vsock_listen = number(key, val) != 0,
                b"vsock_connect" => c.vsock_connect = number(key, val),
                b"rescue_ms" => c.rescue_ms = number(key, val).max(1),
                b"crash" => {
                    c.crash = match val {
                        b"pf" => CRASH_PF,
                        b"ud" => CRASH_UD,
                        b"panic" => CRASH_PANIC,
                        _ => 0,
                    }
                }
                _ => {}
            }
        }
        c
    }
}

fn number(key: &[u8], val: &[u8]) -> u64 {
    let mut n: u64 = 0;
    let ok = !val.is_empty()
        && val.iter().all(|&b| {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                return false;
            }
            match n.checked_mul(10).and_then(|x| x.checked_add(d as u64)) {
                Some(x) => {
                    n = x;
                    true
                }
                None => false,
            }
        });
    if !ok {
        fail(format_args!(
            "bad number {}={}",
            core::str::from_utf8(key).unwrap_or("?"),
            core::str::from_utf8(val).unwrap_or("?")
        ));
    }
    n
}
