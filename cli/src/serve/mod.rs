//! `microagent serve`: a JSON REST API and a web dashboard over the same workspaces and
//! snapshots the CLI manages.
//!
//! Mutations run this very binary as a child (`microagent --json ...`), so the API and a
//! terminal share the state root, the workspace locks and the exit codes exactly; cheap reads
//! (list, status, snapshot list) call the library. State changes reach clients as server-sent
//! events from a server-side watcher of the state root; no page polls.

mod child;
mod error;
mod events;
mod routes;
mod security;
mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use clap::Args;
use serde_json::json;

use crate::exit::{Code, Failure};
use crate::output::Out;

/// The default TCP address: loopback only, so nothing off this host can reach it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";
/// Request bodies above this are refused (413) before a handler sees them.
pub const MAX_BODY: usize = 64 * 1024;
/// At most this many CLI children run for the API at once; more requests wait their turn.
const MAX_CHILDREN: usize = 8;

#[derive(Args)]
pub struct ServeArgs {
    /// Listen on this TCP address (default 127.0.0.1:7878; port 0 picks a free one).
    #[arg(long, value_name = "ADDR:PORT", conflicts_with = "socket")]
    listen: Option<SocketAddr>,
    /// Listen on this Unix domain socket instead of TCP.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Allow --listen on an address other than loopback (the token is then all that guards
    /// every workspace, over plain HTTP).
    #[arg(long)]
    allow_non_loopback: bool,
}

/// What every handler shares.
pub struct AppState {
    pub root: PathBuf,
    pub token: String,
    /// This binary: the CLI the API runs for mutations.
    pub exe: PathBuf,
    pub hub: events::Hub,
    pub children: Arc<tokio::sync::Semaphore>,
    /// The OpenAPI document, rendered once the router is built (it describes that router).
    pub openapi: OnceLock<String>,
}

pub type Shared = Arc<AppState>;

pub fn run(root: &Path, args: ServeArgs, out: Out) -> Result<(), Failure> {
    if let Some(addr) = args.listen {
        if !addr.ip().is_loopback() && !args.allow_non_loopback {
            return Err(Failure::new(
                Code::Usage,
                format!("{addr} is not a loopback address: pass --allow-non-loopback to serve it"),
            ));
        }
    }
    std::fs::create_dir_all(root).map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot create {}: {e}", root.display()),
        )
    })?;
    let token = token::load_or_create(root)?;
    routes::sweep_staging(root);
    let exe = std::env::current_exe()
        .map_err(|e| Failure::new(Code::Error, format!("cannot find my own binary: {e}")))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::new(Code::Error, format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let state = Arc::new(AppState {
            root: root.to_path_buf(),
            token,
            exe,
            hub: events::Hub::new(),
            children: Arc::new(tokio::sync::Semaphore::new(MAX_CHILDREN)),
            openapi: OnceLock::new(),
        });
        let app = routes::app(state.clone());
        events::spawn_watcher(state.clone());
        let token_file = token::path(root);
        match &args.socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let listener = tokio::net::UnixListener::bind(path).map_err(|e| {
                    Failure::new(
                        Code::Error,
                        format!("cannot listen on {}: {e}", path.display()),
                    )
                })?;
                // The token guards it as well, but only this user needs to connect at all.
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
                out.emit(
                    format!(
                        "microagent serve: listening on {} (token in {})",
                        path.display(),
                        token_file.display()
                    ),
                    json!({"socket": path, "token_file": token_file}),
                );
                flush_stdout();
                axum::serve(listener, app)
                    .await
                    .map_err(|e| Failure::new(Code::Error, format!("server failed: {e}")))
            }
            None => {
                let addr = args
                    .listen
                    .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("constant address"));
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    Failure::new(Code::Error, format!("cannot listen on {addr}: {e}"))
                })?;
                let local = listener
                    .local_addr()
                    .map_err(|e| Failure::new(Code::Error, format!("cannot listen: {e}")))?;
                let url = format!("http://{local}/");
                out.emit(
                    format!(
                        "microagent serve: open {url}login?token={} (token in {})",
                        state.token,
                        token_file.display()
                    ),
                    json!({"url": url, "listen": local.to_string(), "token_file": token_file}),
                );
                flush_stdout();
                axum::serve(listener, app)
                    .await
                    .map_err(|e| Failure::new(Code::Error, format!("server failed: {e}")))
            }
        }
    })
}

/// The first line tells a supervising program where to connect: it must not sit in a buffer.
fn flush_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
}
