//! Per-page cost of serving first touches through the userfaultfd page server, against a plain
//! MAP_PRIVATE first touch of the same memory file, side by side in one run.
//!
//! `cargo bench -p snapshot --bench uffd` (256 MiB; `UFFD_BENCH_MIB=64` for a quicker run).
//! The file is all data pages and in the page cache for every row, so rows differ only in how a
//! page reaches the toucher. Timing on shared machines is noisy: read the ratios.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use snapshot::pageserver::{
    Client, ClientOptions, Layout, PageServer, Region, ServerConfig, WorkingSet,
};

const PAGE: u64 = 4096;

struct Map {
    addr: u64,
    len: u64,
}

impl Map {
    fn anon(len: u64) -> Self {
        Self::new(
            len,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
        )
    }
    fn private_file(f: &File, len: u64) -> Self {
        Self::new(len, libc::MAP_PRIVATE | libc::MAP_NORESERVE, f.as_raw_fd())
    }
    fn new(len: u64, flags: i32, fd: i32) -> Self {
        // SAFETY: a fresh mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self {
            addr: p as u64,
            len,
        }
    }
    /// Touches the pages of `order`, in that order; returns the time taken.
    fn touch(&self, order: &[u64], write: bool) -> Duration {
        let t = Instant::now();
        let mut sum = 0u64;
        for &p in order {
            let a = (self.addr + p * PAGE) as *mut u64;
            // SAFETY: inside our mapping.
            unsafe {
                if write {
                    std::ptr::write_volatile(a, p);
                } else {
                    sum = sum.wrapping_add(std::ptr::read_volatile(a));
                }
            }
        }
        std::hint::black_box(sum);
        t.elapsed()
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

struct Row {
    name: String,
    per_page_us: f64,
    spread: (f64, f64),
    faults: Option<u64>,
    /// Pages the server placed (copied or zero): the memory a lazy restore costs.
    placed: Option<u64>,
}

fn rw(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}

/// `n` distinct pages out of `pages`, in a fixed pseudo-random order.
fn scattered_pages(pages: u64, n: u64) -> Vec<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    while (out.len() as u64) < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let p = x % pages;
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

fn us_per_page(d: Duration, pages: u64) -> f64 {
    d.as_secs_f64() * 1e6 / pages as f64
}

/// One client over the whole file touching the pages of `order`; returns the time, the faults
/// the server served and the pages it placed.
fn uffd_run(
    mem: &Path,
    dir: &Path,
    cfg: ServerConfig,
    ws: Option<&WorkingSet>,
    order: &[u64],
    write: bool,
) -> (Duration, u64, u64) {
    let sock = dir.join("bench.sock");
    let ws_path = dir.join("workingset.bin");
    let _ = std::fs::remove_file(&ws_path);
    if let Some(ws) = ws {
        ws.write_atomic(&ws_path).unwrap();
    }
    let server = PageServer::start(mem, Some(ws_path.clone()), &sock, cfg).unwrap();
    let len = std::fs::metadata(mem).unwrap().len();
    let g = Map::anon(len);
    let layout = Layout {
        regions: vec![Region {
            guest_addr: 0,
            host_addr: g.addr,
            len,
            file_offset: 0,
        }],
    };
    let client = Client::connect(&sock, &layout, &ClientOptions::labelled("bench")).unwrap();
    let d = g.touch(order, write);
    let c = client.stats(Duration::from_secs(10)).unwrap().counters;
    client.finish().unwrap();
    server.shutdown();
    let _ = std::fs::remove_file(&ws_path);
    (d, c.faults, c.pages_copied + c.zero_pages)
}

/// The working set a first restore touching `order` records.
fn record_working_set(mem: &Path, dir: &Path, cfg: ServerConfig, order: &[u64]) -> WorkingSet {
    let sock = dir.join("record.sock");
    let ws_path = dir.join("workingset.bin");
    let _ = std::fs::remove_file(&ws_path);
    let cfg = ServerConfig {
        record: true,
        record_for: None,
        ..cfg
    };
    let server = PageServer::start(mem, Some(ws_path.clone()), &sock, cfg).unwrap();
    let len = std::fs::metadata(mem).unwrap().len();
    let g = Map::anon(len);
    let layout = Layout {
        regions: vec![Region {
            guest_addr: 0,
            host_addr: g.addr,
            len,
            file_offset: 0,
        }],
    };
    let client = Client::connect(&sock, &layout, &ClientOptions::labelled("record")).unwrap();
    g.touch(order, false);
    client.finish().unwrap();
    server.shutdown();
    let ws = WorkingSet::load(&ws_path, len).unwrap().unwrap();
    let _ = std::fs::remove_file(&ws_path);
    ws
}

/// `n` clients at once, each over the first `len` bytes of the file.
fn concurrent(mem: &Path, dir: &Path, n: usize, len: u64, chunk: u64) -> (Duration, u64) {
    let sock = dir.join("conc.sock");
    let server = PageServer::start(
        mem,
        None,
        &sock,
        ServerConfig {
            chunk_bytes: chunk,
            adaptive_chunks: false,
            record: false,
            prefetch: false,
            ..Default::default()
        },
    )
    .unwrap();
    let barrier = std::sync::Barrier::new(n + 1);
    let t = std::thread::scope(|sc| {
        for i in 0..n {
            let (sock, barrier) = (&sock, &barrier);
            sc.spawn(move || {
                let g = Map::anon(len);
                let layout = Layout {
                    regions: vec![Region {
                        guest_addr: 0,
                        host_addr: g.addr,
                        len,
                        file_offset: 0,
                    }],
                };
                let c = Client::connect(sock, &layout, &ClientOptions::labelled(&format!("c{i}")))
                    .unwrap();
                barrier.wait();
                g.touch(&(0..len / PAGE).collect::<Vec<_>>(), false);
                barrier.wait();
                c.finish().unwrap();
            });
        }
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        t.elapsed()
    });
    let faults = server.stats().totals.faults;
    server.shutdown();
    (t, faults)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: u64 = std::env::var("UFFD_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let len = mib << 20;
    let pages = len / PAGE;
    let dir = std::env::temp_dir().join(format!("uffd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mem = dir.join("memory.bin");
    {
        let f = File::create(&mem).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for m in 0..mib {
            for (i, w) in buf.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&((m << 20) + i as u64 * 8 + 1).to_le_bytes());
            }
            f.write_all_at(&buf, m << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    // Page cache warm for every row.
    let warm = || {
        let mut f = File::open(&mem).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        while f.read(&mut buf).unwrap() > 0 {}
    };
    warm();

    let runs: usize = std::env::var("UFFD_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let file = File::open(&mem).unwrap();
    let t = Instant::now();
    drop(Map::private_file(&file, len));
    let setup = t.elapsed();
    let seq: Vec<u64> = (0..pages).collect();
    let scattered = scattered_pages(pages, pages / 20);
    let base = |chunk: u64| ServerConfig {
        chunk_bytes: chunk,
        adaptive_chunks: false,
        record: false,
        prefetch: false,
        ..Default::default()
    };
    let adaptive = ServerConfig {
        adaptive_chunks: true,
        ..base(256 << 10)
    };

    for (title, order) in [
        ("every page, in order", &seq),
        (
            "5% of the pages, scattered (an idle loop's working set)",
            &scattered,
        ),
    ] {
        let touched = order.len() as u64;
        let mut rows: Vec<Row> = Vec::new();
        let mut row =
            |name: String, f: &mut dyn FnMut() -> (Duration, Option<u64>, Option<u64>)| {
                let mut v: Vec<(Duration, Option<u64>, Option<u64>)> = (0..runs)
                    .map(|_| {
                        warm();
                        f()
                    })
                    .collect();
                v.sort_by_key(|x| x.0);
                let (d, faults, placed) = v[v.len() / 2];
                rows.push(Row {
                    name,
                    per_page_us: us_per_page(d, touched),
                    spread: (
                        us_per_page(v[0].0, touched),
                        us_per_page(v[v.len() - 1].0, touched),
                    ),
                    faults,
                    placed,
                });
            };
        for write in [false, true] {
            row(
                format!("MAP_PRIVATE first touch, {}", rw(write)),
                &mut || {
                    let m = Map::private_file(&file, len);
                    (m.touch(order, write), None, None)
                },
            );
        }
        row("anonymous first touch, write (no data)".into(), &mut || {
            let m = Map::anon(len);
            (m.touch(order, true), None, None)
        });
        for chunk in [4 << 10, 16 << 10, 64 << 10, 256 << 10] {
            row(
                format!("uffd server, chunk {:>3} KiB, read", chunk >> 10),
                &mut || {
                    let (d, f, p) = uffd_run(&mem, &dir, base(chunk), None, order, false);
                    (d, Some(f), Some(p))
                },
            );
        }
        row("uffd server, chunk  64 KiB, write".into(), &mut || {
            let (d, f, p) = uffd_run(&mem, &dir, base(64 << 10), None, order, true);
            (d, Some(f), Some(p))
        });
        row("uffd server, adaptive <=256 KiB, read".into(), &mut || {
            let (d, f, p) = uffd_run(&mem, &dir, adaptive.clone(), None, order, false);
            (d, Some(f), Some(p))
        });
        // A second restore: the working set the first one recorded is prefetched while the
        // toucher starts at once and races it.
        for (name, cfg) in [
            ("uffd server, 64 KiB + prefetch, read", base(64 << 10)),
            ("uffd server, adaptive + prefetch, read", adaptive.clone()),
        ] {
            let ws = record_working_set(&mem, &dir, cfg.clone(), order);
            row(name.into(), &mut || {
                let cfg = ServerConfig {
                    prefetch: true,
                    ..cfg.clone()
                };
                let (d, f, p) = uffd_run(&mem, &dir, cfg, Some(&ws), order, false);
                (d, Some(f), Some(p))
            });
        }

        let read_ref = rows[0].per_page_us;
        let write_ref = rows[1].per_page_us;
        println!();
        println!(
            "first touch of {title}: {touched} of the {pages} pages of a {mib} MiB memory file \
             (page cache warm, median of {runs} runs; MAP_PRIVATE set-up {:.2} ms)",
            setup.as_secs_f64() * 1e3
        );
        println!(
            "{:<40} {:>9} {:>15} {:>8} {:>9} {:>11} {:>12}",
            "how", "us/page", "(min-max)", "faults", "placed", "x MAP read", "x MAP write"
        );
        for r in &rows {
            let opt = |v: Option<u64>| v.map_or("-".to_string(), |f| f.to_string());
            println!(
                "{:<40} {:>9.2} {:>15} {:>8} {:>9} {:>11.1} {:>12.2}",
                r.name,
                r.per_page_us,
                format!("({:.2}-{:.2})", r.spread.0, r.spread.1),
                opt(r.faults),
                opt(r.placed),
                r.per_page_us / read_ref,
                r.per_page_us / write_ref
            );
        }
    }

    // One server thread per client: how the cost of a page holds up with clients at once.
    let clen = len.min(64 << 20);
    let cpages = clen / PAGE;
    println!();
    println!(
        "clients at once, each touching {} MiB (chunk 64 KiB): wall time per page over all clients",
        clen >> 20
    );
    println!(
        "{:<10} {:>10} {:>10} {:>14}",
        "clients", "us/page", "faults", "x 1 client"
    );
    let mut one = 0.0;
    for n in [1usize, 2, 4, 8] {
        warm();
        let (d, faults) = concurrent(&mem, &dir, n, clen, 64 << 10);
        let per = us_per_page(d, cpages * n as u64);
        if n == 1 {
            one = per;
        }
        println!("{:<10} {:>10.2} {:>10} {:>14.2}", n, per, faults, per / one);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
