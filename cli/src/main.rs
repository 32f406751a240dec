//! `microagent`: boot, snapshot and fork KVM microVMs.

mod agent;
mod api;
mod boundedlog;
mod builtin;
mod commands;
mod duration;
mod exit;
mod home;
mod image;
mod kernel_cmd;
mod logging;
mod net;
mod output;
mod pageserver;
mod process;
mod remote;
mod run;
mod sandbox;
mod serve;
mod snapshot_cmd;
#[cfg(feature = "test-hooks")]
mod test_hooks;
mod testhooks;
mod vmm_jail;
mod vmm_process;
mod workspace;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use exit::{Code, Failure};
use output::{code_from_name, Out};

#[derive(Parser)]
#[command(
    name = "microagent",
    version,
    about = "KVM microVMs that boot once, snapshot, roll back and fork",
    long_about = "KVM microVMs that boot once, snapshot, roll back and fork.\n\n\
        State lives in $MICROAGENT_HOME, else $XDG_STATE_HOME/microagent, else ~/.local/state/microagent.",
    after_help = exit::HELP
)]
struct Cli {
    /// Machine-readable output: one JSON document on stdout, errors as JSON on stderr.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a workspace, or fork one from a snapshot (--from-snapshot NAME:TAG [--count N]).
    #[command(after_help = exit::HELP)]
    Create(commands::CreateArgs),
    /// Start a workspace's VM, or roll it back to a snapshot (--from-snapshot TAG).
    #[command(after_help = exit::HELP)]
    Start(commands::StartArgs),
    /// Stop a workspace's VM.
    #[command(after_help = exit::HELP)]
    Halt { name: String },
    /// Pause a running workspace's vCPUs in place (`resume` or `start` continues it).
    #[command(after_help = exit::HELP)]
    Pause { name: String },
    /// Let a paused workspace run on from where it stopped.
    #[command(after_help = exit::HELP)]
    Resume { name: String },
    /// Save a running workspace's memory and stop its VMM; the next `start` resumes it.
    #[command(after_help = exit::HELP)]
    Hibernate { name: String },
    /// Delete a workspace, its disk and all its snapshots.
    #[command(after_help = exit::HELP)]
    Delete {
        name: String,
        /// Confirm: the workspace and its snapshots are gone for good.
        #[arg(long)]
        yes: bool,
    },
    /// List workspaces and their state.
    #[command(after_help = exit::HELP)]
    List,
    /// Show one workspace.
    #[command(after_help = exit::HELP)]
    Status { name: String },
    /// Run a command in a running workspace (through its guest agent); exits with its code.
    #[command(after_help = exit::HELP)]
    Exec(agent::ExecArgs),
    /// Secrets delivered into the guest's /run/secrets on start, restore and fork.
    #[command(subcommand, after_help = exit::HELP)]
    Secret(SecretCommand),
    /// Print a workspace's serial console log.
    #[command(after_help = exit::HELP)]
    Console { name: String },
    /// Snapshots: create, list, delete, inspect, export/import, push/pull to a remote.
    #[command(subcommand, after_help = exit::HELP)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Remotes (S3-compatible object storage) for `snapshot push` and `snapshot pull`.
    #[command(subcommand, after_help = exit::HELP)]
    Remote(remote::RemoteCommand),
    /// OCI images: list, pull (and build the root filesystem), rm.
    #[command(subcommand, after_help = exit::HELP)]
    Image(image::ImageCommand),
    /// Guest kernels: list the cached ones, build the default one for this host.
    #[command(subcommand, after_help = exit::HELP)]
    Kernel(kernel_cmd::KernelCommand),
    /// Serve the JSON API (OpenAPI at /api/openapi.json) and the web dashboard.
    #[command(after_help = exit::HELP)]
    Serve(serve::ServeArgs),
    /// Boot a kernel in the foreground until the guest resets or powers off.
    #[command(after_help = exit::HELP)]
    Run(run::RunArgs),
    /// The VMM process of a running workspace (started by `start`; not for direct use).
    #[command(name = "__vmm", hide = true)]
    Vmm(vmm_process::VmmArgs),
    /// A workspace's network supervisor: runs its passt (started by `start`; not for direct use).
    #[command(name = "__netd", hide = true)]
    Netd(net::NetdArgs),
    /// A snapshot's page server for lazy restores (started on demand; not for direct use).
    #[command(name = "__pageserver", hide = true)]
    PageServer(pageserver::PageServerArgs),
    /// Test-only requests to a VMM (built with the `test-hooks` feature only).
    #[cfg(feature = "test-hooks")]
    #[command(name = "__test-hook", hide = true)]
    TestHook(test_hooks::TestHookArgs),
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Store a secret on the host (mode 0600, outside every snapshot).
    Set(agent::SecretSetArgs),
}

/// Maps a snapshot error to the exit code a script can act on.
pub fn snapshot_failure(e: snapshot::SnapshotError) -> Failure {
    Failure::new(code_from_name(e.code()), e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(match cli.command {
        Command::Vmm(_) | Command::PageServer(_) | Command::Netd(_) => logging::Role::Daemon,
        _ => logging::Role::Cli,
    });
    let out = Out { json: cli.json };
    if let Command::Exec(a) = cli.command {
        return match home::state_root().and_then(|root| agent::exec(&root, a)) {
            Ok(code) => ExitCode::from(code),
            Err(f) => {
                out.error(&f);
                f.code.into()
            }
        };
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Vmm(args) => vmm_process::run(args),
        Command::PageServer(args) => pageserver::run(args),
        Command::Netd(args) => net::supervise(args),
        other => home::state_root().and_then(|root| match other {
            Command::Create(a) => commands::create(&root, a, out),
            Command::Start(a) => commands::start(&root, a, out),
            Command::Halt { name } => commands::halt(&root, &name, out),
            Command::Pause { name } => commands::pause(&root, &name, true, out),
            Command::Resume { name } => commands::pause(&root, &name, false, out),
            Command::Hibernate { name } => commands::hibernate(&root, &name, out),
            Command::Delete { name, yes } => commands::delete(&root, &name, yes, out),
            Command::List => commands::list(&root, out),
            Command::Status { name } => commands::status(&root, &name, out),
            Command::Console { name } => commands::console(&root, &name),
            Command::Secret(SecretCommand::Set(a)) => agent::secret_set(&root, a, out),
            Command::Snapshot(c) => snapshot_cmd::run(&root, c, out),
            Command::Image(c) => image::run(&root, c, out),
            Command::Remote(c) => remote::run(&root, c, out),
            #[cfg(feature = "test-hooks")]
            Command::TestHook(a) => test_hooks::run(&root, a, out),
            Command::Kernel(c) => kernel_cmd::run(c, out),
            Command::Serve(a) => serve::run(&root, a, out),
            Command::Run(_)
            | Command::Vmm(_)
            | Command::Exec(_)
            | Command::PageServer(_)
            | Command::Netd(_) => Err(Failure::new(Code::Error, "unreachable")),
        }),
    };
    match result {
        Ok(()) => Code::Ok.into(),
        Err(f) => {
            out.error(&f);
            f.code.into()
        }
    }
}
