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
    /// Touches every page once, in order; returns the time taken.
    fn touch_all(&self, write: bool) -> Duration {
        let t = Instant::now();
        let mut sum = 0u64;
        for p in 0..self.len / PAGE {
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
    faults: Option<u64>,
}

fn us_per_page(d: Duration, pages: u64) -> f64 {
    d.as_secs_f64() * 1e6 / pages as f64
}

/// One client over the whole file; touches every page (a thread per toucher), returns the time
/// and the faults the server served.
fn uffd_run(
    mem: &Path,
    dir: &Path,
    cfg: ServerConfig,
    ws: Option<&WorkingSet>,
    write: bool,
) -> (Duration, u64) {
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
    let d = g.touch_all(write);
    let faults = client
        .stats(Duration::from_secs(10))
        .unwrap()
        .counters
        .faults;
    client.finish().unwrap();
    server.shutdown();
    let _ = std::fs::remove_file(&ws_path);
    (d, faults)
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
                g.touch_all(false);
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
                w.copy_from_slice(&((m << 20) as u64 + i as u64 * 8 + 1).to_le_bytes());
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

    let mut rows = Vec::new();
    let file = File::open(&mem).unwrap();
    let t = Instant::now();
    let m = Map::private_file(&file, len);
    let setup = t.elapsed();
    let d = m.touch_all(false);
    drop(m);
    rows.push(Row {
        name: "MAP_PRIVATE first touch, read".into(),
        per_page_us: us_per_page(d, pages),
        faults: None,
    });
    let m = Map::private_file(&file, len);
    let d = m.touch_all(true);
    drop(m);
    rows.push(Row {
        name: "MAP_PRIVATE first touch, write".into(),
        per_page_us: us_per_page(d, pages),
        faults: None,
    });
    let m = Map::anon(len);
    let d = m.touch_all(true);
    drop(m);
    rows.push(Row {
        name: "anonymous first touch, write (no data)".into(),
        per_page_us: us_per_page(d, pages),
        faults: None,
    });
    let base = |chunk: u64| ServerConfig {
        chunk_bytes: chunk,
        record: false,
        prefetch: false,
        ..Default::default()
    };
    for chunk in [4 << 10, 16 << 10, 64 << 10, 256 << 10] {
        warm();
        let (d, faults) = uffd_run(&mem, &dir, base(chunk), None, false);
        rows.push(Row {
            name: format!("uffd server, chunk {:>3} KiB, read", chunk >> 10),
            per_page_us: us_per_page(d, pages),
            faults: Some(faults),
        });
    }
    warm();
    let (d, faults) = uffd_run(&mem, &dir, base(64 << 10), None, true);
    rows.push(Row {
        name: "uffd server, chunk  64 KiB, write".into(),
        per_page_us: us_per_page(d, pages),
        faults: Some(faults),
    });
    // Prefetch of a working set covering everything, recorded with 64 KiB chunks: the toucher
    // starts at once and races the prefetch.
    let ws = WorkingSet {
        memory_bytes: len,
        chunk_bytes: 64 << 10,
        pages: (0..pages as u32).step_by(16).collect(),
    };
    warm();
    let (d, faults) = uffd_run(
        &mem,
        &dir,
        ServerConfig {
            prefetch: true,
            ..base(64 << 10)
        },
        Some(&ws),
        false,
    );
    rows.push(Row {
        name: "uffd server, 64 KiB + prefetch of all".into(),
        per_page_us: us_per_page(d, pages),
        faults: Some(faults),
    });

    let read_ref = rows[0].per_page_us;
    let write_ref = rows[1].per_page_us;
    println!();
    println!(
        "first touch of a {mib} MiB memory file ({pages} pages, page cache warm); \
         MAP_PRIVATE mapping set-up {:.2} ms",
        setup.as_secs_f64() * 1e3
    );
    println!(
        "{:<42} {:>10} {:>10} {:>16} {:>17}",
        "how", "us/page", "faults", "x MAP_PRIV read", "x MAP_PRIV write"
    );
    for r in &rows {
        println!(
            "{:<42} {:>10.2} {:>10} {:>16.1} {:>17.1}",
            r.name,
            r.per_page_us,
            r.faults.map_or("-".to_string(), |f| f.to_string()),
            r.per_page_us / read_ref,
            r.per_page_us / write_ref
        );
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
