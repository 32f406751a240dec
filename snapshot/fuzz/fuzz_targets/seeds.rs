//! Seeds from the real encoders, written on a target's first run into its corpus directory when
//! that is empty (nothing is committed: the encoders are the source of truth for the format).

use std::path::PathBuf;

pub fn write_if_empty(seeds: impl FnOnce() -> Vec<Vec<u8>>) {
    // cargo fuzz passes the corpus directory as the first argument that is not a `-flag`.
    let Some(dir) = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .find(|p| p.is_dir())
    else {
        return;
    };
    if std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_some()) {
        return;
    }
    for (i, seed) in seeds().into_iter().enumerate() {
        let _ = std::fs::write(dir.join(format!("seed-{i:02}")), seed);
    }
}
