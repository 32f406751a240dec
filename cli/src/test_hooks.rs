//! `microagent __test-hook NAME ...`: test-only requests to a workspace's VMM. Compiled only with
//! the `test-hooks` feature, never in the shipped binary.

use std::path::Path;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::api::{self, Request, Response};
use crate::exit::{Code, Failure};
use crate::output::Out;
use crate::workspace::{self, Workspace};

#[derive(Args)]
pub struct TestHookArgs {
    name: String,
    #[command(subcommand)]
    hook: Hook,
}

#[derive(Subcommand)]
enum Hook {
    /// Make the VMM issue a system call outside its seccomp filters.
    ForbiddenSyscall,
    /// Make the VMM try to open PATH and report the outcome.
    Open { path: String },
}

pub fn run(root: &Path, args: TestHookArgs, out: Out) -> Result<(), Failure> {
    let ws = Workspace::open(root, &args.name)?;
    let req = match &args.hook {
        Hook::ForbiddenSyscall => Request::TestForbiddenSyscall,
        Hook::Open { path } => Request::TestOpen { path: path.clone() },
    };
    match api::request(&ws.path(workspace::API_SOCK), &req, Duration::from_secs(10)) {
        Ok(Response::TestResult { ok, detail }) => {
            out.emit(detail.clone(), json!({"ok": ok, "detail": detail}));
            Ok(())
        }
        Ok(other) => Err(Failure::new(
            Code::Error,
            format!("unexpected answer from the VMM: {other:?}"),
        )),
        Err(e) => Err(crate::process::vmm_gone(&ws, &e.to_string())),
    }
}
