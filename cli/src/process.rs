//! Starting and stopping a workspace's VMM process.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::{self, Request, Response};
use crate::exit::{Code, Failure};
use crate::sandbox::RunFlags;
use crate::vmm_process::MemoryArg;
use crate::workspace::{self, process_alive, Workspace};

/// How long a VMM may take to answer after launch. Restores take milliseconds; a boot of the
/// test guest a few; the margin is for loaded CI machines.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const HALT_TIMEOUT: Duration = Duration::from_secs(10);

/// Launches the VMM process for `ws`, detached into its own process group, sandboxed as its
/// config says.
pub fn spawn(ws: &Workspace, restore: Option<&Path>, memory: MemoryArg) -> Result<Child, Failure> {
    let flags = RunFlags {
        jail: ws.config.sandbox.jail,
        seccomp: ws.config.sandbox.seccomp,
    };
    spawn_with(ws, restore, memory, flags)
}

/// Launches the VMM for `ws` restoring `snapshot` with its vCPUs paused: it answers on its API
/// socket once the VM is set up, and the guest runs from [`set_running`] on.
pub fn spawn_paused(ws: &Workspace, snapshot: &Path, memory: MemoryArg) -> Result<Child, Failure> {
    let flags = RunFlags {
        jail: ws.config.sandbox.jail,
        seccomp: ws.config.sandbox.seccomp,
    };
    launch(ws, Some(snapshot), memory, flags, true)
}

/// As [`spawn`], with this run's sandbox settings.
pub fn spawn_with(
    ws: &Workspace,
    restore: Option<&Path>,
    memory: MemoryArg,
    flags: RunFlags,
) -> Result<Child, Failure> {
    launch(ws, restore, memory, flags, false)
}

fn launch(
    ws: &Workspace,
    restore: Option<&Path>,
    memory: MemoryArg,
    flags: RunFlags,
    paused: bool,
) -> Result<Child, Failure> {
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(Code::Error, format!("cannot find my own binary: {e}")))?;
    crate::vmm_jail::rotate_log(&ws.path(workspace::VMM_LOG));
    let _ = std::fs::remove_file(ws.path(crate::sandbox::FAILED));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.path(workspace::VMM_LOG))
        .map_err(|e| Failure::new(Code::Error, format!("cannot open the VMM log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Failure::new(Code::Error, format!("cannot open the VMM log: {e}")))?;
    // Each run gets a fresh console log; the previous run's stays as console.log.1.
    let console = ws.path(workspace::CONSOLE);
    if console.exists() {
        let _ = std::fs::rename(&console, ws.path(&format!("{}.1", workspace::CONSOLE)));
    }
    // The VM's passt runs beside it in the host's network namespace, before the VMM dials it.
    crate::net::ensure(ws)?;
    let mut cmd = Command::new(exe);
    cmd.arg("__vmm").arg("--workspace").arg(&ws.dir);
    if let (Some(r), MemoryArg::Uffd) = (restore, memory) {
        crate::pageserver::ensure(r, flags)?;
    }
    if let Some(r) = restore {
        cmd.arg("--restore")
            .arg(r)
            .arg("--memory")
            .arg(match memory {
                MemoryArg::Eager => "eager",
                MemoryArg::Mmap => "mmap",
                MemoryArg::Uffd => "uffd",
                MemoryArg::Hot => "hot",
            });
        if paused {
            cmd.arg("--paused");
        }
    }
    if !flags.jail {
        cmd.arg("--no-jail");
    }
    if !flags.seccomp {
        cmd.arg("--no-seccomp");
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .process_group(0);
    cmd.spawn()
        .map_err(|e| Failure::new(Code::Error, format!("cannot start the VMM process: {e}")))
}

/// Waits until the VMM answers on its API socket, or reports why it died.
pub fn wait_ready(ws: &Workspace, child: &mut Child) -> Result<u32, Failure> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let sock = ws.path(workspace::API_SOCK);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let code = status.code().unwrap_or(1);
            let why = last_log_line(ws).unwrap_or_else(|| format!("exited with {status}"));
            let why = why.trim_start_matches("microagent vmm: ").to_string();
            let code = match code {
                3 => Code::NotFound,
                5 => Code::SnapshotRefused,
                6 => Code::HostUnsupported,
                7 => Code::GuestFailed,
                2 => Code::Usage,
                _ => Code::Error,
            };
            return Err(Failure::new(
                code,
                format!("workspace {} did not start: {why}", ws.name()),
            ));
        }
        if sock.exists() {
            if let Ok(Response::Status { .. }) =
                api::request(&sock, &Request::Status, Duration::from_secs(2))
            {
                // The pid its waiter recorded, not the one the VMM says (see `Workspace::pid`).
                return ws.pid().map(|p| p as u32).ok_or_else(|| {
                    Failure::new(
                        Code::Error,
                        format!(
                            "workspace {}: its VMM's pid file does not name the process its \
                             waiter started",
                            ws.name()
                        ),
                    )
                });
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(Failure::new(
                Code::Error,
                format!(
                    "workspace {} did not answer within {READY_TIMEOUT:?}",
                    ws.name()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn last_log_line(ws: &Workspace) -> Option<String> {
    let text =
        workspace::read_tail_untrusted(&ws.path(workspace::VMM_LOG), crate::vmm_jail::VMM_LOG_MAX)
            .ok()?;
    crate::logging::last_problem(&text)
}

/// Resumes (`running`) or pauses the VMM's vCPUs through its API socket.
pub fn set_running(ws: &Workspace, running: bool) -> Result<(), Failure> {
    let req = if running {
        Request::Resume
    } else {
        Request::Pause
    };
    match api::request(&ws.path(workspace::API_SOCK), &req, Duration::from_secs(30)) {
        Ok(Response::Ok) => Ok(()),
        Ok(Response::Error { code, message }) => {
            Err(Failure::new(crate::output::code_from_name(&code), message))
        }
        Ok(other) => Err(Failure::new(
            Code::Error,
            format!("unexpected answer from the VMM: {other:?}"),
        )),
        Err(e) => Err(Failure::new(Code::Error, e.to_string())),
    }
}

/// Stops the VMM: a clean shutdown request, then SIGKILL if it does not go.
pub fn halt(ws: &Workspace) -> Result<(), Failure> {
    let Some(pid) = ws.pid() else {
        crate::net::stop(ws);
        ws.clear_stale_process();
        return Ok(());
    };
    if process_alive(pid) {
        let _ = api::request(
            &ws.path(workspace::API_SOCK),
            &Request::Shutdown,
            Duration::from_secs(5),
        );
        let deadline = Instant::now() + HALT_TIMEOUT;
        while process_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if process_alive(pid) {
            // SAFETY: killing the workspace's own VMM process.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + HALT_TIMEOUT;
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    crate::net::stop(ws);
    ws.clear_stale_process();
    Ok(())
}

/// SIGKILL to a process this command started, then wait (bounded) until it is gone.
pub fn kill_and_wait(pid: i32) {
    if !process_alive(pid) {
        return;
    }
    // SAFETY: a plain signal to a VMM this command launched and has not yet reaped elsewhere.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + HALT_TIMEOUT;
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every live process launched as `__vmm --workspace DIR` (a waiter and the jailed VMM it forked),
/// found by its command line: on a failure path a waiter can be killed before it has recorded its
/// VMM's pid, and that VMM would otherwise outlive the command that removed its workspace.
pub fn vmm_processes(dir: &Path) -> Vec<i32> {
    use std::os::unix::ffi::OsStrExt;
    let mut want = b"__vmm\0--workspace\0".to_vec();
    want.extend_from_slice(dir.as_os_str().as_bytes());
    want.push(0);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let ours = cmdline.windows(want.len()).any(|w| w == want.as_slice());
            (ours && process_alive(pid)).then_some(pid)
        })
        .collect()
}

/// The error for a request the VMM did not answer: when its sandbox killed it (the waiter says
/// why), a guest failure naming the workspace; else the request's own error.
#[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
pub fn vmm_gone(ws: &Workspace, why: &str) -> Failure {
    let start = Instant::now();
    loop {
        if let Some(reason) = crate::sandbox::failure(&ws.dir) {
            return Failure::new(
                Code::GuestFailed,
                format!("workspace {} failed: its VMM was {reason}", ws.name()),
            );
        }
        let alive = ws.pid().is_some_and(process_alive);
        // A dead VMM's waiter writes why within moments; a live one just did not answer.
        if start.elapsed() > Duration::from_secs(5)
            || (alive && start.elapsed() > Duration::from_secs(1))
        {
            return Failure::new(Code::Error, format!("workspace {}: {why}", ws.name()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
