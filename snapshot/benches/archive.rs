//! Export and import throughput of snapshot archives against `tar -cf - DIR | zstd` and back, on
//! the same snapshot files, side by side in one run. Prints one table; asserts nothing on time.

use std::process::Command;
use std::time::{Duration, Instant};

use snapshot::{capture, CaptureRequest, CpuidLeaf, SavedVm, Snapshot, Snapshottable};
use vm_memory::{Bytes, GuestAddress};

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
            mem_mib: (self
                .0
                .iter()
                .map(vm_memory::GuestMemoryRegion::len)
                .sum::<u64>()
                >> 20),
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

use vm_memory::GuestMemoryBackend;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn shell(cmd: &str) -> Duration {
    let t = Instant::now();
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "{cmd}");
    t.elapsed()
}

fn main() {
    let mib: u64 = std::env::var("MICROAGENT_BENCH_ARCHIVE_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let dir = std::env::temp_dir().join(format!("ma-archive-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A guest that touched half its memory with semi-compressible data; the rest is zero.
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), (mib << 20) as usize)]).unwrap();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut page = vec![0u8; 4096];
    for p in 0..(mib << 20) / 4096 / 2 {
        for chunk in page.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&(x & 0x0000_ffff_0000_ffff).to_le_bytes());
        }
        mem.write_slice(&page, GuestAddress(p * 2 * 4096)).unwrap();
    }
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, b"not a kernel, only hashed").unwrap();
    let snaps = dir.join("snaps");
    capture(
        &FakeVm(mem),
        &CaptureRequest {
            dir: &snaps,
            tag: "s",
            kernel: &kernel,
            cmdline: "",
            rootfs: None,
            image: None,
            workspace: Some("bench"),
            note: None,
            parent: None,
            secrets: None,
        },
        &mut |_| {},
    )
    .unwrap();
    let snap = Snapshot::open(&snaps.join("s")).unwrap();
    let size: u64 = snap.manifest.files.iter().map(|f| f.size).sum();
    let runs = 3;
    let (mut ours_x, mut ours_i, mut tar_x, mut tar_i) = (vec![], vec![], vec![], vec![]);
    let mut tar_is = vec![];
    let (mut ours_size, mut tar_size) = (0, 0);
    for r in 0..runs {
        let out = dir.join(format!("ours-{r}.tar.zst"));
        let t = Instant::now();
        snapshot::archive::export(&snap, &out).unwrap();
        ours_x.push(t.elapsed());
        ours_size = std::fs::metadata(&out).unwrap().len();
        let into = dir.join(format!("import-{r}"));
        shell("sync");
        let t = Instant::now();
        snapshot::archive::import(&out, &into, None).unwrap();
        ours_i.push(t.elapsed());

        let tz = dir.join(format!("tar-{r}.tar.zst"));
        let src = snap.dir.display();
        tar_x.push(shell(&format!(
            "tar -C {src} -cf - . | zstd -q -3 -T1 -o {}",
            tz.display()
        )));
        tar_size = std::fs::metadata(&tz).unwrap().len();
        let dst = dir.join(format!("untar-{r}"));
        std::fs::create_dir_all(&dst).unwrap();
        tar_i.push(shell(&format!(
            "zstd -q -d -c {} | tar -C {} -xf -",
            tz.display(),
            dst.display()
        )));
        // Durable, as an import is (it fsyncs every file before the snapshot appears): the
        // same extraction, then a sync of its filesystem, with nothing else left dirty first.
        let dst = dir.join(format!("untar-sync-{r}"));
        std::fs::create_dir_all(&dst).unwrap();
        shell("sync");
        tar_is.push(shell(&format!(
            "zstd -q -d -c {} | tar -C {d} -xf - && sync -f {d}",
            tz.display(),
            d = dst.display()
        )));
    }
    let rate = |d: Duration| size as f64 / (1 << 20) as f64 / d.as_secs_f64();
    let (ox, oi, tx, ti) = (median(ours_x), median(ours_i), median(tar_x), median(tar_i));
    println!(
        "snapshot archive, {mib} MiB guest (half touched), {} MiB of files, median of {runs}",
        size >> 20
    );
    println!("| tool                         | export MiB/s | import MiB/s | archive MiB |");
    println!("|------------------------------|-------------:|-------------:|------------:|");
    println!(
        "| microagent (tar+zstd, verify)| {:>12.0} | {:>12.0} | {:>11.1} |",
        rate(ox),
        rate(oi),
        ours_size as f64 / (1 << 20) as f64
    );
    println!(
        "| tar -cf - | zstd -3 -T1      | {:>12.0} | {:>12.0} | {:>11.1} |",
        rate(tx),
        rate(ti),
        tar_size as f64 / (1 << 20) as f64
    );
    let tis = median(tar_is);
    println!(
        "| zstd -d | tar -xf, sync -f   |              | {:>12.0} |             |",
        rate(tis)
    );
    println!(
        "| ratio microagent / tar+zstd  | {:>12.2} | {:>12.2} | {:>11.2} |",
        rate(ox) / rate(tx),
        rate(oi) / rate(ti),
        ours_size as f64 / tar_size as f64
    );
    println!(
        "| ratio against the durable one|              | {:>12.2} |             |",
        rate(oi) / rate(tis)
    );
    println!(
        "(import includes verifying every digest and the format, and an fsync of every file, \
         before the snapshot appears)"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
