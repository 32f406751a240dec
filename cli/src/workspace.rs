//! A workspace on disk: its config, private files, lock and the state of its VMM process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snapshot::file_lock::FileLock;

use crate::api;
use crate::exit::{Code, Failure};
use crate::home;

pub const CONFIG: &str = "config.json";
pub const ROOTFS: &str = "rootfs.ext4";
pub const KERNEL_COPY: &str = "kernel.elf";
pub const CONSOLE: &str = "console.log";
pub const API_SOCK: &str = "api.sock";
pub const VSOCK_SOCK: &str = "vsock.sock";
pub const PID: &str = "vmm.pid";
pub const VMM_LOG: &str = "vmm.log";
pub const LOCK: &str = "lock";
pub const SNAPSHOTS: &str = "snapshots";
/// Holds the one hibernation snapshot (`hibernation/slot`) while a workspace hibernates.
pub const HIBERNATION: &str = "hibernation";
pub const HIBERNATION_SLOT: &str = "slot";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    pub name: String,
    /// The kernel as the user named it (a path, or `builtin:testguest`).
    pub kernel_spec: String,
    /// The file the VM boots (for built-in kernels a copy inside the workspace).
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    #[serde(default)]
    pub image: Option<String>,
    pub mem_mib: u64,
    pub vcpus: u8,
    pub cmdline: String,
    pub created: String,
    /// Set when the workspace was forked from a snapshot: `NAME:TAG`.
    #[serde(default)]
    pub forked_from: Option<String>,
    /// When set (seconds since the epoch), the VMM halts and deletes the workspace then.
    #[serde(default)]
    pub expires_unix: Option<u64>,
    /// The guest runs the microagent agent (Linux workspaces with a rootfs): exec, secrets and
    /// the snapshot hooks go through it.
    #[serde(default)]
    pub agent: bool,
    /// How the VM reaches the network (workspaces from before networking: none).
    #[serde(default)]
    pub net: crate::net::NetMode,
    /// Guest ports published on the host (`--net user` only).
    #[serde(default)]
    pub publish: Vec<crate::net::Publish>,
    /// The VMM's jail and seccomp filters (both on unless created with --no-jail/--no-seccomp).
    #[serde(default)]
    pub sandbox: crate::sandbox::SandboxConfig,
}

/// What a workspace is doing, as `list` and `status` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Stopped,
    Running,
    Paused,
    /// A VMM process was recorded but is gone without a clean stop.
    Crashed,
    /// Stopped with its memory saved; the next start resumes where it left off.
    Hibernated,
    /// The VMM was killed for breaking its sandbox (e.g. a system call outside its seccomp
    /// filter); `status` says why.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Running => "running",
            State::Paused => "paused",
            State::Crashed => "crashed",
            State::Hibernated => "hibernated",
            State::Failed => "failed",
        }
    }
}

pub struct Workspace {
    pub dir: PathBuf,
    pub config: Config,
}

impl Workspace {
    pub fn dir_for(root: &Path, name: &str) -> PathBuf {
        home::workspaces_dir(root).join(name)
    }

    pub fn open(root: &Path, name: &str) -> Result<Self, Failure> {
        home::check_name(name)?;
        let dir = Self::dir_for(root, name);
        let path = dir.join(CONFIG);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Failure::new(
                    Code::NotFound,
                    format!("workspace {name} does not exist"),
                ))
            }
            Err(e) => {
                return Err(Failure::new(
                    Code::Error,
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        };
        let config: Config = serde_json::from_slice(&bytes).map_err(|e| {
            Failure::new(
                Code::Error,
                format!("workspace {name} has a corrupt config.json: {e}"),
            )
        })?;
        Ok(Self { dir, config })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    pub fn snapshots_dir(&self) -> PathBuf {
        self.path(SNAPSHOTS)
    }

    /// Every workspace under `root`, sorted by name; unreadable ones are skipped.
    pub fn all(root: &Path) -> Vec<Workspace> {
        let Ok(entries) = std::fs::read_dir(home::workspaces_dir(root)) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .flatten()
            .filter_map(|e| Workspace::open(root, &e.file_name().to_string_lossy()).ok())
            .collect();
        out.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        out
    }

    /// The pid of the workspace's running VMM. The VMM is jailed because its guest may take it
    /// over, and its pid file is its own to write: the pid is the one its waiter (root, outside
    /// the jail, in a file the VMM cannot replace) recorded, and only while that very process
    /// runs (its start time too), never what the pid file says. Else `halt` would SIGKILL
    /// whatever process a hostile VMM named, or one that took over a dead VMM's pid.
    pub fn pid(&self) -> Option<i32> {
        let recorded = crate::sandbox::record(&self.dir)?;
        // A record without a start time (an older version's) is believed only beside a pid file.
        if !recorded.running() || (recorded.start_time.is_none() && !self.pid_file_left()) {
            return None;
        }
        i32::try_from(recorded.pid).ok()
    }

    /// Whether a VMM's pid file is there: a VMM removes it when it exits cleanly.
    fn pid_file_left(&self) -> bool {
        std::fs::symlink_metadata(self.path(PID)).is_ok()
    }

    /// The VMM's state: asks it over the API socket when its process is alive.
    /// The hibernation snapshot, if the workspace hibernates.
    pub fn hibernation_slot(&self) -> Option<PathBuf> {
        let p = self.path(HIBERNATION).join(HIBERNATION_SLOT);
        p.join("manifest.json").exists().then_some(p)
    }

    pub fn state(&self) -> State {
        let pid = self.pid().filter(|&p| process_alive(p));
        let Some(_) = pid else {
            if !self.pid_file_left() {
                if self.hibernation_slot().is_some() {
                    return State::Hibernated;
                }
                return State::Stopped;
            }
            if crate::sandbox::failure(&self.dir).is_some() {
                return State::Failed;
            }
            return State::Crashed;
        };
        match api::request(
            &self.path(API_SOCK),
            &api::Request::Status,
            Duration::from_secs(2),
        ) {
            Ok(api::Response::Status { paused: true, .. }) => State::Paused,
            Ok(_) => State::Running,
            // Alive but not answering yet (starting) or wedged: it still owns the workspace.
            Err(_) => State::Running,
        }
    }

    /// Removes the records of a VMM process that died without cleaning up.
    pub fn clear_stale_process(&self) {
        for f in [PID, API_SOCK, VSOCK_SOCK] {
            let _ = std::fs::remove_file(self.path(f));
        }
    }

    /// Takes the workspace's lock, failing at once if another command holds it.
    pub fn lock(&self) -> Result<Lock, Failure> {
        Lock::take(&self.path(LOCK), self.name())
    }
}

/// An exclusive flock on a workspace; released when dropped (or when the process dies).
pub struct Lock(#[allow(dead_code)] FileLock);

impl Lock {
    /// Takes the lock at `path` without waiting: a holder means another command is at work.
    pub fn take(path: &Path, name: &str) -> Result<Self, Failure> {
        match FileLock::try_acquire(path) {
            Ok(Some(l)) => Ok(Lock(l)),
            Ok(None) => Err(Failure::new(
                Code::Conflict,
                format!("workspace {name} is busy: another microagent command is changing it"),
            )),
            Err(e) => Err(Failure::new(Code::Error, e.to_string())),
        }
    }
}

pub fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only probes for existence. A zombie counts as dead.
    if pid <= 0 || unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

pub fn save_config(dir: &Path, config: &Config) -> Result<(), Failure> {
    let mut bytes = serde_json::to_vec_pretty(config).unwrap_or_default();
    bytes.push(b'\n');
    snapshot::atomic_file::write(&dir.join(CONFIG), &bytes)
        .map_err(|e| Failure::new(Code::Error, format!("cannot write config: {e}")))
}

/// Files the jailed VMM may have written (its console log, its failure note) are opened and read
/// never through a link (a hostile VMM could point one at any host file, and the reader is
/// root), and only as regular files (not a FIFO that would block the reader).
pub use snapshot::untrusted::{
    open as open_untrusted, read as read_untrusted, tail as read_tail_untrusted,
};
