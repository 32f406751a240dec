//! Workspace commands: create (and fork), start, halt, delete, list, status, console.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::json;
use snapshot::{Snapshot, VerifyOptions};

use crate::builtin;
use crate::exit::{Code, Failure};
use crate::home;
use crate::output::Out;
use crate::process;
use crate::vmm_process::MemoryArg;
use crate::workspace::{self, Config, State, Workspace};

#[derive(Args)]
pub struct CreateArgs {
    /// Workspace name (with --count N, the prefix of NAME-1..NAME-N).
    name: String,
    /// Kernel: a vmlinux ELF or bzImage path, or `builtin:testguest` (default: the kernel
    /// `microagent kernel build` made for this host; `microagent kernel list` shows it).
    #[arg(long, conflicts_with = "from_snapshot")]
    kernel: Option<String>,
    /// Initial ramdisk.
    #[arg(long, conflicts_with = "from_snapshot")]
    initrd: Option<PathBuf>,
    /// A root filesystem image; the workspace gets a private copy.
    #[arg(long, conflicts_with_all = ["from_snapshot", "image"])]
    rootfs: Option<PathBuf>,
    /// An OCI image reference to build the root filesystem from.
    #[arg(long, conflicts_with = "from_snapshot")]
    image: Option<String>,
    /// With --image: registry credentials (else $MICROAGENT_REGISTRY_AUTH, else docker's config.json).
    #[arg(long, value_name = "USER:PASS", requires = "image")]
    registry_auth: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256, conflicts_with = "from_snapshot")]
    mem: u64,
    /// vCPUs (1 to 8).
    #[arg(long, default_value_t = 1, conflicts_with = "from_snapshot")]
    vcpus: u32,
    /// Kernel command line.
    #[arg(long, conflicts_with = "from_snapshot")]
    cmdline: Option<String>,
    /// Fork from a snapshot, `NAME:TAG`, and start the fork(s).
    #[arg(long, value_name = "NAME:TAG")]
    from_snapshot: Option<String>,
    /// With --from-snapshot: how many forks (named NAME-1..NAME-N). All or nothing: if any
    /// fork fails to start, the error names it and every fork of the batch is removed. Every
    /// fork is set up before any guest runs; each is reported once it runs (with --json, one
    /// line `{"ready": {...}}` per fork, then the summary).
    #[arg(long, requires = "from_snapshot")]
    count: Option<u32>,
    /// With --from-snapshot: how guest memory comes back [default: eager for one fork, mmap for
    /// a --count batch of more, whose forks then share the snapshot's pages]. From a
    /// REMOTE/NAME:TAG it comes on first touch through the page server unless `eager` is given
    /// (the whole snapshot pulled first).
    #[arg(long, value_enum)]
    memory: Option<MemoryArg>,
    /// With --from-snapshot: each fork halts and is deleted after this long (e.g. 30m, 2h).
    #[arg(long, value_name = "DURATION", requires = "from_snapshot")]
    ttl: Option<String>,
    #[command(flatten)]
    net: crate::net::NetArgs,
    #[command(flatten)]
    sandbox: SandboxArgs,
    /// Bound on the console log in KiB (it keeps the latest output; the previous run's log is
    /// console.log.1).
    #[arg(long, value_name = "KIB")]
    console_max_kib: Option<u64>,
}

/// Debugging switches: the VMM runs jailed and seccomp-filtered unless told otherwise.
#[derive(Args, Clone, Copy)]
pub struct SandboxArgs {
    /// Run the VMM without its jail (namespaces, unprivileged uid, no capabilities, cgroup).
    #[arg(long)]
    no_jail: bool,
    /// Run the VMM without its seccomp filters.
    #[arg(long)]
    no_seccomp: bool,
}

impl CreateArgs {
    fn sandbox_config(&self, base: crate::sandbox::SandboxConfig) -> crate::sandbox::SandboxConfig {
        crate::sandbox::SandboxConfig {
            jail: base.jail && !self.sandbox.no_jail,
            seccomp: base.seccomp && !self.sandbox.no_seccomp,
            console_max: self
                .console_max_kib
                .map_or(base.console_max, |k| k.saturating_mul(1024)),
            ..base
        }
    }
}

const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
const MAX_FORKS: u32 = 1000;

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    snapshot::manifest::rfc3339(now_unix())
}

fn io_fail(what: &str, p: &Path, e: std::io::Error) -> Failure {
    Failure::new(Code::Error, format!("{what} {}: {e}", p.display()))
}

/// Removes a workspace directory the way `delete` does: out of sight first, then gone.
pub fn remove_workspace_dir(root: &Path, ws: &Workspace) {
    let doomed =
        home::workspaces_dir(root).join(format!(".deleting-{}-{}", ws.name(), std::process::id()));
    if std::fs::rename(&ws.dir, &doomed).is_ok() {
        let _ = std::fs::remove_dir_all(&doomed);
    }
}

/// Removes what interrupted commands left behind: half-deleted workspaces (`.deleting-*`) and
/// half-made ones (`.creating-NAME-PID`) whose command is no longer running.
pub fn sweep_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(home::workspaces_dir(root)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .rsplit_once('-')
            .and_then(|(_, p)| p.parse::<i32>().ok());
        let stale = match pid {
            Some(p) if name.starts_with(".deleting-") || name.starts_with(".creating-") => {
                p != std::process::id() as i32 && !crate::workspace::process_alive(p)
            }
            _ => false,
        };
        if stale {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Makes `<root>/workspaces/<name>` appear only once fully populated.
fn new_workspace_dir(
    root: &Path,
    name: &str,
    fill: impl FnOnce(&Path) -> Result<Config, Failure>,
) -> Result<Workspace, Failure> {
    home::check_name(name)?;
    let dir = Workspace::dir_for(root, name);
    if dir.exists() {
        return Err(Failure::new(
            Code::Conflict,
            format!("workspace {name} already exists"),
        ));
    }
    let parent = home::workspaces_dir(root);
    std::fs::create_dir_all(&parent).map_err(|e| io_fail("cannot create", &parent, e))?;
    let tmp = parent.join(format!(".creating-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| io_fail("cannot create", &tmp, e))?;
    let result = fill(&tmp).and_then(|config| {
        workspace::save_config(&tmp, &config)?;
        std::fs::rename(&tmp, &dir).map_err(|e| io_fail("cannot create", &dir, e))?;
        Ok(Workspace { dir, config })
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Puts the kernel where the workspace can always find it: built-in kernels are copied in.
fn stage_kernel(spec: &str, dir: &Path) -> Result<PathBuf, Failure> {
    if spec.starts_with(builtin::PREFIX) {
        let bytes =
            builtin::bytes(spec).map_err(|e| Failure::new(Code::NotFound, e.to_string()))?;
        let p = dir.join(workspace::KERNEL_COPY);
        std::fs::write(&p, bytes).map_err(|e| io_fail("cannot write", &p, e))?;
        return Ok(p);
    }
    let p = Path::new(spec);
    std::fs::canonicalize(p)
        .map_err(|e| Failure::new(Code::NotFound, format!("kernel {}: {e}", p.display())))
}

pub fn create(root: &Path, args: CreateArgs, out: Out) -> Result<(), Failure> {
    sweep_leftovers(root);
    if let Some(src) = args.from_snapshot.clone() {
        return fork(root, &args, &src, out);
    }
    let vcpus = vmm::vm::check_vcpus(args.vcpus).map_err(crate::run::vm_failure)?;
    vmm::memory::check_size(args.mem).map_err(|e| Failure::new(Code::Usage, e.to_string()))?;
    let builtin_kernel = args
        .kernel
        .as_deref()
        .is_some_and(|k| k.starts_with(builtin::PREFIX));
    let (net, publish) = crate::net::from_args(&args.net, builtin_kernel)?;
    // An image becomes the rootfs: pulled and built once into the image cache, then copied.
    let image = match &args.image {
        Some(r) => Some(crate::image::for_create(
            root,
            r,
            args.registry_auth.clone(),
            out,
        )?),
        None => None,
    };
    let rootfs_src = args
        .rootfs
        .clone()
        .or_else(|| image.as_ref().map(|i| i.rootfs.clone()));
    let spec = match &args.kernel {
        Some(k) => k.clone(),
        None => crate::kernel_cmd::default_kernel()?.display().to_string(),
    };
    let is_builtin = spec.starts_with(builtin::PREFIX);
    let cmdline = args.cmdline.clone().unwrap_or_else(|| {
        if is_builtin {
            "mode=counter".to_string()
        } else if image.is_some() && net == crate::net::NetMode::User {
            // The image's init configures eth0 from this.
            format!(
                "{DEFAULT_LINUX_CMDLINE} {} {}",
                crate::image::KERNEL_ARGS,
                crate::net::kernel_arg()
            )
        } else if image.is_some() {
            format!("{DEFAULT_LINUX_CMDLINE} {}", crate::image::KERNEL_ARGS)
        } else if args.rootfs.is_some() {
            // The rootfs is the first virtio disk.
            format!("{DEFAULT_LINUX_CMDLINE} root=/dev/vda rw init_on_free=1")
        } else {
            DEFAULT_LINUX_CMDLINE.to_string()
        }
    });
    for (what, p) in [("initrd", &args.initrd), ("rootfs", &args.rootfs)] {
        if let Some(p) = p {
            if !p.is_file() {
                return Err(Failure::new(
                    Code::NotFound,
                    format!("{what} {} does not exist", p.display()),
                ));
            }
        }
    }
    let ws = new_workspace_dir(root, &args.name, |dir| {
        crate::testhooks::fail_point("create-fill")?;
        let kernel = stage_kernel(&spec, dir)?;
        let rootfs = match &rootfs_src {
            Some(src) => {
                let dst = dir.join(workspace::ROOTFS);
                snapshot::rootfs::copy_image(src, &dst)
                    .map_err(|e| io_fail("cannot copy rootfs to", &dst, e))?;
                Some(Workspace::dir_for(root, &args.name).join(workspace::ROOTFS))
            }
            None => None,
        };
        let kernel = if is_builtin {
            Workspace::dir_for(root, &args.name).join(workspace::KERNEL_COPY)
        } else {
            kernel
        };
        Ok(Config {
            name: args.name.clone(),
            kernel_spec: spec.clone(),
            kernel,
            initrd: args
                .initrd
                .as_ref()
                .map(|p| std::fs::canonicalize(p).unwrap_or(p.clone())),
            rootfs,
            image: image.as_ref().map(|i| i.image.clone()),
            mem_mib: args.mem,
            vcpus,
            cmdline: cmdline.clone(),
            created: now_rfc3339(),
            forked_from: None,
            expires_unix: None,
            agent: !is_builtin && rootfs_src.is_some(),
            net: net.clone(),
            publish: publish.clone(),
            sandbox: args.sandbox_config(Default::default()),
        })
    })?;
    out.emit(
        format!(
            "workspace {} created ({} MiB RAM, {} vCPU, kernel {})",
            ws.name(),
            ws.config.mem_mib,
            ws.config.vcpus,
            ws.config.kernel_spec
        ),
        json!({"created": ws.config}),
    );
    Ok(())
}

/// Splits `NAME:TAG`.
fn parse_source(s: &str) -> Result<(&str, &str), Failure> {
    s.split_once(':')
        .filter(|(n, t)| !n.is_empty() && !t.is_empty())
        .ok_or_else(|| {
            Failure::new(
                Code::Usage,
                format!("--from-snapshot wants NAME:TAG, got {s:?}"),
            )
        })
}

pub fn open_snapshot(ws: &Workspace, tag: &str) -> Result<Snapshot, Failure> {
    if !snapshot::manifest::is_safe_name(tag) {
        return Err(Failure::new(
            Code::Usage,
            format!("invalid snapshot tag {tag:?}"),
        ));
    }
    let dir = ws.snapshots_dir().join(tag);
    match Snapshot::open(&dir) {
        Err(snapshot::SnapshotError::NotFound(_)) => Err(Failure::new(
            Code::NotFound,
            format!("workspace {} has no snapshot {tag}", ws.name()),
        )),
        other => other.map_err(crate::snapshot_failure),
    }
}

fn fork(root: &Path, args: &CreateArgs, src: &str, out: Out) -> Result<(), Failure> {
    // REMOTE/NAME:TAG: memory on first touch through the page server, the rest fetched first
    // (see remote::lazy); `--memory eager` (or a diff) pulls it whole into the cache first.
    let mut memory = args.memory;
    let mut lazy = false;
    let (source_root, src_name, tag, fetched) = if crate::remote::RemoteRef::is_remote(src) {
        let m = crate::remote::materialize(root, src, memory == Some(MemoryArg::Eager), out)?;
        if m.lazy {
            memory = Some(MemoryArg::Uffd);
            lazy = true;
        }
        let tag = parse_source(src)?.1;
        (m.root, m.name, tag, Some(m.stats))
    } else {
        let (n, t) = parse_source(src)?;
        (root.to_path_buf(), n.to_string(), t, None)
    };
    let src_name = src_name.as_str();
    let ttl = args
        .ttl
        .as_deref()
        .map(crate::duration::parse)
        .transpose()
        .map_err(|e| Failure::new(Code::Usage, e))?;
    let source = Workspace::open(&source_root, src_name)?;
    let snap = open_snapshot(&source, tag)?;
    let count = args.count.unwrap_or(1);
    if count == 0 || count > MAX_FORKS {
        return Err(Failure::new(
            Code::Usage,
            format!("--count must be 1 to {MAX_FORKS}"),
        ));
    }
    let memory = memory.unwrap_or_else(|| MemoryArg::default_for(count));
    let names: Vec<String> = match args.count {
        None => vec![args.name.clone()],
        Some(n) => (1..=n).map(|i| format!("{}-{i}", args.name)).collect(),
    };
    for n in &names {
        home::check_name(n)?;
        if Workspace::dir_for(root, n).exists() {
            return Err(Failure::new(
                Code::Conflict,
                format!("workspace {n} already exists"),
            ));
        }
    }
    // One full check for all forks; each VMM then only re-checks sizes and the kernel. (A
    // lazily filled snapshot's memory is checked chunk by chunk as it comes, the rest was
    // checked by materialize.)
    snap.verify(&VerifyOptions {
        kernel: Some(&source.config.kernel),
        contents: !lazy,
        recheck: false,
    })
    .map_err(crate::snapshot_failure)?;

    let mut created: Vec<Workspace> = Vec::new();
    let mut children = Vec::new();
    let result = (|| {
        // Several at a time: each waits on its own fsyncs (config.json), which overlap.
        let made = in_parallel(&names, DIR_THREADS, |n| {
            new_workspace_dir(root, n, |dir| {
                let kernel = if source.config.kernel_spec.starts_with(builtin::PREFIX) {
                    let p = dir.join(workspace::KERNEL_COPY);
                    link_or_copy(&source.config.kernel, &p)
                        .map_err(|e| io_fail("cannot copy", &p, e))?;
                    Workspace::dir_for(root, n).join(workspace::KERNEL_COPY)
                } else {
                    source.config.kernel.clone()
                };
                let rootfs = match snap.rootfs_path() {
                    Some(r) => {
                        let dst = dir.join(workspace::ROOTFS);
                        snapshot::rootfs::copy_image_untrusted(&r, &dst)
                            .map_err(|e| io_fail("cannot copy rootfs to", &dst, e))?;
                        Some(Workspace::dir_for(root, n).join(workspace::ROOTFS))
                    }
                    None => None,
                };
                // The source's secrets follow the fork (delivered once it runs).
                copy_secrets(
                    &source.path(crate::agent::SECRETS),
                    &dir.join(crate::agent::SECRETS),
                )?;
                Ok(Config {
                    name: n.clone(),
                    kernel_spec: source.config.kernel_spec.clone(),
                    kernel,
                    initrd: source.config.initrd.clone(),
                    rootfs,
                    image: snap.manifest.image.clone(),
                    mem_mib: snap.manifest.mem_mib,
                    vcpus: snap.manifest.vcpus,
                    cmdline: snap.manifest.cmdline.clone(),
                    created: now_rfc3339(),
                    forked_from: Some(src.to_string()),
                    expires_unix: ttl.map(|d| now_unix() + d.as_secs()),
                    agent: source.config.agent,
                    // Same network, but fixed host ports cannot be bound twice: free ones.
                    net: source.config.net.clone(),
                    publish: source
                        .config
                        .publish
                        .iter()
                        .map(crate::net::Publish::for_fork)
                        .collect(),
                    sandbox: args.sandbox_config(source.config.sandbox.clone()),
                })
            })
        });
        // Every workspace made is kept for the clean-up; the first failure (in name order) wins.
        let mut first_failure = None;
        for m in made {
            match m {
                Ok(ws) => created.push(ws),
                Err(f) => {
                    first_failure.get_or_insert(f);
                }
            }
        }
        if let Some(f) = first_failure {
            return Err(f);
        }
        // Start them all, then wait for all: restores run concurrently. A disk snapshot's
        // forks boot afresh from their disk copy.
        let restore = (snap.manifest.kind != snapshot::Kind::Disk).then_some(snap.dir.as_path());
        // A failure names the fork it hit; the batch is then removed as a whole (see --count).
        let named = |ws: &Workspace, f: Failure| {
            Failure::new(f.code, format!("fork {} failed: {}", ws.name(), f.message))
        };
        // Restored forks are set up with their vCPUs paused: readiness must not wait on guest
        // CPU, and the running guests of a large batch would starve the set-up of the rest.
        // Launched from a few threads while a few more wait for each to answer: one launcher
        // kept only a couple of VMMs in set-up at a time, which on a shared host got the batch
        // a small share of the CPU (each launch waits for its exec), and the batch is set up
        // when its last VMM is, not a round trip per fork later.
        let total = created.len() as u64;
        let slots: Vec<Mutex<Option<std::process::Child>>> =
            created.iter().map(|_| Mutex::new(None)).collect();
        let ready: Vec<std::sync::OnceLock<u32>> =
            created.iter().map(|_| std::sync::OnceLock::new()).collect();
        let failed: Mutex<Option<Failure>> = Mutex::new(None);
        let fail = |f: Failure| {
            failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(f);
        };
        let has_failed = || failed.lock().unwrap_or_else(|e| e.into_inner()).is_some();
        let set_up = std::sync::atomic::AtomicU64::new(0);
        let next_launch = std::sync::atomic::AtomicUsize::new(0);
        let next_wait = std::sync::atomic::AtomicUsize::new(0);
        let launch = || loop {
            if has_failed() {
                break;
            }
            let i = next_launch.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(ws) = created.get(i) else { break };
            let launched = crate::testhooks::fail_point(&format!("fork-spawn-{}", ws.name()))
                .and_then(|()| match restore {
                    Some(snap) => process::spawn_paused(ws, snap, memory),
                    None => process::spawn(ws, None, memory),
                });
            match launched {
                Ok(c) => *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(c),
                Err(f) => fail(named(ws, f)),
            }
        };
        let wait = || loop {
            let i = next_wait.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(ws) = created.get(i) else { break };
            // Until a launcher has started it (or the batch failed).
            loop {
                if has_failed() {
                    return;
                }
                let mut slot = slots[i].lock().unwrap_or_else(|e| e.into_inner());
                if let Some(child) = slot.as_mut() {
                    match process::wait_ready(ws, child) {
                        Ok(pid) => {
                            let _ = ready[i].set(pid);
                            let n = set_up.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                            out.progress_items("forks set up", n, total);
                        }
                        Err(f) => fail(named(ws, f)),
                    }
                    break;
                }
                drop(slot);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        std::thread::scope(|s| {
            let waiters = (0..READY_WAITERS.min(created.len()))
                .filter(|_| std::thread::Builder::new().spawn_scoped(s, wait).is_ok())
                .count();
            for _ in 1..LAUNCHERS.min(created.len()) {
                let _ = std::thread::Builder::new().spawn_scoped(s, launch);
            }
            launch();
            // No thread to wait in: this one does it.
            if waiters == 0 {
                wait();
            }
        });
        children.extend(
            slots
                .into_iter()
                .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())),
        );
        if let Some(f) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(f);
        }
        let pids: Vec<u32> = ready
            .into_iter()
            .map(|p| p.into_inner().unwrap_or(0))
            .collect();
        let report = std::sync::Mutex::new(BatchReport::new(out, src, args.count.is_some(), total));
        let ready = |ws: &Workspace, pid: u32| {
            report
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .ready(ws, pid)
        };
        // A fork without a guest agent is ready once it runs; one with an agent once it has
        // taken its own identity and entropy and got the secrets back, which needs it running.
        if restore.is_some() {
            let forks: Vec<(&Workspace, u32)> = created.iter().zip(pids.iter().copied()).collect();
            // While the batch resumes, each running fork's vCPUs get the lowest priority: with
            // a thousand busy guests on two cores, the control thread of every VMM still to
            // answer would otherwise wait about one scheduling round behind all of them.
            let lowered = Mutex::new(Vec::new());
            let lower = priority::can_restore();
            let resumed = resume_batch(&forks, |ws, pid| {
                if lower {
                    let mut l = lowered.lock().unwrap_or_else(|e| e.into_inner());
                    l.extend(priority::lower_vcpus(pid));
                }
                if !ws.config.agent {
                    ready(ws, pid)
                }
            });
            priority::restore(&lowered.into_inner().unwrap_or_else(|e| e.into_inner()));
            resumed.map_err(|(ws, f)| named(ws, f))?;
        }
        for (ws, pid) in created.iter().zip(&pids) {
            match restore {
                Some(_) if !ws.config.agent => continue,
                Some(_) => {
                    crate::agent::deliver(ws, true, true).and_then(|()| crate::net::after_fork(ws))
                }
                None => crate::agent::deliver_after_boot(ws),
            }
            .map_err(|f| named(ws, f))?;
            ready(ws, *pid);
        }
        Ok(pids)
    })();
    match result {
        Ok(pids) => {
            let human: Vec<String> = created
                .iter()
                .zip(&pids)
                .map(|(w, p)| format!("workspace {} forked from {src} (pid {p})", w.name()))
                .collect();
            let js: Vec<_> = created
                .iter()
                .zip(&pids)
                .map(|(w, p)| json!({"name": w.name(), "pid": p, "from": src}))
                .collect();
            out.emit(human.join("\n"), json!({"forked": js, "fetched": fetched}));
            Ok(())
        }
        Err(f) => {
            // Nothing half-made stays behind: VMMs that were launched, ready or not, go too.
            // A jailed VMM is its waiter's child and dies of the waiter's death (PDEATHSIG), but
            // in its own time: it is killed by its host pid as well and waited for.
            let jailed: Vec<i32> = created
                .iter()
                .filter_map(|ws| crate::sandbox::record(&ws.dir))
                .filter_map(|r| i32::try_from(r.pid).ok())
                .collect();
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for pid in jailed {
                process::kill_and_wait(pid);
            }
            // A waiter killed before it recorded its VMM leaves that VMM to PDEATHSIG, which
            // may not have fired yet: find it by its command line and wait for it too.
            for ws in &created {
                for pid in process::vmm_processes(&ws.dir) {
                    process::kill_and_wait(pid);
                }
            }
            for ws in &created {
                let _ = process::halt(ws);
                let _ = std::fs::remove_dir_all(&ws.dir);
            }
            Err(f)
        }
    }
}

/// Threads creating a batch's workspace directories.
const DIR_THREADS: usize = 8;
/// Threads launching a batch's VMMs.
const LAUNCHERS: usize = 4;
/// Threads waiting for a batch's VMMs to answer while the rest are launched.
const READY_WAITERS: usize = 4;

/// Runs `f` on every item, up to `threads` at a time (fewer if threads cannot be had), and
/// returns the results in the items' order.
fn in_parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(item) = items.get(i) else { break };
        let r = f(item);
        *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    };
    std::thread::scope(|s| {
        for _ in 1..threads.min(items.len()) {
            let _ = std::thread::Builder::new().spawn_scoped(s, work);
        }
        work();
    });
    results
        .into_iter()
        .filter_map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect()
}

/// A built-in kernel for a fork: a hard link to the source's copy where the filesystem allows
/// (no new inode and no copy per fork; the file is root's, read-only to every VMM), else a copy.
fn link_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(_) => std::fs::copy(src, dst).map(|_| ()),
    }
}

/// Resumes every fork of a set-up batch through a window of requests in flight, sent from one
/// thread without waiting: each VMM's API thread answers whenever it gets the CPU, so the batch
/// waits about one scheduling round behind the guests already running instead of one per few
/// forks (with 32 blocking requests at a time, 1000 busy forks took 96 s to resume). The answers
/// are read in order; `on_running` sees each fork once it runs. The first failure stops the rest.
fn resume_batch<'a>(
    forks: &[(&'a Workspace, u32)],
    mut on_running: impl FnMut(&Workspace, u32),
) -> Result<(), (&'a Workspace, Failure)> {
    // Well under the usual 1024 open files.
    const WINDOW: usize = 256;
    let mut pending = std::collections::VecDeque::new();
    let mut next = forks.iter();
    loop {
        while pending.len() < WINDOW {
            let Some(&(ws, pid)) = next.next() else { break };
            let sent = send_resume(ws).map_err(|f| (ws, f))?;
            pending.push_back((ws, pid, sent));
        }
        let Some((ws, pid, sent)) = pending.pop_front() else {
            break;
        };
        answer_of_resume(sent).map_err(|f| (ws, f))?;
        on_running(ws, pid);
    }
    Ok(())
}

/// How long a VMM may take to answer a resume (its API thread competes with running guests).
const RESUME_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

fn send_resume(ws: &Workspace) -> Result<std::os::unix::net::UnixStream, Failure> {
    let fail = |e: std::io::Error| Failure::new(Code::Error, format!("cannot resume it: {e}"));
    let mut stream = crate::api::connect_vmm(&ws.path(workspace::API_SOCK)).map_err(fail)?;
    stream
        .set_read_timeout(Some(RESUME_TIMEOUT))
        .map_err(fail)?;
    stream
        .set_write_timeout(Some(RESUME_TIMEOUT))
        .map_err(fail)?;
    crate::api::write_msg(&mut stream, &crate::api::Request::Resume).map_err(fail)?;
    Ok(stream)
}

fn answer_of_resume(stream: std::os::unix::net::UnixStream) -> Result<(), Failure> {
    use crate::api::Response;
    match crate::api::read_msg::<Response>(&mut std::io::BufReader::new(stream)) {
        Ok(Some(Response::Ok)) => Ok(()),
        Ok(Some(Response::Error { code, message })) => {
            Err(Failure::new(crate::output::code_from_name(&code), message))
        }
        Ok(Some(other)) => Err(Failure::new(
            Code::Error,
            format!("unexpected answer from the VMM: {other:?}"),
        )),
        Ok(None) => Err(Failure::new(
            Code::Error,
            "its VMM closed the connection before resuming",
        )),
        Err(e) => Err(Failure::new(Code::Error, format!("cannot resume it: {e}"))),
    }
}

/// The vCPU threads of a batch's running forks at the lowest priority until every fork runs
/// (set from here, outside their jails: a VMM without capabilities could lower its own threads
/// but not bring them back).
mod priority {
    /// Lowest priority.
    const LOW: libc::c_int = 19;

    /// Whether this process may bring a thread back from nice 19 to 0 (root with
    /// CAP_SYS_NICE, or an RLIMIT_NICE of 20): tried on this thread, so that nothing is
    /// lowered that could not be restored.
    pub fn can_restore() -> bool {
        // SAFETY: gettid takes no arguments and cannot fail.
        let me = unsafe { libc::gettid() } as libc::id_t;
        // SAFETY: getpriority/setpriority on this very thread.
        unsafe {
            let before = libc::getpriority(libc::PRIO_PROCESS, me);
            if before != 0 || libc::setpriority(libc::PRIO_PROCESS, me, 1) != 0 {
                return false;
            }
            libc::setpriority(libc::PRIO_PROCESS, me, 0) == 0
        }
    }

    /// Lowers the vCPU threads (named `vcpuN`) of VMM `pid`; returns their thread ids.
    pub fn lower_vcpus(pid: u32) -> Vec<libc::id_t> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return Vec::new();
        };
        tasks
            .flatten()
            .filter_map(|t| {
                let tid: libc::id_t = t.file_name().to_str()?.parse().ok()?;
                let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
                comm.starts_with("vcpu").then_some(tid)
            })
            // SAFETY: setpriority on a thread of a VMM this command started.
            .filter(|&tid| unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, LOW) } == 0)
            .collect()
    }

    /// Normal priority again for every thread `lower_vcpus` lowered.
    pub fn restore(tids: &[libc::id_t]) {
        for &tid in tids {
            // SAFETY: as above; a thread that has gone since just fails.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 0) };
        }
    }
}

/// Reports the forks of a batch as each becomes ready: a progress line on a terminal, and with
/// `--json` one JSON line per fork (`--count` batches only: a single fork answers with the
/// summary alone, as before) ahead of the summary document.
struct BatchReport<'a> {
    out: Out,
    from: &'a str,
    lines: bool,
    done: u64,
    total: u64,
}

impl<'a> BatchReport<'a> {
    fn new(out: Out, from: &'a str, lines: bool, total: u64) -> Self {
        BatchReport {
            out,
            from,
            lines,
            done: 0,
            total,
        }
    }

    fn ready(&mut self, ws: &Workspace, pid: u32) {
        self.done += 1;
        if self.lines {
            self.out.item(json!({"ready": {
                "name": ws.name(),
                "pid": pid,
                "from": self.from,
                "done": self.done,
                "total": self.total,
            }}));
        }
        self.out
            .progress_items("forks running", self.done, self.total);
    }
}

#[derive(Args)]
pub struct StartArgs {
    name: String,
    /// Roll the (halted) workspace back to this snapshot: memory, devices and disk.
    #[arg(long, value_name = "TAG")]
    from_snapshot: Option<String>,
    /// How guest memory comes back from a snapshot [default: eager].
    #[arg(long, value_enum)]
    memory: Option<MemoryArg>,
    /// With --from-snapshot: halt a running workspace first instead of refusing.
    #[arg(long, requires = "from_snapshot")]
    force: bool,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

pub fn start(root: &Path, args: StartArgs, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, &args.name)?;
    let _lock = ws.lock()?;
    match ws.state() {
        State::Stopped | State::Hibernated => {}
        State::Crashed | State::Failed => ws.clear_stale_process(),
        // Starting a paused workspace lets it run on from where it stopped.
        State::Paused if args.from_snapshot.is_none() => {
            return set_paused(&ws, true, out);
        }
        State::Running | State::Paused if args.force => process::halt(&ws)?,
        s => {
            return Err(Failure::new(
                Code::Conflict,
                if args.from_snapshot.is_some() {
                    format!(
                        "workspace {} is {}; halt it first or pass --force",
                        ws.name(),
                        s.as_str()
                    )
                } else {
                    format!("workspace {} is already {}", ws.name(), s.as_str())
                },
            ))
        }
    }
    let hibernated = ws.hibernation_slot();
    if args.from_snapshot.is_some() {
        // Rolling back discards the hibernated state.
        if let Some(slot) = &hibernated {
            let _ = std::fs::remove_dir_all(slot.parent().unwrap_or(slot));
        }
    }
    let resume_from = match (&args.from_snapshot, &hibernated) {
        (None, Some(slot)) => {
            let snap = Snapshot::open(slot).map_err(crate::snapshot_failure)?;
            snap.verify(&VerifyOptions {
                kernel: Some(&ws.config.kernel),
                contents: true,
                recheck: false,
            })
            .map_err(crate::snapshot_failure)?;
            Some(snap)
        }
        _ => None,
    };
    let snap = match &args.from_snapshot {
        None => resume_from,
        Some(tag) => {
            let snap = open_snapshot(&ws, tag)?;
            snap.verify(&VerifyOptions {
                kernel: Some(&ws.config.kernel),
                contents: true,
                recheck: false,
            })
            .map_err(crate::snapshot_failure)?;
            if let (Some(src), Some(dst)) = (snap.rootfs_path(), ws.config.rootfs.as_ref()) {
                // The disk goes back too: copy beside, then replace in one rename.
                let tmp = ws.path(".rootfs.restoring");
                let _ = std::fs::remove_file(&tmp);
                snapshot::rootfs::copy_image_untrusted(&src, &tmp)
                    .map_err(|e| io_fail("cannot copy rootfs to", &tmp, e))?;
                std::fs::rename(&tmp, dst).map_err(|e| io_fail("cannot replace", dst, e))?;
            }
            Some(snap)
        }
    };
    // A disk snapshot only brings the disk back (copied above): the VM boots afresh.
    let snap = snap.filter(|s| s.manifest.kind != snapshot::Kind::Disk);
    let flags = crate::sandbox::RunFlags {
        jail: ws.config.sandbox.jail && !args.sandbox.no_jail,
        seccomp: ws.config.sandbox.seccomp && !args.sandbox.no_seccomp,
    };
    let mut child = process::spawn_with(
        &ws,
        snap.as_ref().map(|s| s.dir.as_path()),
        args.memory.unwrap_or_else(|| MemoryArg::default_for(1)),
        flags,
    )?;
    let pid = process::wait_ready(&ws, &mut child)?;
    match &snap {
        // Restored: thaw, fresh entropy, secrets back (they were scrubbed before the capture).
        Some(_) => {
            crate::agent::deliver(&ws, true, false)?;
            crate::net::after_restore(&ws)?;
        }
        None => crate::agent::deliver_after_boot(&ws)?,
    }
    let human = match (&args.from_snapshot, &hibernated) {
        (Some(t), _) => format!(
            "workspace {} restored from snapshot {t} (pid {pid})",
            ws.name()
        ),
        (None, Some(_)) => {
            // The VMM has the memory mapped (or read); the slot has done its job.
            let _ = std::fs::remove_dir_all(ws.path(workspace::HIBERNATION));
            format!(
                "workspace {} resumed from hibernation (pid {pid})",
                ws.name()
            )
        }
        (None, None) => format!("workspace {} started (pid {pid})", ws.name()),
    };
    out.emit(human, json!({"name": ws.name(), "pid": pid, "state": "running", "from_snapshot": args.from_snapshot}));
    Ok(())
}

/// `pause NAME` / `resume NAME`: stop or continue a running workspace's vCPUs in place.
pub fn pause(root: &Path, name: &str, pause: bool, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let _lock = ws.lock()?;
    let state = ws.state();
    match (state, pause) {
        (State::Running, true) | (State::Paused, false) => set_paused(&ws, !pause, out),
        (State::Paused, true) | (State::Running, false) => {
            out.emit(
                format!("workspace {name} is already {}", state.as_str()),
                json!({"name": name, "state": state}),
            );
            Ok(())
        }
        (s, _) => Err(Failure::new(
            Code::Conflict,
            format!(
                "workspace {name} is {}; only a running workspace {}",
                s.as_str(),
                if pause { "pauses" } else { "resumes" }
            ),
        )),
    }
}

/// Sends pause or resume to the VMM (`running` true resumes) and reports the new state.
fn set_paused(ws: &Workspace, running: bool, out: Out) -> Result<(), Failure> {
    process::set_running(ws, running)?;
    let (verb, state) = if running {
        ("resumed", State::Running)
    } else {
        ("paused", State::Paused)
    };
    out.emit(
        format!("workspace {} {verb}", ws.name()),
        json!({"name": ws.name(), "state": state}),
    );
    Ok(())
}

pub fn halt(root: &Path, name: &str, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let _lock = ws.lock()?;
    let before = ws.state();
    process::halt(&ws)?;
    out.emit(
        match before {
            State::Stopped => format!("workspace {name} is already stopped"),
            _ => format!("workspace {name} halted"),
        },
        json!({"name": name, "state": "stopped"}),
    );
    Ok(())
}

pub fn delete(root: &Path, name: &str, yes: bool, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    if !yes {
        return Err(Failure::new(
            Code::Usage,
            format!("refusing to delete workspace {name} and its snapshots without --yes"),
        ));
    }
    let _lock = ws.lock()?;
    process::halt(&ws)?;
    // Rename first so a half-deleted workspace never looks like a workspace; what an
    // interrupted removal leaves is swept by the next command.
    let doomed =
        home::workspaces_dir(root).join(format!(".deleting-{name}-{}", std::process::id()));
    std::fs::rename(&ws.dir, &doomed).map_err(|e| io_fail("cannot delete", &ws.dir, e))?;
    crate::testhooks::crash_point("delete-renamed");
    std::fs::remove_dir_all(&doomed).map_err(|e| io_fail("cannot delete", &doomed, e))?;
    out.emit(
        format!("workspace {name} deleted"),
        json!({"deleted": name}),
    );
    Ok(())
}

pub(crate) fn summary(ws: &Workspace) -> serde_json::Value {
    let state = ws.state();
    let snaps = snapshot::list(&ws.snapshots_dir()).len();
    json!({
        "name": ws.name(),
        "state": state,
        "pid": if matches!(state, State::Running | State::Paused) { ws.pid() } else { None },
        "vcpus": ws.config.vcpus,
        "mem_mib": ws.config.mem_mib,
        "kernel": ws.config.kernel_spec,
        "image": ws.config.image,
        "snapshots": snaps,
        "forked_from": ws.config.forked_from,
        "created": ws.config.created,
        "expires_in_s": ws.config.expires_unix.map(|t| t.saturating_sub(now_unix())),
        "paused_ms": if state == State::Paused { paused_ms(ws) } else { None },
        "net": ws.config.net.describe(),
        "published": match crate::net::runtime(ws) {
            Some(rt) if matches!(state, State::Running | State::Paused) => rt
                .published
                .iter()
                .map(crate::net::Publish::describe)
                .collect::<Vec<_>>(),
            _ => ws.config.publish.iter().map(crate::net::Publish::describe).collect(),
        },
        "sandbox": sandbox_summary(ws, state),
        "failure": match state {
            State::Failed => crate::sandbox::failure(&ws.dir),
            // A VMM that died on its own says why in its log (bounded: rotated at 1 MiB).
            State::Crashed => crate::workspace::read_tail_untrusted(
                &ws.path(crate::workspace::VMM_LOG),
                crate::vmm_jail::VMM_LOG_MAX,
            )
            .ok()
                .and_then(|log| crate::logging::last_error(&log)),
            _ => None,
        },
    })
}

/// The running VMM's sandbox as its waiter recorded it, else the workspace's settings.
fn sandbox_summary(ws: &Workspace, state: State) -> serde_json::Value {
    let running = matches!(state, State::Running | State::Paused);
    match crate::sandbox::record(&ws.dir).filter(|r| running && Some(r.pid as i32) == ws.pid()) {
        Some(r) => json!({
            "jail": r.jail,
            "seccomp": r.seccomp,
            "uid": r.uid,
            "gid": r.gid,
            "jail_root": r.jail_root,
            "cgroups": r.cgroups,
            "cgroup_note": r.cgroup_note,
            "summary": crate::sandbox::describe(&r),
        }),
        None => json!({
            "jail": ws.config.sandbox.jail,
            "seccomp": ws.config.sandbox.seccomp,
            "console_max": ws.config.sandbox.console_max,
        }),
    }
}

/// How long the workspace's VM has been paused, as its VMM reports it.
fn paused_ms(ws: &Workspace) -> Option<u64> {
    use crate::api::{self, Request, Response};
    match api::request(
        &ws.path(workspace::API_SOCK),
        &Request::Status,
        std::time::Duration::from_secs(2),
    ) {
        Ok(Response::Status { paused_ms, .. }) => paused_ms,
        _ => None,
    }
}

pub fn list(root: &Path, out: Out) -> Result<(), Failure> {
    sweep_leftovers(root);
    let all: Vec<_> = Workspace::all(root).iter().map(summary).collect();
    let mut human = format!(
        "{:<20} {:<10} {:>5} {:>8} {:>9} {:>8}  {}",
        "NAME", "STATE", "VCPUS", "MEM", "SNAPSHOTS", "TTL", "KERNEL"
    );
    for w in &all {
        let ttl = w["expires_in_s"]
            .as_u64()
            .map(|s| format!("{s}s"))
            .unwrap_or_else(|| "-".into());
        human.push_str(&format!(
            "\n{:<20} {:<10} {:>5} {:>8} {:>9} {:>8}  {}",
            w["name"].as_str().unwrap_or(""),
            w["state"].as_str().unwrap_or(""),
            w["vcpus"].to_string(),
            format!("{}M", w["mem_mib"]),
            w["snapshots"].to_string(),
            ttl,
            w["kernel"].as_str().unwrap_or("")
        ));
    }
    out.emit(human, json!({"workspaces": all}));
    Ok(())
}

pub fn status(root: &Path, name: &str, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let s = summary(&ws);
    let paused = s["paused_ms"]
        .as_u64()
        .map(|ms| format!(" for {}.{:03} s", ms / 1000, ms % 1000))
        .unwrap_or_default();
    let human = format!(
        "name:      {}\nstate:     {}{paused}\nvcpus:     {}\nmemory:    {} MiB\nkernel:    {}\nsnapshots: {}\nnetwork:   {}{}",
        ws.name(),
        s["state"].as_str().unwrap_or(""),
        ws.config.vcpus,
        ws.config.mem_mib,
        ws.config.kernel_spec,
        s["snapshots"],
        net_line(&s),
        ws.config
            .forked_from
            .as_ref()
            .map(|f| format!("\nforked:    from {f}"))
            .unwrap_or_default()
    );
    let sandbox = match s["sandbox"]["summary"].as_str() {
        Some(line) => line.to_string(),
        None => format!(
            "{}, {}",
            if ws.config.sandbox.jail {
                "jail"
            } else {
                "no jail"
            },
            if ws.config.sandbox.seccomp {
                "seccomp"
            } else {
                "no seccomp"
            }
        ),
    };
    let mut human = format!("{human}\nsandbox:   {sandbox}");
    if let Some(f) = s["failure"].as_str() {
        human.push_str(&format!("\nfailure:   {f}"));
    }
    out.emit(human, s);
    Ok(())
}

/// `user (8080->80/tcp, ...)`: the mode and, for a running VM, the host ports in force.
fn net_line(s: &serde_json::Value) -> String {
    let ports: Vec<String> = s["published"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mode = s["net"].as_str().unwrap_or("none");
    if ports.is_empty() {
        mode.to_string()
    } else {
        format!("{mode}, published {}", ports.join(" "))
    }
}

pub fn console(root: &Path, name: &str) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let p = ws.path(workspace::CONSOLE);
    // The VMM keeps its log under this bound; a larger file is not its log.
    let max = ws.config.sandbox.console_max.saturating_add(1 << 20);
    match read_settled(&p, max) {
        Ok(b) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&b);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_fail("cannot read", &p, e)),
    }
}

/// A bounded log is compacted in place while the guest prints (its newest half moved to the
/// front, then the file cut): a read that overlaps a compaction sees the new front followed by
/// the old tail. Such a read finds the file shorter afterwards than what it read, and is repeated.
/// The log is the jailed VMM's file: read as [`workspace::read_untrusted`] does.
fn read_settled(p: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = workspace::read_untrusted(p, max)?;
    for _ in 0..10 {
        let now = std::fs::symlink_metadata(p)?.len();
        if now >= bytes.len() as u64 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        bytes = workspace::read_untrusted(p, max)?;
    }
    Ok(bytes)
}

pub fn hibernate(root: &Path, name: &str, out: Out) -> Result<(), Failure> {
    use crate::api::{self, Request, Response};
    let ws = Workspace::open(root, name)?;
    let _lock = ws.lock()?;
    match ws.state() {
        State::Running | State::Paused => {}
        s => {
            return Err(Failure::new(
                Code::Conflict,
                format!(
                    "workspace {name} is {}; only a running workspace hibernates",
                    s.as_str()
                ),
            ))
        }
    }
    let _ = std::fs::remove_dir_all(ws.path(workspace::HIBERNATION));
    let resp = api::request_with_progress(
        &ws.path(workspace::API_SOCK),
        &Request::Hibernate,
        Some(std::time::Duration::from_secs(3600)),
        &mut |done, total| out.progress("saving memory", done, total),
    )
    .map_err(|e| Failure::new(Code::Error, e.to_string()))?;
    match resp {
        Response::Snapshot { manifest, .. } => {
            // The VMM stops by itself after the capture; wait for it to be gone.
            process::halt(&ws)?;
            out.emit(
                format!(
                    "workspace {name} hibernated ({} MiB RAM saved); `start {name}` resumes it",
                    manifest.mem_mib
                ),
                json!({"name": name, "state": "hibernated"}),
            );
            Ok(())
        }
        Response::Error { code, message } => {
            Err(Failure::new(crate::output::code_from_name(&code), message))
        }
        other => Err(Failure::new(
            Code::Error,
            format!("unexpected answer from the VMM: {other:?}"),
        )),
    }
}

/// A stopped workspace to receive an imported snapshot, shaped like the snapshot's VM. Its kernel
/// is the built-in one if the digest says so, else the manifest's path or `--kernel`, and must
/// match the manifest's sha256.
pub fn create_for_import(
    root: &Path,
    name: &str,
    m: &snapshot::Manifest,
    kernel: Option<&Path>,
) -> Result<Workspace, Failure> {
    create_for_import_with(root, name, m, kernel, |_| Ok(()))
}

/// As `create_for_import`, with `extra` run on the hidden directory before it becomes visible
/// (a pull puts the snapshot there, so the workspace appears with it or not at all).
pub fn create_for_import_with(
    root: &Path,
    name: &str,
    m: &snapshot::Manifest,
    kernel: Option<&Path>,
    extra: impl FnOnce(&Path) -> Result<(), Failure>,
) -> Result<Workspace, Failure> {
    let builtin_spec = format!("{}testguest", builtin::PREFIX);
    let builtin_sha =
        snapshot::digest::sha256_bytes(builtin::bytes(&builtin_spec).unwrap_or_default());
    let spec = if m.kernel.sha256 == builtin_sha {
        builtin_spec
    } else {
        let candidate = kernel
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from(&m.kernel.path));
        let sha = snapshot::digest::sha256_file(&candidate).map_err(|_| {
            Failure::new(
                Code::NotFound,
                format!(
                    "the snapshot's kernel {} is not here: pass --kernel PATH",
                    candidate.display()
                ),
            )
        })?;
        if sha != m.kernel.sha256 {
            return Err(Failure::new(
                Code::SnapshotRefused,
                format!(
                    "kernel {} does not match the snapshot's sha256 {}",
                    candidate.display(),
                    m.kernel.sha256
                ),
            ));
        }
        candidate.display().to_string()
    };
    new_workspace_dir(root, name, |dir| {
        let staged = stage_kernel(&spec, dir)?;
        let kernel = if spec.starts_with(builtin::PREFIX) {
            Workspace::dir_for(root, name).join(workspace::KERNEL_COPY)
        } else {
            staged
        };
        let rootfs = m
            .file(snapshot::manifest::ROOTFS)
            .map(|_| Workspace::dir_for(root, name).join(workspace::ROOTFS));
        if rootfs.is_some() {
            // An empty placeholder; `start --from-snapshot` copies the snapshot's disk over it.
            std::fs::File::create(dir.join(workspace::ROOTFS))
                .map_err(|e| io_fail("cannot create", dir, e))?;
        }
        extra(dir)?;
        Ok(Config {
            name: name.to_string(),
            kernel_spec: spec.clone(),
            kernel,
            initrd: None,
            rootfs,
            image: m.image.clone(),
            mem_mib: m.mem_mib,
            vcpus: m.vcpus,
            cmdline: m.cmdline.clone(),
            created: now_rfc3339(),
            forked_from: None,
            expires_unix: None,
            agent: !spec.starts_with(builtin::PREFIX)
                && m.file(snapshot::manifest::ROOTFS).is_some(),
            net: crate::net::NetMode::None,
            publish: Vec::new(),
            sandbox: Default::default(),
        })
    })
}

fn copy_secrets(from: &Path, to: &Path) -> Result<(), Failure> {
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    std::fs::create_dir_all(to).map_err(|e| io_fail("cannot create", to, e))?;
    for e in entries.flatten() {
        let dst = to.join(e.file_name());
        std::fs::copy(e.path(), &dst).map_err(|err| io_fail("cannot copy", &dst, err))?;
    }
    Ok(())
}
