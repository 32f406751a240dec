//! The cost of the host-side secret scan (`snapshot::residue`) on a capture: a 1 GiB guest with
//! 10% and 50% of its pages touched, captured with and without the scan, side by side in one
//! run. Prints one table; asserts nothing on time.
//!
//! The memory file is scanned from the writer's chunks in a thread beside it, so the figure that
//! counts is the capture's overhead (with scan / without - 1); the scan's own time (its thread's
//! busy time plus the other files) is shown too, as a share of the capture without it.
//!
//!   cargo bench -p snapshot --bench secrets
//!
//! MICROAGENT_BENCH_SECRETS_MIB changes the guest size, MICROAGENT_BENCH_RUNS the runs per row.

use std::time::{Duration, Instant};

use snapshot::residue::{Scanner, SecretValue};
use snapshot::{capture, CaptureRequest, CpuidLeaf, SavedVm, SecretCheck, Snapshottable};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Guest memory as a VMM holds it (mmap regions with a bitmap for device writes).
type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

struct FakeVm(GuestMemory);

impl Snapshottable for FakeVm {
    type State = Vec<u8>;
    type Error = std::io::Error;
    type Memory = GuestMemory;
    fn save(&self) -> Result<SavedVm<Vec<u8>>, std::io::Error> {
        Ok(SavedVm {
            state: vec![7; 4096],
            vcpus: 1,
            mem_mib: self
                .0
                .iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>()
                >> 20,
            cpuid: Vec::<CpuidLeaf>::new(),
        })
    }
    fn guest_memory(&self) -> &GuestMemory {
        &self.0
    }
    fn take_dirty(&self) -> Result<Option<Vec<Vec<u64>>>, std::io::Error> {
        Ok(None)
    }
    fn requeue_dirty(&self, _: Vec<Vec<u64>>) {}
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A guest that touched `percent` of its pages, spread over all of RAM: half of them text-like
/// (ASCII, which gives a scanner's prefilter the most candidates), half random bytes. One page
/// holds a secret, so every scan must find it.
fn guest(mib: u64, percent: u64, secret: &[u8]) -> GuestMemory {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap();
    let pages = (mib << 20) / 4096;
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut page = vec![0u8; 4096];
    const WORDS: &[u8] =
        b"the quick brown fox jumps over the lazy dog export PATH=/usr/bin token=\n";
    for p in 0..pages {
        // Exactly `percent` of every hundred pages, evenly spread.
        if (p * percent) / 100 == ((p + 1) * percent) / 100 {
            continue;
        }
        for (i, chunk) in page.chunks_mut(8).enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if p % 2 == 0 {
                chunk.copy_from_slice(&x.to_le_bytes());
            } else {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = WORDS[(i * 8 + j + (x as usize & 7)) % WORDS.len()];
                }
            }
        }
        mem.write_slice(&page, GuestAddress(p * 4096)).unwrap();
    }
    mem.write_slice(secret, GuestAddress((pages / 3) * 4096 + 100))
        .unwrap();
    mem
}

fn touched_pages(mem: &GuestMemory) -> u64 {
    let mut page = vec![0u8; 4096];
    let total: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    (0..total / 4096)
        .filter(|p| {
            mem.read_slice(&mut page, GuestAddress(p * 4096)).unwrap();
            page.iter().any(|b| *b != 0)
        })
        .count() as u64
}

fn main() {
    let mib: u64 = std::env::var("MICROAGENT_BENCH_SECRETS_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("ma-secrets-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, b"not a kernel, only hashed").unwrap();
    // Eight delivered secrets of typical sizes (API tokens, a password, a key id).
    let secrets: Vec<SecretValue> = (0..8)
        .map(|i| SecretValue {
            name: format!("secret{i}"),
            value: format!("sk-{i}-{}", "Zq8vR2mX7pL4wN9c".repeat(1 + i % 4)).into_bytes(),
        })
        .collect();
    let scanner = Scanner::new(&secrets).unwrap();

    println!(
        "secret scan cost on a capture: {mib} MiB guest, {} secrets (raw, hex, base64 patterns), \
         {} threads, median of {runs}",
        secrets.len(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "| touched | capture without scan | capture with scan | overhead | scan's own time | scan time / capture | found |"
    );
    println!(
        "|--------:|---------------------:|------------------:|---------:|----------------:|--------------------:|------:|"
    );
    for percent in [10u64, 50] {
        let vm = FakeVm(guest(mib, percent, &secrets[3].value));
        let touched = touched_pages(&vm.0) * 4096 * 100 / (mib << 20);
        let (mut plain, mut scanned, mut scan_only) = (vec![], vec![], vec![]);
        let mut found = 0;
        for r in 0..runs {
            for with_scan in [false, true] {
                let tag = format!("p{percent}-r{r}-{with_scan}");
                let t = Instant::now();
                let m = capture(
                    &vm,
                    &CaptureRequest {
                        dir: &dir,
                        tag: &tag,
                        kernel: &kernel,
                        cmdline: "",
                        rootfs: None,
                        image: None,
                        workspace: Some("bench"),
                        note: None,
                        parent: None,
                        secrets: with_scan.then_some(SecretCheck {
                            scanner: &scanner,
                            strict: false,
                        }),
                    },
                    &mut |_| {},
                )
                .unwrap();
                let took = t.elapsed();
                if let Some(report) = m.secret_scan {
                    scanned.push(took);
                    scan_only.push(Duration::from_millis(report.millis));
                    found = report.found.iter().map(|f| f.pages).sum();
                } else {
                    plain.push(took);
                }
                std::fs::remove_dir_all(dir.join(&tag)).unwrap();
            }
        }
        let (p, s, so) = (median(plain), median(scanned), median(scan_only));
        println!(
            "| {:>6}% | {:>18.0}ms | {:>15.0}ms | {:>+7.1}% | {:>13.0}ms | {:>18.2}x | {:>5} |",
            touched,
            p.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            (s.as_secs_f64() / p.as_secs_f64() - 1.0) * 100.0,
            so.as_secs_f64() * 1e3,
            so.as_secs_f64() / p.as_secs_f64(),
            found
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
