//! Seccomp-BPF filters per thread kind, built with `seccompiler`: default deny, and a denied
//! system call kills the whole process (SIGSYS; its waiter reports it).
//!
//! The process-wide filter (the union of every kind, plus what boot and restore need) is put on
//! the main thread while it is still the only thread, so every thread inherits it. Each thread
//! then stacks the narrower filter of its kind on itself: a vCPU thread, the device event loop,
//! the control API thread, and the main thread once the VM runs. The page server has one
//! process-wide filter. The sets come from running every path (boot, restore eager/mmap/uffd,
//! snapshot full/diff/hibernate, TTL, vsock, rng, blk, the Linux guest) under `strace -f`.

use std::collections::BTreeMap;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::exit::{Code, Failure};

/// What a thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Everything the VMM process does, boot and restore included: the process-wide filter.
    VmmProcess,
    Vcpu,
    Devices,
    /// The control API thread (snapshots, hibernation, status) and the main thread once the VM
    /// runs (waits for the guest, cleans up).
    Control,
    PageServer,
    /// A remote snapshot's page server: the page server's calls plus an S3 client's.
    RemotePageServer,
}

/// Every thread: memory, futexes, signals, time, ordinary reads and writes of open files.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// A vCPU: `KVM_RUN` and the ioctls its exits need; the serial console's bounded log.
const VCPU: &[i64] = &[libc::SYS_ioctl];

/// The device event loop: epoll, eventfds, disk files, vsock's Unix sockets.
const DEVICES: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
];

/// The control API and the main thread: captures write snapshot files; threads come and go.
const CONTROL: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_getdents64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // A capture starts the memory file's writeback chunk by chunk (snapshot::memfile).
    libc::SYS_sync_file_range,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_msync,
    libc::SYS_mincore,
    libc::SYS_statfs,
    libc::SYS_fstatfs,
    libc::SYS_fchmod,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_eventfd2,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_membarrier,
    libc::SYS_userfaultfd,
];

/// Only while booting or restoring (main thread, before its narrower filter).
const SETUP: &[i64] = &[
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_socketpair,
    libc::SYS_epoll_create1,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_memfd_create,
    libc::SYS_set_tid_address,
    libc::SYS_sched_setaffinity,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_uname,
    libc::SYS_umask,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_seccomp,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_prlimit64,
    libc::SYS_sysinfo,
    libc::SYS_arch_prctl,
    libc::SYS_access,
];

/// The page server: its socket, sessions (threads), the memory file, userfaultfd ioctls.
const PAGE_SERVER: &[i64] = &[
    libc::SYS_ioctl,
    libc::SYS_accept4,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_openat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigaction,
    libc::SYS_preadv,
    libc::SYS_process_vm_readv,
    libc::SYS_mincore,
    libc::SYS_membarrier,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_readlink,
    libc::SYS_fsync,
    libc::SYS_getdents64,
];

/// What a remote snapshot's page server adds: the S3 client's sockets (name resolution
/// included) and the chunk cache (recency is a file's mtime).
const REMOTE_CLIENT: &[i64] = &[
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    libc::SYS_utimensat,
];

fn syscalls(kind: Kind) -> Vec<i64> {
    let mut v: Vec<i64> = BASE.to_vec();
    match kind {
        Kind::VmmProcess => {
            for s in [VCPU, DEVICES, CONTROL, SETUP] {
                v.extend_from_slice(s);
            }
        }
        Kind::Vcpu => v.extend_from_slice(VCPU),
        Kind::Devices => v.extend_from_slice(DEVICES),
        Kind::Control => v.extend_from_slice(CONTROL),
        Kind::PageServer => {
            v.extend_from_slice(PAGE_SERVER);
            v.extend_from_slice(SETUP);
        }
        Kind::RemotePageServer => {
            v.extend_from_slice(PAGE_SERVER);
            v.extend_from_slice(SETUP);
            v.extend_from_slice(REMOTE_CLIENT);
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// The compiled filter for `kind`.
pub fn program(kind: Kind) -> Result<BpfProgram, Failure> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = syscalls(kind)
        .into_iter()
        .map(|n| (n, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| Failure::new(Code::Error, format!("seccomp filter {kind:?}: {e}")))?;
    filter.try_into().map_err(|e: seccompiler::BackendError| {
        Failure::new(Code::Error, format!("seccomp filter {kind:?}: {e}"))
    })
}

/// Puts the filter for `kind` on the calling thread (threads it creates later inherit it).
pub fn apply(kind: Kind) -> Result<(), Failure> {
    let prog = program(kind)?;
    seccompiler::apply_filter(&prog)
        .map_err(|e| Failure::new(Code::Error, format!("seccomp filter {kind:?}: {e}")))
}

/// The VMM's thread hook: vCPU and device threads stack their filter as they start. A thread
/// that cannot is not allowed to go on unfiltered.
pub fn vmm_thread_hook(kind: vmm::thread_hook::ThreadKind) {
    let k = match kind {
        vmm::thread_hook::ThreadKind::Vcpu => Kind::Vcpu,
        vmm::thread_hook::ThreadKind::Devices => Kind::Devices,
    };
    if let Err(f) = apply(k) {
        tracing::error!("{}", f.message);
        std::process::abort();
    }
}

/// The number of the system call that got `pid` killed, from the kernel's audit record
/// (`type=1326 ... pid=N ... syscall=NR`) in /dev/kmsg. None when the log is not readable.
pub fn audit_syscall(pid: u32) -> Option<i64> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // The record may trail the death by a moment.
    for _ in 0..20 {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()?;
        let needle = format!(" pid={pid} ");
        let mut found = None;
        let mut buf = vec![0u8; 8192];
        // Each read returns one record; EAGAIN at the end.
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            let rec = String::from_utf8_lossy(&buf[..n]);
            if rec.contains("type=1326") && rec.contains(&needle) {
                found = rec
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("syscall="))
                    .and_then(|s| s.parse().ok());
            }
        }
        if found.is_some() {
            return found;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

/// `" (name)"` for the few system calls one is likely to meet here.
pub fn name_suffix(nr: i64) -> String {
    let name = match nr {
        libc::SYS_ptrace => "ptrace",
        libc::SYS_execve => "execve",
        libc::SYS_fork => "fork",
        libc::SYS_kill => "kill",
        libc::SYS_mount => "mount",
        libc::SYS_setuid => "setuid",
        libc::SYS_socket => "socket",
        libc::SYS_openat => "openat",
        libc::SYS_ioctl => "ioctl",
        libc::SYS_syslog => "syslog",
        _ => return String::new(),
    };
    format!(" ({name})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_narrow_kinds_are_subsets_of_the_process_filter() {
        let all = syscalls(Kind::VmmProcess);
        for k in [Kind::Vcpu, Kind::Devices, Kind::Control] {
            program(k).unwrap();
            for n in syscalls(k) {
                assert!(all.contains(&n), "{k:?}: {n} not in the process filter");
            }
        }
        program(Kind::PageServer).unwrap();
        program(Kind::RemotePageServer).unwrap();
        let remote = syscalls(Kind::RemotePageServer);
        for n in syscalls(Kind::PageServer) {
            assert!(
                remote.contains(&n),
                "{n} not in the remote page server's filter"
            );
        }
        assert!(!remote.contains(&libc::SYS_execve) && !remote.contains(&libc::SYS_ptrace));
        assert!(!syscalls(Kind::Vcpu).contains(&libc::SYS_openat));
        assert!(!all.contains(&libc::SYS_execve));
        assert!(!all.contains(&libc::SYS_ptrace));
    }
}
