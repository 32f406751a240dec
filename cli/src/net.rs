//! Networking for workspaces: `--net user|none|tap:IFNAME` and `--publish`.
//!
//! `user` (the default) gives each VM its own passt process. passt must stay in the host's
//! network namespace to reach the host's network, so it is not a child of the (jailed) VMM: a
//! small supervisor per VM (`microagent __netd`) starts it listening on `net.sock` in the
//! workspace directory (which the VMM sees in its jail), restarts it if it dies, and stops it
//! with the VM. The VMM's virtio-net connects to that socket and reconnects when passt restarts.
//! passt confines itself (namespaces, seccomp, drops to nobody).
//!
//! The guest side is static and the same in every VM, since each has its own passt:
//! 10.0.2.15/24, gateway 10.0.2.2 (which passt maps to the host's loopback, so a server the host
//! runs on 127.0.0.1 is reachable there), DNS 10.0.2.3 (forwarded by passt to the host's
//! resolver). Images built by `--image` configure it at boot from `microagent.net=` on the
//! kernel command line.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::exit::{Code, Failure};
use crate::workspace::{process_alive, Workspace};

/// passt's socket, in a directory of its own that passt (dropped to nobody) can write.
const SOCKET: &str = "passt.sock";
/// Where a root-run passt makes its socket: outside the state directory, because nobody may not
/// pass through it (a default state directory is under /root; a workspace directory is closed to
/// all but the VMM's group once it has been jailed).
const ROOT_SOCKET_DIRS: &str = "/run/microagent/net";
/// Who passt runs as when we are root (it refuses to stay root).
const PASST_UID: u32 = 65534;
/// The effective port mapping of the running VM (host ports chosen at start included).
pub const RUNTIME: &str = "net.json";
pub const SUPERVISOR_PID: &str = "netd.pid";
const LOG: &str = "net.log";

pub const GUEST_ADDR: &str = "10.0.2.15";
pub const GUEST_PREFIX: u8 = 24;
pub const GATEWAY: &str = "10.0.2.2";
pub const DNS: &str = "10.0.2.3";
/// passt's own MAC as the guest sees it: fixed, so a guest's ARP entry for its gateway stays
/// right after a restore on any host.
const PASST_MAC: &str = "9a:55:9a:55:9a:55";

/// The kernel command line argument the image's init reads to configure eth0.
pub fn kernel_arg() -> String {
    format!("microagent.net={GUEST_ADDR}/{GUEST_PREFIX},{GATEWAY},{DNS}")
}

/// How a workspace reaches the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum NetMode {
    /// No network device (loopback only). Workspaces made before networking existed.
    #[default]
    None,
    /// A passt process of its own: outbound connections, DNS, published ports.
    User,
    /// An existing tap interface the user set up.
    Tap { name: String },
}

impl NetMode {
    pub fn parse(s: &str) -> Result<Self, Failure> {
        match s {
            "user" => Ok(NetMode::User),
            "none" => Ok(NetMode::None),
            _ => match s.strip_prefix("tap:") {
                Some(n)
                    if !n.is_empty()
                        && n.len() <= 15
                        && n.bytes().all(|b| b.is_ascii_graphic() && b != b'/') =>
                {
                    Ok(NetMode::Tap {
                        name: n.to_string(),
                    })
                }
                _ => Err(Failure::new(
                    Code::Usage,
                    format!("--net wants user, none or tap:IFNAME (at most 15 bytes), got {s:?}"),
                )),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            NetMode::None => "none".into(),
            NetMode::User => "user".into(),
            NetMode::Tap { name } => format!("tap:{name}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// One `--publish [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp]`; `host_port` None: chosen at start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    #[serde(default)]
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: Option<u16>,
    pub guest_port: u16,
    pub proto: Proto,
}

impl Publish {
    pub fn parse(s: &str) -> Result<Self, Failure> {
        let bad = |why: &str| {
            Failure::new(
                Code::Usage,
                format!("--publish {s:?}: {why} (want [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp] or :GUEST_PORT)"),
            )
        };
        let (spec, proto) = match s.rsplit_once('/') {
            Some((spec, "tcp")) => (spec, Proto::Tcp),
            Some((spec, "udp")) => (spec, Proto::Udp),
            Some(_) => return Err(bad("the protocol must be tcp or udp")),
            None => (s, Proto::Tcp),
        };
        let port = |p: &str, what: &str| -> Result<u16, Failure> {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| bad(&format!("{what} {p:?} is not a port number 1-65535")))
        };
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host, guest) = match parts.as_slice() {
            [host, guest] => (None, *host, *guest),
            [ip, host, guest] => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| bad(&format!("{ip:?} is not an IPv4 address")))?;
                (Some(ip), *host, *guest)
            }
            _ => return Err(bad("wrong number of fields")),
        };
        let host_port = if host.is_empty() {
            None
        } else {
            Some(port(host, "host port")?)
        };
        Ok(Publish {
            host_ip,
            host_port,
            guest_port: port(guest, "guest port")?,
            proto,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{}{}:{}/{}",
            self.host_ip.map(|i| format!("{i}:")).unwrap_or_default(),
            self.host_port.map(|p| p.to_string()).unwrap_or_default(),
            self.guest_port,
            match self.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            }
        )
    }

    /// For a fork: a fixed host port cannot be bound twice, so forks get free ones.
    pub fn for_fork(&self) -> Self {
        Publish {
            host_port: None,
            ..self.clone()
        }
    }
}

/// Network options of `create`.
#[derive(Args, Clone)]
pub struct NetArgs {
    /// Network: user (a passt of its own: outbound, DNS, --publish; the default), none
    /// (loopback only; the default for builtin:testguest, which has no network driver), or
    /// tap:IFNAME (an existing tap device).
    #[arg(long, value_name = "MODE")]
    pub net: Option<String>,
    /// Publish a guest port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|udp], or
    /// :GUEST_PORT for a free host port chosen at each start (shown by `status`). Repeatable.
    #[arg(long, value_name = "SPEC")]
    pub publish: Vec<String>,
}

/// Checks `create`'s network options; nothing is created when they are wrong.
pub fn from_args(a: &NetArgs, builtin_kernel: bool) -> Result<(NetMode, Vec<Publish>), Failure> {
    let default = if builtin_kernel { "none" } else { "user" };
    let mode = NetMode::parse(a.net.as_deref().unwrap_or(default))?;
    let publish = a
        .publish
        .iter()
        .map(|p| Publish::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    if !publish.is_empty() && mode != NetMode::User {
        return Err(Failure::new(
            Code::Usage,
            "--publish needs --net user (a tap's ports are yours to route)",
        ));
    }
    if mode == NetMode::User {
        find_passt()?;
    }
    for p in &publish {
        if p.host_port.is_some_and(|h| h < 1024) && !is_root() {
            return Err(Failure::new(
                Code::Usage,
                format!(
                    "--publish {}: host ports below 1024 need root",
                    p.describe()
                ),
            ));
        }
    }
    Ok((mode, publish))
}

/// The passt `--net user` runs: `MICROAGENT_PASST` if set; else the newest one
/// scripts/build-passt.sh built into the cache (Debian 12's own resets a guest's connections
/// after 24 s of silence from the host: see that script); else `passt` in PATH.
pub fn find_passt() -> Result<PathBuf, Failure> {
    if let Some(p) = std::env::var_os("MICROAGENT_PASST").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Failure::new(
                Code::HostUnsupported,
                format!("MICROAGENT_PASST={}: no such file", p.display()),
            ))
        };
    }
    if let Some(p) = built_passt(&crate::kernel_cmd::cache_root().join("passt")) {
        return Ok(p);
    }
    vmm::devices::virtio::net::backend::find_passt().map_err(|e| {
        Failure::new(
            Code::HostUnsupported,
            format!("{e}; or build the pinned one: scripts/build-passt.sh"),
        )
    })
}

/// `DIR/<version>/passt` with the greatest version (they are named `YYYY_MM_DD.commit`).
fn built_passt(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path().join("passt"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// A locally administered MAC of the workspace's own, from its name.
pub fn mac_for(name: &str) -> vmm::devices::config::MacAddr {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    vmm::devices::config::MacAddr::local_from_seed(h.finish())
}

/// After a restore in place: the guest's connections to the outside are stale, and its new
/// passt must see a frame from it before it forwards a published port.
pub fn after_restore(ws: &Workspace) -> Result<(), Failure> {
    if ws.config.net == NetMode::None || !ws.config.agent {
        return Ok(());
    }
    after_resume(ws, None);
    Ok(())
}

/// After a fork: as [`after_restore`], but first the fork's guest, which still has its
/// source's MAC address (read at boot), takes its own. First, because passt sends to the
/// address it saw in the guest's last frame: a frame sent before the change (the resets'
/// RSTs, the nudge) would have it send to the old address, which the guest then ignores.
pub fn after_fork(ws: &Workspace) -> Result<(), Failure> {
    if ws.config.net == NetMode::None || !ws.config.agent {
        return Ok(());
    }
    after_resume(ws, Some(&mac_for(ws.name()).to_string()));
    Ok(())
}

/// The guest's side of a restore or fork, in this order, over one agent connection. Each step
/// that fails is said, not fatal: the guest keeps working as it is.
///
/// 1. (fork) `--set-mac eth0 MAC`: the agent sets the address itself (SIOCSIFHWADDR; busybox
///    `ip` needs AF_PACKET, which our guest kernel leaves out); virtio-net's control queue lets
///    it change on a running link. An older agent leaves the source's (each fork has its own
///    passt, so nothing collides).
/// 2. `--reset-connections`: aborts the guest's TCP connections to peers outside it. The peers
///    and the new passt know none of them, and a process blocked on one would otherwise wait
///    out TCP's retransmission timeout.
/// 3. One ping to the gateway: the new passt forwards a published port's connections only once
///    it has seen a frame from the guest, and a guest with a static address may send nothing
///    until it makes a connection itself (busybox ping works without AF_PACKET). In the
///    foreground, at most 1 s: sent in the background it could leave after the command
///    returned, and a host connection made at once stalled until a retry (net bench: 5 s; our
///    reading is that passt addresses the guest by the source MAC of the last frame it saw).
///
/// The agent's own steps run as `/proc/self/exe`, which in the process the agent forks is the
/// agent's binary wherever the image put it; an older agent refuses the flag.
fn after_resume(ws: &Workspace, mac: Option<&str>) {
    let ping = format!("ping -c 1 -W 1 {GATEWAY} >/dev/null 2>&1; true");
    let mut steps: Vec<(&str, Vec<&str>)> = Vec::new();
    if let Some(mac) = mac {
        steps.push((
            "keeps its source's MAC address",
            vec!["/proc/self/exe", "--set-mac", "eth0", mac],
        ));
    }
    steps.push((
        "connections from before the snapshot were not reset",
        vec!["/proc/self/exe", "--reset-connections"],
    ));
    steps.push((
        "no frame sent to the new network back end",
        vec!["sh", "-c", &ping],
    ));
    let commands: Vec<&[&str]> = steps.iter().map(|(_, argv)| argv.as_slice()).collect();
    for ((what, _), result) in steps.iter().zip(crate::agent::run_in_guest(ws, &commands)) {
        if let Err(f) = result {
            tracing::warn!("{}: {what}: {}", ws.name(), f.message);
        }
    }
}

/// The mapping in force while the VM runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Runtime {
    pub passt_pid: u32,
    pub published: Vec<Publish>,
}

pub fn runtime(ws: &Workspace) -> Option<Runtime> {
    let b = std::fs::read(ws.path(RUNTIME)).ok()?;
    serde_json::from_slice(&b).ok()
}

/// Host ports for `publish`: fixed ones must be free now, `:GUEST_PORT` ones get a free port.
fn resolve_ports(publish: &[Publish]) -> Result<Vec<Publish>, Failure> {
    let mut out = Vec::new();
    for p in publish {
        let ip = p.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED);
        let probe = |port: u16| -> std::io::Result<u16> {
            match p.proto {
                Proto::Tcp => TcpListener::bind((ip, port))?
                    .local_addr()
                    .map(|a| a.port()),
                Proto::Udp => UdpSocket::bind((ip, port))?.local_addr().map(|a| a.port()),
            }
        };
        let port = match p.host_port {
            Some(h) => probe(h).map_err(|e| {
                Failure::new(
                    if e.kind() == std::io::ErrorKind::AddrInUse {
                        Code::Conflict
                    } else {
                        Code::Usage
                    },
                    format!("--publish {}: host port {h}: {e}", p.describe()),
                )
            })?,
            None => probe(0).map_err(|e| {
                Failure::new(
                    Code::Error,
                    format!("--publish {}: no free host port: {e}", p.describe()),
                )
            })?,
        };
        out.push(Publish {
            host_port: Some(port),
            ..p.clone()
        });
    }
    Ok(out)
}

fn passt_args(published: &[Publish], sock: &Path) -> Vec<String> {
    let mut a: Vec<String> = ["--foreground", "--quiet", "--one-off", "-4", "--socket"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    a.push(sock.display().to_string());
    for (k, v) in [
        ("--address", GUEST_ADDR.to_string()),
        ("--netmask", format!("{GUEST_PREFIX}")),
        ("--gateway", GATEWAY.to_string()),
        ("--mac-addr", PASST_MAC.to_string()),
        ("--dns", DNS.to_string()),
        ("--dns-forward", DNS.to_string()),
    ] {
        a.push(k.into());
        a.push(v);
    }
    let mut tcp = Vec::new();
    let mut udp = Vec::new();
    for p in published {
        let spec = format!(
            "{}{}:{}",
            p.host_ip.map(|i| format!("{i}/")).unwrap_or_default(),
            p.host_port.unwrap_or(p.guest_port),
            p.guest_port
        );
        match p.proto {
            Proto::Tcp => tcp.push(spec),
            Proto::Udp => udp.push(spec),
        }
    }
    for (flag, specs) in [("-t", tcp), ("-u", udp)] {
        for s in specs {
            a.push(flag.into());
            a.push(s);
        }
    }
    a
}

/// The directory of passt's socket for the workspace in `ws_dir`: a private one under
/// /run/microagent/net when we are root (short, so the socket path fits in `sun_path`), else
/// `net/` in the workspace.
///
/// Decided by who owns the workspace directory, not by who asks: the jailed VMM asks too.
fn socket_dir_of(ws_dir: &Path) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata(ws_dir).map_or(!is_root(), |m| m.uid() != 0) {
        return ws_dir.join("net");
    }
    use sha2::Digest;
    let canonical = std::fs::canonicalize(ws_dir).unwrap_or_else(|_| ws_dir.to_path_buf());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let id: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Path::new(ROOT_SOCKET_DIRS).join(id)
}

/// passt's socket for the workspace in `ws_dir` (the VMM connects to it; the jail binds its
/// directory in).
pub fn socket_path(ws_dir: &Path) -> PathBuf {
    socket_dir_of(ws_dir).join(SOCKET)
}

/// Before the VMM starts: a supervised passt for a `user` workspace, listening on `net.sock`.
pub fn ensure(ws: &Workspace) -> Result<(), Failure> {
    if ws.config.net != NetMode::User {
        return Ok(());
    }
    stop(ws);
    let passt = find_passt()?;
    let published = resolve_ports(&ws.config.publish)?;
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(Code::Error, format!("cannot find my own binary: {e}")))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(ws.path(LOG))
        .map_err(|e| Failure::new(Code::Error, format!("cannot open the network log: {e}")))?;
    let plan =
        serde_json::to_string(&published).map_err(|e| Failure::new(Code::Error, e.to_string()))?;
    let mut cmd = Command::new(exe);
    use std::os::unix::process::CommandExt;
    cmd.arg("__netd")
        .arg("--workspace")
        .arg(&ws.dir)
        .arg("--passt")
        .arg(&passt)
        .arg("--published")
        .arg(plan)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot start the network supervisor: {e}"),
        )
    })?;
    // Ready once passt listens and the mapping is recorded.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if socket_path(&ws.dir).exists() && ws.path(RUNTIME).exists() {
            return Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let why = std::fs::read_to_string(ws.path(LOG))
                .ok()
                .and_then(|t| crate::logging::last_problem(&t))
                .unwrap_or_else(|| format!("exited with {st}"));
            return Err(Failure::new(
                Code::Error,
                format!(
                    "the network of workspace {} did not start: {why}",
                    ws.name()
                ),
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(Failure::new(
                Code::Error,
                format!(
                    "passt for workspace {} did not listen within 10 s",
                    ws.name()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops the workspace's network supervisor (and with it passt), if one runs.
pub fn stop(ws: &Workspace) {
    if let Some(pid) = std::fs::read_to_string(ws.path(SUPERVISOR_PID))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        if process_alive(pid) {
            // SAFETY: signalling the workspace's own supervisor, which stops passt on SIGTERM.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while process_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if process_alive(pid) {
                // SAFETY: as above, now without asking.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    for f in [SUPERVISOR_PID, RUNTIME] {
        let _ = std::fs::remove_file(ws.path(f));
    }
    let _ = std::fs::remove_file(socket_path(&ws.dir));
    let _ = std::fs::remove_dir(socket_dir_of(&ws.dir));
}

#[derive(Args)]
pub struct NetdArgs {
    #[arg(long)]
    workspace: PathBuf,
    #[arg(long)]
    passt: PathBuf,
    /// The published ports, host ports resolved (JSON).
    #[arg(long)]
    published: String,
}

static TERM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// `microagent __netd`: runs passt for one VM until the VM is gone, restarting it if it dies.
pub fn supervise(a: NetdArgs) -> Result<(), Failure> {
    let published: Vec<Publish> = serde_json::from_str(&a.published)
        .map_err(|e| Failure::new(Code::Usage, format!("--published: {e}")))?;
    let dir = &a.workspace;
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
    }
    snapshot::atomic_file::write(
        &dir.join(SUPERVISOR_PID),
        format!("{}\n", std::process::id()).as_bytes(),
    )
    .map_err(|e| Failure::new(Code::Error, format!("cannot write the pid file: {e}")))?;
    let sock = socket_path(dir);
    if is_root() {
        runtime_dirs()?;
    }
    socket_dir(&socket_dir_of(dir))?;
    let started = Instant::now();
    let mut vmm_seen = false;
    let mut restarts = 0u32;
    let result = loop {
        let _ = std::fs::remove_file(&sock);
        let mut passt = match spawn_passt(&a.passt, &published, &sock) {
            Ok(c) => c,
            Err(e) => break Err(e),
        };
        if let Err(e) = wait_listening(&mut passt, &sock, dir) {
            let _ = passt.kill();
            let _ = passt.wait();
            break Err(e);
        }
        let rt = Runtime {
            passt_pid: passt.id(),
            published: published.clone(),
        };
        if let Ok(b) = serde_json::to_vec(&rt) {
            let _ = snapshot::atomic_file::write(&dir.join(RUNTIME), &b);
        }
        // Watch both: passt dying means a restart, the VM going means we go too.
        let vm_gone = loop {
            if TERM.load(std::sync::atomic::Ordering::SeqCst) {
                break true;
            }
            // The waiter's record, not the VMM's own pid file (see `Workspace::pid`).
            match crate::sandbox::record(dir).filter(|r| r.running() && r.start_time.is_some()) {
                Some(r) if process_alive(r.pid as i32) => vmm_seen = true,
                _ if vmm_seen || started.elapsed() > Duration::from_secs(120) => break true,
                _ => {}
            }
            if let Ok(Some(st)) = passt.try_wait() {
                tracing::warn!("passt exited ({st}); restarting it");
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = passt.kill();
        let _ = passt.wait();
        if vm_gone {
            break Ok(());
        }
        restarts += 1;
        if restarts > 100 {
            break Err(Failure::new(Code::Error, "passt keeps dying; giving up"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for f in [SUPERVISOR_PID, RUNTIME] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_dir(socket_dir_of(dir));
    if let Err(f) = &result {
        tracing::error!("{}", f.message);
    }
    result
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// /run/microagent/net: root's, passable by all (passt, dropped to nobody, must reach its own
/// directory below), listable by none.
fn runtime_dirs() -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let top = Path::new(ROOT_SOCKET_DIRS);
    for d in [top.parent().unwrap_or(top), top] {
        std::fs::create_dir_all(d)
            .and_then(|()| std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711)))
            .map_err(|e| Failure::new(Code::Error, format!("{}: {e}", d.display())))?;
    }
    Ok(())
}

/// A directory passt may make its socket in, and that others may only pass through (the socket
/// itself is then handed to the VMM's uid). Older passt (Debian 12's 2023-03) binds after
/// dropping to nobody; newer ones (2025) bind while still uid 0 but without CAP_DAC_OVERRIDE:
/// owner nobody, group root, both with write, serves both.
fn socket_dir(d: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |e: std::io::Error| Failure::new(Code::Error, format!("{}: {e}", d.display()));
    std::fs::create_dir_all(d).map_err(fail)?;
    let mode = if is_root() {
        std::os::unix::fs::chown(d, Some(PASST_UID), Some(0)).map_err(fail)?;
        0o771
    } else {
        0o711
    };
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).map_err(fail)
}

fn spawn_passt(passt: &Path, published: &[Publish], sock: &Path) -> Result<Child, Failure> {
    let mut cmd = Command::new(passt);
    cmd.args(passt_args(published, sock));
    if is_root() {
        cmd.args(["--runas", &format!("{PASST_UID}:{PASST_UID}")]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            Failure::new(
                Code::Error,
                format!("cannot start {}: {e}", passt.display()),
            )
        })
}

/// Waits until passt listens, then gives the socket to the workspace directory's owner and group
/// only (the jailed VMM runs with that group, and is handed the socket itself at start).
fn wait_listening(passt: &mut Child, sock: &Path, dir: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::MetadataExt;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(st)) = passt.try_wait() {
            return Err(Failure::new(
                Code::Error,
                format!("passt exited at start-up ({st}): a published port may be taken"),
            ));
        }
        if Instant::now() > deadline {
            return Err(Failure::new(
                Code::Error,
                "passt did not listen within 10 s",
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let owner = std::fs::metadata(dir).map(|m| (m.uid(), m.gid())).ok();
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::chown(sock, Some(uid), Some(gid));
    }
    use std::os::unix::fs::PermissionsExt;
    // The workspace directory's group is the jailed VMM's.
    let _ = std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o660));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_built_passt_is_found_and_a_build_in_progress_is_not() {
        let d = std::env::temp_dir().join(format!("ma-passt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(built_passt(&d), None, "no cache directory");
        for v in [
            "2024_01_02.aaa",
            "2025_05_03.587980c",
            ".build.x",
            "2026_01_01.nobinary",
        ] {
            std::fs::create_dir_all(d.join(v)).unwrap();
        }
        for v in ["2024_01_02.aaa", "2025_05_03.587980c", ".build.x"] {
            std::fs::write(d.join(v).join("passt"), b"").unwrap();
        }
        assert_eq!(built_passt(&d), Some(d.join("2025_05_03.587980c/passt")));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn modes_and_publish_specs_parse_or_say_why() {
        assert_eq!(NetMode::parse("user").unwrap(), NetMode::User);
        assert_eq!(NetMode::parse("none").unwrap(), NetMode::None);
        assert_eq!(
            NetMode::parse("tap:tap0").unwrap(),
            NetMode::Tap {
                name: "tap0".into()
            }
        );
        for bad in [
            "",
            "tap:",
            "tap:waytoolonginterfacename",
            "bridge",
            "tap:a/b",
        ] {
            let e = NetMode::parse(bad).unwrap_err();
            assert_eq!(e.code, Code::Usage, "{bad}");
        }
        let p = Publish::parse("127.0.0.1:8080:80/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(
            (p.host_port, p.guest_port, p.proto),
            (Some(8080), 80, Proto::Udp)
        );
        let p = Publish::parse(":80").unwrap();
        assert_eq!((p.host_port, p.guest_port, p.proto), (None, 80, Proto::Tcp));
        assert_eq!(p.describe(), ":80/tcp");
        assert_eq!(
            Publish::parse("8080:80").unwrap().for_fork().host_port,
            None
        );
        for bad in [
            "80",
            "a:80",
            "0:80",
            "80:70000",
            "1.2.3:80:80",
            "80:80/sctp",
            "x:1:2:3",
        ] {
            let e = Publish::parse(bad).unwrap_err();
            assert_eq!(e.code, Code::Usage, "{bad}");
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }

    #[test]
    fn a_taken_host_port_is_a_conflict() {
        let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let e = resolve_ports(&[Publish::parse(&format!("{port}:80")).unwrap()]).unwrap_err();
        assert_eq!(e.code, Code::Conflict, "{}", e.message);
        let got = resolve_ports(&[Publish::parse(":80").unwrap()]).unwrap();
        assert!(got[0].host_port.is_some_and(|p| p > 0));
    }

    #[test]
    fn passt_gets_the_fixed_guest_network_and_the_ports() {
        let p = vec![
            Publish::parse("127.0.0.1:8080:80").unwrap(),
            Publish::parse("5353:53/udp").unwrap(),
        ];
        let a = passt_args(&p, Path::new("/w/net.sock")).join(" ");
        assert!(a.contains("--socket /w/net.sock"), "{a}");
        assert!(
            a.contains("--address 10.0.2.15 --netmask 24 --gateway 10.0.2.2"),
            "{a}"
        );
        assert!(a.contains("-t 127.0.0.1/8080:80"), "{a}");
        assert!(a.contains("-u 5353:53"), "{a}");
    }
}
