//! Live capture, after QEMU's precopy: guest memory goes to the snapshot's memory file while the
//! guest runs, then the pages the dirty log says changed since are rewritten in place, round after
//! round, until what is left would take less than the pause bound to write. Only then are the
//! vCPUs and devices stopped, for the last dirty set, the vCPU and device state and the disk copy;
//! the guest runs again before the memory file is fsynced, hashed, scanned and published. The
//! snapshot is exactly the state at that stop: every page written after it was copied is in a
//! later dirty set, the last of them taken with nothing running.
//!
//! A guest that dirties memory faster than the file takes it never gets under the bound: after
//! the dirty set stops shrinking (or a round cap) the capture stops the guest anyway and copies
//! the rest (a stop-and-copy), and says so in its report.
//!
//! The VM's dirty log must be armed before (`take_dirty` answering `Some`): it covers vCPU writes
//! (KVM's log) and device writes (vm-memory's bitmap) alike.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

use crate::capture::{self, CaptureRequest, Progress, RemoveOnDrop, ScanLog};
use crate::digest::FileDigest;
use crate::error::{io, SnapshotError};
use crate::manifest::{FileEntry, Manifest, MEMORY, ROOTFS, VMSTATE};
use crate::memfile::{self, PAGE};
use crate::pagedigest::{self, PageDigests};
use crate::{faults, rootfs, vmstate, SavedVm, Snapshottable};

const MIB: f64 = (1 << 20) as f64;
/// The largest run written with one call (and the buffer it needs).
const RUN: usize = 4 << 20;

/// How a live capture may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveOptions {
    /// Stop the guest once the remaining dirty pages would take less than this to write.
    pub max_pause: Duration,
    /// Copy rounds while the guest runs (round 0, all of memory, included) before it is stopped
    /// whatever is left.
    pub max_rounds: u32,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            max_pause: Duration::from_millis(20),
            max_rounds: 30,
        }
    }
}

/// What a live capture did: for the command's output, `--json` and benchmarks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveReport {
    /// Copy rounds while the guest ran, round 0 (all of memory) included.
    pub rounds: u32,
    /// Bytes written while the guest ran.
    pub precopy_bytes: u64,
    /// Bytes of memory written with the guest stopped.
    pub final_bytes: u64,
    /// Time the vCPUs were stopped: from the pause to the resume.
    pub pause_ms: f64,
    /// Whether the remaining set got under the bound; otherwise `fallback` says why not.
    pub converged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// The write rate last measured, and the rate the guest dirtied memory at in the last round.
    pub write_mib_s: f64,
    pub dirty_mib_s: f64,
}

/// Errors of a live capture besides those of any capture.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VM answered `take_dirty` with `None`: its dirty log is not armed.
    #[error("live capture needs the VM's dirty log armed")]
    NoDirtyLog,
    /// A diff needs the pages changed since its parent; a live capture copies all of memory.
    #[error("a live capture is always a full snapshot (no parent)")]
    Diff,
    #[error("cannot pause the VM: {0}")]
    Pause(String),
}

impl LiveError {
    /// A stable machine-readable code (those of [`SnapshotError::code`] for its errors).
    pub fn code(&self) -> &'static str {
        match self {
            LiveError::Snapshot(e) => e.code(),
            LiveError::NoDirtyLog => "host-unsupported",
            LiveError::Diff => "invalid-argument",
            LiveError::Pause(_) => "error",
        }
    }
}

/// How the capture stops and restarts the guest. `pause` stops vCPUs and devices (after it
/// returns nothing changes guest memory); `resume` lets them run again, and reports its own
/// failure (by then the capture is complete in memory and goes on to publish).
pub struct Controls<'a> {
    pub pause: &'a mut dyn FnMut() -> Result<(), String>,
    pub resume: &'a mut dyn FnMut(),
}

/// Captures the running `vm` as full snapshot `req.tag` while it runs (see the module docs).
pub fn capture_live<V: Snapshottable>(
    vm: &V,
    req: &CaptureRequest<'_>,
    opts: LiveOptions,
    controls: Controls<'_>,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Manifest, LiveReport), LiveError> {
    if req.parent.is_some() {
        return Err(LiveError::Diff);
    }
    let kernel_sha = capture::preflight(req)?;
    // Every page taken from the log from here on; a failure gives them all back, so a later diff
    // against the previous capture still has them.
    let mut taken = Taken::default();
    let result = run(vm, req, opts, controls, progress, kernel_sha, &mut taken);
    if result.is_err() {
        if let Some(bits) = taken.0 {
            vm.requeue_dirty(bits);
        }
    }
    result
}

#[derive(Default)]
struct Taken(Option<Vec<Vec<u64>>>);

impl Taken {
    fn take<V: Snapshottable>(&mut self, vm: &V) -> Result<Vec<Vec<u64>>, LiveError> {
        let bits = vm
            .take_dirty()
            .map_err(|e| SnapshotError::Save(Box::new(e)))?
            .ok_or(LiveError::NoDirtyLog)?;
        match &mut self.0 {
            None => self.0 = Some(bits.clone()),
            Some(all) => or_into(all, &bits),
        }
        Ok(bits)
    }
}

fn or_into(into: &mut Vec<Vec<u64>>, bits: &[Vec<u64>]) {
    if into.len() < bits.len() {
        into.resize(bits.len(), Vec::new());
    }
    for (region, b) in into.iter_mut().zip(bits) {
        if region.len() < b.len() {
            region.resize(b.len(), 0);
        }
        for (w, o) in region.iter_mut().zip(b) {
            *w |= o;
        }
    }
}

fn pages_set(bits: &[Vec<u64>]) -> u64 {
    bits.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64().max(1e-6)
}

fn run<V: Snapshottable>(
    vm: &V,
    req: &CaptureRequest<'_>,
    opts: LiveOptions,
    controls: Controls<'_>,
    progress: &mut dyn FnMut(Progress),
    kernel_sha: String,
    taken: &mut Taken,
) -> Result<(Manifest, LiveReport), LiveError> {
    let mem = vm.guest_memory();
    let guard = RemoveOnDrop::temp_dir(req)?;
    let tmp = guard.path().to_path_buf();
    faults::checkpoint();
    let mem_path = tmp.join(MEMORY);
    let mem_file = capture::create(&mem_path)?;

    // Round 0: everything, from a clean log (what was logged before is in this copy).
    taken.take(vm)?;
    let t = Instant::now();
    let (size, data_bytes) = write_running(mem, &mem_file, &mut |done, total| {
        progress(Progress::Memory { done, total })
    })
    .map_err(io("cannot write", &mem_path))?;
    // A first figure for the rate pages go to the file: round 0's pace through memory (its zero
    // pages only read and checked, so it flatters a mostly empty guest until round 1 measures).
    let mut write_rate = mib_s(size, t.elapsed());
    let mut precopy_bytes = data_bytes;
    let mut rounds = 1u32;
    let mut last_take = Instant::now();
    let mut dirty_rate;
    let mut previous = u64::MAX;
    let mut growing = 0u32;
    let mut fallback = None;
    let mut buf = Vec::new();
    // The dirty set the stop starts from.
    let pending = loop {
        let bits = taken.take(vm)?;
        let bytes = pages_set(&bits) * PAGE as u64;
        dirty_rate = mib_s(bytes, last_take.elapsed());
        last_take = Instant::now();
        // Strictly under: a bound of zero can never be met (a stop-and-copy after the rounds).
        let estimate = Duration::from_secs_f64(bytes as f64 / MIB / write_rate.max(1e-3));
        if estimate < opts.max_pause {
            break bits;
        }
        growing = if bytes >= previous { growing + 1 } else { 0 };
        if growing >= 2 || rounds >= opts.max_rounds {
            fallback = Some(format!(
                "live capture did not converge after {rounds} rounds: the guest dirtied \
                 {dirty_rate:.0} MiB/s, the file took {write_rate:.0} MiB/s, and {:.1} MiB \
                 remained (about {} ms against a bound of {} ms); stopped the guest to copy \
                 the rest",
                bytes as f64 / MIB,
                estimate.as_millis(),
                opts.max_pause.as_millis()
            ));
            break bits;
        }
        previous = bytes;
        let t = Instant::now();
        write_pages(mem, &mem_file, &bits, &mut buf, &mut |done, total| {
            progress(Progress::Memory { done, total })
        })
        .map_err(io("cannot write", &mem_path))?;
        // Small sets measure the call overhead more than the disk: keep the last real figure.
        if bytes >= 1 << 20 {
            write_rate = mib_s(bytes, t.elapsed());
        }
        precopy_bytes += bytes;
        rounds += 1;
        faults::checkpoint();
    };

    // The stop: the last dirty set, state and disk, with nothing running.
    // The pause as the guest sees it: from the request to stop to the vCPUs running again.
    let paused = Instant::now();
    (controls.pause)().map_err(LiveError::Pause)?;
    let stopped = stopped_part(
        vm, req, &tmp, &mem_file, &mem_path, pending, taken, &mut buf,
    );
    (controls.resume)();
    let pause = paused.elapsed();
    let (saved, state_bytes, final_bytes) = stopped?;
    faults::checkpoint();

    // The guest runs again: make the files durable, hash and scan them, publish.
    mem_file.sync_all().map_err(io("cannot fsync", &mem_path))?;
    let mut files = Vec::new();
    let mut scan = ScanLog::new(req.secrets);
    let mut d = FileDigest::new();
    d.update(&state_bytes);
    capture::write_file(&tmp.join(VMSTATE), &state_bytes)?;
    files.push(FileEntry {
        name: VMSTATE.into(),
        size: state_bytes.len() as u64,
        digest: d.finish(),
    });
    scan.data(VMSTATE, &state_bytes);
    faults::checkpoint();

    let read = read_back(&mem_path, mem, scan.scanner())?;
    let pages = read.digests.encode();
    let mut d = FileDigest::new();
    d.update(&pages);
    capture::write_file(&tmp.join(pagedigest::FILE), &pages)?;
    files.push(FileEntry {
        name: pagedigest::FILE.into(),
        size: pages.len() as u64,
        digest: d.finish(),
    });
    scan.data(pagedigest::FILE, &pages);
    files.push(FileEntry {
        name: MEMORY.into(),
        size: read.size,
        digest: read.digest,
    });
    if let Some((found, spent)) = read.scan {
        scan.add(MEMORY, found, spent);
    }
    if req.rootfs.is_some() {
        capture::seal_rootfs(&tmp.join(ROOTFS), &mut files, &mut scan)?;
    }
    let secret_scan = scan.finish()?;
    let manifest = capture::publish(
        req,
        guard,
        files,
        secret_scan,
        (saved.vcpus, saved.mem_mib, saved.cpuid),
        kernel_sha,
        progress,
    )?;
    Ok((
        manifest,
        LiveReport {
            rounds,
            precopy_bytes,
            final_bytes,
            pause_ms: pause.as_secs_f64() * 1000.0,
            converged: fallback.is_none(),
            fallback,
            write_mib_s: write_rate,
            dirty_mib_s: dirty_rate,
        },
    ))
}

/// What runs while the guest is stopped: the last dirty pages, the state, the disk copy.
/// Returns the saved VM (state encoded) and the bytes of memory written.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn stopped_part<V: Snapshottable>(
    vm: &V,
    req: &CaptureRequest<'_>,
    tmp: &Path,
    mem_file: &File,
    mem_path: &Path,
    mut pending: Vec<Vec<u64>>,
    taken: &mut Taken,
    buf: &mut Vec<u8>,
) -> Result<(SavedVm<()>, Vec<u8>, u64), LiveError> {
    let last = taken.take(vm)?;
    or_into(&mut pending, &last);
    let bytes = pages_set(&pending) * PAGE as u64;
    write_pages(vm.guest_memory(), mem_file, &pending, buf, &mut |_, _| {})
        .map_err(io("cannot write", mem_path))?;
    faults::checkpoint();
    let SavedVm {
        state,
        vcpus,
        mem_mib,
        cpuid,
    } = vm.save().map_err(|e| SnapshotError::Save(Box::new(e)))?;
    let state_bytes = vmstate::encode(&state).map_err(SnapshotError::Encode)?;
    if let Some(src) = req.rootfs {
        // The disk has no dirty log: it is copied whole while nothing writes it (a reflink
        // where the filesystem has them).
        let dst = tmp.join(ROOTFS);
        rootfs::copy_image(src, &dst).map_err(io("cannot copy rootfs to", &dst))?;
    }
    Ok((
        SavedVm {
            state: (),
            vcpus,
            mem_mib,
            cpuid,
        },
        state_bytes,
        bytes,
    ))
}

/// Writes the pages set in `bits` (per region, a bit per page) from `mem` into `file` at their
/// offsets (the regions back to back), over what an earlier round wrote there. Runs of set pages
/// go in one call each, up to [`RUN`] bytes.
/// Round 0: all of `mem` into the empty `file`, zero pages left as holes, while the vCPUs run.
/// Each run is copied out of guest memory first (a volatile copy, as the guest may write it
/// meanwhile): the stop-time writer borrows memory in place, which is only sound on a paused
/// VM. A page changed after its copy is in the dirty log and rewritten by a later round.
/// Returns (file size, bytes written).
fn write_running<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<(u64, u64)> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut buf = vec![0u8; RUN];
    let mut file_off = 0u64;
    let mut written = 0u64;
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let len = (region.len() - off).min(RUN as u64) as usize;
            let chunk = &mut buf[..len];
            mem.read_slice(chunk, region.start_addr().unchecked_add(off))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            for (at, start, end) in memfile::nonzero_runs(chunk, file_off + off) {
                file.write_all_at(&chunk[start..end], at)?;
                written += (end - start) as u64;
            }
            off += len as u64;
            progress(file_off + off, total);
        }
        file_off += region.len();
    }
    file.set_len(total)?;
    Ok((total, written))
}

fn write_pages<M: GuestMemoryBackend>(
    mem: &M,
    file: &File,
    bits: &[Vec<u64>],
    buf: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<()> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    buf.resize(RUN, 0);
    let mut file_off = 0u64;
    for (region, words) in mem.iter().zip(bits) {
        let pages = region.len() / PAGE as u64;
        let set = |i: u64| {
            words
                .get((i / 64) as usize)
                .is_some_and(|w| w & (1 << (i % 64)) != 0)
        };
        let mut p = 0u64;
        while p < pages {
            // A clear word skips 64 pages at once: most of a late round's bitmap is clear.
            if p.is_multiple_of(64) && words.get((p / 64) as usize).is_none_or(|w| *w == 0) {
                p += 64;
                continue;
            }
            if !set(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && set(p) && ((p - start) as usize) < RUN / PAGE {
                p += 1;
            }
            let len = ((p - start) as usize) * PAGE;
            let run = &mut buf[..len];
            mem.read_slice(run, region.start_addr().unchecked_add(start * PAGE as u64))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            file.write_all_at(run, file_off + start * PAGE as u64)?;
            progress(file_off + p * PAGE as u64, total);
        }
        file_off += region.len();
    }
    Ok(())
}

/// The memory file as written, read back once after the guest resumed.
struct ReadBack {
    size: u64,
    digest: String,
    digests: PageDigests,
    scan: Option<((Vec<u64>, u64), Duration)>,
}

/// One pass over the finished memory file: its digest, every page's digest (for later diffs)
/// and the secret scan. It runs after the resume, so none of it is in the guest's pause.
fn read_back<M: GuestMemoryBackend>(
    path: &Path,
    mem: &M,
    scanner: Option<&crate::residue::Scanner>,
) -> Result<ReadBack, SnapshotError> {
    let file = File::open(path).map_err(io("cannot read", path))?;
    let size = file.metadata().map_err(io("cannot read", path))?.len();
    let expected: u64 = mem.iter().map(|r| r.len()).sum();
    if size != expected {
        return Err(SnapshotError::Io {
            what: "wrong size after writing",
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("{size} bytes, guest memory is {expected}")),
        });
    }
    let seed = pagedigest::new_seed();
    let mut pages = Vec::with_capacity((size / PAGE as u64) as usize);
    let mut d = FileDigest::new();
    let mut stream = scanner.map(|s| s.stream());
    let mut spent = Duration::ZERO;
    let mut buf = vec![0u8; RUN];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(RUN as u64) as usize;
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, pos)
            .map_err(io("cannot read", path))?;
        d.update(chunk);
        pages.extend(chunk.chunks(PAGE).map(|p| pagedigest::digest_page(seed, p)));
        if let Some(s) = stream.as_mut() {
            let t = Instant::now();
            s.feed_nonzero(pos, chunk);
            spent += t.elapsed();
        }
        pos += n as u64;
    }
    Ok(ReadBack {
        size,
        digest: d.finish(),
        digests: PageDigests { seed, pages },
        scan: stream.map(|s| (s.finish(), spent)),
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use vm_memory::GuestAddress;

    use super::*;
    use crate::fake::{FakeVm, Setup};
    use crate::open::{Snapshot, VerifyOptions};
    use crate::restore::{plan, RestorePlan};
    use crate::GuestMemory;

    /// 8 MiB (two of the writer's chunks) and 4 MiB above a gap, as a large guest has.
    fn vm() -> FakeVm {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 8 << 20),
            (GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        FakeVm::with_dirty_log(mem, "before")
    }

    /// Runs a live capture of a guest that keeps writing (a page per progress step: the same
    /// few pages again and again, so pages already copied change after their copy) until it is
    /// paused; checks that the snapshot verifies and rebuilds to exactly the memory and state at
    /// the pause.
    fn live_is_exact(name: &str, opts: LiveOptions) -> LiveReport {
        let s = Setup::fresh(name, vm());
        for p in [0, 1, 2047, 2048, 3071] {
            s.vm.write_page(p, 0x5a);
        }
        let stopped = Cell::new(false);
        let step = Cell::new(0usize);
        let at_pause = std::cell::RefCell::new(Vec::new());
        let mut pause = || {
            // The guest writes up to the moment it stops: after the rounds' last look at the log.
            s.vm.write_page(9, step.get() as u8 | 1);
            stopped.set(true);
            *s.vm.state.borrow_mut() = format!("at step {}", step.get());
            *at_pause.borrow_mut() = s.vm.memory();
            Ok(())
        };
        let mut resume = || {
            // The guest runs on after the resume; the snapshot must not see it.
            s.vm.write_page(5, 0xee);
            *s.vm.state.borrow_mut() = "after".into();
        };
        let mut progress = |p: Progress| {
            if stopped.get() || !matches!(p, Progress::Memory { .. }) {
                return;
            }
            let n = step.get() + 1;
            step.set(n);
            let page = [0, 7, 2048, 3000, 3071][n % 5];
            s.vm.write_page(page, n as u8 | 1);
        };
        let (manifest, report) = capture_live(
            &s.vm,
            &s.request("live", None),
            opts,
            Controls {
                pause: &mut pause,
                resume: &mut resume,
            },
            &mut progress,
        )
        .unwrap();
        assert_eq!(manifest.tag, "live");
        let snap = Snapshot::open(&s.snaps.join("live")).unwrap();
        snap.verify(&VerifyOptions {
            kernel: Some(&s.kernel),
            contents: true,
            recheck: true,
        })
        .unwrap();
        let p: RestorePlan<String> = plan(&snap, Some(&s.kernel), true).unwrap();
        assert!(p.state.starts_with("at step "), "{}", p.state);
        assert!(
            Setup::rebuild(&p) == *at_pause.borrow(),
            "rebuilt memory differs from the memory at the pause"
        );
        // The page digests are those of the memory at the pause: a diff against this snapshot
        // sees exactly the page written after it.
        let digests = PageDigests::read(&snap.dir.join(pagedigest::FILE)).unwrap();
        let now = PageDigests::of_memory(&s.vm.mem, digests.seed).unwrap();
        let changed = now.changed_since(&digests, &s.vm.mem);
        assert_eq!(pages_set(&changed), 1);
        assert_eq!(changed[0][0], 1 << 5);
        report
    }

    /// A bound no write misses: the capture stops after round 0, whatever this host's speed.
    const GENEROUS: LiveOptions = LiveOptions {
        max_pause: Duration::from_secs(3600),
        max_rounds: 30,
    };

    #[test]
    fn a_guest_that_keeps_writing_is_captured_exactly_at_the_stop() {
        let r = live_is_exact("live-converges", GENEROUS);
        assert!(r.converged, "{r:?}");
        assert!(r.fallback.is_none());
    }

    #[test]
    fn a_bound_never_met_falls_back_to_stop_and_copy_still_exact() {
        let r = live_is_exact(
            "live-fallback",
            LiveOptions {
                max_pause: Duration::ZERO,
                max_rounds: 4,
            },
        );
        assert!(!r.converged, "{r:?}");
        assert!(r.rounds >= 2, "{r:?}");
        let msg = r.fallback.unwrap();
        assert!(msg.contains("did not converge"), "{msg}");
    }

    #[test]
    fn a_live_capture_refuses_a_parent_and_an_unarmed_log() {
        let s = Setup::new("live-refuses");
        let mut pause = || Ok(());
        let mut resume = || {};
        let r = capture_live(
            &s.vm,
            &s.request("x", Some("base")),
            LiveOptions::default(),
            Controls {
                pause: &mut pause,
                resume: &mut resume,
            },
            &mut |_| {},
        );
        assert!(matches!(r, Err(LiveError::Diff)), "{r:?}");
        let r = capture_live(
            &s.vm,
            &s.request("x", None),
            LiveOptions::default(),
            Controls {
                pause: &mut pause,
                resume: &mut resume,
            },
            &mut |_| {},
        );
        assert!(matches!(r, Err(LiveError::NoDirtyLog)), "{r:?}");
        // Nothing left behind.
        assert!(
            s.entries().iter().all(|e| !e.starts_with('.')),
            "{:?}",
            s.entries()
        );
    }

    #[test]
    fn a_failed_pause_keeps_nothing_and_gives_the_pages_back() {
        let s = Setup::fresh("live-pause-fails", vm());
        s.vm.write_page(9, 0x99);
        let mut pause = || Err("injected".to_string());
        let mut resume = || {};
        let r = capture_live(
            &s.vm,
            &s.request("x", None),
            LiveOptions::default(),
            Controls {
                pause: &mut pause,
                resume: &mut resume,
            },
            &mut |_| {},
        );
        assert!(matches!(r, Err(LiveError::Pause(_))), "{r:?}");
        assert!(s.entries().is_empty(), "{:?}", s.entries());
        let back = s.vm.take_dirty().unwrap().unwrap();
        assert_eq!(back[0][0], 1 << 9);
    }

    /// Crash points exist only with the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    mod killed {
        use super::*;
        use crate::capture::sweep_leftovers;

        const CHILD_DIR: &str = "SNAPSHOT_TEST_LIVE_CRASH_DIR";

        /// A live capture of a guest that writes a page at every progress step.
        fn live_once(s: &Setup) -> Result<(Manifest, LiveReport), LiveError> {
            let step = Cell::new(0usize);
            let mut pause = || Ok(());
            let mut resume = || {};
            capture_live(
                &s.vm,
                &s.request("live", None),
                GENEROUS,
                Controls {
                    pause: &mut pause,
                    resume: &mut resume,
                },
                &mut |_| {
                    step.set(step.get() + 1);
                    s.vm.write_page(step.get() % 3000, step.get() as u8 | 1);
                },
            )
        }

        /// Not a test on its own: the capturing process the crash test kills.
        #[test]
        #[ignore = "run by a_live_capture_killed_at_each_point_leaves_all_or_nothing"]
        fn live_crash_child() {
            let Ok(dir) = std::env::var(CHILD_DIR) else {
                return;
            };
            let s = Setup::at(Path::new(&dir), vm());
            live_once(&s).unwrap();
            println!("CHECKPOINTS {}", faults::passed());
        }

        fn run_child(s: &Setup, crash_at: Option<u64>) -> (bool, String) {
            use std::os::unix::process::ExitStatusExt;
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args([
                "--ignored",
                "--exact",
                "live::tests::killed::live_crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, &s.dir);
            match crash_at {
                Some(n) => cmd.env(faults::ENV, n.to_string()),
                None => cmd.env_remove(faults::ENV),
            };
            let out = cmd.output().unwrap();
            let killed = out.status.signal() == Some(libc::SIGKILL);
            assert!(
                killed || out.status.success(),
                "child failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            (killed, String::from_utf8_lossy(&out.stdout).into_owned())
        }

        #[test]
        fn a_live_capture_killed_at_each_point_leaves_all_or_nothing() {
            let s = Setup::fresh("live-crash", vm());
            let target = s.snaps.join("live");
            let (_, out) = run_child(&s, None);
            let points: u64 = out
                .lines()
                .find_map(|l| l.split_once("CHECKPOINTS ").map(|(_, n)| n))
                .and_then(|n| n.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no checkpoint count in: {out}"));
            // Directory, round 0's chunks, the stop, state, rename at least.
            assert!(points >= 6, "only {points} crash points");
            Snapshot::open(&target).unwrap().delete().unwrap();
            let mut complete = 0;
            for at in 1..=points {
                let (killed, _) = run_child(&s, Some(at));
                assert!(killed, "crash point {at} of {points} was not reached");
                match Snapshot::open(&target) {
                    Ok(snap) => {
                        snap.verify(&VerifyOptions {
                            kernel: Some(&s.kernel),
                            contents: true,
                            recheck: true,
                        })
                        .unwrap_or_else(|e| panic!("crash at {at}: looks complete but {e}"));
                        complete += 1;
                        snap.delete().unwrap();
                    }
                    Err(SnapshotError::NotFound(_)) => {
                        assert!(!target.exists(), "crash at {at}: a half snapshot in place");
                    }
                    Err(e) => panic!("crash at {at}: {e}"),
                }
                sweep_leftovers(&s.snaps);
                assert!(s.entries().is_empty(), "crash at {at}: {:?}", s.entries());
            }
            assert_eq!(
                complete, 1,
                "only the last crash point comes after the rename"
            );
        }
    }
}
