//! `microagent`: boot, snapshot and fork KVM microVMs.

mod builtin;
mod exit;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "microagent",
    version,
    about = "KVM microVMs that boot once, snapshot, roll back and fork",
    after_help = exit::HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in the foreground until the guest resets or powers off.
    #[command(after_help = exit::HELP)]
    Run(run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
    };
    match result {
        Ok(()) => exit::Code::Ok.into(),
        Err(f) => {
            eprintln!("microagent: {}", f.message);
            f.code.into()
        }
    }
}
