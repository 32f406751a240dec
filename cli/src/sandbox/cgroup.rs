//! A per-process cgroup with memory and pids limits, wherever a hierarchy is writable: cgroup v2
//! (the unified hierarchy with both controllers), else v1 (`memory` and `pids`). When none is,
//! the sandbox says why and runs without one.

use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

pub struct Outcome {
    pub dirs: Vec<PathBuf>,
    pub note: Option<String>,
}

impl Outcome {
    pub fn none(why: &str) -> Self {
        Self {
            dirs: Vec::new(),
            note: Some(why.to_string()),
        }
    }

    /// Removes the cgroups once their process is gone (a moment after, they may still be busy).
    pub fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                if std::fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

/// Creates `microagent/<label>-<pid>` with the limits; the child joins it itself.
pub fn create(label: &str, memory: u64, pids: u64) -> Outcome {
    let name = format!("{label}-{}", std::process::id());
    match v2(&name, memory, pids) {
        Ok(d) => Outcome {
            dirs: vec![d],
            note: None,
        },
        Err(e2) => match v1(&name, memory, pids) {
            Ok(dirs) => Outcome { dirs, note: None },
            Err(e1) => Outcome::none(&format!(
                "no writable cgroup hierarchy (v2: {e2}; v1: {e1})"
            )),
        },
    }
}

fn v2(name: &str, memory: u64, pids: u64) -> Result<PathBuf, String> {
    let root = Path::new(ROOT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|_| "not mounted".to_string())?;
    if !controllers.contains("memory") || !controllers.contains("pids") {
        return Err("memory or pids controller missing".into());
    }
    let parent = root.join("microagent");
    let _ = std::fs::create_dir(&parent);
    let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids");
    std::fs::write(parent.join("cgroup.subtree_control"), "+memory +pids")
        .map_err(|e| format!("{}: {e}", parent.display()))?;
    let dir = parent.join(name);
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let set = |f: &str, v: String| std::fs::write(dir.join(f), v).map_err(|e| format!("{f}: {e}"));
    let r = set("memory.max", memory.to_string()).and_then(|_| set("pids.max", pids.to_string()));
    if let Err(e) = r {
        let _ = std::fs::remove_dir(&dir);
        return Err(e);
    }
    Ok(dir)
}

fn v1(name: &str, memory: u64, pids: u64) -> Result<Vec<PathBuf>, String> {
    let mut made: Vec<PathBuf> = Vec::new();
    let r = (|| {
        for (ctl, file, value) in [
            ("memory", "memory.limit_in_bytes", memory),
            ("pids", "pids.max", pids),
        ] {
            let base = Path::new(ROOT).join(ctl);
            if !base.join("cgroup.procs").exists() {
                return Err(format!("{} not mounted", base.display()));
            }
            let parent = base.join("microagent");
            let _ = std::fs::create_dir(&parent);
            let dir = parent.join(name);
            std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            made.push(dir.clone());
            std::fs::write(dir.join(file), value.to_string())
                .map_err(|e| format!("{}: {e}", dir.join(file).display()))?;
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok(made),
        Err(e) => {
            for d in made {
                let _ = std::fs::remove_dir(d);
            }
            Err(e)
        }
    }
}
