//! The jail: namespaces, a root holding only bind mounts of what the process needs (at the same
//! absolute paths), device nodes of its own, then an unprivileged uid with no capabilities.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{errno_fail, Spec};
use crate::exit::{Code, Failure};

/// Where jails live; each is `<JAIL_DIR>/<label>-<pid>`.
pub const JAIL_DIR: &str = "/run/microagent/jail";

/// The jail root's tmpfs: room for its mount points and device nodes only.
const JAIL_TMPFS: &str = "mode=0755,size=64k,nr_inodes=256";

pub fn root_for(label: &str, pid: u32) -> PathBuf {
    Path::new(JAIL_DIR).join(format!("{label}-{pid}"))
}

/// A host path made visible in the jail at the same path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// A device node created in the jail's /dev (with the host device's numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub path: PathBuf,
    /// Only the jailed uid may open it (kvm, userfaultfd, tun); else world read-write (null).
    pub private: bool,
}

/// What the jail holds. Other modules add what their devices need (e.g. a network helper's
/// socket directory) with [`Mounts::bind`].
#[derive(Debug, Clone, Default)]
pub struct Mounts {
    pub binds: Vec<Bind>,
    pub devices: Vec<Device>,
    /// Keep the host network namespace (a VM with a host tap device needs it).
    pub host_network: bool,
    /// A procfs of the jail's own PID namespace at /proc (read-only): the page server checks
    /// descriptors through /proc/self/fd.
    pub proc: bool,
}

impl Mounts {
    /// Adds `path` (a file or directory); a path already inside another bind is skipped.
    pub fn bind(&mut self, path: &Path, writable: bool) {
        if self.binds.iter().any(|b| path.starts_with(&b.path)) {
            return;
        }
        self.binds.push(Bind {
            path: path.to_path_buf(),
            writable,
        });
    }

    pub fn device(&mut self, path: &str, private: bool) {
        self.devices.push(Device {
            path: PathBuf::from(path),
            private,
        });
    }
}

fn cstr(p: &Path) -> Result<CString, Failure> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Failure::new(Code::Error, format!("bad path {}", p.display())))
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> Result<(), Failure> {
    mount_with(src, dst, fstype, flags, None)
}

fn mount_with(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), Failure> {
    let s = src.map(cstr).transpose()?;
    let d = cstr(dst)?;
    let t = fstype.map(|t| CString::new(t).unwrap_or_default());
    let o = data.map(|o| CString::new(o).unwrap_or_default());
    // SAFETY: valid NUL-terminated strings (or null) for the duration of the call.
    let r = unsafe {
        libc::mount(
            s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            d.as_ptr(),
            t.as_ref().map_or(std::ptr::null(), |t| t.as_ptr()),
            flags,
            o.as_ref()
                .map_or(std::ptr::null(), |o| o.as_ptr().cast::<libc::c_void>()),
        )
    };
    if r != 0 {
        return Err(errno_fail(&format!("mount {}", dst.display())));
    }
    Ok(())
}

/// Builds the jail and enters it; then drops privileges. Runs in the forked child, as root.
pub fn setup(spec: &Spec, pid: u32, ids: Option<(u32, u32)>) -> Result<(), Failure> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if !spec.mounts.host_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: plain unshare of this (single-threaded) process.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(errno_fail("unshare"));
    }
    // Nothing we mount may propagate back to the host.
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE)?;
    let root = root_for(&spec.label, pid);
    let _ = prune_dir(&root);
    std::fs::create_dir_all(&root).map_err(|e| {
        Failure::new(
            Code::Error,
            format!("sandbox: cannot create {}: {e}", root.display()),
        )
    })?;
    let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755));
    // The jail's skeleton (mount points, device nodes) lives in a small tmpfs of this mount
    // namespace, which pivot_root also wants (a mount point): on the host the jail is one empty
    // directory. Built on the host's filesystem, each VMM created and later removed a dozen
    // inodes there, the largest share of a fork's set-up in a batch of 1000 (ext4 scans past
    // every recently deleted inode for each new one). Not MS_NODEV: the device nodes are here.
    mount_with(
        Some(Path::new("tmpfs")),
        &root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(JAIL_TMPFS),
    )?;
    for dir in spec.untrusted.iter().chain(&spec.shared_dir) {
        for p in spec.mounts.binds.iter().map(|b| &b.path).chain(&spec.owned) {
            no_links_below(dir, p)?;
        }
    }
    for b in &spec.mounts.binds {
        let meta = std::fs::metadata(&b.path).map_err(|e| {
            Failure::new(Code::Error, format!("sandbox: {}: {e}", b.path.display()))
        })?;
        let target = inside(&root, &b.path);
        make_mount_point(&target, meta.is_dir())?;
        mount(Some(&b.path), &target, None, libc::MS_BIND | libc::MS_REC)?;
        let mut f = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
        if !b.writable {
            f |= libc::MS_RDONLY;
        }
        mount(None, &target, None, f)?;
    }
    for d in &spec.mounts.devices {
        let Ok(meta) = std::fs::metadata(&d.path) else {
            continue; // absent on this host: whatever needs it fails with a clear error later
        };
        let target = inside(&root, &d.path);
        if let Some(parent) = target.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = std::fs::remove_file(&target);
        let mode = if d.private { 0o600 } else { 0o666 };
        let c = cstr(&target)?;
        // SAFETY: creating a character device node in our own jail directory.
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | mode, meta.rdev()) } != 0 {
            return Err(errno_fail(&format!("mknod {}", target.display())));
        }
        // SAFETY: as above; the umask may have cut the mode.
        unsafe { libc::chmod(c.as_ptr(), mode) };
        if let (true, Some((uid, gid))) = (d.private, ids) {
            // SAFETY: chown of the node we just made.
            unsafe { libc::chown(c.as_ptr(), uid, gid) };
        }
    }
    if let Some((uid, gid)) = ids {
        for p in &spec.owned {
            let _ = std::fs::create_dir_all(p);
            chown(p, uid, gid);
        }
        if let Some(d) = &spec.shared_dir {
            // The process may add files here and remove its own, never root's (config, secrets).
            chown(d, 0, gid);
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o1770));
        }
    }
    if spec.mounts.proc {
        let target = root.join("proc");
        make_mount_point(&target, true)?;
        mount(
            Some(Path::new("proc")),
            &target,
            Some("proc"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        )?;
    }
    let host = CString::new("microagent").unwrap_or_default();
    // SAFETY: sethostname in our own UTS namespace.
    unsafe { libc::sethostname(host.as_ptr(), 10) };
    std::env::set_current_dir(&root)
        .map_err(|e| Failure::new(Code::Error, format!("sandbox: chdir: {e}")))?;
    let dot = CString::new(".").unwrap_or_default();
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one; we detach it next.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } != 0 {
        return Err(errno_fail("pivot_root"));
    }
    // SAFETY: detach the old root (the host's filesystem) from this namespace.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(errno_fail("umount the old root"));
    }
    std::env::set_current_dir("/")
        .map_err(|e| Failure::new(Code::Error, format!("sandbox: chdir /: {e}")))?;
    // The jail's own directories (mount points) become read-only.
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC,
    )?;
    set_limits(spec)?;
    drop_privileges(ids)
}

fn inside(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn make_mount_point(target: &Path, dir: bool) -> Result<(), Failure> {
    let fail = |e: std::io::Error| {
        Failure::new(
            Code::Error,
            format!("sandbox: cannot create {}: {e}", target.display()),
        )
    };
    if dir {
        std::fs::create_dir_all(target).map_err(fail)?;
    } else {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        if !target.exists() {
            std::fs::File::create(target).map_err(fail)?;
        }
    }
    Ok(())
}

/// Never through a link: what is handed over is the entry itself.
fn chown(p: &Path, uid: u32, gid: u32) {
    let _ = std::os::unix::fs::lchown(p, Some(uid), Some(gid));
}

/// Refuses `path` if it lies in `shared` (a directory the jailed process writes) and any of its
/// components there is a symbolic link. A VMM whose guest took it over could leave, say,
/// `rootfs.ext4 -> /etc/shadow` or `snapshots -> /etc` behind, and the next start (as root)
/// would bind that file into the jail and hand it to the new VMM's uid. Checked with no VMM
/// of this workspace running, so nothing can swap the entries between this check and the use
/// (a fork's source may be running: its snapshot is bound read-only).
fn no_links_below(shared: &Path, path: &Path) -> Result<(), Failure> {
    let Ok(rest) = path.strip_prefix(shared) else {
        return Ok(());
    };
    let mut at = shared.to_path_buf();
    for c in rest.components() {
        at.push(c);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(Failure::new(
                    Code::Error,
                    format!(
                        "sandbox: {} is a symbolic link, which the workspace's own files never \
                         are (a compromised VMM may have left it): refusing to start; remove it",
                        at.display()
                    ),
                ))
            }
            // Absent: made later as a plain directory or file.
            _ => {}
        }
    }
    Ok(())
}

fn set_limits(spec: &Spec) -> Result<(), Failure> {
    for (res, v) in [
        (libc::RLIMIT_NOFILE, spec.limits.nofile),
        (libc::RLIMIT_FSIZE, spec.limits.fsize),
    ] {
        let l = libc::rlimit {
            rlim_cur: v,
            rlim_max: v,
        };
        // SAFETY: setrlimit with a valid struct.
        if unsafe { libc::setrlimit(res, &l) } != 0 {
            return Err(errno_fail("setrlimit"));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`
const CAP_V3: u32 = 0x2008_0522;

/// Every capability gone (bounding, ambient, inheritable, permitted, effective), then the
/// unprivileged ids, then no_new_privs.
fn drop_privileges(ids: Option<(u32, u32)>) -> Result<(), Failure> {
    // SAFETY: prctl calls on this process; EINVAL past the last capability ends the loop.
    unsafe {
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
            {
                break;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    if let Some((uid, gid)) = ids {
        // SAFETY: plain id changes; checked.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 {
                return Err(errno_fail("setgroups"));
            }
            if libc::setresgid(gid, gid, gid) != 0 {
                return Err(errno_fail("setresgid"));
            }
            if libc::setresuid(uid, uid, uid) != 0 {
                return Err(errno_fail("setresuid"));
            }
        }
        rearm_parent_death()?;
    }
    let mut hdr = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and two zeroed data structs, as the ABI wants.
    if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
        return Err(errno_fail("capset"));
    }
    // SAFETY: prctl on this process.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(errno_fail("no_new_privs"));
    }
    Ok(())
}

/// The kernel clears the parent-death signal when the uid changes (commit_creds), which would
/// leave a jailed process running after its waiter is killed (a fork batch given up, a killed
/// page-server launcher). Armed again here; a waiter that died before this leaves our log
/// pipe without a reader (POLLERR on stdout), and we stop rather than run unwatched.
fn rearm_parent_death() -> Result<(), Failure> {
    // SAFETY: prctl with plain integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(errno_fail("prctl(PR_SET_PDEATHSIG)"));
    }
    let mut out = libc::pollfd {
        fd: 1,
        events: 0,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, zero timeout.
    let ready = unsafe { libc::poll(&mut out, 1, 0) };
    if ready == 1 && out.revents & libc::POLLERR != 0 {
        return Err(Failure::new(
            Code::Error,
            "sandbox: the waiter exited while the jail was being set up",
        ));
    }
    Ok(())
}

/// Removes a finished jail: only its empty mount-point directories and files, never crossing
/// into anything else (should a bind mount still be visible, it stays untouched).
pub fn prune(root: &Path) {
    let _ = prune_dir(root);
}

fn prune_dir(dir: &Path) -> std::io::Result<()> {
    let dev = std::fs::symlink_metadata(dir)?.dev();
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        if m.is_dir() {
            let _ = prune_dir(&p);
        } else if m.len() == 0 || m.file_type().is_char_device() {
            let _ = std::fs::remove_file(&p);
        }
    }
    std::fs::remove_dir(dir)
}
