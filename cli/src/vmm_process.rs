//! The VMM process of one running workspace (`microagent __vmm`): boots or restores the VM,
//! serves the control API on `api.sock`, and cleans up its records when the guest ends.

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use snapshot::live::{Controls, LiveOptions};
use snapshot::restore::RestoreMode;
use snapshot::{CaptureRequest, Progress, Snapshot};
use vmm::devices::config::{BlockConfig, DeviceConfig, NetBackendConfig, NetConfig, VsockConfig};
use vmm::{Console, Vm, VmConfig};

use crate::api::{self, Request, Response};
use crate::exit::{Code, Failure};
use crate::workspace::{self, Workspace};

#[derive(Args)]
pub struct VmmArgs {
    /// The workspace directory.
    #[arg(long)]
    workspace: PathBuf,
    /// Restore from this snapshot directory instead of booting.
    #[arg(long)]
    restore: Option<PathBuf>,
    /// How guest memory comes back on restore.
    #[arg(long, value_enum, default_value_t = MemoryArg::Mmap)]
    memory: MemoryArg,
    /// With --restore: leave the vCPUs paused until a resume request (a fork batch sets up
    /// every fork before any guest runs).
    #[arg(long, requires = "restore")]
    paused: bool,
    /// Run without the jail (namespaces, unprivileged uid, capabilities, cgroup).
    #[arg(long)]
    no_jail: bool,
    /// Run without seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MemoryArg {
    /// Read the memory file into fresh memory.
    Eager,
    /// Map the memory file copy-on-write (pages load on first touch, shared by forks).
    Mmap,
    /// Serve pages lazily through userfaultfd from the snapshot's page server.
    Uffd,
    /// Map copy-on-write, but read the working set a lazy (uffd) restore recorded into huge
    /// pages first (eager when none was recorded).
    Hot,
}

impl MemoryArg {
    /// The mode a restore of `count` VMs from one snapshot gets unless asked otherwise. One VM:
    /// eager, read in parallel into huge pages, whose guest then runs at full speed at once (a
    /// copy-on-write map faults every page it writes in 4 KiB at a time, seconds for a guest
    /// that touches 1 GiB on nested KVM). A batch: the copy-on-write map, whose forks share the
    /// snapshot's pages in the page cache instead of holding a private copy each.
    pub fn default_for(count: u32) -> Self {
        if count > 1 {
            MemoryArg::Mmap
        } else {
            MemoryArg::Eager
        }
    }
}

impl From<MemoryArg> for RestoreMode {
    fn from(m: MemoryArg) -> Self {
        match m {
            MemoryArg::Eager => RestoreMode::Eager,
            MemoryArg::Mmap | MemoryArg::Uffd => RestoreMode::PrivateMap,
            MemoryArg::Hot => RestoreMode::Hot,
        }
    }
}

/// A workspace's devices: its private rootfs as the first disk, a vsock socket in its
/// directory (the guest agent's channel), and entropy.
fn device_config(ws: &Workspace) -> DeviceConfig {
    DeviceConfig {
        blocks: ws
            .config
            .rootfs
            .iter()
            .map(|p| BlockConfig {
                path: p.clone(),
                read_only: false,
                id: Some("rootfs".into()),
            })
            .collect(),
        net: match &ws.config.net {
            crate::net::NetMode::None => None,
            crate::net::NetMode::User => Some(NetConfig {
                backend: NetBackendConfig::PasstSocket {
                    path: crate::net::socket_path(&ws.dir),
                },
                mac: crate::net::mac_for(ws.name()),
            }),
            crate::net::NetMode::Tap { name } => Some(NetConfig {
                backend: NetBackendConfig::Tap { name: name.clone() },
                mac: crate::net::mac_for(ws.name()),
            }),
        },
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: ws.path(workspace::VSOCK_SOCK),
        }),
        rng: true,
    }
}

/// Every VM has its own vsock namespace (its own socket), so all guests can use the same CID.
const GUEST_CID: u64 = 3;

struct Daemon {
    vm: Vm,
    ws: Workspace,
    paused: AtomicBool,
    /// When the VM was last paused (for `status`), while it is.
    paused_since: Mutex<Option<Instant>>,
    shutdown: AtomicBool,
    started: Instant,
    restored_from: Option<String>,
    /// The snapshot (in this workspace) the VM's memory last matched: the parent of a diff.
    last_capture: Mutex<Option<String>>,
    // One request at a time: a snapshot and a resume must not interleave.
    busy: Mutex<()>,
}

pub fn run(args: VmmArgs) -> Result<(), Failure> {
    let root = args
        .workspace
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Failure::new(Code::Usage, "bad workspace path"))?
        .to_path_buf();
    let name = args
        .workspace
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ws = Workspace::open(&root, &name)?;
    let flags = crate::sandbox::RunFlags {
        jail: !args.no_jail,
        seccomp: !args.no_seccomp,
    };
    tracing::debug!(
        workspace = %name,
        restore = ?args.restore,
        memory = ?args.memory,
        jail = flags.jail,
        seccomp = flags.seccomp,
        "VMM starting"
    );
    crate::sandbox::enter(crate::vmm_jail::spec(
        &ws,
        args.restore.as_deref(),
        args.memory,
        flags,
    ))?;
    crate::sandbox::on_stop_signals();
    if flags.seccomp {
        vmm::thread_hook::set(crate::sandbox::seccomp::vmm_thread_hook);
        crate::sandbox::seccomp::apply(crate::sandbox::seccomp::Kind::VmmProcess)?;
    }
    let console_log = crate::boundedlog::BoundedLog::create(
        &ws.path(workspace::CONSOLE),
        ws.config.sandbox.console_max,
    )
    .map_err(|e| Failure::new(Code::Error, format!("cannot open the console log: {e}")))?;
    let console = Console::Writer(Box::new(console_log));
    let cfg = &ws.config;
    let vm = match &args.restore {
        None => Vm::boot(VmConfig {
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            cmdline: cfg.cmdline.clone(),
            mem_mib: cfg.mem_mib,
            vcpus: cfg.vcpus,
            console,
            devices: device_config(&ws),
        })
        .map_err(crate::run::vm_failure)?,
        Some(dir) => {
            let snap = Snapshot::open(dir).map_err(crate::snapshot_failure)?;
            let page_server =
                (args.memory == MemoryArg::Uffd).then(|| crate::pageserver::socket_for(&snap.dir));
            // The CLI verified the contents and the kernel once before starting us (forks share
            // that work). The kernel is not checked again here: a restore never reads it, and in
            // the jail the host's verified stamps are out of reach, so every VMM hashed the
            // whole kernel again (17 MB for the test Linux kernel).
            snapshot::restore::restore::<Vm>(
                &snap,
                &snapshot::restore::RestoreOptions {
                    kernel: None,
                    verify_contents: false,
                    memory_mode: args.memory.into(),
                    page_server: page_server.as_deref(),
                    label: "vmm",
                },
                vmm::snapshots::RestoreArgs {
                    console,
                    paused: args.paused,
                    // This workspace's own disk copy and vsock socket, whoever took the snapshot.
                    devices: Some(device_config(&ws)),
                },
            )
            .map_err(|e| {
                use snapshot::restore::{MemoryError, RestoreError};
                match e {
                    RestoreError::Snapshot(e) => crate::snapshot_failure(e),
                    RestoreError::Vm(e) => crate::run::vm_failure(e),
                    // As when the VM built its memory: a memory file that does not fit is bad
                    // input, a page server that refuses is not.
                    RestoreError::Memory(
                        e @ (MemoryError::PageServer(_) | MemoryError::LazyDiff),
                    ) => Failure::new(Code::Error, e.to_string()),
                    RestoreError::Memory(e) => Failure::new(Code::Usage, e.to_string()),
                }
            })?
        }
    };
    match &args.restore {
        None => tracing::info!("VM booted"),
        Some(dir) => tracing::info!(memory = ?args.memory, "VM restored from {}", dir.display()),
    }
    let sock = ws.path(workspace::API_SOCK);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot listen on {}: {e}", sock.display()),
        )
    })?;
    // Atomic but not durable: a pid means nothing after a host crash (a stale one is cleared),
    // and two fsyncs per VMM were a visible share of a large fork batch's set-up.
    snapshot::atomic_file::Options::default()
        .durable(false)
        .write(
            &ws.path(workspace::PID),
            format!("{}\n", crate::sandbox::host_pid()).as_bytes(),
        )
        .map_err(|e| Failure::new(Code::Error, format!("cannot write pid file: {e}")))?;

    // No dirty log: it would make every first write after each capture a write-protection
    // fault (seconds of a busy guest's time on nested KVM). Diffs compare page digests instead.
    let ws_snapshots = ws.snapshots_dir();
    let daemon = Arc::new(Daemon {
        vm,
        ws,
        paused: AtomicBool::new(args.paused),
        paused_since: Mutex::new(args.paused.then(Instant::now)),
        shutdown: AtomicBool::new(false),
        started: Instant::now(),
        restored_from: args.restore.as_ref().map(|p| p.display().to_string()),
        last_capture: Mutex::new(own_snapshot_tag(&ws_snapshots, args.restore.as_deref())),
        busy: Mutex::new(()),
    });
    use crate::sandbox::seccomp::Kind;
    let seccomp = flags.seccomp;
    {
        let d = daemon.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                if seccomp && crate::sandbox::seccomp::apply(Kind::Control).is_err() {
                    std::process::abort();
                }
                serve(&d, listener)
            })
            .map_err(|e| Failure::new(Code::Error, format!("cannot start the API thread: {e}")))?;
    }
    if seccomp {
        crate::sandbox::seccomp::apply(Kind::Control)?;
    }
    let expires = daemon.ws.config.expires_unix;
    let mut expired = false;
    let result = loop {
        if daemon.shutdown.load(Ordering::SeqCst) {
            break Ok(());
        }
        if crate::sandbox::stop_requested() {
            // As `halt`, but an operation under way (a capture) ends first, answer and all.
            let _busy = daemon.busy.lock().unwrap_or_else(|e| e.into_inner());
            tracing::info!("stop signal");
            break Ok(());
        }
        if expires.is_some_and(|t| now_unix() >= t) {
            expired = true;
            break Ok(());
        }
        match daemon.vm.poll_exit(Duration::from_millis(100)) {
            Ok(None) => continue,
            Ok(Some(_)) => break Ok(()),
            Err(e) => break Err(crate::run::vm_failure(e)),
        }
    };
    for f in [workspace::API_SOCK, workspace::PID, workspace::VSOCK_SOCK] {
        let _ = std::fs::remove_file(daemon.ws.path(f));
    }
    match &result {
        Ok(()) => tracing::info!(expired, "VM stopped"),
        Err(f) => tracing::error!("{}", f.message),
    }
    // Exit without unwinding the API thread; the VM's threads stop with the process. An
    // expired workspace goes, files and all, even with no CLI around: the waiter (outside the
    // jail) removes it.
    std::process::exit(match &result {
        Ok(()) if expired => crate::sandbox::EXIT_EXPIRED,
        Ok(()) => 0,
        Err(f) => f.code as i32,
    })
}

fn serve(d: &Daemon, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        handle(d, conn);
    }
}

fn handle(d: &Daemon, conn: UnixStream) {
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let req = match api::read_msg::<Request>(&mut r) {
        Ok(Some(req)) => req,
        Ok(None) => return,
        Err(e) => {
            let _ = api::write_msg(
                &mut w,
                &Response::Error {
                    code: "invalid-request".into(),
                    message: e.to_string(),
                },
            );
            return;
        }
    };
    tracing::debug!(request = ?req, "API request");
    let _busy = d.busy.lock().unwrap_or_else(|e| e.into_inner());
    // Set only once the answer is written: the main loop exits the process as soon as it sees
    // the flag, and a client must never lose the answer to a stop it asked for.
    let mut stop_after = false;
    let resp = match req {
        Request::Status => status(d),
        Request::Pause => set_paused(d, true),
        Request::Resume => set_paused(d, false),
        Request::Snapshot {
            tag,
            note,
            leave_paused,
            diff,
            secrets,
            strict_secrets,
            live,
        } => take_snapshot(
            d,
            &tag,
            note.as_deref(),
            leave_paused,
            diff,
            live,
            (&secrets, strict_secrets),
            &mut |done, total| {
                let _ = api::write_msg(&mut w, &Response::Progress { done, total });
            },
        ),
        Request::Shutdown => {
            stop_after = true;
            Response::Ok
        }
        Request::Hibernate => {
            let dir = d.ws.path(workspace::HIBERNATION);
            let r = capture_into(
                d,
                &dir,
                workspace::HIBERNATION_SLOT,
                None,
                true,
                false,
                None,
                None,
                None,
                &mut |done, total| {
                    let _ = api::write_msg(&mut w, &Response::Progress { done, total });
                },
            );
            // Stop with the VM still paused: nothing runs after the capture.
            stop_after = matches!(r, Response::Snapshot { .. });
            r
        }
        #[cfg(feature = "test-hooks")]
        Request::TestForbiddenSyscall => {
            // syslog(SYSLOG_ACTION_SIZE_BUFFER) is harmless, and in no filter.
            // SAFETY: a read-only query with no buffer.
            let r = unsafe { libc::syscall(libc::SYS_syslog, 10, std::ptr::null::<u8>(), 0) };
            Response::TestResult {
                ok: false,
                detail: format!("still alive: syslog returned {r}"),
            }
        }
        #[cfg(feature = "test-hooks")]
        Request::TestOpen { path } => match std::fs::File::open(&path) {
            Ok(_) => Response::TestResult {
                ok: true,
                detail: format!("opened {path}"),
            },
            Err(e) => Response::TestResult {
                ok: false,
                detail: format!("cannot open {path}: {e}"),
            },
        },
    };
    crate::testhooks::slow_point("vmm-answer");
    let _ = api::write_msg(&mut w, &resp);
    if stop_after {
        d.shutdown.store(true, Ordering::SeqCst);
    }
}

fn status(d: &Daemon) -> Response {
    Response::Status {
        paused: d.paused.load(Ordering::SeqCst),
        pid: crate::sandbox::host_pid(),
        vcpus: d.ws.config.vcpus,
        mem_mib: d.ws.config.mem_mib,
        uptime_ms: d.started.elapsed().as_millis() as u64,
        restored_from: d.restored_from.clone(),
        paused_ms: d
            .paused_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map(|t| t.elapsed().as_millis() as u64),
    }
}

fn error(code: &str, message: impl Into<String>) -> Response {
    Response::Error {
        code: code.into(),
        message: message.into(),
    }
}

fn mark_paused(d: &Daemon, paused: bool) {
    let mut since = d.paused_since.lock().unwrap_or_else(|e| e.into_inner());
    if paused && since.is_none() {
        *since = Some(Instant::now());
    } else if !paused {
        *since = None;
    }
    d.paused.store(paused, Ordering::SeqCst);
}

fn set_paused(d: &Daemon, pause: bool) -> Response {
    if d.paused.load(Ordering::SeqCst) == pause {
        return Response::Ok;
    }
    let r = if pause { d.vm.pause() } else { d.vm.resume() };
    match r {
        Ok(()) => {
            mark_paused(d, pause);
            Response::Ok
        }
        Err(e) => error("error", e.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
fn take_snapshot(
    d: &Daemon,
    tag: &str,
    note: Option<&str>,
    leave_paused: bool,
    diff: bool,
    live: Option<api::LiveParams>,
    (secrets, strict_secrets): (&[snapshot::residue::SecretValue], bool),
    progress: &mut dyn FnMut(u64, u64),
) -> Response {
    if diff && live.is_some() {
        return error(
            "invalid-argument",
            "a live capture is a full snapshot: a diff is taken with the guest stopped",
        );
    }
    // Built before the VM pauses: the automaton costs the guest nothing while it runs.
    let scanner = if secrets.is_empty() {
        None
    } else {
        match snapshot::residue::Scanner::new(secrets) {
            Ok(s) => Some(s),
            Err(e) => return error("error", e.to_string()),
        }
    };
    let check = scanner.as_ref().map(|scanner| snapshot::SecretCheck {
        scanner,
        strict: strict_secrets,
    });
    let parent = if diff {
        let last = d
            .last_capture
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match last {
            Some(p) if d.ws.snapshots_dir().join(&p).is_dir() => Some(p),
            _ => {
                return error(
                    "conflict",
                    "a diff snapshot needs a parent: take a full snapshot of this run first",
                )
            }
        }
    } else {
        None
    };
    let r = capture_into(
        d,
        &d.ws.snapshots_dir(),
        tag,
        note,
        leave_paused,
        true,
        parent.as_deref(),
        check,
        live.map(|l| LiveOptions {
            max_pause: Duration::from_micros(l.max_pause_us),
            ..LiveOptions::default()
        }),
        progress,
    );
    if matches!(r, Response::Snapshot { .. }) {
        *d.last_capture.lock().unwrap_or_else(|e| e.into_inner()) = Some(tag.to_string());
    }
    r
}

/// The tag of `restored`, if it is one of this workspace's own snapshots.
fn own_snapshot_tag(snapshots: &Path, restored: Option<&Path>) -> Option<String> {
    let r = restored?;
    if r.parent() != Some(snapshots) {
        return None;
    }
    r.file_name()?.to_str().map(str::to_string)
}

/// Pauses (if running), captures into `dir/tag`, resumes unless `leave_paused`. With `live`,
/// a running VM is captured while it runs and stopped only for the last pages.
#[allow(clippy::too_many_arguments)]
fn capture_into(
    d: &Daemon,
    dir: &Path,
    tag: &str,
    note: Option<&str>,
    leave_paused: bool,
    with_rootfs: bool,
    parent: Option<&str>,
    secrets: Option<snapshot::SecretCheck<'_>>,
    live: Option<LiveOptions>,
    progress: &mut dyn FnMut(u64, u64),
) -> Response {
    let was_paused = d.paused.load(Ordering::SeqCst);
    let cfg = &d.ws.config;
    let req = CaptureRequest {
        dir,
        tag,
        kernel: &cfg.kernel,
        cmdline: &cfg.cmdline,
        rootfs: if with_rootfs {
            cfg.rootfs.as_deref()
        } else {
            None
        },
        image: cfg.image.as_deref(),
        workspace: Some(&cfg.name),
        note,
        parent,
        secrets,
    };
    let mut progress = |p| {
        if let Progress::Memory { done, total } = p {
            progress(done, total)
        }
    };
    snapshot::sweep_leftovers(dir);
    // A paused guest writes nothing: a live capture of it is the ordinary one.
    if let Some(opts) = live.filter(|_| !was_paused) {
        return capture_live(d, &req, opts, leave_paused, &mut progress);
    }
    // The pause as the guest sees it: from the request to stop to the vCPUs running again.
    let paused = Instant::now();
    if !was_paused {
        if let Err(e) = d.vm.pause() {
            return error("error", format!("cannot pause the VM: {e}"));
        }
        mark_paused(d, true);
    }
    let result = snapshot::capture(&d.vm, &req, &mut progress);
    if !was_paused && !leave_paused {
        if let Err(e) = d.vm.resume() {
            return error(
                "error",
                format!("snapshot taken but the VM did not resume: {e}"),
            );
        }
        mark_paused(d, false);
    }
    let pause_ms = (!was_paused).then(|| paused.elapsed().as_secs_f64() * 1000.0);
    match result {
        Ok(manifest) => Response::Snapshot {
            manifest: Box::new(manifest),
            capture: Some(api::CaptureReport {
                pause_ms,
                live: None,
            }),
        },
        Err(e) => error(e.code(), e.to_string()),
    }
}

/// A live capture of the running VM (`snapshot::live`): the dirty log is armed for it, unless
/// it already was, and disarmed after, so the guest does not pay for it past the capture.
fn capture_live(
    d: &Daemon,
    req: &CaptureRequest<'_>,
    opts: LiveOptions,
    leave_paused: bool,
    progress: &mut dyn FnMut(Progress),
) -> Response {
    let armed_before = d.vm.dirty_tracking();
    if let Err(e) = d.vm.enable_dirty_tracking() {
        return error(
            "host-unsupported",
            format!("cannot arm the dirty log for a live capture: {e}"),
        );
    }
    let mut resume_failed = None;
    let result = snapshot::live::capture_live(
        &d.vm,
        req,
        opts,
        Controls {
            pause: &mut || {
                d.vm.pause().map_err(|e| e.to_string())?;
                mark_paused(d, true);
                Ok(())
            },
            resume: &mut || {
                if leave_paused {
                    return;
                }
                match d.vm.resume() {
                    Ok(()) => mark_paused(d, false),
                    Err(e) => resume_failed = Some(e.to_string()),
                }
            },
        },
        progress,
    );
    if !armed_before {
        if let Err(e) = d.vm.disable_dirty_tracking() {
            tracing::warn!("cannot disarm the dirty log after a live capture: {e}");
        }
    }
    if let Some(e) = resume_failed {
        return error(
            "error",
            format!("snapshot taken but the VM did not resume: {e}"),
        );
    }
    match result {
        Ok((manifest, report)) => {
            if let Some(why) = &report.fallback {
                tracing::warn!("{why}");
            }
            tracing::info!(
                rounds = report.rounds,
                pause_ms = report.pause_ms,
                final_bytes = report.final_bytes,
                "live capture {}",
                manifest.tag
            );
            Response::Snapshot {
                manifest: Box::new(manifest),
                capture: Some(api::CaptureReport {
                    pause_ms: Some(report.pause_ms),
                    live: Some(report),
                }),
            }
        }
        Err(e) => error(e.code(), e.to_string()),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
