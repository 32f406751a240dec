//! The sandbox around each `__vmm` and `__pageserver` process, after Firecracker's jailer.
//!
//! [`enter`] forks. The parent stays on the host as a small *waiter*: it copies the child's
//! output into a bounded log, waits for it, reports a seccomp kill (SIGSYS) with the syscall
//! number, and cleans up (cgroup, jail directory). The child is PID 1 of new PID, mount, IPC,
//! UTS and network namespaces, `pivot_root`ed into a per-process jail: a small tmpfs of its own
//! mount namespace, mounted on an empty per-process directory, that holds only the host paths it
//! needs, bind-mounted at the same absolute paths (so no path in a config or a manifest changes),
//! and its device nodes; nothing of it is made on the host's filesystem. It then takes an unprivileged uid/gid (when started as root), drops every
//! capability, sets no_new_privs and rlimits, and joins a per-process cgroup where one is
//! writable. The caller then applies the seccomp filters ([`seccomp`]).

pub mod cgroup;
pub mod jail;
pub mod seccomp;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::exit::{Code, Failure};

/// Per-workspace settings, stored in its config.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Namespaces, pivot_root, unprivileged uid, no capabilities, rlimits, cgroup.
    #[serde(default = "yes")]
    pub jail: bool,
    /// Seccomp-BPF filters per thread kind.
    #[serde(default = "yes")]
    pub seccomp: bool,
    /// The uid the jailed VMM runs as (when started as root); default `UID_BASE + its pid`,
    /// distinct for every live VM.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Likewise the gid; default the same number as the uid.
    #[serde(default)]
    pub gid: Option<u32>,
    /// The console log's bound in bytes (the latest output is kept).
    #[serde(default = "default_console_max")]
    pub console_max: u64,
}

fn yes() -> bool {
    true
}

fn default_console_max() -> u64 {
    crate::boundedlog::DEFAULT_CONSOLE_MAX
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            jail: true,
            seccomp: true,
            uid: None,
            gid: None,
            console_max: default_console_max(),
        }
    }
}

/// Default base of the per-VM uids and gids: far above login users.
pub const UID_BASE: u32 = 1_000_000;

/// What one run of a sandboxed process gets (the workspace's config, overridden on `start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunFlags {
    pub jail: bool,
    pub seccomp: bool,
}

/// What the waiter records about a running sandbox (`sandbox.json` beside the process's other
/// files): `status` and `list` show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub jail: bool,
    pub seccomp: bool,
    pub pid: u32,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    #[serde(default)]
    pub jail_root: Option<PathBuf>,
    /// The cgroup directories the process runs in.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// Why there is no cgroup, when there is none.
    #[serde(default)]
    pub cgroup_note: Option<String>,
    /// The process's start time (clock ticks after boot, `/proc/PID/stat`): with the pid, which
    /// process this is, even after the pid has gone to another.
    #[serde(default)]
    pub start_time: Option<u64>,
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`), if it exists.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) is in parentheses and may hold anything: count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

impl Record {
    /// Whether the recorded process still runs (a zombie not yet reaped counts).
    pub fn running(&self) -> bool {
        match (self.start_time, start_time(self.pid)) {
            (Some(want), Some(have)) => want == have,
            // Recorded by an older version: the pid alone.
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }
}

pub const RECORD: &str = "sandbox.json";
/// Written by the waiter when the process died by a signal other than SIGKILL (e.g. SIGSYS).
pub const FAILED: &str = "vmm.failed";

/// Exit code by which a VMM asks its waiter to delete its workspace (its TTL ran out): the jailed
/// VMM cannot rename its own workspace directory away.
pub const EXIT_EXPIRED: i32 = 64;

static HOST_PID: OnceLock<u32> = OnceLock::new();

/// This process's pid as the host sees it (inside a PID namespace `getpid()` says 1).
pub fn host_pid() -> u32 {
    *HOST_PID.get().unwrap_or(&std::process::id())
}

/// Everything [`enter`] needs to build one sandbox.
pub struct Spec {
    /// Names the jail and cgroup directories (`<label>-<pid>`).
    pub label: String,
    pub flags: RunFlags,
    pub mounts: jail::Mounts,
    /// Host directories the process must be able to write as its own uid.
    pub owned: Vec<PathBuf>,
    /// A directory shared with root-owned files: the process gets its group, with the sticky
    /// bit, so it can create (and remove) only its own files there.
    pub shared_dir: Option<PathBuf>,
    /// Directories a jailed process writes or wrote (workspace directories): no bind or owned
    /// path may pass through a symbolic link below one of them (the shared directory counts).
    pub untrusted: Vec<PathBuf>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub limits: Limits,
    /// Where the waiter writes the record and the failure marker (a workspace directory).
    pub record_dir: Option<PathBuf>,
    /// The bound on what the waiter copies into its stdout (the process's log).
    pub log_max: u64,
    /// Files the waiter removes after the process, should it leave them (e.g. its socket).
    pub leftovers: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub nofile: u64,
    pub fsize: u64,
    pub memory: u64,
    pub pids: u64,
}

fn errno_fail(what: &str) -> Failure {
    Failure::new(
        Code::Error,
        format!("sandbox: {what}: {}", std::io::Error::last_os_error()),
    )
}

/// Forks into the sandbox. Returns in the child (jailed as `spec` says); the parent becomes the
/// waiter and never returns.
pub fn enter(spec: Spec) -> Result<(), Failure> {
    let cgroup = if spec.flags.jail {
        cgroup::create(&spec.label, spec.limits.memory, spec.limits.pids)
    } else {
        cgroup::Outcome::none("jail off")
    };
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(errno_fail("pipe"));
    }
    // SAFETY: just created, owned here.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    if spec.flags.jail {
        // SAFETY: plain unshare; the next fork's child is PID 1 of the new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(errno_fail("unshare(CLONE_NEWPID)"));
        }
    }
    // SAFETY: this process is single-threaded here (nothing has spawned a thread yet), so the
    // child may go on running ordinary Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(errno_fail("fork"));
    }
    if pid > 0 {
        drop(wr);
        waiter(pid, rd, &spec, cgroup);
    }
    drop(rd);
    // The waiter is what the CLI knows of us until we are ready: when it is killed (a fork batch
    // given up), we go too. (In a new PID namespace getppid() says 0, so it cannot tell us
    // whether the waiter died before this call; that window is a few instructions wide.)
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
    }
    // SAFETY: the write end of the pipe becomes stdout and stderr: the waiter bounds the log.
    unsafe {
        libc::dup2(wr.as_raw_fd(), 1);
        libc::dup2(wr.as_raw_fd(), 2);
    }
    drop(wr);
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
        .unwrap_or(std::process::id());
    let _ = HOST_PID.set(pid);
    if spec.flags.jail {
        for dir in &cgroup.dirs {
            // "0" is the writer itself; threads created later follow it.
            std::fs::write(dir.join("cgroup.procs"), "0").map_err(|e| {
                Failure::new(
                    Code::Error,
                    format!("sandbox: cannot join {}: {e}", dir.display()),
                )
            })?;
        }
        let ids = ids(&spec, pid);
        jail::setup(&spec, pid, ids)?;
    }
    Ok(())
}

/// The uid/gid the jailed process takes, when this process is root.
pub fn ids(spec: &Spec, pid: u32) -> Option<(u32, u32)> {
    // SAFETY: getuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let uid = spec.uid.unwrap_or(UID_BASE.saturating_add(pid));
    let gid = spec.gid.unwrap_or(uid);
    Some((uid, gid))
}

static STOP_SIGNAL: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_SIGNAL.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT a request to stop (`stop_requested`), for a sandboxed process to
/// end cleanly. Without a handler they would do nothing to a jailed one: it is PID 1 of its
/// namespace, and the kernel drops signals from outside it that such a process has not asked
/// for (only SIGKILL gets through).
pub fn on_stop_signals() {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether SIGTERM or SIGINT came since `on_stop_signals`.
pub fn stop_requested() -> bool {
    STOP_SIGNAL.load(Ordering::SeqCst)
}

static WAITED_CHILD: AtomicI32 = AtomicI32::new(0);

/// Passed on as SIGTERM, the one stop signal the VMM handles.
extern "C" fn forward_stop_signal(_: libc::c_int) {
    let child = WAITED_CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; the child is ours and not yet reaped.
        unsafe { libc::kill(child, libc::SIGTERM) };
    }
}

/// The parent side: copy the log, wait, report, clean up, exit with the child's status.
fn waiter(child: libc::pid_t, rd: OwnedFd, spec: &Spec, cgroup: cgroup::Outcome) -> ! {
    // A stop signal to the waiter is passed on, and the waiter stays to clean up after the
    // child (cgroups, jail root): dying at once would leave those behind and SIGKILL the VMM
    // through its death signal.
    WAITED_CHILD.store(child, Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: installs a handler that only loads an atomic and calls kill (both
        // async-signal-safe); signal() gives SA_RESTART, so the log copy and waitpid go on.
        unsafe { libc::signal(sig, forward_stop_signal as *const () as libc::sighandler_t) };
    }
    let jail_root = spec
        .flags
        .jail
        .then(|| jail::root_for(&spec.label, child as u32));
    let record = Record {
        jail: spec.flags.jail,
        seccomp: spec.flags.seccomp,
        pid: child as u32,
        uid: spec
            .flags
            .jail
            .then(|| ids(spec, child as u32).map(|i| i.0))
            .flatten(),
        gid: spec
            .flags
            .jail
            .then(|| ids(spec, child as u32).map(|i| i.1))
            .flatten(),
        jail_root: jail_root.clone(),
        cgroups: cgroup.dirs.clone(),
        cgroup_note: cgroup.note.clone(),
        start_time: start_time(child as u32),
    };
    if let Some(dir) = &spec.record_dir {
        let _ = std::fs::remove_file(dir.join(FAILED));
        if let Ok(bytes) = serde_json::to_vec_pretty(&record) {
            // A record of a live process: nothing to keep across a host crash, so no fsyncs.
            let _ = snapshot::atomic_file::Options::default()
                .durable(false)
                .write(&dir.join(RECORD), &bytes);
        }
    }
    copy_bounded(rd, spec.log_max);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    while unsafe { libc::waitpid(child, &mut status, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    cgroup.remove();
    if let Some(root) = &jail_root {
        jail::prune(root);
    }
    for f in &spec.leftovers {
        let _ = std::fs::remove_file(f);
    }
    let code = if libc::WIFEXITED(status) {
        let code = libc::WEXITSTATUS(status);
        if let (EXIT_EXPIRED, Some(dir)) = (code, &spec.record_dir) {
            remove_expired(dir);
            0
        } else {
            code
        }
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if sig == libc::SIGKILL {
            // halt's fallback (or the OOM killer): the CLI sees a crashed workspace.
            128 + sig
        } else {
            let why = if sig == libc::SIGSYS {
                let nr = seccomp::audit_syscall(child as u32);
                format!(
                    "killed by SIGSYS: a system call outside its seccomp filter ({})",
                    nr.map(|n| format!("syscall {n}{}", seccomp::name_suffix(n)))
                        .unwrap_or_else(|| "syscall number not in the kernel log".into())
                )
            } else {
                format!("killed by signal {sig}")
            };
            tracing::error!("{why}");
            if let Some(dir) = &spec.record_dir {
                let _ =
                    snapshot::atomic_file::write(&dir.join(FAILED), format!("{why}\n").as_bytes());
            }
            Code::GuestFailed as i32
        }
    } else {
        1
    };
    std::process::exit(code)
}

/// Copies the child's output to our stdout until it closes, at most `max` bytes.
fn copy_bounded(rd: OwnedFd, max: u64) {
    use std::io::{Read, Write};
    let mut r = std::fs::File::from(rd);
    let mut out = std::io::stdout().lock();
    let mut written = 0u64;
    let mut dropped = false;
    let mut buf = [0u8; 8192];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let room = max.saturating_sub(written) as usize;
        let take = n.min(room);
        if take > 0 {
            let _ = out.write_all(&buf[..take]);
            let _ = out.flush();
            written += take as u64;
        }
        if take < n && !dropped {
            dropped = true;
            let _ = writeln!(
                out,
                "\n[log bound of {max} bytes reached: further output dropped]"
            );
            let _ = out.flush();
        }
    }
}

/// Deletes an expired workspace (the VMM asked with [`EXIT_EXPIRED`]).
fn remove_expired(dir: &Path) {
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let doomed = parent.join(format!(
        ".deleting-{}-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    if std::fs::rename(dir, &doomed).is_ok() {
        let _ = std::fs::remove_dir_all(&doomed);
    }
}

/// The running sandbox's record, if its process is alive.
pub fn record(dir: &Path) -> Option<Record> {
    // Root's file in a directory the jailed process writes: read as an untrusted one anyway.
    let bytes = crate::workspace::read_untrusted(&dir.join(RECORD), 64 << 10).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Why the workspace's VMM failed, if its waiter said so. (The file is the waiter's, but the VMM
/// could put one there when there is none: never followed through a link, and bounded.)
pub fn failure(dir: &Path) -> Option<String> {
    let bytes = crate::workspace::read_untrusted(&dir.join(FAILED), 4096).ok()?;
    Some(String::from_utf8_lossy(&bytes).trim().to_string())
}

/// One line for `status`.
pub fn describe(r: &Record) -> String {
    let mut parts = Vec::new();
    if r.jail {
        parts.push(match r.uid {
            Some(u) => format!("jail (uid {u})"),
            None => "jail".to_string(),
        });
    } else {
        parts.push("no jail".into());
    }
    parts.push(if r.seccomp { "seccomp" } else { "no seccomp" }.into());
    if r.jail {
        match (&r.cgroups.is_empty(), &r.cgroup_note) {
            (false, _) => parts.push(format!("cgroup {}", r.cgroups.len())),
            (true, Some(n)) => parts.push(format!("no cgroup: {n}")),
            (true, None) => parts.push("no cgroup".into()),
        }
    }
    parts.join(", ")
}
