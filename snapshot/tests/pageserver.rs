//! The userfaultfd page server with a plain process as the "guest": anonymous memory registered
//! by a [`Client`], served from a generated memory file with a known pattern and holes.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::pageserver::protocol::{Hello, Message, MAX_FRAME};
use snapshot::pageserver::sys::Seqpacket;
use snapshot::pageserver::{
    create_uffd, AfterRemove, Client, ClientError, ClientOptions, GoneReason, Layout, PageServer,
    RefuseCode, Region, ServerConfig, WorkingSet,
};

const PAGE: u64 = 4096;

fn tmpdir(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "ps-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Whether file page `i` holds data: holes in runs and scattered, as a sparse capture makes.
fn is_data(i: u64) -> bool {
    !(i % 7 == 3 || (i / 64) % 5 == 2 || i % 1000 == 999)
}

/// The contents of data page `i`: every 8-byte word distinct across the file.
fn page_bytes(i: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(PAGE as usize);
    for w in 0..PAGE / 8 {
        v.extend_from_slice(&((i << 20) ^ (w * 0x9e37_79b9) ^ 0xa5a5_0000_0000_0001).to_le_bytes());
    }
    v
}

/// A sparse memory file of `pages` pages; returns its bytes.
fn make_memfile(path: &Path, pages: u64) -> Vec<u8> {
    let f = File::create(path).unwrap();
    f.set_len(pages * PAGE).unwrap();
    let mut all = vec![0u8; (pages * PAGE) as usize];
    for i in 0..pages {
        if is_data(i) {
            let b = page_bytes(i);
            f.write_all_at(&b, i * PAGE).unwrap();
            all[(i * PAGE) as usize..((i + 1) * PAGE) as usize].copy_from_slice(&b);
        }
    }
    // No fsync: freeing thousands of allocated extents makes deleting the file take seconds on
    // ext4; the page cache serves the same bytes and SEEK_DATA sees delayed allocations.
    all
}

/// Anonymous guest memory as the VMM maps it.
struct Guest {
    addr: u64,
    len: u64,
}

impl Guest {
    fn new(len: u64) -> Self {
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self {
            addr: p as u64,
            len,
        }
    }

    /// Reads page `i` (faulting it in).
    fn page(&self, i: u64) -> &[u8] {
        assert!(i * PAGE < self.len);
        // SAFETY: inside our mapping; the page server fills it on first touch.
        unsafe { std::slice::from_raw_parts((self.addr + i * PAGE) as *const u8, PAGE as usize) }
    }

    fn touch(&self, i: u64) -> u8 {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::read_volatile((self.addr + i * PAGE + 8) as *const u8) }
    }

    fn write(&self, i: u64, v: u8) {
        // SAFETY: inside our mapping.
        unsafe { std::ptr::write_volatile((self.addr + i * PAGE + 100) as *mut u8, v) }
    }

    /// Never unmapped: a thread may be blocked on a fault in it for the rest of the process.
    fn leak(self) {
        std::mem::forget(self);
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
    }
}

fn region(g: &Guest, guest_addr: u64, file_offset: u64) -> Region {
    Region {
        guest_addr,
        host_addr: g.addr,
        len: g.len,
        file_offset,
    }
}

/// Fixed chunks of `chunk` bytes.
fn config(chunk: u64) -> ServerConfig {
    ServerConfig {
        chunk_bytes: chunk,
        adaptive_chunks: false,
        ..Default::default()
    }
}

struct Setup {
    dir: PathBuf,
    mem: PathBuf,
    sock: PathBuf,
    bytes: Vec<u8>,
}

fn setup(tag: &str, pages: u64) -> Setup {
    let dir = tmpdir(tag);
    let mem = dir.join("memory.bin");
    let bytes = make_memfile(&mem, pages);
    Setup {
        sock: dir.join("ps.sock"),
        dir,
        mem,
        bytes,
    }
}

impl Setup {
    fn file_page(&self, fp: u64) -> &[u8] {
        &self.bytes[(fp * PAGE) as usize..((fp + 1) * PAGE) as usize]
    }
    fn ws_path(&self) -> PathBuf {
        self.dir.join("workingset.bin")
    }
    fn server(&self, cfg: ServerConfig) -> PageServer {
        PageServer::start(&self.mem, Some(self.ws_path()), &self.sock, cfg).unwrap()
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_page_reads_back_exactly_the_file_data_and_holes() {
    // Two regions like guest RAM around the MMIO gap: 10 MiB at 0, 6 MiB + 12 KiB at 4 GiB (a
    // length that is no multiple of any chunk).
    let pages_a = 2560;
    let pages_b = 1539;
    let s = setup("content", pages_a + pages_b);
    for (chunk, adaptive) in [
        (4096, false),
        (16 << 10, false),
        (64 << 10, false),
        (256 << 10, false),
        (256 << 10, true),
    ] {
        let server = s.server(ServerConfig {
            record: false,
            adaptive_chunks: adaptive,
            ..config(chunk)
        });
        let a = Guest::new(pages_a * PAGE);
        let b = Guest::new(pages_b * PAGE);
        let layout = Layout {
            regions: vec![region(&a, 0, 0), region(&b, 1 << 32, pages_a * PAGE)],
        };
        let client =
            Client::connect(&s.sock, &layout, &ClientOptions::labelled("content")).unwrap();
        assert_eq!(client.session().chunk_bytes, chunk);
        // Four threads touch every page in different orders, racing on the same chunks.
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let (a, b, s) = (&a, &b, &s);
                sc.spawn(move || {
                    let total = pages_a + pages_b;
                    for k in 0..total {
                        let fp = if t % 2 == 0 {
                            (k * 7 + t * 13) % total
                        } else {
                            total - 1 - k
                        };
                        let got = if fp < pages_a {
                            a.page(fp)
                        } else {
                            b.page(fp - pages_a)
                        };
                        assert!(
                            got == s.file_page(fp),
                            "chunk {chunk}: file page {fp} differs"
                        );
                    }
                });
            }
        });
        // A written hole keeps its write; a written data page too.
        let hole = (0..pages_a).find(|i| !is_data(*i)).unwrap();
        a.write(hole, 0x5a);
        a.write(0, 0x5b);
        assert_eq!(a.page(hole)[100], 0x5a);
        assert_eq!(a.page(0)[100], 0x5b);

        let st = client.stats(Duration::from_secs(5)).unwrap();
        let data = (0..pages_a + pages_b).filter(|i| is_data(*i)).count() as u64;
        assert_eq!(st.counters.pages_copied, data, "chunk {chunk}: {st:?}");
        assert_eq!(
            st.counters.zero_pages,
            pages_a + pages_b - data,
            "chunk {chunk}"
        );
        assert!(st.counters.faults >= (pages_a + pages_b) * PAGE / chunk / 2);
        assert_eq!(st.counters.prefetched_pages, 0);
        client.finish().unwrap();
        wait_until("session end", Duration::from_secs(5), || {
            server.stats().clients_active == 0
        });
        let totals = server.stats().totals;
        assert_eq!(totals.pages_copied + totals.zero_pages, pages_a + pages_b);
        server.shutdown();
    }
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// File pages that fault, in order, for a touch sequence over one region of `pages` pages at
/// file page `base`, served in aligned chunks of `chunk` pages or adaptively up to `chunk`.
fn first_faults(seq: &[u64], chunk: u64, adaptive: bool, base: u64, pages: u64) -> Vec<u32> {
    let mut populated = std::collections::HashSet::new();
    let mut streams = snapshot::pageserver::Streams::new(chunk);
    let mut out = Vec::new();
    for &p in seq {
        if populated.contains(&p) {
            continue;
        }
        out.push((base + p) as u32);
        let (start, end) = if adaptive {
            (p, (p + streams.window(base + p)).min(pages))
        } else {
            (p - p % chunk, (p - p % chunk + chunk).min(pages))
        };
        populated.extend(start..end);
    }
    out
}

fn touch_sequence(pages: u64) -> Vec<u64> {
    // A known order: scattered pages (data and holes), some touched again.
    let mut seq = Vec::new();
    let mut x = 12345u64;
    for _ in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seq.push((x >> 33) % pages);
    }
    seq.extend_from_slice(&[5, 6, 7, 5, 0, pages - 1, 6]);
    // A sequential stretch, as a guest walking a buffer makes.
    seq.extend(1000..1200);
    seq
}

#[test]
fn recorded_working_set_is_exactly_the_touched_pages() {
    // The region starts 1 MiB into the file, so file pages differ from region pages.
    let base = 256;
    let pages = 2048;
    for (chunk_pages, adaptive, tag) in [
        (1u64, false, "ws1"),
        (16, false, "ws16"),
        (64, true, "wsad"),
    ] {
        let s = setup(tag, base + pages);
        let server = s.server(ServerConfig {
            record_for: None,
            adaptive_chunks: adaptive,
            ..config(chunk_pages * PAGE)
        });
        let g = Guest::new(pages * PAGE);
        let layout = Layout {
            regions: vec![region(&g, 0, base * PAGE)],
        };
        let client = Client::connect(&s.sock, &layout, &ClientOptions::default()).unwrap();
        assert!(client.session().recording);
        let seq = touch_sequence(pages);
        for &p in &seq {
            assert!(g.page(p) == s.file_page(base + p));
        }
        client.finish().unwrap();
        wait_until("working set written", Duration::from_secs(5), || {
            server.stats().working_set.written.is_some()
        });
        let ws = WorkingSet::load(&s.ws_path(), (base + pages) * PAGE)
            .unwrap()
            .unwrap();
        let expected = first_faults(&seq, chunk_pages, adaptive, base, pages);
        assert_eq!(ws.pages, expected, "chunk of {chunk_pages} pages");
        assert_eq!(ws.chunk_bytes, chunk_pages * PAGE);
        assert_eq!(ws.adaptive, adaptive);
        if chunk_pages == 1 {
            // Page granularity: the set is exactly the distinct touched pages, in order.
            let mut seen = std::collections::HashSet::new();
            let distinct: Vec<u32> = seq
                .iter()
                .filter(|p| seen.insert(**p))
                .map(|p| (base + p) as u32)
                .collect();
            assert_eq!(ws.pages, distinct);
        }
        server.shutdown();
        std::fs::remove_dir_all(&s.dir).unwrap();
    }
}

#[test]
fn working_set_is_written_after_the_configured_time_while_the_client_runs() {
    let s = setup("wstime", 512);
    let server = s.server(ServerConfig {
        record_for: Some(Duration::from_millis(200)),
        ..config(PAGE)
    });
    // A VMM that leaves without touching anything records nothing and leaves the recording to
    // the next one.
    {
        let g = Guest::new(512 * PAGE);
        let layout = Layout {
            regions: vec![region(&g, 0, 0)],
        };
        let c = Client::connect(&s.sock, &layout, &ClientOptions::default()).unwrap();
        assert!(c.session().recording);
        c.finish().unwrap();
        wait_until("first session ends", Duration::from_secs(5), || {
            server.stats().clients_active == 0
        });
        assert_eq!(server.stats().working_set.written, None);
    }
    let g = Guest::new(512 * PAGE);
    let client = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    assert!(client.session().recording);
    for p in [9, 3, 400] {
        g.touch(p);
    }
    wait_until("timed write", Duration::from_secs(5), || {
        server.stats().working_set.written.is_some()
    });
    let ws = WorkingSet::load(&s.ws_path(), 512 * PAGE).unwrap().unwrap();
    assert_eq!(ws.pages, vec![9, 3, 400]);
    // Touches after the write are not recorded any more.
    g.touch(100);
    assert_eq!(server.stats().working_set.written, Some(3));
    client.finish().unwrap();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn a_later_client_gets_the_working_set_prefetched_without_faulting() {
    let pages = 4096;
    let s = setup("prefetch", pages);
    // Record with a first client.
    let server = s.server(ServerConfig {
        record_for: None,
        ..config(PAGE)
    });
    let seq: Vec<u64> = touch_sequence(pages);
    {
        let g = Guest::new(pages * PAGE);
        let c = Client::connect(
            &s.sock,
            &Layout {
                regions: vec![region(&g, 0, 0)],
            },
            &ClientOptions::default(),
        )
        .unwrap();
        for &p in &seq {
            g.touch(p);
        }
        c.finish().unwrap();
    }
    wait_until("working set written", Duration::from_secs(5), || {
        server.stats().working_set.written.is_some()
    });
    let n = server.stats().working_set.written.unwrap() as u64;
    // The same server prefetches it into the next client...
    let check = || {
        let g = Guest::new(pages * PAGE);
        let c = Client::connect(
            &s.sock,
            &Layout {
                regions: vec![region(&g, 0, 0)],
            },
            &ClientOptions::default(),
        )
        .unwrap();
        assert_eq!(c.session().prefetch_pages, n);
        assert!(!c.session().recording);
        wait_until("prefetch", Duration::from_secs(10), || {
            c.stats(Duration::from_secs(5)).unwrap().prefetch_done
        });
        for &p in &seq {
            assert!(g.page(p) == s.file_page(p));
        }
        let st = c.stats(Duration::from_secs(5)).unwrap();
        assert_eq!(st.counters.faults, 0, "{st:?}");
        assert_eq!(st.counters.prefetched_pages, n);
        assert_eq!(st.prefetch_total, n);
        // A page outside the set still faults and is served.
        let outside = (0..pages).find(|p| !seq.contains(p)).unwrap();
        assert!(g.page(outside) == s.file_page(outside));
        assert_eq!(c.stats(Duration::from_secs(5)).unwrap().counters.faults, 1);
        c.finish().unwrap();
    };
    check();
    server.shutdown();
    // ...and so does a new server for the same snapshot, from the file.
    let server = s.server(config(PAGE));
    assert_eq!(server.stats().working_set.loaded, Some(n as usize));
    check();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn faults_are_served_before_the_prefetch_finishes() {
    // A working set of every page of 64 MiB, prefetched in small steps; the client touches the
    // last page of the set at once: served long before prefetch gets there.
    let pages = 16384u64;
    let s = setup("priority", pages);
    WorkingSet {
        memory_bytes: pages * PAGE,
        chunk_bytes: PAGE,
        adaptive: false,
        pages: (0..pages as u32).collect(),
    }
    .write_atomic(&s.ws_path())
    .unwrap();
    let server = s.server(ServerConfig {
        prefetch_step_bytes: 16 * PAGE,
        ..config(PAGE)
    });
    let g = Guest::new(pages * PAGE);
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    let last = pages - 1;
    let t = Instant::now();
    assert!(g.page(last) == s.file_page(last));
    let first_touch = t.elapsed();
    let st = c.stats(Duration::from_secs(5)).unwrap();
    assert!(
        !st.prefetch_done,
        "prefetch finished before the fault was served"
    );
    assert_eq!(st.counters.faults, 1);
    wait_until("prefetch", Duration::from_secs(60), || {
        c.stats(Duration::from_secs(5)).unwrap().prefetch_done
    });
    let all = t.elapsed();
    let st = c.stats(Duration::from_secs(5)).unwrap();
    assert_eq!(st.counters.prefetched_pages, pages - 1);
    assert!(
        first_touch < all / 4,
        "fault {first_touch:?}, whole prefetch {all:?}"
    );
    for p in (0..pages).step_by(97) {
        assert!(g.page(p) == s.file_page(p));
    }
    assert_eq!(c.stats(Duration::from_secs(5)).unwrap().counters.faults, 1);
    c.finish().unwrap();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn removed_pages_are_served_again_and_unmap_does_not_crash() {
    for after in [AfterRemove::Zero, AfterRemove::Reload] {
        let pages = 1024;
        let s = setup("remove", pages);
        let server = s.server(ServerConfig {
            after_remove: after,
            record: false,
            ..config(64 << 10)
        });
        let g = Guest::new(pages * PAGE);
        let opts = ClientOptions {
            remove_events: true,
            unmap_events: true,
            ..Default::default()
        };
        let c = Client::connect(
            &s.sock,
            &Layout {
                regions: vec![region(&g, 0, 0)],
            },
            &opts,
        )
        .unwrap();
        assert!(c.features().remove_events() && c.features().unmap_events());
        for p in 0..pages {
            assert!(g.page(p) == s.file_page(p));
        }
        // A balloon gives back pages 100..300.
        // SAFETY: part of our mapping.
        let r = unsafe {
            libc::madvise(
                (g.addr + 100 * PAGE) as *mut libc::c_void,
                (200 * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert_eq!(r, 0);
        for p in 100..300 {
            match after {
                AfterRemove::Zero => assert!(g.page(p).iter().all(|b| *b == 0), "page {p}"),
                AfterRemove::Reload => assert!(g.page(p) == s.file_page(p), "page {p}"),
            }
        }
        let st = c.stats(Duration::from_secs(5)).unwrap();
        assert_eq!(st.counters.removed_pages, 200);
        assert!(st.counters.faults > 0);
        // Unmapping the tail: the server takes the event and goes on serving.
        // SAFETY: the last 128 pages of our mapping, never used again.
        let r = unsafe {
            libc::munmap(
                (g.addr + (pages - 128) * PAGE) as *mut libc::c_void,
                (128 * PAGE) as usize,
            )
        };
        assert_eq!(r, 0);
        assert_eq!(
            c.stats(Duration::from_secs(5))
                .unwrap()
                .counters
                .removed_pages,
            328
        );
        // SAFETY: DONTNEED again, then touch: served again.
        unsafe {
            libc::madvise(
                g.addr as *mut libc::c_void,
                (50 * PAGE) as usize,
                libc::MADV_DONTNEED,
            )
        };
        assert!(g.page(60) == s.file_page(60));
        let _ = g.touch(10);
        assert!(c.watchdog().gone().is_none());
        c.finish().unwrap();
        server.shutdown();
        std::fs::remove_dir_all(&s.dir).unwrap();
    }
}

#[test]
fn a_stale_populated_bit_never_hangs_a_fault() {
    // Without remove events the server cannot know pages went away: it must still serve them.
    let pages = 256;
    let s = setup("stale", pages);
    let server = s.server(ServerConfig {
        record: false,
        ..config(64 << 10)
    });
    let g = Guest::new(pages * PAGE);
    let opts = ClientOptions {
        remove_events: false,
        ..Default::default()
    };
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &opts,
    )
    .unwrap();
    for p in 0..pages {
        g.touch(p);
    }
    // SAFETY: part of our mapping.
    unsafe {
        libc::madvise(
            g.addr as *mut libc::c_void,
            (pages * PAGE) as usize,
            libc::MADV_DONTNEED,
        )
    };
    for p in 0..pages {
        assert!(g.page(p) == s.file_page(p), "page {p}");
    }
    c.finish().unwrap();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn many_clients_at_once_each_get_the_file() {
    let pages = 4096;
    let s = setup("many", pages);
    let server = s.server(ServerConfig {
        record: false,
        ..config(64 << 10)
    });
    std::thread::scope(|sc| {
        for i in 0..8 {
            let s = &s;
            sc.spawn(move || {
                let g = Guest::new(pages * PAGE);
                let c = Client::connect(
                    &s.sock,
                    &Layout {
                        regions: vec![region(&g, 0, 0)],
                    },
                    &ClientOptions::labelled(&format!("vm-{i}")),
                )
                .unwrap();
                for p in 0..pages {
                    let p = (p * 31 + i) % pages;
                    assert!(g.page(p) == s.file_page(p));
                }
                // Each has its own memory.
                g.write(1, i as u8);
                assert_eq!(g.page(1)[100], i as u8);
                c.finish().unwrap();
            });
        }
    });
    let st = server.stats();
    assert_eq!(st.clients_total, 8);
    assert_eq!(st.totals.pages_copied + st.totals.zero_pages, 8 * pages);
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn memory_touched_before_registration_is_refused() {
    let s = setup("populated", 64);
    let server = s.server(config(PAGE));
    let g = Guest::new(64 * PAGE);
    g.write(5, 1);
    let e = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap_err();
    match e {
        ClientError::Populated { addr } => assert_eq!(addr, g.addr + 5 * PAGE),
        e => panic!("{e}"),
    }
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn server_shutdown_is_reported_by_the_watchdog() {
    let s = setup("shutdown", 64);
    let server = s.server(config(PAGE));
    let g = Guest::new(64 * PAGE);
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    g.touch(0);
    let called = Arc::new(AtomicBool::new(false));
    let cl = called.clone();
    c.watchdog()
        .on_gone(move |_| cl.store(true, Ordering::SeqCst));
    server.shutdown();
    let gone = c
        .watchdog()
        .wait(Some(Duration::from_secs(5)))
        .expect("watchdog fired");
    assert_eq!(gone.reason, GoneReason::Closed);
    // Callbacks run on the watchdog thread, right after waiters are woken.
    wait_until("callback", Duration::from_secs(5), || {
        called.load(Ordering::SeqCst)
    });
    let msg = gone.to_string();
    assert!(
        msg.contains("page server") && msg.contains("must stop"),
        "{msg}"
    );
    // The eventfd is readable, and a callback added now runs at once.
    let r = snapshot::pageserver::sys::poll_in(&[c.watchdog().eventfd()], 0).unwrap();
    assert!(r[0].readable);
    let late = Arc::new(AtomicBool::new(false));
    let l = late.clone();
    c.watchdog()
        .on_gone(move |_| l.store(true, Ordering::SeqCst));
    assert!(late.load(Ordering::SeqCst));
    assert!(matches!(
        c.stats(Duration::from_secs(1)),
        Err(ClientError::Gone(_))
    ));
    assert!(matches!(c.finish(), Err(ClientError::Gone(_))));
    // The memory stays registered with the uffd held open: leave it mapped.
    g.leak();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

const CHILD_ENV: &str = "PAGESERVER_TEST_CHILD";

/// Not a test on its own: the body of the child process that runs a server to be killed.
#[test]
fn child_server_process() {
    let Ok(args) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mem, sock) = args.split_once('|').unwrap();
    let _server = PageServer::start(
        Path::new(mem),
        None,
        Path::new(sock),
        ServerConfig {
            chunk_bytes: PAGE,
            ..Default::default()
        },
    )
    .unwrap();
    println!("ready");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// A page server in a child process (this test binary, re-run as `child_server_process`).
fn spawn_child_server(s: &Setup) -> std::process::Child {
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_server_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}", s.mem.display(), s.sock.display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("ready") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "child server exited");
    }
    child
}

#[test]
fn killing_the_server_mid_restore_is_reported_not_hung() {
    let pages = 4096;
    let s = setup("kill", pages);
    let mut child = spawn_child_server(&s);
    let g = Guest::new(pages * PAGE);
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    // A toucher works through guest memory, one page per fault, while the server is killed.
    let progress = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicBool::new(false));
    {
        let (progress, bad) = (progress.clone(), bad.clone());
        let (addr, expect) = (g.addr, s.bytes.clone());
        std::thread::spawn(move || {
            for p in 0..pages {
                // SAFETY: inside the leaked guest mapping.
                let got = unsafe {
                    std::slice::from_raw_parts((addr + p * PAGE) as *const u8, PAGE as usize)
                };
                if got != &expect[(p * PAGE) as usize..((p + 1) * PAGE) as usize] {
                    bad.store(true, Ordering::SeqCst);
                }
                progress.store(p + 1, Ordering::SeqCst);
            }
        });
    }
    wait_until("some pages served", Duration::from_secs(10), || {
        progress.load(Ordering::SeqCst) >= 50
    });
    child.kill().unwrap();
    let killed = Instant::now();
    child.wait().unwrap();
    let gone = c.watchdog().wait(Some(Duration::from_secs(5)));
    let gone = gone.expect("the watchdog did not report the dead server within 5 s");
    assert!(killed.elapsed() < Duration::from_secs(5));
    assert_eq!(gone.reason, GoneReason::Closed);
    // The toucher is stuck on a page that never came, and was never handed zeros.
    let at = progress.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(progress.load(Ordering::SeqCst), at);
    assert!(at < pages, "all pages were served before the kill");
    assert!(!bad.load(Ordering::SeqCst), "a page read back wrong");
    // The toucher stays blocked until this process exits: keep its memory and uffd.
    drop(c);
    g.leak();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// Sends a raw handshake frame with `fds` attached; returns the server's answer.
fn raw_handshake(
    sock: &Path,
    frame: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Option<Message> {
    let conn = Seqpacket::connect(sock).unwrap();
    let _ = conn.send(frame, fds);
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let got = conn.recv(&mut buf).ok()??;
    Message::decode(&buf[..got.len]).ok()
}

fn refused(m: Option<Message>) -> RefuseCode {
    match m {
        Some(Message::Refuse { code, .. }) => code,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn hostile_handshakes_are_refused_and_the_server_carries_on() {
    let pages = 256;
    let s = setup("hostile", pages);
    let server = s.server(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..config(PAGE)
    });
    let g = Guest::new(pages * PAGE);
    let (uffd, _) = create_uffd(0).unwrap();
    let good = Layout {
        regions: vec![region(&g, 0, 0)],
    };
    let hello = |layout: Layout| {
        Message::Hello(Hello {
            page_size: 4096,
            features: 0,
            label: "hostile".into(),
            layout,
        })
        .encode()
    };
    let fd = [uffd.as_fd()];

    // Bad version (CRC fixed up).
    let mut f = hello(good.clone());
    f[4] = 9;
    let n = f.len() - 4;
    let crc = crc32fast::hash(&f[..n]);
    f[n..].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(
        refused(raw_handshake(&s.sock, &f, &fd)),
        RefuseCode::UnsupportedVersion
    );
    // Oversized layout: more regions than allowed, and a frame larger than any valid one.
    let many = Layout {
        regions: (0..65)
            .map(|i| Region {
                guest_addr: i << 32,
                host_addr: 0x1000_0000 + (i << 24),
                len: PAGE,
                file_offset: i * PAGE,
            })
            .collect(),
    };
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(many), &fd)),
        RefuseCode::TooLarge
    );
    assert_eq!(
        refused(raw_handshake(&s.sock, &vec![0x41u8; 100_000], &fd)),
        RefuseCode::TooLarge
    );
    // Overlapping regions.
    let overlap = Layout {
        regions: vec![
            region(&g, 0, 0),
            Region {
                guest_addr: 1 << 32,
                host_addr: g.addr + PAGE,
                len: PAGE,
                file_offset: 128 * PAGE,
            },
        ],
    };
    let mut overlap_file = good.clone();
    overlap_file.regions.push(Region {
        guest_addr: 1 << 32,
        host_addr: g.addr + (1 << 30),
        len: PAGE,
        file_offset: 0,
    });
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(overlap), &fd)),
        RefuseCode::BadLayout
    );
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(overlap_file), &fd)),
        RefuseCode::BadLayout
    );
    // A region reaching past the memory file.
    let outside = Layout {
        regions: vec![Region {
            file_offset: PAGE,
            ..region(&g, 0, 0)
        }],
    };
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(outside), &fd)),
        RefuseCode::OutsideFile
    );
    // Unaligned, empty.
    let unaligned = Layout {
        regions: vec![Region {
            len: 100,
            ..region(&g, 0, 0)
        }],
    };
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(unaligned), &fd)),
        RefuseCode::BadLayout
    );
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(Layout::default()), &fd)),
        RefuseCode::BadLayout
    );
    // No descriptor, two, or one that is not a userfaultfd.
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(good.clone()), &[])),
        RefuseCode::NotUserfaultfd
    );
    assert_eq!(
        refused(raw_handshake(
            &s.sock,
            &hello(good.clone()),
            &[uffd.as_fd(), uffd.as_fd()]
        )),
        RefuseCode::NotUserfaultfd
    );
    let devnull = File::open("/dev/null").unwrap();
    assert_eq!(
        refused(raw_handshake(
            &s.sock,
            &hello(good.clone()),
            &[devnull.as_fd()]
        )),
        RefuseCode::NotUserfaultfd
    );
    // Garbage, a flipped byte, the wrong message.
    assert_eq!(
        refused(raw_handshake(&s.sock, b"GET / HTTP/1.0\r\n\r\n", &fd)),
        RefuseCode::Malformed
    );
    let mut flipped = hello(good.clone());
    flipped[20] ^= 1;
    assert_eq!(
        refused(raw_handshake(&s.sock, &flipped, &fd)),
        RefuseCode::Malformed
    );
    assert_eq!(
        refused(raw_handshake(&s.sock, &Message::Bye.encode(), &fd)),
        RefuseCode::Unexpected
    );
    // Fork events cannot be followed.
    let h = Hello {
        page_size: 4096,
        features: 1 << 1,
        label: String::new(),
        layout: good.clone(),
    };
    assert_eq!(
        refused(raw_handshake(&s.sock, &Message::Hello(h).encode(), &fd)),
        RefuseCode::Unsupported
    );
    // A userfaultfd that never had UFFDIO_API.
    let raw = snapshot::pageserver::sys::new_uffd().unwrap();
    assert_eq!(
        refused(raw_handshake(&s.sock, &hello(good.clone()), &[raw.as_fd()])),
        RefuseCode::NotUserfaultfd
    );
    // Accepted, then garbage: the server ends that session, saying why.
    let g2 = Guest::new(4 * PAGE);
    let (uffd2, _) = create_uffd(0).unwrap();
    snapshot::pageserver::sys::register(uffd2.as_fd(), g2.addr, g2.len, 1).unwrap();
    let conn = Seqpacket::connect(&s.sock).unwrap();
    conn.send(
        &hello(Layout {
            regions: vec![region(&g2, 0, 0)],
        }),
        &[uffd2.as_fd()],
    )
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = vec![0u8; MAX_FRAME + 1];
    let got = conn.recv(&mut buf).unwrap().unwrap();
    assert!(matches!(
        Message::decode(&buf[..got.len]),
        Ok(Message::Accept(_))
    ));
    conn.send(b"garbage", &[]).unwrap();
    let got = conn.recv(&mut buf).unwrap().unwrap();
    match Message::decode(&buf[..got.len]) {
        Ok(Message::Fatal(r)) => assert!(r.contains("bad message"), "{r}"),
        other => panic!("{other:?}"),
    }
    assert!(conn.recv(&mut buf).unwrap().is_none());
    // Silence: the server hangs up after its handshake timeout.
    let silent = Seqpacket::connect(&s.sock).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(silent.recv(&mut buf).unwrap().is_none());

    assert!(server.stats().refused >= 17);
    assert_eq!(server.stats().clients_total, 1);
    // Still serving.
    let c = Client::connect(&s.sock, &good, &ClientOptions::default()).unwrap();
    for p in 0..pages {
        assert!(g.page(p) == s.file_page(p));
    }
    c.finish().unwrap();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn a_second_server_on_a_live_socket_is_refused_and_a_stale_one_replaced() {
    let s = setup("sockets", 16);
    let server = s.server(config(PAGE));
    assert!(matches!(
        PageServer::start(&s.mem, None, &s.sock, config(PAGE)),
        Err(snapshot::pageserver::ServerError::InUse(_))
    ));
    drop(server);
    // A socket file left by a dead server.
    let stale = Seqpacket::listen(&s.sock).unwrap();
    drop(stale);
    let server = s.server(config(PAGE));
    server.shutdown();
    assert!(!s.sock.exists());
    assert!(PageServer::start(&s.mem, None, &s.sock, config(3 * PAGE)).is_err());
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn a_stopped_server_is_reported_by_the_heartbeat() {
    let pages = 64;
    let s = setup("heartbeat", pages);
    let mut child = spawn_child_server(&s);
    let g = Guest::new(pages * PAGE);
    let opts = ClientOptions {
        heartbeat: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &opts,
    )
    .unwrap();
    assert!(g.page(3) == s.file_page(3));
    // A healthy server answers every heartbeat.
    assert!(c
        .watchdog()
        .wait(Some(Duration::from_millis(800)))
        .is_none());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    let stopped = Instant::now();
    let gone = c
        .watchdog()
        .wait(Some(Duration::from_secs(5)))
        .expect("heartbeat fired");
    assert!(stopped.elapsed() < Duration::from_secs(2));
    assert_eq!(
        gone.reason,
        GoneReason::Unresponsive(Duration::from_millis(100))
    );
    assert!(gone.to_string().contains("heartbeat"), "{gone}");
    child.kill().unwrap();
    child.wait().unwrap();
    drop(c);
    g.leak();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// Lazy memory: units of a known file handed out one at a time, each fetch recorded; a unit
/// listed in `fail` cannot be fetched.
struct Units {
    bytes: Vec<u8>,
    unit: u64,
    fetched: std::sync::Mutex<Vec<u64>>,
    fail: Option<u64>,
}

impl snapshot::pageserver::UnitSource for Units {
    fn unit_bytes(&self) -> u64 {
        self.unit
    }
    fn has_data(&self, unit: u64) -> bool {
        let from = (unit * self.unit) as usize;
        let to = (from + self.unit as usize).min(self.bytes.len());
        from < to && self.bytes[from..to].iter().any(|b| *b != 0)
    }
    fn fetch(&self, unit: u64, len: u64) -> Result<Vec<u8>, String> {
        self.fetched.lock().unwrap().push(unit);
        if self.fail == Some(unit) {
            return Err(format!("unit {unit} is gone (test)"));
        }
        let from = (unit * self.unit) as usize;
        Ok(self.bytes[from..from + len as usize].to_vec())
    }
}

const UNIT: u64 = 16 * PAGE;

/// A server of a sparse file of `s`'s size, filled from `s`'s bytes by a [`Units`].
fn lazy_server(s: &Setup, fail: Option<u64>, ws: Option<PathBuf>) -> (PageServer, Arc<Units>) {
    let sparse = s.dir.join("lazy.bin");
    let f = File::create(&sparse).unwrap();
    f.set_len(s.bytes.len() as u64).unwrap();
    let units = Arc::new(Units {
        bytes: s.bytes.clone(),
        unit: UNIT,
        fetched: std::sync::Mutex::new(Vec::new()),
        fail,
    });
    let server = PageServer::start_lazy(
        &sparse,
        units.clone(),
        ws,
        &s.sock,
        ServerConfig {
            record: false,
            ..config(PAGE)
        },
    )
    .unwrap();
    (server, units)
}

#[test]
fn lazy_memory_is_fetched_unit_by_unit_on_first_touch() {
    let pages = 2048;
    let s = setup("lazy", pages);
    let (server, units) = lazy_server(&s, None, None);
    let g = Guest::new(pages * PAGE);
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    // Pages 128..192 are holes (see is_data): units 8 to 11 hold no data, never fetched.
    assert!((128..192).all(|p| !is_data(p)));
    for p in [17, 18, 31, 80, 81, 130, 140, 200, 1000, 1001] {
        assert!(g.page(p) == s.file_page(p), "page {p} differs");
    }
    let mut got = units.fetched.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, vec![1, 5, 12, 62], "each touched unit with data, once");
    let lazy = server.stats().lazy.expect("lazy statistics");
    assert_eq!(lazy.units_fetched, 4);
    assert_eq!(lazy.units, pages * PAGE / UNIT);
    assert_eq!(lazy.failures, 0);
    // Every page of the memory reads back exactly, from four threads racing on the units.
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            let (g, s) = (&g, &s);
            sc.spawn(move || {
                for k in 0..pages {
                    let p = (k * 7 + t * 13) % pages;
                    assert!(g.page(p) == s.file_page(p), "page {p} differs");
                }
            });
        }
    });
    let n = units.fetched.lock().unwrap().len() as u64;
    assert_eq!(n, server.stats().lazy.unwrap().units_with_data);
    c.finish().unwrap();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn a_unit_that_cannot_be_fetched_stops_the_vm_naming_it_never_zeros() {
    let pages = 256;
    let s = setup("lazyfail", pages);
    let (server, units) = lazy_server(&s, Some(2), None);
    let g = Guest::new(pages * PAGE);
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    assert!(g.page(1) == s.file_page(1));
    let returned = Arc::new(AtomicBool::new(false));
    let (r, addr) = (returned.clone(), g.addr);
    std::thread::spawn(move || {
        // SAFETY: a page of the guest mapping, which is never unmapped (leaked below).
        let v = unsafe { std::ptr::read_volatile((addr + 2 * UNIT + 8) as *const u64) };
        r.store(true, Ordering::SeqCst);
        v
    });
    let gone = c
        .watchdog()
        .wait(Some(Duration::from_secs(10)))
        .expect("the server gave the VM up");
    match &gone.reason {
        GoneReason::Fatal(m) => assert!(m.contains("unit 2 is gone"), "{m}"),
        other => panic!("{other:?}"),
    }
    // The faulting thread got nothing: no zeros, no stale bytes.
    std::thread::sleep(Duration::from_millis(200));
    assert!(!returned.load(Ordering::SeqCst), "a fault was answered");
    let lazy = server.stats().lazy.unwrap();
    assert!(lazy.failures >= 1, "{lazy:?}");
    assert!(lazy.last_error.unwrap().contains("unit 2"));
    assert!(units.fetched.lock().unwrap().contains(&2));
    // The memory stays registered with the uffd held open: leave it mapped.
    std::mem::forget(c);
    g.leak();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn a_working_set_has_its_units_fetched_ahead_in_the_background() {
    let pages = 1024;
    let s = setup("lazyahead", pages);
    // Pages of units 7, 2, 7 again and 12, in first-touch order.
    let ws_pages = vec![7 * 16 + 1, 2 * 16, 7 * 16 + 5, 12 * 16 + 3];
    assert!(ws_pages.iter().all(|p| is_data(u64::from(*p))));
    WorkingSet {
        memory_bytes: pages * PAGE,
        chunk_bytes: PAGE,
        adaptive: false,
        pages: ws_pages.clone(),
    }
    .write_atomic(&s.ws_path())
    .unwrap();
    let (server, units) = lazy_server(&s, None, Some(s.ws_path()));
    // Before any VM connects.
    wait_until("readahead", Duration::from_secs(10), || {
        server.stats().lazy.unwrap().readahead_done == 3
    });
    let mut got = units.fetched.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, vec![2, 7, 12]);
    // A VM then gets the set prefetched and faults on none of it; nothing is fetched twice.
    let g = Guest::new(pages * PAGE);
    let c = Client::connect(
        &s.sock,
        &Layout {
            regions: vec![region(&g, 0, 0)],
        },
        &ClientOptions::default(),
    )
    .unwrap();
    wait_until("prefetch", Duration::from_secs(10), || {
        c.stats(Duration::from_secs(5)).unwrap().prefetch_done
    });
    for p in &ws_pages {
        assert!(g.page(u64::from(*p)) == s.file_page(u64::from(*p)));
    }
    let st = c.stats(Duration::from_secs(5)).unwrap();
    assert_eq!(st.counters.faults, 0, "{st:?} {:?}", server.stats());
    assert_eq!(units.fetched.lock().unwrap().len(), 3);
    c.finish().unwrap();
    server.shutdown();
    std::fs::remove_dir_all(&s.dir).unwrap();
}
