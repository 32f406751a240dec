//! Talking to a workspace's guest agent over its vsock socket: `exec`, secrets, and the snapshot
//! hooks (freeze and scrub before a capture; thaw, reseed, new identity and secrets after).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use guest_agent::client::ExecEvent;
use guest_agent::protocol::messages::{
    AfterRestoreRequest, ExecRequest, Identity, PrepareRequest, Secret, SecretBytes,
};
use guest_agent::{Client, RetryPolicy, AGENT_VSOCK_PORT};
use serde_json::json;

use crate::exit::{Code, Failure};
use crate::output::Out;
use crate::workspace::{self, State, Workspace};

/// Where a workspace's secrets live on the host: beside, never inside, its snapshots.
pub const SECRETS: &str = "secrets";
/// The longest secret accepted (they travel in one frame with the others).
const MAX_SECRET: u64 = 256 << 10;

fn connect(ws: &Workspace, policy: &RetryPolicy) -> Result<Client, Failure> {
    // Secrets and commands go through this socket: only to this workspace's own VMM, whatever
    // the path (which its VMM can replace) leads to.
    Client::connect_hybrid_vsock_checked(
        &ws.path(workspace::VSOCK_SOCK),
        AGENT_VSOCK_PORT,
        policy,
        &|stream| crate::api::check_vmm_peer(stream, &ws.dir),
    )
    .map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot reach the guest agent of {}: {e}", ws.name()),
        )
    })
}

#[derive(Args)]
pub struct ExecArgs {
    name: String,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Working directory in the guest.
    #[arg(long)]
    cwd: Option<String>,
    /// Environment variables, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

/// Runs a command in the guest, streaming its output; returns the command's exit code.
pub fn exec(root: &Path, a: ExecArgs) -> Result<u8, Failure> {
    let ws = Workspace::open(root, &a.name)?;
    if ws.state() != State::Running {
        return Err(Failure::new(
            Code::Conflict,
            format!("workspace {} is not running", a.name),
        ));
    }
    let env = a
        .env
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    Failure::new(Code::Usage, format!("--env wants KEY=VALUE, got {kv:?}"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let client = connect(&ws, &RetryPolicy::default())?;
    let req = ExecRequest {
        argv: a.argv.clone(),
        env,
        clear_env: false,
        cwd: a.cwd.clone(),
        stdin: None,
        timeout_ms: a.timeout.map(|s| s * 1000),
    };
    let call = client
        .exec_start(req)
        .map_err(|e| Failure::new(Code::Error, format!("exec failed: {e}")))?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    loop {
        match call.next_event() {
            Ok(ExecEvent::Stdout(b)) => {
                let _ = out.write_all(&b);
                let _ = out.flush();
            }
            Ok(ExecEvent::Stderr(b)) => {
                let _ = err.write_all(&b);
            }
            Ok(ExecEvent::Exited(status)) => return Ok(status.shell_code().clamp(0, 255) as u8),
            Err(e) => return Err(Failure::new(Code::Error, format!("exec failed: {e}"))),
        }
    }
}

#[derive(Args)]
pub struct SecretSetArgs {
    name: String,
    key: String,
    #[arg(
        long,
        conflicts_with = "from_env",
        required_unless_present = "from_env"
    )]
    from_file: Option<PathBuf>,
    #[arg(long, value_name = "VAR")]
    from_env: Option<String>,
}

pub fn secret_set(root: &Path, a: SecretSetArgs, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, &a.name)?;
    if !snapshot::manifest::is_safe_name(&a.key) {
        return Err(Failure::new(
            Code::Usage,
            format!("invalid secret name {:?}", a.key),
        ));
    }
    let bytes = match (&a.from_file, &a.from_env) {
        (Some(f), _) => {
            let len = std::fs::metadata(f)
                .map_err(|e| Failure::new(Code::NotFound, format!("{}: {e}", f.display())))?
                .len();
            if len > MAX_SECRET {
                return Err(Failure::new(
                    Code::Usage,
                    format!("secret of {len} bytes; at most {MAX_SECRET}"),
                ));
            }
            std::fs::read(f)
                .map_err(|e| Failure::new(Code::Error, format!("{}: {e}", f.display())))?
        }
        (None, Some(v)) => std::env::var(v)
            .map_err(|_| {
                Failure::new(
                    Code::NotFound,
                    format!("environment variable {v} is not set"),
                )
            })?
            .into_bytes(),
        (None, None) => return Err(Failure::new(Code::Usage, "give --from-file or --from-env")),
    };
    let dir = ws.path(SECRETS);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(Code::Error, format!("{}: {e}", dir.display())))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    let path = dir.join(&a.key);
    snapshot::atomic_file::Options::default()
        .mode(0o600)
        .write(&path, &bytes)
        .map_err(|e| Failure::new(Code::Error, format!("{}: {e}", path.display())))?;
    // A running guest gets it at once; others on their next start, restore or fork.
    let delivered =
        ws.config.agent && ws.state() == State::Running && deliver(&ws, false, false).is_ok();
    out.emit(
        format!(
            "secret {} set for {}{}",
            a.key,
            a.name,
            if delivered { " (delivered)" } else { "" }
        ),
        json!({"workspace": a.name, "secret": a.key, "delivered": delivered}),
    );
    Ok(())
}

fn load_secrets(ws: &Workspace) -> Vec<Secret> {
    let Ok(entries) = std::fs::read_dir(ws.path(SECRETS)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let data = std::fs::read(e.path()).ok()?;
            Some(Secret {
                name: e.file_name().to_string_lossy().into_owned(),
                data: SecretBytes::from(data),
            })
        })
        .collect()
}

/// The workspace's secrets as the capture's residue scan needs them: names, and at most the
/// first `residue::WINDOW` bytes of each value (all the scan looks at), so no more of a secret
/// than that travels to the VMM.
pub fn secrets_to_scan(ws: &Workspace) -> Vec<snapshot::residue::SecretValue> {
    let mut list: Vec<_> = load_secrets(ws)
        .into_iter()
        .map(|s| {
            let bytes = s.data.as_bytes();
            snapshot::residue::SecretValue {
                name: s.name.clone(),
                value: bytes[..bytes.len().min(snapshot::residue::WINDOW)].to_vec(),
            }
        })
        .collect();
    list.sort_by(|a, b| a.name.cmp(&b.name));
    list
}

/// Runs short commands in the guest, one after another over one agent connection; each
/// failure is ours, with its stderr. A connection that cannot be made fails them all.
pub fn run_in_guest(ws: &Workspace, commands: &[&[&str]]) -> Vec<Result<(), Failure>> {
    let client = match connect(ws, &RetryPolicy::default()) {
        Ok(c) => c,
        Err(f) => return commands.iter().map(|_| Err(f.clone())).collect(),
    };
    commands.iter().map(|argv| run_one(&client, argv)).collect()
}

fn run_one(client: &Client, argv: &[&str]) -> Result<(), Failure> {
    let out = client
        .exec_output(ExecRequest {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            stdin: None,
            timeout_ms: Some(30_000),
        })
        .map_err(|e| Failure::new(Code::Error, format!("{}: {e}", argv.join(" "))))?;
    if out.status.code != Some(0) {
        return Err(Failure::new(
            Code::Error,
            format!(
                "`{}` failed in the guest: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Before a capture: sync, freeze, scrub the secrets. `Ok(false)` when the workspace has no agent.
pub fn prepare(ws: &Workspace) -> Result<bool, Failure> {
    if !ws.config.agent {
        return Ok(false);
    }
    let client = connect(ws, &RetryPolicy::default())?;
    client
        .prepare_snapshot(PrepareRequest::default())
        .map_err(|e| {
            Failure::new(
                Code::Error,
                format!("the guest agent could not prepare the snapshot: {e}"),
            )
        })?;
    Ok(true)
}

/// After a capture, restore or fork: thaw, reseed entropy, (fork) a new identity, secrets back.
pub fn deliver(ws: &Workspace, reseed: bool, new_identity: bool) -> Result<(), Failure> {
    deliver_with(ws, reseed, new_identity, &RetryPolicy::default())
}

/// After a fresh boot the agent appears only once the guest is up: wait for it longer.
pub fn deliver_after_boot(ws: &Workspace) -> Result<(), Failure> {
    let boot = RetryPolicy {
        attempts: 400,
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(500),
    };
    deliver_with(ws, false, false, &boot)
}

fn deliver_with(
    ws: &Workspace,
    reseed: bool,
    new_identity: bool,
    policy: &RetryPolicy,
) -> Result<(), Failure> {
    if !ws.config.agent {
        return Ok(());
    }
    let client = connect(ws, policy)?;
    let mut entropy = vec![0u8; if reseed { 64 } else { 0 }];
    if reseed {
        // SAFETY: getrandom writes at most the buffer's length.
        let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
        if n != entropy.len() as isize {
            return Err(Failure::new(Code::Error, "cannot read host entropy"));
        }
    }
    let report = client
        .after_restore(AfterRestoreRequest {
            thaw: true,
            entropy: SecretBytes::from(entropy),
            identity: new_identity.then(|| Identity {
                hostname: ws.name().to_string(),
                machine_id: None,
            }),
            secrets: load_secrets(ws),
        })
        .map_err(|e| {
            Failure::new(
                Code::Error,
                format!("the guest agent could not finish the restore: {e}"),
            )
        })?;
    let _ = report;
    Ok(())
}
