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
