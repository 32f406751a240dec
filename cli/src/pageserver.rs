//! One page server process per snapshot (`microagent __pageserver`), shared by every VM restored
//! lazily from it; it stops by itself once no VM has used it for a while.
//!
//! A snapshot forked straight from a remote (see `remote::lazy`) has its memory filled by its
//! page server as forks touch it: that server parses what comes from the network, so it is
//! confined like any other: its own PID, mount, IPC and UTS namespaces with only its snapshot
//! directory, the host's chunk cache and the files name resolution and TLS read, an unprivileged
//! uid shared by the remote page servers (they share the chunk cache), no capabilities, and a
//! seccomp filter that adds to the local server's only the socket calls a client needs. It keeps
//! the host's network namespace, as the S3 endpoint is wherever the host can reach. Its client is
//! built before the sandbox is entered (the credentials are read there, then out of sight), and
//! what it serves is still only verified bytes: every chunk is checked against its digest before
//! it is written into `memory.bin`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use snapshot::file_lock::FileLock;
use snapshot::pageserver::server::{PageServer, ServerConfig};
use snapshot::Snapshot;

use crate::exit::{Code, Failure};
use crate::sandbox::{RunFlags, Spec};

pub const SOCKET: &str = "pageserver.sock";
const LOG: &str = "pageserver.log";
/// How long a server with no VM stays up.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Args)]
pub struct PageServerArgs {
    /// The snapshot directory to serve.
    #[arg(long)]
    snapshot: PathBuf,
    /// Run without the jail.
    #[arg(long)]
    no_jail: bool,
    /// Run without a seccomp filter.
    #[arg(long)]
    no_seccomp: bool,
}

pub fn socket_for(snapshot_dir: &Path) -> PathBuf {
    snapshot_dir.join(SOCKET)
}

/// The page server process body.
pub fn run(args: PageServerArgs) -> Result<(), Failure> {
    let snap = Snapshot::open(&args.snapshot).map_err(crate::snapshot_failure)?;
    let sock = socket_for(&snap.dir);
    let marker = crate::remote::lazy::Marker::load(&snap.dir)?;
    let flags = RunFlags {
        jail: !args.no_jail,
        seccomp: !args.no_seccomp,
    };
    // A remote snapshot's client and chunk cache, made while the host's files are in sight.
    let remote = marker
        .as_ref()
        .map(crate::remote::lazy::RemoteUnits::prepare)
        .transpose()?;
    let (spec, kind) = match &remote {
        None => (
            crate::vmm_jail::pageserver_spec(&snap.dir, flags),
            crate::sandbox::seccomp::Kind::PageServer,
        ),
        Some(u) => (
            remote_spec(&snap.dir, u.cache(), flags),
            crate::sandbox::seccomp::Kind::RemotePageServer,
        ),
    };
    crate::sandbox::enter(spec)?;
    crate::sandbox::on_stop_signals();
    if flags.seccomp {
        crate::sandbox::seccomp::apply(kind)?;
    }
    let server = match remote {
        None => PageServer::for_snapshot(&snap, &sock, ServerConfig::default()),
        Some(u) => {
            let units = u.start()?;
            let expected = snap
                .manifest
                .file(snapshot::manifest::MEMORY)
                .map(|f| f.size);
            if expected != Some(units.memory_bytes()) {
                return Err(Failure::new(
                    Code::SnapshotRefused,
                    "the remote index's memory.bin is not the manifest's",
                ));
            }
            PageServer::start_lazy(
                &snap.memory_path(),
                std::sync::Arc::new(units),
                Some(snap.path(snapshot::pageserver::workingset::FILE_NAME)),
                &sock,
                ServerConfig::default(),
            )
        }
    }
    .map_err(|e| Failure::new(Code::Error, format!("page server: {e}")))?;
    // Every VMM restoring from this snapshot runs as a uid of its own.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666));
    }
    tracing::info!("serving {} on {}", snap.dir.display(), sock.display());
    let mut idle_since = Some(Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if crate::sandbox::stop_requested() {
            tracing::info!("stop signal: stopping");
            break;
        }
        let active = !server.stats().clients.is_empty();
        match (active, idle_since) {
            (true, _) => idle_since = None,
            (false, None) => idle_since = Some(Instant::now()),
            (false, Some(t)) if t.elapsed() > IDLE => {
                tracing::info!("no VMM for {IDLE:?}: stopping");
                break;
            }
            _ => {}
        }
    }
    server.shutdown();
    let _ = std::fs::remove_file(&sock);
    Ok(())
}

/// The uid (and gid) of every remote snapshot's page server: they all write the host's chunk
/// cache, which this uid owns. Below the per-VM uids (`UID_BASE + pid`), so never one of them.
pub const REMOTE_UID: u32 = crate::sandbox::UID_BASE - 1;

/// What name resolution and TLS read, bound read-only where the host has them: the endpoint
/// may be a host name, and `https://` is verified against the host's CA certificates (where
/// rustls-native-certs looks for them; the certificates only, never `/etc/ssl/private`), plus
/// `$SSL_CERT_FILE` and `$SSL_CERT_DIR` when set.
const NETWORK_FILES: &[&str] = &[
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/gai.conf",
    "/etc/host.conf",
    "/etc/ssl/certs",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/certs",
    "/etc/pki/ca-trust/extracted",
    "/usr/share/ca-certificates",
    "/usr/local/share/ca-certificates",
];

/// A remote snapshot's page server: the local server's jail plus the host's network namespace,
/// the chunk cache (written), the network files, and the memory file it fills.
fn remote_spec(snapshot_dir: &Path, cache: &Path, flags: RunFlags) -> Spec {
    let mut spec = crate::vmm_jail::pageserver_spec(snapshot_dir, flags);
    spec.label = format!("remote-{}", spec.label);
    spec.mounts.host_network = true;
    spec.mounts.bind(cache, true);
    let from_env = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .filter_map(|v| std::env::var_os(v).map(PathBuf::from));
    for p in NETWORK_FILES.iter().map(PathBuf::from).chain(from_env) {
        // Absolute paths only: a jail binds at the same path.
        if p.is_absolute() && p.exists() {
            spec.mounts.bind(&p, false);
        }
    }
    let memory = snapshot_dir.join(snapshot::manifest::MEMORY);
    spec.owned.push(cache.to_path_buf());
    // (A file: `owned` creates only what is missing, and memory.bin is there.)
    spec.owned.push(memory.clone());
    spec.uid = Some(REMOTE_UID);
    spec.gid = Some(REMOTE_UID);
    // It writes chunks anywhere in memory.bin, and RLIMIT_FSIZE bounds the offset written.
    let mem = std::fs::metadata(&memory).map_or(0, |m| m.len());
    spec.limits.fsize = spec.limits.fsize.max(mem + (64 << 20));
    spec
}

/// Makes sure a page server for `snapshot_dir` runs, starting one if none answers.
pub fn ensure(snapshot_dir: &Path, flags: RunFlags) -> Result<PathBuf, Failure> {
    let sock = socket_for(snapshot_dir);
    // One server per snapshot, however many forks start at once.
    let _lock = lock(snapshot_dir)?;
    if answers(&sock) {
        return Ok(sock);
    }
    let _ = std::fs::remove_file(&sock);
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(Code::Error, format!("cannot find my own binary: {e}")))?;
    crate::vmm_jail::rotate_log(&snapshot_dir.join(LOG));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(snapshot_dir.join(LOG))
        .map_err(|e| Failure::new(Code::Error, format!("cannot open the page server log: {e}")))?;
    let log2 = log
        .try_clone()
        .map_err(|e| Failure::new(Code::Error, format!("cannot open the page server log: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__pageserver").arg("--snapshot").arg(snapshot_dir);
    if !flags.jail {
        cmd.arg("--no-jail");
    }
    if !flags.seccomp {
        cmd.arg("--no-seccomp");
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| Failure::new(Code::Error, format!("cannot start the page server: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if answers(&sock) {
            return Ok(sock);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(Failure::new(
                Code::Error,
                format!(
                    "the page server exited ({st}); see {}",
                    snapshot_dir.join(LOG).display()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Err(Failure::new(
        Code::Error,
        "the page server did not start within 10 s",
    ))
}

/// Blocks until another starter of this snapshot's server is done.
fn lock(snapshot_dir: &Path) -> Result<FileLock, Failure> {
    FileLock::acquire(&snapshot_dir.join("pageserver.lock"))
        .map_err(|e| Failure::new(Code::Error, e.to_string()))
}

/// Whether a server listens on `sock` (a SOCK_SEQPACKET Unix socket).
fn answers(sock: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let bytes = sock.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is bounds-checked before the copy.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return false;
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket calls on a descriptor we own and close.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return false;
        }
        let ok = libc::connect(
            fd,
            std::ptr::addr_of!(addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        ) == 0;
        libc::close(fd);
        ok
    }
}
