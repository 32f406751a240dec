//! The engine's half of a restore: walk a diff chain down to its full base, verify every link,
//! and say which memory files rebuild the guest's RAM. The VMM only rebuilds a VM from the result.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::SnapshotError;
use crate::open::{Snapshot, VerifyOptions};

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
