//! Running the CLI itself for the API: `microagent --json ARGS` with the server's state root
//! and JSON progress on stderr. The child's exit code becomes the HTTP status and its JSON
//! error the body, so the API answers exactly what the terminal would.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::error::ApiError;
use super::Shared;
use crate::exit::Code;

/// No CLI answer comes near this: a longer stdout is cut (and then fails to parse).
const MAX_STDOUT: u64 = 16 << 20;
/// After the child exits, how long its pipes may stay open (held by something it started).
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// What an operation is, for the progress and operation events clients see.
#[derive(Clone)]
pub struct Op {
    pub workspace: String,
    pub action: &'static str,
}

/// Builds the child command: this binary, `--json`, the server's state root.
pub fn command(state: &Shared, args: &[String]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(&state.exe);
    cmd.arg("--json")
        .args(args)
        .env("MICROAGENT_HOME", &state.root)
        .env(crate::output::PROGRESS_ENV, "json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `microagent --json ARGS` to completion and returns its JSON answer. The child runs
/// in its own task: a client that goes away does not kill a half-done operation.
pub async fn run(state: &Shared, args: Vec<String>, op: Op) -> Result<Value, ApiError> {
    let permit = state
        .children
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::internal("the server is shutting down"))?;
    let st = state.clone();
    let task = tokio::spawn(async move {
        let _permit = permit;
        let id = st.hub.next_op_id();
        st.hub.publish(
            "operation",
            json!({"id": id, "workspace": op.workspace, "action": op.action, "status": "started"}),
        );
        let result = run_inner(&st, &args, id, &op).await;
        st.hub.publish(
            "operation",
            json!({
                "id": id,
                "workspace": op.workspace,
                "action": op.action,
                "status": "finished",
                "ok": result.is_ok(),
                "error": result.as_ref().err().map(|e| json!({"code": e.code, "message": e.message})),
            }),
        );
        // Something changed on disk: let watchers look now rather than at their next tick.
        st.hub.nudge();
        result
    });
    task.await
        .map_err(|e| ApiError::internal(format!("operation failed: {e}")))?
}

async fn run_inner(state: &Shared, args: &[String], id: u64, op: &Op) -> Result<Value, ApiError> {
    let mut child = command(state, args)
        .spawn()
        .map_err(|e| ApiError::internal(format!("cannot run {}: {e}", state.exe.display())))?;
    let stdout = child.stdout.take().map(|s| tokio::spawn(read_all(s)));
    let stderr = child.stderr.take().map(|s| {
        let hub = state.hub.clone();
        let op = op.clone();
        tokio::spawn(async move { read_stderr(s, &hub, id, &op).await })
    });
    let status = child
        .wait()
        .await
        .map_err(|e| ApiError::internal(format!("waiting for the CLI: {e}")))?;
    let out = match stdout {
        Some(h) => tokio::time::timeout(PIPE_GRACE, h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let (error, tail) = match stderr {
        Some(h) => tokio::time::timeout(PIPE_GRACE, h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default(),
        None => Default::default(),
    };
    let code = status.code().and_then(Code::from_exit);
    if code == Some(Code::Ok) {
        let text = String::from_utf8_lossy(&out);
        let last = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("{}");
        return serde_json::from_str(last).map_err(|e| {
            ApiError::internal(format!("the CLI answered something that is not JSON: {e}"))
        });
    }
    Err(failure(code, error, &tail, status))
}

/// The API error for a failed child: its own JSON error if it printed one, else its code.
fn failure(
    code: Option<Code>,
    error: Option<(String, String)>,
    tail: &str,
    status: std::process::ExitStatus,
) -> ApiError {
    let code = code.unwrap_or(Code::Error);
    match error {
        Some((name, message)) => {
            // The child's own code name wins when it is one we know; the exit code agrees.
            let c = crate::output::code_from_name(&name);
            ApiError::from_code(if c == Code::Error { code } else { c }, message)
        }
        None => ApiError::from_code(
            code,
            if tail.is_empty() {
                format!("the CLI failed ({status})")
            } else {
                tail.to_string()
            },
        ),
    }
}

pub async fn read_all(r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = r.take(MAX_STDOUT).read_to_end(&mut buf).await;
    buf
}

/// Follows the child's stderr: progress lines become events, a JSON error is the answer, and
/// the last plain line is kept for a child that died without one.
async fn read_stderr(
    r: impl AsyncRead + Unpin,
    hub: &super::events::Hub,
    id: u64,
    op: &Op,
) -> (Option<(String, String)>, String) {
    let mut lines = BufReader::new(r.take(MAX_STDOUT)).lines();
    let mut error = None;
    let mut tail = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        match parse_stderr_line(&line) {
            StderrLine::Progress(p) => hub.publish(
                "progress",
                json!({
                    "id": id,
                    "workspace": op.workspace,
                    "action": op.action,
                    "what": p["what"],
                    "done": p["done"],
                    "total": p["total"],
                    "unit": p["unit"],
                }),
            ),
            StderrLine::Error(code, message) => error = Some((code, message)),
            StderrLine::Other => {
                if !line.trim().is_empty() {
                    tail = line.chars().take(500).collect();
                }
            }
        }
    }
    (error, tail)
}

#[derive(Debug, PartialEq)]
pub enum StderrLine {
    Progress(Value),
    Error(String, String),
    Other,
}

/// Sorts one stderr line of a `--json` child with `MICROAGENT_PROGRESS=json`.
pub fn parse_stderr_line(line: &str) -> StderrLine {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return StderrLine::Other;
    };
    if let Some(p) = v.get("progress").filter(|p| p.is_object()) {
        return StderrLine::Progress(p.clone());
    }
    match v.get("error") {
        Some(e) => StderrLine::Error(
            e["code"].as_str().unwrap_or("error").to_string(),
            e["message"].as_str().unwrap_or("").to_string(),
        ),
        None => StderrLine::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_lines_are_sorted() {
        assert_eq!(
            parse_stderr_line(r#"{"progress":{"what":"x","done":1,"total":2,"unit":"bytes"}}"#),
            StderrLine::Progress(json!({"what":"x","done":1,"total":2,"unit":"bytes"}))
        );
        assert_eq!(
            parse_stderr_line(r#"{"error":{"code":"not-found","message":"gone"}}"#),
            StderrLine::Error("not-found".into(), "gone".into())
        );
        assert_eq!(parse_stderr_line("plain words"), StderrLine::Other);
        assert_eq!(parse_stderr_line("[1,2]"), StderrLine::Other);
    }
}
