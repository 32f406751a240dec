//! `exec`: run a process, stream its stdout and stderr as they come, then report how it ended.
//!
//! The process runs in its own process group, so a timeout or a `Signal` reaches its children too.
//! The agent waits for the exit without reaping (pidfd, or `waitid(WNOWAIT)` on old kernels), stops
//! signalling the group, and only then reaps, so a signal can never hit a recycled pid. Output still
//! in the pipes after the exit is drained; a pipe held open by a background descendant is abandoned
//! once it stays idle for [`LINGER`] after the exit. If the client goes away, the process keeps
//! running (its output is drained and dropped) until it ends or its timeout kills it.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::connection::Reply;
use crate::protocol::messages::{ErrorKind, ExecRequest, ExitStatus, ServerMsg};
use crate::protocol::CHUNK_LEN;

/// How long the output pipes may stay open but idle after the process exited.
const LINGER: Duration = Duration::from_millis(200);
/// How often to look for the exit where there is no pidfd.
const POLL_EXIT: Duration = Duration::from_millis(5);
/// Pipe capacity asked for (fewer wake-ups for chatty processes).
const PIPE_SIZE: libc::c_int = 1 << 20;

/// Undoes an inherited "ignore" of SIGINT and SIGQUIT, which every process `exec` starts would
/// inherit in turn. An agent started as a background job of a non-interactive shell has both
/// ignored (POSIX), and a shell cannot trap a signal that was ignored when it started: a `Signal`
/// (the user's Ctrl-C) would then never reach a command run through `sh -c`. Done here, once,
/// rather than between fork and exec, so the children still start through posix_spawn.
pub(crate) fn restore_default_signals() {
    for signal in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: sigaction with a null new action only reads the current one into a zeroed,
        // valid struct; the disposition changes only from SIG_IGN, never from a handler.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
            {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
    }
}

/// Runs `req`, answering through `reply`.
pub(crate) fn run(req: ExecRequest, reply: Reply) {
    let Some((program, args)) = req.argv.split_first() else {
        return reply.fail(ErrorKind::InvalidRequest, "argv is empty".into());
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    if req.clear_env {
        cmd.env_clear();
    }
    cmd.envs(req.env.iter().map(|(k, v)| (k, v)));
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(if req.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.process_group(0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => {
            return reply.fail(
                ErrorKind::from_io(&e),
                format!("cannot run {program:?}: {e}"),
            );
        }
    };
    let Ok(pid) = i32::try_from(child.id()) else {
        return reply.fail(ErrorKind::Io, "pid out of range".into());
    };
    reply.set_pgid(Some(pid));

    if let (Some(data), Some(mut stdin)) = (req.stdin, child.stdin.take()) {
        // Not joined: a descendant may keep stdin open without reading it.
        let _ = thread::Builder::new()
            .name("agent-stdin".into())
            .spawn(move || {
                let mut data = data;
                // EPIPE when the process does not read all of it is fine.
                let _ = stdin.write_all(&data);
                crate::zeroize(&mut data);
            });
    }
    let pipes: Vec<(File, OutputKind)> = [
        child
            .stdout
            .take()
            .map(|p| (File::from(OwnedFd::from(p)), OutputKind::Stdout)),
        child
            .stderr
            .take()
            .map(|p| (File::from(OwnedFd::from(p)), OutputKind::Stderr)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let waited = supervise(&mut child, pid, pipes, timeout, &reply);
    match waited {
        Ok((status, timed_out)) => reply.finish(ServerMsg::Exited(ExitStatus {
            code: status.code(),
            signal: status.signal(),
            timed_out,
        })),
        Err(e) => reply.fail(ErrorKind::Io, format!("waiting for {program:?}: {e}")),
    }
}

#[derive(Clone, Copy)]
enum OutputKind {
    Stdout,
    Stderr,
}

/// Forwards the output pipes and waits for the exit in one poll loop (no thread of its own per
/// pipe): kills the group at the deadline, drains the pipes after the exit, then reaps.
fn supervise(
    child: &mut Child,
    pid: i32,
    mut pipes: Vec<(File, OutputKind)>,
    timeout: Option<Duration>,
    reply: &Reply,
) -> io::Result<(std::process::ExitStatus, bool)> {
    for (pipe, _) in &pipes {
        // SAFETY: plain fcntl on a pipe we own; failure only leaves the default size.
        unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
    let pidfd = pidfd_open(pid).ok();
    let mut deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    let mut exited = false;
    let mut buf = vec![0u8; CHUNK_LEN];
    loop {
        if !exited && deadline.is_some_and(|d| Instant::now() >= d) {
            reply.signal_group(libc::SIGKILL);
            // SAFETY: the child is not reaped yet, so its pid is still ours. It may have left
            // the group (setsid), hence the direct kill too.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            timed_out = true;
            deadline = None;
        }
        if exited && pipes.is_empty() {
            break;
        }
        let mut fds: Vec<libc::pollfd> = pipes
            .iter()
            .map(|(pipe, _)| pollfd(pipe.as_raw_fd()))
            .collect();
        let watch_pidfd = match (&pidfd, exited) {
            (Some(pidfd), false) => {
                fds.push(pollfd(pidfd.as_raw_fd()));
                true
            }
            _ => false,
        };
        let wait = if exited {
            Some(LINGER)
        } else if pidfd.is_none() {
            // Kernels before 5.3 have no pidfd: look for the exit at a short interval.
            Some(POLL_EXIT)
        } else {
            deadline.map(|d| d.saturating_duration_since(Instant::now()))
        };
        let ready = poll(&mut fds, wait)?;
        if ready == 0 && exited {
            // Idle since the exit: a background descendant holds the pipes; stop here.
            break;
        }
        let mut closed = Vec::new();
        for (i, (pipe, kind)) in pipes.iter_mut().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            match pipe.read(&mut buf) {
                Ok(0) => closed.push(i),
                Ok(n) => {
                    let chunk = buf[..n].to_vec();
                    // When the client is gone keep draining, so the process does not block.
                    reply.send(match kind {
                        OutputKind::Stdout => ServerMsg::Stdout(chunk),
                        OutputKind::Stderr => ServerMsg::Stderr(chunk),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => closed.push(i),
            }
        }
        for i in closed.into_iter().rev() {
            pipes.remove(i);
        }
        if !exited {
            exited = if watch_pidfd {
                fds.last().is_some_and(|p| p.revents != 0)
            } else {
                exited_without_reaping(pid)?
            };
        }
    }
    // The last reads may hold what the process printed (secrets, say): not for freed memory.
    crate::zeroize(&mut buf);
    // From here the pid may be recycled: no more signals to this group.
    reply.set_pgid(None);
    let status = child.wait()?;
    Ok((status, timed_out))
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until one of `fds` is ready (`None`: without limit); returns how many are.
fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = match timeout {
        // Round up so a deadline is not polled for in a busy loop.
        Some(t) => libc::c_int::try_from(t.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX),
        None => -1,
    };
    // SAFETY: fds is a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            fds.iter_mut().for_each(|p| p.revents = 0);
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn exited_without_reaping(pid: i32) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain old data; all-zero is valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: info is a valid siginfo_t to fill.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled info (si_pid is 0 when nothing changed state).
    Ok(unsafe { info.si_pid() } != 0)
}
