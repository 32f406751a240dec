//! `prepare-snapshot` and `after-restore`: what makes a snapshot of a live guest safe to take,
//! share and fork.
//!
//! Prepare: scrub the secrets directory, `sync()`, drop the page cache and compact memory (so the
//! freed pages of deleted files, zeroed by the kernel's init_on_free, are all that is left of
//! them, and cached copies of files that held secrets are gone), then FIFREEZE every writable filesystem that
//! supports it (reverse mount order, `/` last). Scrubbing comes first because writing zeros to a
//! frozen filesystem would block. While frozen, the agent itself writes nothing to disk.
//!
//! After restore: FITHAW (what was frozen, in reverse order; or every candidate when this agent
//! froze nothing, ignoring EINVAL from filesystems that were not frozen), add the host's entropy
//! and reseed the CRNG, take the new identity, and write the secrets back.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use super::connection::Reply;
use super::{entropy, freeze, identity, secrets, ServerConfig};
use crate::lock;
use crate::protocol::messages::{
    AfterRestoreRequest, ErrorKind, PrepareReport, PrepareRequest, RestoreReport, ServerMsg,
    SkippedMount,
};
use crate::protocol::MAX_ENTROPY_LEN;

/// What the agent remembers between `prepare-snapshot` and `after-restore` (it lives in guest
/// memory, so it survives the snapshot).
#[derive(Default)]
struct FreezeState {
    /// Mount points frozen by this agent, in freezing order.
    frozen: Vec<PathBuf>,
    /// Bumped by every prepare and after-restore; an auto-thaw timer fires only if unchanged.
    generation: u64,
}

/// The snapshot hooks and their state, shared by all connections.
pub struct SnapshotHooks {
    /// Serialises prepare and after-restore.
    op: Mutex<()>,
    state: Arc<Mutex<FreezeState>>,
    log_errors: bool,
}

impl SnapshotHooks {
    pub(crate) fn new(config: &ServerConfig) -> Self {
        Self {
            op: Mutex::new(()),
            state: Arc::new(Mutex::new(FreezeState::default())),
            log_errors: config.log_errors,
        }
    }

    /// Mount points currently frozen by this agent.
    pub fn frozen(&self) -> Vec<PathBuf> {
        lock(&self.state).frozen.clone()
    }

    pub(crate) fn prepare(&self, config: &ServerConfig, req: &PrepareRequest, reply: Reply) {
        let _op = lock(&self.op);
        let mut report = PrepareReport::default();
        if req.scrub_secrets {
            match secrets::scrub(&config.secrets_dir) {
                Ok(scrubbed) => report.scrubbed = scrubbed,
                Err(e) => return reply.fail(ErrorKind::Io, format!("scrubbing secrets: {e}")),
            }
        }
        // SAFETY: sync() has no arguments and cannot fail.
        unsafe { libc::sync() };
        if let Some(dir) = &config.vm_sysctl_dir {
            drop_caches_and_compact(dir, self.log_errors);
        }
        if req.freeze {
            let (chosen, skipped) =
                match freeze::plan_from(&config.mountinfo, config.freeze_only.as_deref()) {
                    Ok(plan) => plan,
                    Err(e) => {
                        return reply.fail(
                            ErrorKind::Io,
                            format!("reading {}: {e}", config.mountinfo.display()),
                        )
                    }
                };
            report.skipped = skipped
                .into_iter()
                .map(|s| skipped_mount(&s.entry, s.reason))
                .collect();
            let mut state = lock(&self.state);
            for entry in chosen {
                let point = entry.mount_point.clone();
                match freeze::freeze(&point) {
                    Ok(()) => {
                        state.frozen.push(point.clone());
                        report.frozen.push(point.display().to_string());
                    }
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY)
                            && state.frozen.contains(&point) =>
                    {
                        report.frozen.push(point.display().to_string());
                    }
                    Err(e) => {
                        let reason = match e.raw_os_error() {
                            Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) => {
                                "does not support freezing".to_owned()
                            }
                            Some(libc::EBUSY) => "already frozen by someone else".to_owned(),
                            _ => format!("freeze failed: {e}"),
                        };
                        report.skipped.push(skipped_mount(&entry, reason));
                    }
                }
            }
            state.generation += 1;
            if let (Some(ms), false) = (req.auto_thaw_ms, state.frozen.is_empty()) {
                self.arm_auto_thaw(state.generation, Duration::from_millis(ms));
            }
        }
        reply.finish(ServerMsg::Prepared(report));
    }

    fn arm_auto_thaw(&self, generation: u64, after: Duration) {
        let state = Arc::clone(&self.state);
        let log = self.log_errors;
        let _ = thread::Builder::new()
            .name("agent-auto-thaw".into())
            .spawn(move || {
                thread::sleep(after);
                let mut state = lock(&state);
                if state.generation != generation || state.frozen.is_empty() {
                    return;
                }
                if log {
                    eprintln!("microagent-agent: no after-restore came; thawing by myself");
                }
                for point in std::mem::take(&mut state.frozen).iter().rev() {
                    let _ = freeze::thaw(point);
                }
            });
    }

    pub(crate) fn after_restore(
        &self,
        config: &ServerConfig,
        req: AfterRestoreRequest,
        reply: Reply,
    ) {
        if let Err(message) = validate(&req) {
            return reply.fail(ErrorKind::InvalidRequest, message);
        }
        let _op = lock(&self.op);
        let mut report = RestoreReport::default();
        if req.thaw {
            self.thaw(config, &mut report);
        }
        if !req.entropy.is_empty() {
            match entropy::add_entropy(&config.random_device, req.entropy.as_bytes()) {
                Ok(n) => report.entropy_added = n,
                Err(e) => report.warnings.push(format!("adding entropy: {e}")),
            }
            match entropy::reseed_crng(&config.random_device) {
                Ok(()) => report.crng_reseeded = true,
                Err(e) => report.warnings.push(format!("reseeding the CRNG: {e}")),
            }
        }
        if let Some(new) = &req.identity {
            apply_identity(config, new, &mut report);
        }
        match secrets::write_all(&config.secrets_dir, &req.secrets) {
            Ok(names) => report.secrets_written = names,
            Err(e) => report.warnings.push(format!("writing secrets: {e}")),
        }
        drop(req); // zeroes the secrets and entropy before answering
        reply.finish(ServerMsg::Restored(report));
    }

    fn thaw(&self, config: &ServerConfig, report: &mut RestoreReport) {
        let mut state = lock(&self.state);
        state.generation += 1; // disarms a pending auto-thaw
        let mut targets = std::mem::take(&mut state.frozen);
        if targets.is_empty() {
            // This agent froze nothing (or was restarted): thaw whatever could be frozen.
            match freeze::plan_from(&config.mountinfo, config.freeze_only.as_deref()) {
                Ok((chosen, _)) => targets = chosen.into_iter().map(|e| e.mount_point).collect(),
                Err(e) => report
                    .warnings
                    .push(format!("reading {}: {e}", config.mountinfo.display())),
            }
        }
        for point in targets.iter().rev() {
            match freeze::thaw(point) {
                Ok(()) => report.thawed.push(point.display().to_string()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // was not frozen
                Err(e) => report
                    .warnings
                    .push(format!("thawing {}: {e}", point.display())),
            }
        }
    }
}

/// Drops clean page cache, dentries and inodes (`drop_caches` = 3) and compacts memory
/// (`compact_memory` = 1), after `sync()` made every cached page clean. Best effort: a kernel
/// without these files (no SYSCTL or COMPACTION) still gets its snapshot; the gap is logged.
fn drop_caches_and_compact(dir: &std::path::Path, log: bool) {
    for (file, value) in [("drop_caches", "3"), ("compact_memory", "1")] {
        let path = dir.join(file);
        // Never create the file: only a kernel's own knob is written.
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()));
        if let Err(e) = result {
            if log {
                eprintln!(
                    "microagent-agent: prepare-snapshot: cannot write {value} to {}: {e}",
                    path.display()
                );
            }
        }
    }
}

fn skipped_mount(entry: &freeze::MountEntry, reason: String) -> SkippedMount {
    SkippedMount {
        mount_point: entry.mount_point.display().to_string(),
        fstype: entry.fstype.clone(),
        reason,
    }
}

fn validate(req: &AfterRestoreRequest) -> Result<(), String> {
    if req.entropy.len() > MAX_ENTROPY_LEN {
        return Err(format!(
            "{} bytes of entropy exceed the limit of {MAX_ENTROPY_LEN}",
            req.entropy.len()
        ));
    }
    if let Some(new) = &req.identity {
        identity::validate_hostname(&new.hostname).map_err(|e| e.to_string())?;
        if let Some(id) = &new.machine_id {
            identity::validate_machine_id(id).map_err(|e| e.to_string())?;
        }
    }
    for secret in &req.secrets {
        secrets::validate_name(&secret.name).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn apply_identity(
    config: &ServerConfig,
    new: &crate::protocol::messages::Identity,
    report: &mut RestoreReport,
) {
    let mut warn =
        |what: &str, e: &dyn std::fmt::Display| report.warnings.push(format!("{what}: {e}"));
    let machine_id = match &new.machine_id {
        Some(id) => Some(id.clone()),
        None => identity::generate_machine_id()
            .map_err(|e| warn("generating a machine-id", &e))
            .ok(),
    };
    let mut hostname_ok = true;
    if config.set_kernel_hostname {
        if let Err(e) = identity::set_kernel_hostname(&new.hostname) {
            warn("setting the hostname", &e);
            hostname_ok = false;
        }
    }
    let line = format!("{}\n", new.hostname);
    if let Err(e) = identity::replace_file(&config.etc_dir, "hostname", &line, "writing hostname") {
        warn("writing /etc/hostname", &e);
        hostname_ok = false;
    }
    let mut id_ok = false;
    if let Some(id) = &machine_id {
        match identity::replace_file(
            &config.etc_dir,
            "machine-id",
            &format!("{id}\n"),
            "writing machine-id",
        ) {
            Ok(()) => id_ok = true,
            Err(e) => warn("writing /etc/machine-id", &e),
        }
    }
    if hostname_ok {
        report.hostname = Some(new.hostname.clone());
    }
    if id_ok {
        report.machine_id = machine_id;
    }
}
