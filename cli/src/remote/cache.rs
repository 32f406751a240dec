//! A bound on the host's chunk cache (`<state>/remote-cache/chunks`): with
//! `MICROAGENT_REMOTE_CACHE_MAX_MIB` set, the least recently used chunks go once the cache holds
//! more, never one the operation that evicts still needs.
//!
//! Nothing depends on the cache for correctness: a chunk evicted under another pull or a page
//! server is fetched again from the remote when it is next needed (and checked again), so the
//! bound trades bandwidth for disk, never a result. Recency is the file's modification time,
//! moved forward on every use.

use std::collections::HashSet;
use std::path::Path;
use std::time::SystemTime;

pub const MAX_ENV: &str = "MICROAGENT_REMOTE_CACHE_MAX_MIB";

/// The bound in bytes, if one is set.
pub fn limit() -> Option<u64> {
    std::env::var(MAX_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|mib| mib.saturating_mul(1 << 20))
}

/// Marks the cached chunk at `p` as used now.
pub fn touch(p: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(p) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// What an eviction removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub chunks: u64,
    pub bytes: u64,
    /// What the cache holds afterwards.
    pub left_bytes: u64,
}

/// Removes the least recently used chunks of `cache` until it holds at most `max` bytes,
/// never one named in `keep`. Only chunk files (named by their digest) are counted or removed.
pub fn evict(cache: &Path, max: u64, keep: &HashSet<String>) -> Evicted {
    let mut all = Vec::new();
    let mut total = 0u64;
    let Ok(dir) = std::fs::read_dir(cache) else {
        return Evicted::default();
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !super::index::is_digest(&name) {
            continue;
        }
        let Ok(m) = e.metadata() else { continue };
        total += m.len();
        let used = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        all.push((used, m.len(), name));
    }
    let mut out = Evicted::default();
    if total > max {
        all.sort();
        for (_, len, name) in all {
            if total <= max {
                break;
            }
            if keep.contains(&name) {
                continue;
            }
            if std::fs::remove_file(cache.join(&name)).is_ok() {
                total -= len;
                out.chunks += 1;
                out.bytes += len;
            }
        }
    }
    out.left_bytes = total;
    if out.chunks > 0 {
        tracing::debug!(
            chunks = out.chunks,
            bytes = out.bytes,
            "evicted from the chunk cache"
        );
    }
    out
}

/// With a bound set: evicts down to it, keeping `keep`.
pub fn enforce(cache: &Path, keep: &HashSet<String>) {
    if let Some(max) = limit() {
        evict(cache, max, keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chunk(dir: &Path, n: u8, len: usize, age_s: u64) -> String {
        let name = format!("{:064x}", n);
        let p = dir.join(&name);
        std::fs::write(&p, vec![n; len]).unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
        name
    }

    #[test]
    fn least_recently_used_go_first_never_a_kept_one() {
        let dir = std::env::temp_dir().join(format!("chunk-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let oldest = chunk(&dir, 1, 100, 400);
        let old_kept = chunk(&dir, 2, 100, 300);
        let middle = chunk(&dir, 3, 100, 200);
        let newest = chunk(&dir, 4, 100, 100);
        std::fs::write(dir.join(".tmp-not-a-chunk"), [0u8; 1000]).unwrap();
        // Used just now: the most recent of all.
        touch(&dir.join(&oldest));
        let keep: HashSet<String> = [old_kept.clone()].into();
        let ev = evict(&dir, 250, &keep);
        assert_eq!(
            ev,
            Evicted {
                chunks: 2,
                bytes: 200,
                left_bytes: 200
            }
        );
        let left: HashSet<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.contains(&oldest) && left.contains(&old_kept));
        assert!(!left.contains(&middle) && !left.contains(&newest));
        assert!(left.contains(".tmp-not-a-chunk"));
        // Within the bound: nothing goes.
        assert_eq!(evict(&dir, 1000, &HashSet::new()).chunks, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
