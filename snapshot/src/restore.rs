//! The engine's restore: walk a diff chain down to its full base, verify every link, decode
//! the newest link's state, build guest RAM (eager, copy-on-write map, hot, or lazily from a page
//! server) and copy the diffs over it, then hand state and memory to the VM to rebuild itself
//! ([`Restorable`]). The VM never sees the snapshot directory.

pub mod memory;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::SnapshotError;
use crate::open::{Snapshot, VerifyOptions};

pub use memory::{GuestRam, MemoryError, RestoreMode, EXIT_PAGE_SERVER_GONE};
pub use snapshot_boundary::{HostRegion, KeepAlive, RegionLayout, Restorable, RestoredMemory};

/// How the engine brings a snapshot back.
#[derive(Debug, Clone, Copy)]
pub struct RestoreOptions<'a> {
    /// The kernel the workspace is configured with; refused if its sha256 differs.
    pub kernel: Option<&'a Path>,
    /// Re-read every file and compare digests before restoring.
    pub verify_contents: bool,
    /// How memory comes back from the memory files (without `page_server`).
    pub memory_mode: RestoreMode,
    /// Serve memory lazily from the page server listening here (userfaultfd) instead; full
    /// snapshots only. A server that goes away ends this process with a clear error.
    pub page_server: Option<&'a Path>,
    /// Shown in the page server's statistics.
    pub label: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot restore the VM: {0}")]
    Vm(#[source] E),
}

/// Verifies `snapshot` and its chain, builds its guest RAM and has `V` rebuild itself from it.
pub fn restore<V: Restorable>(
    snapshot: &Snapshot,
    options: &RestoreOptions<'_>,
    args: V::Args,
) -> Result<V, RestoreError<V::Error>> {
    let plan: RestorePlan<V::State> = plan(snapshot, options.kernel, options.verify_contents)?;
    let layout = V::memory_layout(&plan.state).map_err(RestoreError::Vm)?;
    let memory = match options.page_server {
        Some(socket) => {
            if !plan.overlays.is_empty() {
                return Err(MemoryError::LazyDiff.into());
            }
            GuestRam::lazy(&layout, socket, options.label)?
        }
        None => {
            let mut memory = GuestRam::from_file(&layout, &plan.base_memory, options.memory_mode)?;
            memory.apply_overlays(&plan.overlays)?;
            memory
        }
    };
    V::restore(&plan.state, memory.into_restored(), args).map_err(RestoreError::Vm)
}

/// A verified snapshot chain resolved into what rebuilds a VM.
#[derive(Debug)]
pub struct RestorePlan<S> {
    /// The newest link's component state.
    pub state: S,
    /// The full base's memory file.
    pub base_memory: PathBuf,
    /// Each diff's (memory file, dirty-page bitmap), oldest first, to copy over the base.
    pub overlays: Vec<(PathBuf, Vec<u64>)>,
}

/// Verifies `snapshot` and every parent it depends on, then loads its state. `kernel` is refused
/// if its sha256 differs; `contents` re-reads files a verified stamp does not vouch for.
pub fn plan<S: DeserializeOwned>(
    snapshot: &Snapshot,
    kernel: Option<&Path>,
    contents: bool,
) -> Result<RestorePlan<S>, SnapshotError> {
    // A diff holds only what changed since its parent: walk the chain down to a full one.
    let chain = snapshot.chain()?;
    for s in &chain {
        s.verify(&VerifyOptions {
            kernel,
            contents,
            recheck: false,
        })?;
    }
    let state: S = snapshot.load_state()?;
    let mut overlays = Vec::new();
    for s in &chain[1..] {
        if let Some(bits) = s.dirty_pages()? {
            overlays.push((s.memory_path(), bits));
        }
    }
    Ok(RestorePlan {
        state,
        base_memory: chain[0].memory_path(),
        overlays,
    })
}

/// The engine without a VMM: a fake VM (plain memory and a text state) captured full, then
/// twice as a diff, restored through the plan. Nothing here opens /dev/kvm.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Setup, MEM, PAGE};
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_diff_chain_of_three_restores_to_the_last_capture() {
        let s = Setup::new("chain");
        s.capture("base", None, 3, 0xaa, "s0");
        s.capture("d1", Some("base"), 5, 0xbb, "s1");
        s.capture("d2", Some("d1"), 3, 0xcc, "s2");

        let d2 = Snapshot::open(&s.snaps.join("d2")).unwrap();
        let last: RestorePlan<String> = plan(&d2, Some(&s.kernel), true).unwrap();
        assert_eq!(last.state, "s2");
        assert_eq!(last.base_memory, s.snaps.join("base").join("memory.bin"));
        let links: Vec<_> = last.overlays.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            links,
            [s.snaps.join("d1/memory.bin"), s.snaps.join("d2/memory.bin")],
            "overlays oldest first"
        );
        // Each diff holds exactly the page that changed since its parent.
        assert_eq!(last.overlays[0].1.first().copied(), Some(1 << 5));
        assert_eq!(last.overlays[1].1.first().copied(), Some(1 << 3));

        let mut now = vec![0u8; MEM];
        s.vm.mem.read_slice(&mut now, GuestAddress(0)).unwrap();
        assert!(Setup::rebuild(&last) == now, "rebuilt memory differs");

        // The middle link restores to its own moment.
        let d1 = Snapshot::open(&s.snaps.join("d1")).unwrap();
        let mid: RestorePlan<String> = plan(&d1, Some(&s.kernel), false).unwrap();
        assert_eq!(mid.state, "s1");
        let m = Setup::rebuild(&mid);
        assert_eq!(m[3 * PAGE], 0xaa);
        assert_eq!(m[5 * PAGE], 0xbb);
    }

    #[test]
    fn a_tampered_link_or_another_kernel_is_refused() {
        let s = Setup::new("tamper");
        s.capture("base", None, 1, 0x11, "s0");
        s.capture("d1", Some("base"), 2, 0x22, "s1");
        let d1 = Snapshot::open(&s.snaps.join("d1")).unwrap();
        plan::<String>(&d1, Some(&s.kernel), true).unwrap();

        let other = s.dir.join("other-kernel");
        std::fs::write(&other, b"another kernel").unwrap();
        match plan::<String>(&d1, Some(&other), false) {
            Err(e) => assert!(e.to_string().contains("kernel"), "{e}"),
            Ok(_) => panic!("a different kernel was accepted"),
        }

        // One byte flipped in the base, below the diff: the whole chain is refused, even though
        // both links carry verified stamps from their capture.
        let base_mem = s.snaps.join("base").join("memory.bin");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&base_mem)
            .unwrap();
        f.write_all_at(&[0x12], PAGE as u64).unwrap();
        drop(f);
        // As the CLI verifies before it starts a VMM: contents checked, stamps trusted.
        match plan::<String>(&d1, Some(&s.kernel), true) {
            Err(e) => assert!(e.to_string().contains("memory.bin"), "{e}"),
            Ok(_) => panic!("a tampered base was accepted"),
        }
    }
}

/// The engine's whole restore, driven as the VMM process drives it but into the fake VM: the
/// chain walked and verified, memory built in each mode, the diffs copied over it oldest first.
#[cfg(test)]
mod engine_tests {
    use super::*;
    use crate::fake::{FakeVm, Setup, PAGE};

    fn options(s: &Setup, mode: RestoreMode) -> RestoreOptions<'_> {
        RestoreOptions {
            kernel: Some(&s.kernel),
            verify_contents: true,
            memory_mode: mode,
            page_server: None,
            label: "test",
        }
    }

    /// Page 3 is written by the base and by both diffs: only the overlays applied in chain
    /// order leave the last diff's byte there.
    #[test]
    fn a_diff_chain_restores_with_its_overlays_in_order_in_every_mode() {
        let s = Setup::new("engine-chain");
        s.capture("base", None, 3, 0xaa, "s0");
        s.vm.write_page(9, 0x99);
        s.capture("d1", Some("base"), 3, 0xbb, "s1");
        s.capture("d2", Some("d1"), 3, 0xcc, "s2");
        let want = s.vm.memory();
        assert_eq!(want[3 * PAGE], 0xcc);
        assert_eq!(want[9 * PAGE], 0x99);

        let d2 = Snapshot::open(&s.snaps.join("d2")).unwrap();
        let d1 = Snapshot::open(&s.snaps.join("d1")).unwrap();
        for mode in [
            RestoreMode::Eager,
            RestoreMode::PrivateMap,
            RestoreMode::Hot,
        ] {
            let vm: FakeVm = restore(&d2, &options(&s, mode), ()).unwrap();
            assert_eq!(*vm.state.borrow(), "s2", "{mode:?}");
            assert!(vm.memory() == want, "{mode:?}: restored memory differs");

            let mid: FakeVm = restore(&d1, &options(&s, mode), ()).unwrap();
            assert_eq!(*mid.state.borrow(), "s1", "{mode:?}");
            let m = mid.memory();
            assert_eq!(
                (m[3 * PAGE], m[9 * PAGE]),
                (0xbb, 0x99),
                "{mode:?}: d1's moment"
            );
        }
    }

    #[test]
    fn a_tampered_diff_or_another_kernel_builds_no_vm() {
        let s = Setup::new("engine-tamper");
        s.capture("base", None, 1, 0x11, "s0");
        s.capture("d1", Some("base"), 2, 0x22, "s1");
        s.capture("d2", Some("d1"), 3, 0x33, "s2");
        let d2 = Snapshot::open(&s.snaps.join("d2")).unwrap();
        restore::<FakeVm>(&d2, &options(&s, RestoreMode::Eager), ()).unwrap();

        let other = s.dir.join("other-kernel");
        std::fs::write(&other, b"another kernel").unwrap();
        let mut o = options(&s, RestoreMode::Eager);
        o.kernel = Some(&other);
        match restore::<FakeVm>(&d2, &o, ()) {
            Err(RestoreError::Snapshot(e)) => assert!(e.to_string().contains("kernel"), "{e}"),
            Err(e) => panic!("another kernel refused for the wrong reason: {e}"),
            Ok(_) => panic!("another kernel was accepted"),
        }

        // One byte of the middle diff's page flipped: refused, in every memory mode.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s.snaps.join("d1/memory.bin"))
            .unwrap();
        f.write_all_at(&[0x23], 2 * PAGE as u64 + 7).unwrap();
        drop(f);
        for mode in [
            RestoreMode::Eager,
            RestoreMode::PrivateMap,
            RestoreMode::Hot,
        ] {
            match restore::<FakeVm>(&d2, &options(&s, mode), ()) {
                Err(RestoreError::Snapshot(e)) => {
                    assert!(e.to_string().contains("memory.bin"), "{mode:?}: {e}")
                }
                Err(e) => panic!("{mode:?}: refused for the wrong reason: {e}"),
                Ok(_) => panic!("{mode:?}: a tampered diff was restored"),
            }
        }
    }

    /// Lazy memory: the engine registers fresh memory with userfaultfd and hands it to the
    /// snapshot's page server (here in this process); every byte the VM reads comes through it.
    #[test]
    fn a_lazy_restore_is_served_by_the_page_server() {
        use crate::pageserver::{PageServer, ServerConfig};
        let s = Setup::new("engine-lazy");
        s.vm.write_page(9, 0x99);
        s.capture("base", None, 3, 0xaa, "s0");
        let want = s.vm.memory();
        let base = Snapshot::open(&s.snaps.join("base")).unwrap();
        let sock = s.dir.join("ps.sock");
        let server = PageServer::for_snapshot(
            &base,
            &sock,
            ServerConfig {
                record: false,
                ..Default::default()
            },
        )
        .unwrap();
        let mut o = options(&s, RestoreMode::Eager);
        o.page_server = Some(&sock);
        let vm: FakeVm = restore(&base, &o, ()).unwrap();
        assert_eq!(*vm.state.borrow(), "s0");
        assert_eq!(
            server.stats().clients_active,
            1,
            "the VM is the server's client"
        );
        assert!(vm.memory() == want, "lazily served memory differs");
        // The VM first, so its connection closes before the server (which would stop the
        // process, as it must for a VMM whose memory can no longer arrive).
        drop(vm);
        server.shutdown();
    }

    /// A page server serves one memory file: a diff is refused before any connection.
    #[test]
    fn a_lazy_restore_of_a_diff_is_refused() {
        let s = Setup::new("engine-lazy-diff");
        s.capture("base", None, 1, 0x11, "s0");
        s.capture("d1", Some("base"), 2, 0x22, "s1");
        let d1 = Snapshot::open(&s.snaps.join("d1")).unwrap();
        let sock = s.dir.join("no-server.sock");
        let mut o = options(&s, RestoreMode::Eager);
        o.page_server = Some(&sock);
        assert!(matches!(
            restore::<FakeVm>(&d1, &o, ()),
            Err(RestoreError::Memory(MemoryError::LazyDiff))
        ));
    }
}
