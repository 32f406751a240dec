//! What a workspace's VMM (and a snapshot's page server) may see and do in its jail.

use std::path::{Path, PathBuf};

use crate::sandbox::jail::Mounts;
use crate::sandbox::{Limits, RunFlags, Spec};
use crate::vmm_process::MemoryArg;
use crate::workspace::Workspace;

/// Bounds vmm.log (and pageserver.log) per run; the previous run's log is kept as `.1`.
pub const VMM_LOG_MAX: u64 = 1 << 20;
/// Open files: vsock connections (at most `vmm::devices::virtio::vsock::MAX_CONNECTIONS`) plus
/// the VM's own descriptors.
const NOFILE: u64 = 4096;
const MIB: u64 = 1 << 20;

/// The VMM's jail: its workspace (read-write), its kernel and initrd, the snapshot it restores
/// (read-only, with the snapshots beside it for diff parents), and the devices it uses.
pub fn spec(ws: &Workspace, restore: Option<&Path>, memory: MemoryArg, flags: RunFlags) -> Spec {
    let cfg = &ws.config;
    let mut m = Mounts::default();
    m.bind(&ws.dir, true);
    m.bind(&cfg.kernel, false);
    if let Some(i) = &cfg.initrd {
        m.bind(i, false);
    }
    if let Some(r) = &cfg.rootfs {
        m.bind(r, true);
    }
    if let Some(r) = restore {
        // Diff snapshots name their parents in the same snapshots directory.
        m.bind(r.parent().unwrap_or(r), false);
    }
    m.device("/dev/kvm", true);
    if memory == MemoryArg::Uffd && restore.is_some() {
        m.device("/dev/userfaultfd", true);
    }
    match &cfg.net {
        // A tap lives in the host's network namespace, and the VMM opens it by name.
        crate::net::NetMode::Tap { .. } => {
            m.host_network = true;
            m.device("/dev/net/tun", true);
        }
        // passt stays outside; its socket's directory is bound in.
        crate::net::NetMode::User => {
            let sock = crate::net::socket_path(&ws.dir);
            if !sock.starts_with(&ws.dir) {
                m.bind(sock.parent().unwrap_or(&sock), true);
            }
        }
        crate::net::NetMode::None => {}
    }
    m.device("/dev/null", false);
    m.device("/dev/urandom", false);
    let disk = cfg
        .rootfs
        .as_ref()
        .and_then(|r| std::fs::metadata(r).ok())
        .map_or(0, |m| m.len());
    let mem = cfg.mem_mib * MIB;
    // Owned by the VMM's uid: the files and directories it writes (its disk, its snapshots).
    let mut owned = vec![ws.snapshots_dir()];
    if cfg.net == crate::net::NetMode::User {
        // passt's socket: the VMM's own to connect to (the supervisor made it group-writable too,
        // for a passt restarted while the VMM runs).
        owned.push(crate::net::socket_path(&ws.dir));
    }
    owned.extend(
        cfg.rootfs
            .iter()
            .filter(|r| r.starts_with(&ws.dir))
            .cloned(),
    );
    Spec {
        label: format!("vmm-{}", cfg.name),
        flags,
        mounts: m,
        owned,
        shared_dir: Some(ws.dir.clone()),
        // A fork's source workspace: its VMM wrote the snapshot directory bound here.
        untrusted: restore.into_iter().filter_map(workspace_of).collect(),
        uid: cfg.sandbox.uid,
        gid: cfg.sandbox.gid,
        limits: Limits {
            nofile: NOFILE,
            // The largest file it writes: a memory file, a disk copy or the console log.
            fsize: mem.max(disk).max(cfg.sandbox.console_max) + 64 * MIB,
            // Guest memory, the page cache of what it maps and writes, and its own needs.
            memory: 2 * mem + disk.min(mem) + 512 * MIB,
            pids: 128,
        },
        record_dir: Some(ws.dir.clone()),
        log_max: VMM_LOG_MAX,
        leftovers: Vec::new(),
    }
}

/// The workspace directory holding a snapshot (`<workspace>/snapshots/<tag>`).
fn workspace_of(snapshot_dir: &Path) -> Option<PathBuf> {
    let parent = snapshot_dir.parent()?;
    (parent.file_name()? == crate::workspace::SNAPSHOTS)
        .then(|| parent.parent().map(Path::to_path_buf))
        .flatten()
}

/// The page server's jail: only its snapshot directory, which it owns while it runs (it creates
/// its socket there).
pub fn pageserver_spec(snapshot_dir: &Path, flags: RunFlags) -> Spec {
    let mut m = Mounts::default();
    m.bind(snapshot_dir, true);
    m.device("/dev/null", false);
    m.proc = true;
    let name = snapshot_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mem =
        std::fs::metadata(snapshot_dir.join(snapshot::manifest::MEMORY)).map_or(0, |m| m.len());
    Spec {
        label: format!("pageserver-{name}"),
        flags,
        mounts: m,
        owned: vec![snapshot_dir.to_path_buf()],
        shared_dir: None,
        untrusted: workspace_of(snapshot_dir).into_iter().collect(),
        uid: None,
        gid: None,
        limits: Limits {
            nofile: NOFILE,
            fsize: 64 * MIB,
            memory: mem + 512 * MIB,
            pids: 256,
        },
        record_dir: None,
        log_max: VMM_LOG_MAX,
        leftovers: vec![crate::pageserver::socket_for(snapshot_dir)],
    }
}

/// Keeps the previous run's log as `<log>.1` once it has grown past its bound.
pub fn rotate_log(path: &Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > VMM_LOG_MAX / 2) {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let _ = std::fs::rename(path, PathBuf::from(old));
    }
}
