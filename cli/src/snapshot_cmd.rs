//! `microagent snapshot create|list|delete|inspect`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde_json::json;
use snapshot::{Manifest, VerifyOptions};

// The API's snapshot listing names each one's dependents too.
pub(crate) use snapshot::prune::dependents;

use crate::api::{self, Request, Response};
use crate::commands::open_snapshot;
use crate::exit::{Code, Failure};
use crate::output::{code_from_name, human_size, Out};
use crate::workspace::{self, State, Workspace};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Capture a running or paused workspace: memory, vCPU and device state, and its disk.
    Create(CreateArgs),
    /// List a workspace's snapshots.
    List {
        name: String,
        /// Only snapshots whose tag or note contains WORD (case-insensitive).
        #[arg(long, value_name = "WORD")]
        search: Option<String>,
    },
    /// Delete one snapshot.
    Delete {
        name: String,
        tag: String,
        /// Also delete the diff snapshots that depend on it.
        #[arg(long)]
        cascade: bool,
    },
    /// Show a snapshot's manifest; with --verify, re-check every file's digest.
    Inspect(InspectArgs),
    /// Rename a snapshot or change its note.
    Edit(EditArgs),
    /// Delete old snapshots: older than a duration, beyond the newest N, or both.
    Prune(PruneArgs),
    /// Write a snapshot to one portable archive (tar + zstd). A snapshot whose capture found
    /// delivered secrets in it is refused (exit 5) unless --allow-secrets: an archive leaves the
    /// host.
    Export {
        name: String,
        tag: String,
        file: PathBuf,
        /// Export even a snapshot that holds secrets.
        #[arg(long)]
        allow_secrets: bool,
    },
    /// Import a snapshot archive; every digest is checked before it becomes visible.
    Import(ImportArgs),
    /// Upload a snapshot to a remote as content-addressed chunks (only those it lacks).
    Push {
        name: String,
        tag: String,
        remote: String,
    },
    /// Download a snapshot from a remote (REMOTE/NAME:TAG); every chunk is verified.
    Pull {
        #[arg(value_name = "REMOTE/NAME:TAG")]
        source: String,
        /// The workspace to pull into (default: NAME). It is created if it does not exist.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
    },
}

#[derive(Args)]
pub struct ImportArgs {
    file: PathBuf,
    /// The workspace to import into (default: the one the snapshot was taken from). It is
    /// created from the snapshot if it does not exist.
    #[arg(long = "as", value_name = "NAME")]
    as_name: Option<String>,
    /// The kernel for a new workspace, when the snapshot's is not found (its sha256 must match).
    #[arg(long)]
    kernel: Option<PathBuf>,
}

#[derive(Args)]
pub struct CreateArgs {
    name: String,
    /// Tag (defaults to the UTC time, e.g. 20260611T085244Z).
    #[arg(long)]
    tag: Option<String>,
    /// A note stored with the snapshot.
    #[arg(long)]
    note: Option<String>,
    /// Leave a running VM paused after the capture (the default resumes it).
    #[arg(long)]
    no_resume: bool,
    /// full: memory, state and disk; diff: only the pages written since the previous capture
    /// (or the snapshot this run was restored from), naming it as parent.
    #[arg(long = "type", value_enum, default_value_t = SnapshotKind::Full)]
    kind: SnapshotKind,
    /// The capture's files are scanned for every secret delivered to the workspace (raw, hex,
    /// base64). report: name each one found, with its page count, on stderr, in --json and in
    /// the manifest; strict: refuse such a capture (exit 5), keeping nothing.
    #[arg(long, value_enum, default_value_t = SecretsMode::Report)]
    secrets: SecretsMode,
    /// Copy memory while the guest runs, re-copy what it changes in rounds, and stop it only
    /// for the last pages, its state and the disk copy (a full snapshot of the state at that
    /// stop). A guest that dirties memory faster than it is written is stopped anyway to copy
    /// the rest, with a warning.
    #[arg(long)]
    live: bool,
    /// With --live: stop the guest once what is left would take less than this to write
    /// (like QEMU's downtime-limit), e.g. 20ms, 500us, 1s.
    #[arg(
        long,
        value_name = "DURATION",
        requires = "live",
        default_value = "20ms"
    )]
    max_pause: String,
}

/// A short duration as `--max-pause` takes it: a whole number and `us`, `ms` or `s`.
fn parse_pause(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("--max-pause {s:?} needs a unit (us, ms, s)"))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("--max-pause {s:?} does not start with a number"))?;
    let per = match unit {
        "us" => 1,
        "ms" => 1_000,
        "s" => 1_000_000,
        _ => return Err(format!("--max-pause {s:?}: unknown unit (use us, ms, s)")),
    };
    n.checked_mul(per)
        .filter(|us| *us <= 60_000_000)
        .map(Duration::from_micros)
        .ok_or_else(|| format!("--max-pause {s:?} is longer than a minute"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretsMode {
    Report,
    Strict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotKind {
    Full,
    Diff,
    /// Only the rootfs, of a halted workspace; restoring it boots afresh.
    Disk,
}

#[derive(Args)]
pub struct InspectArgs {
    name: String,
    tag: String,
    #[arg(long)]
    verify: bool,
}

#[derive(Args)]
pub struct EditArgs {
    name: String,
    tag: String,
    /// The new tag.
    #[arg(long = "tag", value_name = "NEW")]
    new_tag: Option<String>,
    /// The new note (an empty string removes it).
    #[arg(long)]
    note: Option<String>,
}

#[derive(Args)]
pub struct PruneArgs {
    name: String,
    /// Delete snapshots older than this (e.g. 30m, 7d).
    #[arg(long, value_name = "DURATION")]
    older_than: Option<String>,
    /// Keep at least the newest N snapshots.
    #[arg(long, value_name = "N")]
    keep: Option<usize>,
    /// Print what would be deleted, delete nothing.
    #[arg(long)]
    dry_run: bool,
}

pub fn run(root: &Path, cmd: SnapshotCommand, out: Out) -> Result<(), Failure> {
    match cmd {
        SnapshotCommand::Create(a) => create(root, a, out),
        SnapshotCommand::List { name, search } => list(root, &name, search.as_deref(), out),
        SnapshotCommand::Delete { name, tag, cascade } => delete(root, &name, &tag, cascade, out),
        SnapshotCommand::Inspect(a) => inspect(root, &a, out),
        SnapshotCommand::Edit(a) => edit(root, a, out),
        SnapshotCommand::Prune(a) => prune(root, a, out),
        SnapshotCommand::Export {
            name,
            tag,
            file,
            allow_secrets,
        } => export(root, &name, &tag, &file, allow_secrets, out),
        SnapshotCommand::Import(a) => import(root, a, out),
        SnapshotCommand::Push { name, tag, remote } => {
            crate::remote::push(root, &name, &tag, &remote, out)
        }
        SnapshotCommand::Pull { source, as_name } => {
            crate::remote::pull(root, &source, as_name, out)
        }
    }
}

fn default_tag() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    snapshot::manifest::rfc3339(now).replace(['-', ':'], "")
}

pub(crate) fn manifest_json(m: &Manifest, dir: &Path) -> serde_json::Value {
    json!({
        "tag": m.tag,
        "kind": m.kind,
        "parent": m.parent,
        "created": m.created,
        "vcpus": m.vcpus,
        "mem_mib": m.mem_mib,
        "image": m.image,
        "kernel": m.kernel,
        "note": m.note,
        "size": disk_usage(dir),
        "files": m.files,
        "secret_scan": m.secret_scan,
    })
}

/// Tells on stderr which secrets a capture holds (names and pages, never values).
fn warn_residue(m: &Manifest, out: Out) {
    let Some(scan) = &m.secret_scan else {
        return;
    };
    if scan.has_residue() && !out.json {
        tracing::warn!(
            "snapshot {} holds secrets delivered to the workspace: {}. \
             `snapshot export` refuses it unless --allow-secrets; --secrets strict refuses such \
             a capture",
            m.tag,
            scan.summary()
        );
    }
    for s in &scan.skipped {
        if !out.json {
            tracing::warn!("secret {} was not scanned for: {}", s.name, s.reason);
        }
    }
}

/// Bytes the snapshot really occupies (sparse files count their allocated blocks).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn create(root: &Path, a: CreateArgs, out: Out) -> Result<(), Failure> {
    let CreateArgs {
        name,
        tag,
        note,
        no_resume,
        kind,
        secrets,
        live,
        max_pause,
    } = a;
    let name = name.as_str();
    let live = if live {
        if kind != SnapshotKind::Full {
            return Err(Failure::new(
                Code::Usage,
                "--live captures a full snapshot: diff and disk snapshots are taken with the \
                 guest stopped (drop --live, or --type)",
            ));
        }
        let max_pause = parse_pause(&max_pause).map_err(|e| Failure::new(Code::Usage, e))?;
        Some(api::LiveParams {
            max_pause_us: u64::try_from(max_pause.as_micros()).unwrap_or(u64::MAX),
        })
    } else {
        None
    };
    let ws = Workspace::open(root, name)?;
    let _lock = ws.lock()?;
    let strict_secrets = secrets == SecretsMode::Strict;
    if kind == SnapshotKind::Disk {
        return disk_snapshot(&ws, tag, note, strict_secrets, out);
    }
    match ws.state() {
        State::Running | State::Paused => {}
        s => {
            return Err(Failure::new(
                Code::Conflict,
                format!(
                    "workspace {name} is {}; snapshots capture a running or paused workspace",
                    s.as_str()
                ),
            ))
        }
    }
    let tag = tag.unwrap_or_else(default_tag);
    if !snapshot::manifest::is_safe_name(&tag) {
        return Err(Failure::new(
            Code::Usage,
            format!("invalid snapshot tag {tag:?}"),
        ));
    }
    // A workspace with an agent syncs, freezes its filesystems and scrubs its secrets first.
    let prepared = crate::agent::prepare(&ws)?;
    let resp = api::request_with_progress(
        &ws.path(workspace::API_SOCK),
        &Request::Snapshot {
            tag: tag.clone(),
            note,
            leave_paused: no_resume,
            diff: kind == SnapshotKind::Diff,
            secrets: crate::agent::secrets_to_scan(&ws),
            strict_secrets,
            live,
        },
        Some(Duration::from_secs(3600)),
        &mut |done, total| out.progress("capturing memory", done, total),
    )
    .map_err(|e| Failure::new(Code::Error, e.to_string()));
    if prepared && !no_resume {
        // The source goes on: thaw it and give its secrets back, whatever the capture did.
        crate::agent::deliver(&ws, false, false)?;
    }
    match resp? {
        Response::Snapshot { manifest, capture } => {
            let dir = ws.snapshots_dir().join(&manifest.tag);
            warn_residue(&manifest, out);
            let mut human = format!(
                "snapshot {} created ({} MiB RAM, {} vCPU) at {}",
                manifest.tag, manifest.mem_mib, manifest.vcpus, manifest.created
            );
            let (pause_ms, live) = capture.map_or((None, None), |c| (c.pause_ms, c.live));
            if let Some(l) = &live {
                if let Some(why) = &l.fallback {
                    if !out.json {
                        tracing::warn!("{why}");
                    }
                }
                human.push_str(&format!(
                    "\nguest paused {:.1} ms (live: {} copy round{}, {:.1} MiB copied while \
                     it ran, {:.1} MiB in the pause{})",
                    l.pause_ms,
                    l.rounds,
                    if l.rounds == 1 { "" } else { "s" },
                    l.precopy_bytes as f64 / (1 << 20) as f64,
                    l.final_bytes as f64 / (1 << 20) as f64,
                    if l.converged {
                        ""
                    } else {
                        "; did not converge"
                    }
                ));
            }
            out.emit(
                human,
                json!({
                    "workspace": name,
                    "snapshot": manifest_json(&manifest, &dir),
                    "pause_ms": pause_ms,
                    "live": live,
                }),
            );
            Ok(())
        }
        Response::Error { code, message } => Err(Failure::new(code_from_name(&code), message)),
        other => Err(Failure::new(
            Code::Error,
            format!("unexpected answer from the VMM: {other:?}"),
        )),
    }
}

fn matches(m: &Manifest, word: &str) -> bool {
    let w = word.to_lowercase();
    m.tag.to_lowercase().contains(&w)
        || m.note
            .as_deref()
            .is_some_and(|n| n.to_lowercase().contains(&w))
}

fn list(root: &Path, name: &str, search: Option<&str>, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let snaps: Vec<_> = snapshot::list(&ws.snapshots_dir())
        .into_iter()
        .filter(|s| search.is_none_or(|w| matches(&s.manifest, w)))
        .collect();
    // The documented columns come first, in their documented order (scripts read IMAGE as the
    // fourth); what came later goes after them. Sizes have no inner space, so every column is
    // one whitespace-separated word.
    let mut human = format!(
        "{:<24} {:>10}  {:<20}  {:<24} {:<5} {}",
        "TAG", "SIZE", "CREATED", "IMAGE", "KIND", "PARENT"
    );
    let mut js = Vec::new();
    for s in &snaps {
        let m = &s.manifest;
        human.push_str(&format!(
            "\n{:<24} {:>10}  {:<20}  {:<24} {:<5} {}",
            m.tag,
            human_size(disk_usage(&s.dir)).replace(' ', ""),
            m.created,
            m.image.as_deref().unwrap_or("-"),
            match m.kind {
                snapshot::Kind::Full => "full",
                snapshot::Kind::Diff => "diff",
                snapshot::Kind::Disk => "disk",
            },
            m.parent.as_deref().unwrap_or("-"),
        ));
        js.push(manifest_json(m, &s.dir));
    }
    out.emit(human, json!({"workspace": name, "snapshots": js}));
    Ok(())
}

fn delete(root: &Path, name: &str, tag: &str, cascade: bool, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let _lock = ws.lock()?;
    let snap = open_snapshot(&ws, tag)?;
    let all = snapshot::list(&ws.snapshots_dir());
    let deps = dependents(&all, tag);
    if !deps.is_empty() && !cascade {
        return Err(Failure::new(
            Code::Conflict,
            format!(
                "snapshot {tag} is the parent of {}; delete with --cascade to remove them too",
                deps.join(", ")
            ),
        ));
    }
    // Children first, so no remaining snapshot ever lacks its parent.
    for d in deps.iter().rev() {
        if let Some(s) = all.iter().find(|s| &s.manifest.tag == d) {
            s.clone().delete().map_err(crate::snapshot_failure)?;
        }
    }
    snap.delete().map_err(crate::snapshot_failure)?;
    let mut gone = deps.clone();
    gone.push(tag.to_string());
    out.emit(
        gone.iter()
            .map(|t| format!("snapshot {t} deleted"))
            .collect::<Vec<_>>()
            .join("\n"),
        json!({"workspace": name, "deleted": gone}),
    );
    Ok(())
}

fn inspect(root: &Path, a: &InspectArgs, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, &a.name)?;
    let snap = open_snapshot(&ws, &a.tag)?;
    if a.verify {
        snap.verify(&VerifyOptions {
            kernel: Some(&ws.config.kernel),
            contents: true,
            recheck: true,
        })
        .map_err(crate::snapshot_failure)?;
    }
    let m = &snap.manifest;
    let mut human = format!(
        "tag:       {}\nkind:      {:?}\ncreated:   {}\nvcpus:     {}\nmemory:    {} MiB\nkernel:    {} (sha256 {})\ncmdline:   {}\nhost cpu:  {} {}\nsize:      {}",
        m.tag,
        m.kind,
        m.created,
        m.vcpus,
        m.mem_mib,
        m.kernel.path,
        m.kernel.sha256,
        m.cmdline,
        m.host_cpu.vendor,
        m.host_cpu.model,
        human_size(disk_usage(&snap.dir)),
    );
    for f in &m.files {
        human.push_str(&format!("\nfile:      {} {} {}", f.name, f.size, f.digest));
    }
    if a.verify {
        human.push_str("\nverified:  every file matches its digest");
    }
    let mut v = manifest_json(m, &snap.dir);
    v["verified"] = json!(a.verify);
    out.emit(human, v);
    Ok(())
}

fn edit(root: &Path, a: EditArgs, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, &a.name)?;
    let _lock = ws.lock()?;
    let snap = open_snapshot(&ws, &a.tag)?;
    if a.new_tag.is_none() && a.note.is_none() {
        return Err(Failure::new(
            Code::Usage,
            "nothing to change: give --tag NEW and/or --note TEXT",
        ));
    }
    let note = a.note.map(|n| if n.is_empty() { None } else { Some(n) });
    let children: Vec<snapshot::Snapshot> = snapshot::list(&ws.snapshots_dir())
        .into_iter()
        .filter(|s| s.manifest.parent.as_deref() == Some(a.tag.as_str()))
        .collect();
    let edited = snap
        .edit(a.new_tag.as_deref(), note)
        .map_err(crate::snapshot_failure)?;
    if edited.manifest.tag != a.tag {
        // Diffs name their parent by tag: follow the rename.
        for c in children {
            c.set_parent(&edited.manifest.tag)
                .map_err(crate::snapshot_failure)?;
        }
    }
    let m = &edited.manifest;
    out.emit(
        format!(
            "snapshot {} updated{}",
            m.tag,
            m.note
                .as_ref()
                .map(|n| format!(" (note: {n})"))
                .unwrap_or_default()
        ),
        json!({"workspace": a.name, "snapshot": manifest_json(m, &edited.dir)}),
    );
    Ok(())
}

fn prune(root: &Path, a: PruneArgs, out: Out) -> Result<(), Failure> {
    if a.older_than.is_none() && a.keep.is_none() {
        return Err(Failure::new(
            Code::Usage,
            "prune needs --older-than DURATION and/or --keep N",
        ));
    }
    let older_than = a
        .older_than
        .as_deref()
        .map(crate::duration::parse)
        .transpose()
        .map_err(|e| Failure::new(Code::Usage, e))?;
    let ws = Workspace::open(root, &a.name)?;
    let _lock = ws.lock()?;
    let snaps = snapshot::list(&ws.snapshots_dir());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let policy = snapshot::prune::Policy {
        older_than,
        keep: a.keep,
    };
    let chosen = snapshot::prune::select(&snaps, now, &policy);
    let tags: Vec<String> = chosen.iter().map(|s| s.manifest.tag.clone()).collect();
    let verb = if a.dry_run { "would delete" } else { "deleted" };
    if !a.dry_run {
        snapshot::prune::delete(&chosen).map_err(crate::snapshot_failure)?;
    }
    let human = if tags.is_empty() {
        "nothing to prune".to_string()
    } else {
        tags.iter()
            .map(|t| format!("{verb} {t}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    out.emit(
        human,
        json!({"workspace": a.name, "dry_run": a.dry_run, "deleted": tags}),
    );
    Ok(())
}

fn export(
    root: &Path,
    name: &str,
    tag: &str,
    file: &Path,
    allow_secrets: bool,
    out: Out,
) -> Result<(), Failure> {
    let ws = Workspace::open(root, name)?;
    let snap = open_snapshot(&ws, tag)?;
    if !allow_secrets {
        refuse_secrets(&ws, &snap)?;
    }
    if file.exists() {
        return Err(Failure::new(
            Code::Conflict,
            format!("{} already exists", file.display()),
        ));
    }
    let start = std::time::Instant::now();
    let size = snapshot::archive::export(&snap, file).map_err(crate::snapshot_failure)?;
    out.emit(
        format!(
            "snapshot {tag} exported to {} ({}, {:.1} s)",
            file.display(),
            human_size(size),
            start.elapsed().as_secs_f64()
        ),
        json!({"workspace": name, "tag": tag, "file": file, "bytes": size}),
    );
    Ok(())
}

/// An archive leaves the host: refuse a snapshot whose capture (or, for a diff, whose parent's)
/// found delivered secrets in it.
fn refuse_secrets(ws: &Workspace, snap: &snapshot::Snapshot) -> Result<(), Failure> {
    let mut at = Some(snap.manifest.clone());
    let mut hops = 0;
    while let Some(m) = at.take() {
        if let Some(scan) = m.secret_scan.as_ref().filter(|s| s.has_residue()) {
            return Err(Failure::new(
                Code::SnapshotRefused,
                format!(
                    "snapshot {} holds secrets delivered to the workspace: {}; an archive leaves \
                     the host, so export refuses it (--allow-secrets exports it anyway)",
                    m.tag,
                    scan.summary()
                ),
            ));
        }
        hops += 1;
        if hops > snapshot::manifest::MAX_CHAIN {
            break;
        }
        at = m
            .parent
            .as_deref()
            .and_then(|p| snapshot::Snapshot::open(&ws.snapshots_dir().join(p)).ok())
            .map(|s| s.manifest);
    }
    Ok(())
}

fn import(root: &Path, a: ImportArgs, out: Out) -> Result<(), Failure> {
    if !a.file.is_file() {
        return Err(Failure::new(
            Code::NotFound,
            format!("{} does not exist", a.file.display()),
        ));
    }
    let manifest = snapshot::archive::read_manifest(&a.file).map_err(crate::snapshot_failure)?;
    let name = a
        .as_name
        .clone()
        .or(manifest.workspace.clone())
        .ok_or_else(|| {
            Failure::new(
                Code::Usage,
                "the archive names no workspace: pass --as NAME",
            )
        })?;
    crate::home::check_name(&name)?;
    let (ws, made_here) = match Workspace::open(root, &name) {
        Ok(ws) => (ws, false),
        Err(f) if f.code == Code::NotFound => (
            crate::commands::create_for_import(root, &name, &manifest, a.kernel.as_deref())?,
            true,
        ),
        Err(f) => return Err(f),
    };
    let lock = ws.lock()?;
    let imported = snapshot::archive::import(&a.file, &ws.snapshots_dir(), None)
        .map_err(crate::snapshot_failure)
        .and_then(|snap| {
            if made_here {
                adopt_network(&ws, &snap)?;
            }
            Ok(snap)
        });
    let snap = match imported {
        Ok(snap) => snap,
        Err(e) => {
            // All or nothing: a workspace made only to receive this snapshot goes with it.
            if made_here {
                drop(lock);
                crate::commands::remove_workspace_dir(root, &ws);
            }
            return Err(e);
        }
    };
    out.emit(
        format!(
            "snapshot {} imported into workspace {name}",
            snap.manifest.tag
        ),
        json!({"workspace": name, "snapshot": manifest_json(&snap.manifest, &snap.dir)}),
    );
    Ok(())
}

/// A workspace made for an imported snapshot gets a network when the captured VM had one: restore
/// rebuilds exactly the captured devices, and the manifest does not name the backend. It is user
/// mode (a fresh passt), whatever the other host used: its tap is not this host's.
fn adopt_network(ws: &Workspace, snap: &snapshot::Snapshot) -> Result<(), Failure> {
    let state: vmm::vm::VmState = snap.load_state().map_err(crate::snapshot_failure)?;
    let has_net = state.devices.virtio.iter().any(|slot| {
        matches!(
            slot.device,
            vmm::devices::manager::VirtioDeviceState::Net(_)
        )
    });
    if !has_net || ws.config.net != crate::net::NetMode::None {
        return Ok(());
    }
    let mut config = ws.config.clone();
    config.net = crate::net::NetMode::User;
    workspace::save_config(&ws.dir, &config)
}

fn disk_snapshot(
    ws: &Workspace,
    tag: Option<String>,
    note: Option<String>,
    strict_secrets: bool,
    out: Out,
) -> Result<(), Failure> {
    let name = ws.name();
    match ws.state() {
        State::Stopped | State::Crashed | State::Failed => {}
        s => {
            return Err(Failure::new(
                Code::Conflict,
                format!(
                    "workspace {name} is {}; a disk snapshot needs a halted workspace",
                    s.as_str()
                ),
            ))
        }
    }
    if ws.config.rootfs.is_none() {
        return Err(Failure::new(
            Code::Usage,
            format!("workspace {name} has no rootfs to snapshot"),
        ));
    }
    let tag = tag.unwrap_or_else(default_tag);
    let cfg = &ws.config;
    let to_scan = crate::agent::secrets_to_scan(ws);
    let scanner = if to_scan.is_empty() {
        None
    } else {
        Some(
            snapshot::residue::Scanner::new(&to_scan)
                .map_err(|e| Failure::new(Code::Error, e.to_string()))?,
        )
    };
    let m = snapshot::capture_disk(
        &snapshot::CaptureRequest {
            dir: &ws.snapshots_dir(),
            tag: &tag,
            kernel: &cfg.kernel,
            cmdline: &cfg.cmdline,
            rootfs: cfg.rootfs.as_deref(),
            image: cfg.image.as_deref(),
            workspace: Some(name),
            note: note.as_deref(),
            parent: None,
            secrets: scanner.as_ref().map(|scanner| snapshot::SecretCheck {
                scanner,
                strict: strict_secrets,
            }),
        },
        cfg.vcpus,
        cfg.mem_mib,
    )
    .map_err(crate::snapshot_failure)?;
    let dir = ws.snapshots_dir().join(&m.tag);
    warn_residue(&m, out);
    out.emit(
        format!("snapshot {} created (disk only) at {}", m.tag, m.created),
        json!({"workspace": name, "snapshot": manifest_json(&m, &dir)}),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_pause_takes_short_units_and_refuses_the_rest() {
        assert_eq!(parse_pause("20ms").unwrap(), Duration::from_millis(20));
        assert_eq!(parse_pause("500us").unwrap(), Duration::from_micros(500));
        assert_eq!(parse_pause("0ms").unwrap(), Duration::ZERO);
        assert_eq!(parse_pause("2s").unwrap(), Duration::from_secs(2));
        for bad in [
            "",
            "20",
            "ms",
            "20m",
            "-1ms",
            "1.5ms",
            "61s",
            "99999999999999999999s",
        ] {
            assert!(parse_pause(bad).is_err(), "{bad}");
        }
    }
}
