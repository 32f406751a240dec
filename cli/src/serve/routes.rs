//! The routes. Each handler carries its OpenAPI description (`#[utoipa::path]`) and is
//! registered through `utoipa_axum::routes!`, which adds it to the router and the document
//! in one step: the document cannot list a route the router lacks, nor miss one it has.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::Event;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::child::{self, Op};
use super::error::{ApiError, ErrorBody};
use super::events;
use super::security::{self, session_cookie};
use super::{Shared, MAX_BODY};
use crate::workspace::{self, State as WsState, Workspace};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "microagent",
        description = "Workspaces (KVM microVMs) and their snapshots. Every request needs the \
            token from `<state root>/serve-token`, as `Authorization: Bearer TOKEN` or the \
            dashboard's session cookie. Errors are `{\"error\": {\"code\", \"message\"}}` with \
            the CLI's stable codes: usage 400, not-found 404, conflict 409, snapshot-refused \
            422, error 500, guest-failed 502, remote-access 502, host-unsupported 503, \
            remote-unreachable 504; and the server's own: \
            unauthorized 401, forbidden-origin 403, too-large 413, unsupported-media-type 415."
    ),
    components(schemas(ErrorBody)),
    modifiers(&Auth),
    security(("bearer" = []), ("cookie" = [])),
    tags(
        (name = "workspaces", description = "Workspaces and their VMs"),
        (name = "snapshots", description = "A workspace's snapshots"),
        (name = "events", description = "Server-sent events"),
        (name = "dashboard", description = "The web dashboard and its sign-in")
    )
)]
struct ApiDoc;

struct Auth;

impl Modify for Auth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(security::COOKIE))),
        );
    }
}

/// The whole application: routes, their document, and the security layers around them.
pub fn app(state: Shared) -> axum::Router {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_workspaces, create_workspace))
        .routes(routes!(workspace_status, delete_workspace))
        .routes(routes!(start_workspace))
        .routes(routes!(halt_workspace))
        .routes(routes!(hibernate_workspace))
        .routes(routes!(exec))
        .routes(routes!(console))
        .routes(routes!(list_snapshots, create_snapshot))
        .routes(routes!(prune_snapshots))
        .routes(routes!(inspect_snapshot, edit_snapshot, delete_snapshot))
        .routes(routes!(export_snapshot))
        .routes(routes!(download_snapshot))
        .routes(routes!(fork_snapshot))
        .routes(routes!(events_stream))
        .routes(routes!(openapi_json))
        .routes(routes!(dashboard))
        .routes(routes!(login_form, login_submit))
        .routes(routes!(asset))
        .split_for_parts();
    let rendered = doc
        .to_pretty_json()
        .unwrap_or_else(|e| json!({"error": e.to_string()}).to_string());
    let _ = state.openapi.set(rendered);
    // Layers run outermost last-added: headers on everything, then Origin, body size, token.
    router
        // Its own code, so a client can tell a mistyped path from a missing workspace.
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no-route", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            security::auth,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(security::body_limit))
        .layer(axum::middleware::from_fn(security::origin))
        .layer(axum::middleware::from_fn(security::headers))
        .with_state(state)
}

// ----- extractors ---------------------------------------------------------------------------

/// A JSON body, bounded, typed, with errors in the API's shape. An empty body reads as `{}`,
/// so actions whose fields are all optional need none.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        let _ = state;
        let bytes = security::read_bounded(req.into_body()).await?;
        let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
        if bytes != b"{}" && !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "the body must be application/json",
            ));
        }
        serde_json::from_slice(bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::usage(format!("bad JSON body: {e}")))
    }
}

/// A query string, typed, whose errors come in the API's shape (axum's own are plain text).
pub struct QueryArgs<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryArgs(q))
            .map_err(|e| ApiError::usage(e.body_text()))
    }
}

// ----- argument checks ----------------------------------------------------------------------

fn check_ws(name: &str) -> Result<(), ApiError> {
    crate::home::check_name(name).map_err(ApiError::from)
}

fn check_tag(tag: &str) -> Result<(), ApiError> {
    if snapshot::manifest::is_safe_name(tag) {
        Ok(())
    } else {
        Err(ApiError::usage(format!("invalid snapshot tag {tag:?}")))
    }
}

/// A free-text value for `--flag=VALUE`: bounded, no NUL (it cannot pass through argv).
fn text(what: &str, s: &str, max: usize) -> Result<String, ApiError> {
    if s.contains('\0') || s.len() > max {
        return Err(ApiError::usage(format!(
            "{what}: at most {max} bytes and no NUL"
        )));
    }
    Ok(s.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("task failed: {e}")))?
}

fn op(workspace: &str, action: &'static str) -> Op {
    Op {
        workspace: workspace.to_string(),
        action,
    }
}

// ----- workspaces ---------------------------------------------------------------------------

/// Every workspace with its state.
#[utoipa::path(get, path = "/api/workspaces", tag = "workspaces",
    responses(
        (status = 200, description = "`{\"workspaces\": [...]}` as `microagent --json list`", body = Value),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
    ))]
async fn list_workspaces(State(st): State<Shared>) -> Result<Json<Value>, ApiError> {
    let root = st.root.clone();
    blocking(move || {
        let all: Vec<Value> = Workspace::all(&root)
            .iter()
            .map(crate::commands::summary)
            .collect();
        Ok(Json(json!({"workspaces": all})))
    })
    .await
}

/// A new workspace (not started).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct CreateWorkspace {
    /// 1-63 letters, digits, '-' or '_'.
    #[schema(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")]
    name: String,
    /// A kernel path on the server, or `builtin:testguest`.
    kernel: Option<String>,
    mem_mib: Option<u64>,
    vcpus: Option<u32>,
    cmdline: Option<String>,
    /// An OCI image reference for the root filesystem.
    image: Option<String>,
}

#[utoipa::path(post, path = "/api/workspaces", tag = "workspaces", request_body = CreateWorkspace,
    responses(
        (status = 201, description = "Created: `{\"created\": config}`", body = Value),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "Kernel or image not found (`not-found`)", body = ErrorBody),
        (status = 409, description = "Exists already (`conflict`)", body = ErrorBody),
        (status = 504, description = "The image's registry cannot be reached (`remote-unreachable`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn create_workspace(
    State(st): State<Shared>,
    JsonBody(b): JsonBody<CreateWorkspace>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_ws(&b.name)?;
    let mut args = vec!["create".to_string(), b.name.clone()];
    if let Some(k) = &b.kernel {
        args.push(format!("--kernel={}", text("kernel", k, 4096)?));
    }
    if let Some(m) = b.mem_mib {
        args.push(format!("--mem={m}"));
    }
    if let Some(v) = b.vcpus {
        args.push(format!("--vcpus={v}"));
    }
    if let Some(c) = &b.cmdline {
        args.push(format!("--cmdline={}", text("cmdline", c, 4096)?));
    }
    if let Some(i) = &b.image {
        args.push(format!("--image={}", text("image", i, 1024)?));
    }
    let v = child::run(&st, args, op(&b.name, "create")).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/api/workspaces/{name}", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    responses(
        (status = 200, description = "As `microagent --json status NAME`", body = Value),
        (status = 400, description = "Invalid name (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
    ))]
async fn workspace_status(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let root = st.root.clone();
    blocking(move || {
        let ws = Workspace::open(&root, &name)?;
        Ok(Json(crate::commands::summary(&ws)))
    })
    .await
}

#[utoipa::path(delete, path = "/api/workspaces/{name}", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    responses(
        (status = 200, description = "Halted and deleted with all its snapshots", body = Value),
        (status = 400, description = "Invalid name (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
        (status = 409, description = "Busy: another command holds it (`conflict`)", body = ErrorBody),
    ))]
async fn delete_workspace(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let args = vec!["delete".into(), name.clone(), "--yes".into()];
    Ok(Json(child::run(&st, args, op(&name, "delete")).await?))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct StartBody {
    /// Roll back to this snapshot (the workspace must be halted unless `force`).
    from_snapshot: Option<String>,
    /// With `from_snapshot`: halt a running workspace first.
    #[serde(default)]
    force: bool,
}

#[utoipa::path(post, path = "/api/workspaces/{name}/start", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    request_body(content = Option<StartBody>, description = "Optional: an empty body starts (or resumes) as it is"),
    responses(
        (status = 200, description = "Running", body = Value),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 409, description = "Already running (`conflict`)", body = ErrorBody),
        (status = 422, description = "Snapshot refused", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn start_workspace(
    State(st): State<Shared>,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<StartBody>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let mut args = vec!["start".to_string(), name.clone()];
    if let Some(t) = &b.from_snapshot {
        check_tag(t)?;
        args.push(format!("--from-snapshot={t}"));
        if b.force {
            args.push("--force".into());
        }
    }
    Ok(Json(child::run(&st, args, op(&name, "start")).await?))
}

#[utoipa::path(post, path = "/api/workspaces/{name}/halt", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    responses(
        (status = 200, description = "Stopped", body = Value),
        (status = 400, description = "Invalid name (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
        (status = 409, description = "Busy (`conflict`)", body = ErrorBody),
    ))]
async fn halt_workspace(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let args = vec!["halt".into(), name.clone()];
    Ok(Json(child::run(&st, args, op(&name, "halt")).await?))
}

#[utoipa::path(post, path = "/api/workspaces/{name}/hibernate", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    responses(
        (status = 200, description = "Memory saved and VM stopped; `start` resumes it", body = Value),
        (status = 400, description = "Invalid name (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
        (status = 409, description = "Not running (`conflict`)", body = ErrorBody),
    ))]
async fn hibernate_workspace(
    State(st): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let args = vec!["hibernate".into(), name.clone()];
    Ok(Json(child::run(&st, args, op(&name, "hibernate")).await?))
}

/// A command to run in the guest (through its agent).
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    /// The command and its arguments (1 to 256).
    #[schema(min_items = 1, max_items = 256)]
    argv: Vec<String>,
    cwd: Option<String>,
    /// KEY=VALUE.
    #[serde(default)]
    #[schema(max_items = 256)]
    env: Vec<String>,
    /// Kill the command after this many seconds.
    timeout_s: Option<u64>,
}

#[utoipa::path(post, path = "/api/workspaces/{name}/exec", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    request_body = ExecBody,
    responses(
        (status = 200, description = "Server-sent events: `stdout` and `stderr` (`{\"text\"}`), \
            then `exit` (`{\"code\"}`)", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
        (status = 409, description = "Not running, or without a guest agent (`conflict`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn exec(
    State(st): State<Shared>,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<ExecBody>,
) -> Result<Response, ApiError> {
    check_ws(&name)?;
    if b.argv.is_empty() || b.argv.len() > 256 || b.env.len() > 256 {
        return Err(ApiError::usage(
            "argv needs 1 to 256 items, env at most 256",
        ));
    }
    let mut args = vec!["exec".to_string(), name.clone()];
    if let Some(c) = &b.cwd {
        args.push(format!("--cwd={}", text("cwd", c, 4096)?));
    }
    for e in &b.env {
        args.push(format!("--env={}", text("env", e, 8192)?));
    }
    if let Some(t) = b.timeout_s {
        args.push(format!("--timeout={t}"));
    }
    args.push("--".into());
    for a in &b.argv {
        args.push(text("argv", a, 8192)?);
    }
    // Refuse before the stream starts, so these come back as statuses, not events.
    let root = st.root.clone();
    let n = name.clone();
    blocking(move || {
        let ws = Workspace::open(&root, &n)?;
        if !ws.config.agent {
            // The CLI would retry the agent's socket for seconds, then fail inside the stream.
            return Err(ApiError::from_code(
                crate::exit::Code::Conflict,
                format!("workspace {n} has no guest agent (its kernel is not a Linux image with one); exec needs it"),
            ));
        }
        match ws.state() {
            WsState::Running => Ok(()),
            s => Err(ApiError::from_code(
                crate::exit::Code::Conflict,
                format!("workspace {n} is {}; exec needs it running", s.as_str()),
            )),
        }
    })
    .await?;
    let mut child = child::command(&st, &args)
        // Should the server go down mid-stream, the command goes with it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ApiError::internal(format!("cannot run the CLI: {e}")))?;
    let (tx, rx) = mpsc::channel::<Event>(64);
    let out = child.stdout.take();
    let err = child.stderr.take();
    tokio::spawn(async move {
        let a = out.map(|o| tokio::spawn(pump(o, "stdout", tx.clone())));
        let b = err.map(|e| tokio::spawn(pump(e, "stderr", tx.clone())));
        for h in [a, b].into_iter().flatten() {
            let _ = h.await;
        }
        if tx.is_closed() {
            // The client left: nobody reads the output, so the command ends too.
            let _ = child.kill().await;
            return;
        }
        let status = child.wait().await;
        let code = status.ok().and_then(|s| s.code());
        let _ = tx
            .send(
                Event::default()
                    .event("exit")
                    .data(json!({"code": code}).to_string()),
            )
            .await;
    });
    Ok(events::sse_from(rx).into_response())
}

/// Copies one pipe of an exec child into events, as text (invalid UTF-8 replaced).
async fn pump(
    mut r: impl tokio::io::AsyncRead + Unpin,
    name: &'static str,
    tx: mpsc::Sender<Event>,
) {
    let mut buf = vec![0u8; 8192];
    loop {
        // A client that left is noticed even while the command prints nothing.
        let read = tokio::select! {
            read = r.read(&mut buf) => read,
            _ = tx.closed() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                let ev = Event::default()
                    .event(name)
                    .data(json!({"text": text}).to_string());
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The console log's last bytes first, then what the guest writes, as it writes it.
#[utoipa::path(get, path = "/api/workspaces/{name}/console", tag = "workspaces",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    responses(
        (status = 200, description = "Server-sent events: `console` (`{\"text\"}`); `reset` when \
            a new run starts a new log", content_type = "text/event-stream", body = String),
        (status = 400, description = "Invalid name (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
    ))]
async fn console(State(st): State<Shared>, Path(name): Path<String>) -> Result<Response, ApiError> {
    /// What a new client gets of the log's past.
    const BACKLOG: u64 = 16 * 1024;
    const CHUNK: u64 = 64 * 1024;
    check_ws(&name)?;
    let root = st.root.clone();
    let n = name.clone();
    let path = blocking(move || Ok(Workspace::open(&root, &n)?.path(workspace::CONSOLE))).await?;
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        let mut offset = tokio::fs::symlink_metadata(&path)
            .await
            .map(|m| m.len().saturating_sub(BACKLOG))
            .unwrap_or(0);
        loop {
            let len = tokio::fs::symlink_metadata(&path)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            if len < offset {
                // A new run rotated the log: start over from its beginning.
                offset = 0;
                if tx
                    .send(Event::default().event("reset").data("{}"))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if len > offset {
                let want = (len - offset).min(CHUNK);
                if let Ok(bytes) = read_at(&path, offset, want).await {
                    offset += bytes.len() as u64;
                    let text = String::from_utf8_lossy(&bytes);
                    let ev = Event::default()
                        .event("console")
                        .data(json!({"text": text}).to_string());
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    Ok(events::sse_from(rx).into_response())
}

/// The log is the jailed VMM's file: opened as [`workspace::open_untrusted`] does.
async fn read_at(path: &std::path::Path, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncSeekExt;
    let p = path.to_path_buf();
    let f = tokio::task::spawn_blocking(move || workspace::open_untrusted(&p))
        .await
        .map_err(std::io::Error::other)??;
    let mut f = tokio::fs::File::from_std(f);
    f.seek(std::io::SeekFrom::Start(offset)).await?;
    let mut buf = Vec::new();
    f.take(len).read_to_end(&mut buf).await?;
    Ok(buf)
}

// ----- snapshots ----------------------------------------------------------------------------

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only snapshots whose tag or note contains this (case-insensitive).
    search: Option<String>,
}

/// Oldest first, as the CLI lists them; each also says which snapshots depend on it
/// (`children`: a Delete would need `cascade`) and whether it is the newest (`latest`).
#[utoipa::path(get, path = "/api/workspaces/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"), ListQuery),
    responses(
        (status = 200, description = "`{\"workspace\", \"snapshots\": [...]}`", body = Value),
        (status = 400, description = "Invalid name (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
    ))]
async fn list_snapshots(
    State(st): State<Shared>,
    Path(name): Path<String>,
    QueryArgs(q): QueryArgs<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let root = st.root.clone();
    blocking(move || {
        let ws = Workspace::open(&root, &name)?;
        let all = snapshot::list(&ws.snapshots_dir());
        let word = q.search.map(|w| w.to_lowercase());
        let last = all.len().checked_sub(1);
        let snaps: Vec<Value> = all
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                word.as_deref().is_none_or(|w| {
                    s.manifest.tag.to_lowercase().contains(w)
                        || s.manifest
                            .note
                            .as_deref()
                            .is_some_and(|n| n.to_lowercase().contains(w))
                })
            })
            .map(|(i, s)| {
                let mut v = crate::snapshot_cmd::manifest_json(&s.manifest, &s.dir);
                v["children"] = json!(crate::snapshot_cmd::dependents(&all, &s.manifest.tag));
                v["latest"] = json!(Some(i) == last);
                v["created_unix"] = json!(s.manifest.created_unix);
                v
            })
            .collect();
        Ok(Json(json!({"workspace": name, "snapshots": snaps})))
    })
    .await
}

#[derive(Deserialize, ToSchema, Default, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum Kind {
    /// Memory, vCPU and device state, and the disk (running or paused workspace).
    #[default]
    Full,
    /// Only the pages written since the previous capture.
    Diff,
    /// Only the disk, of a halted workspace.
    Disk,
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct CreateSnapshot {
    /// Default: the UTC time.
    tag: Option<String>,
    note: Option<String>,
    kind: Option<Kind>,
    /// Copy memory while the guest runs and stop it only for the last pages, its state and
    /// the disk copy (as `snapshot create --live`): a full snapshot of the state at that stop.
    /// Full snapshots only: with `kind` diff or disk it is refused (`usage`).
    #[serde(default)]
    live: bool,
    /// With `live`: stop the guest once what is left would take less than this to write, a
    /// whole number and `us`, `ms` or `s`, at most a minute (the CLI's `--max-pause`,
    /// default 20ms).
    #[schema(example = "20ms", max_length = 64)]
    max_pause: Option<String>,
}

#[utoipa::path(post, path = "/api/workspaces/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    request_body(content = Option<CreateSnapshot>, description = "Optional: an empty body takes a full snapshot tagged with the time"),
    responses(
        (status = 201, description = "As `snapshot create --json`: `{\"workspace\", \"snapshot\", \
            \"pause_ms\", \"live\"}`; `pause_ms` is how long the vCPUs were stopped, `live` (with \
            `live`) the copy `rounds`, `precopy_bytes` and `final_bytes` (copied while it ran and in \
            the pause), `converged`, and a `fallback` reason when it was stopped anyway", body = Value),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
        (status = 409, description = "Wrong state, tag taken, or busy (`conflict`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn create_snapshot(
    State(st): State<Shared>,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<CreateSnapshot>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_ws(&name)?;
    let mut args = vec!["snapshot".to_string(), "create".into(), name.clone()];
    if let Some(t) = &b.tag {
        check_tag(t)?;
        args.push(format!("--tag={t}"));
    }
    if let Some(n) = &b.note {
        args.push(format!("--note={}", text("note", n, 4096)?));
    }
    args.push(
        match b.kind.unwrap_or_default() {
            Kind::Full => "--type=full",
            Kind::Diff => "--type=diff",
            Kind::Disk => "--type=disk",
        }
        .into(),
    );
    // The CLI checks the rest (the duration, live with a diff or disk kind) and says why.
    if b.live {
        args.push("--live".into());
    }
    if let Some(p) = &b.max_pause {
        if !b.live {
            return Err(ApiError::usage("max_pause needs live: true"));
        }
        args.push(format!("--max-pause={}", text("max_pause", p, 64)?));
    }
    let v = child::run(&st, args, op(&name, "snapshot-create")).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct InspectQuery {
    /// Re-check every file's digest.
    #[serde(default)]
    verify: bool,
}

#[utoipa::path(get, path = "/api/workspaces/{name}/snapshots/{tag}", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"),
        ("tag" = String, Path, description = "Snapshot tag", pattern = r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,127}$"), InspectQuery),
    responses(
        (status = 200, description = "The manifest, as `snapshot inspect --json`", body = Value),
        (status = 400, description = "Invalid name or tag (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 422, description = "Verification failed (`snapshot-refused`)", body = ErrorBody),
    ))]
async fn inspect_snapshot(
    State(st): State<Shared>,
    Path((name, tag)): Path<(String, String)>,
    QueryArgs(q): QueryArgs<InspectQuery>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    check_tag(&tag)?;
    let mut args = vec!["snapshot".into(), "inspect".into(), name.clone(), tag];
    if q.verify {
        args.push("--verify".into());
    }
    Ok(Json(
        child::run(&st, args, op(&name, "snapshot-inspect")).await?,
    ))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct EditSnapshot {
    /// A new tag (diffs that name this one as parent follow the rename).
    tag: Option<String>,
    /// A new note; an empty string removes it.
    note: Option<String>,
}

#[utoipa::path(patch, path = "/api/workspaces/{name}/snapshots/{tag}", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"),
        ("tag" = String, Path, description = "Snapshot tag", pattern = r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,127}$")),
    request_body = EditSnapshot,
    responses(
        (status = 200, description = "`{\"workspace\", \"snapshot\"}` after the edit", body = Value),
        (status = 400, description = "Bad input or nothing to change (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 409, description = "New tag taken, or busy (`conflict`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn edit_snapshot(
    State(st): State<Shared>,
    Path((name, tag)): Path<(String, String)>,
    JsonBody(b): JsonBody<EditSnapshot>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    check_tag(&tag)?;
    let mut args = vec!["snapshot".into(), "edit".into(), name.clone(), tag];
    if let Some(t) = &b.tag {
        check_tag(t)?;
        args.push(format!("--tag={t}"));
    }
    if let Some(n) = &b.note {
        args.push(format!("--note={}", text("note", n, 4096)?));
    }
    Ok(Json(
        child::run(&st, args, op(&name, "snapshot-edit")).await?,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// Also delete the diff snapshots that depend on it.
    #[serde(default)]
    cascade: bool,
}

#[utoipa::path(delete, path = "/api/workspaces/{name}/snapshots/{tag}", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"),
        ("tag" = String, Path, description = "Snapshot tag", pattern = r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,127}$"), DeleteQuery),
    responses(
        (status = 200, description = "`{\"workspace\", \"deleted\": [tags]}`", body = Value),
        (status = 400, description = "Invalid name or tag (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 409, description = "Others depend on it (pass cascade), or busy (`conflict`)", body = ErrorBody),
    ))]
async fn delete_snapshot(
    State(st): State<Shared>,
    Path((name, tag)): Path<(String, String)>,
    QueryArgs(q): QueryArgs<DeleteQuery>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    check_tag(&tag)?;
    let mut args = vec!["snapshot".into(), "delete".into(), name.clone(), tag];
    if q.cascade {
        args.push("--cascade".into());
    }
    Ok(Json(
        child::run(&st, args, op(&name, "snapshot-delete")).await?,
    ))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct PruneBody {
    /// Delete snapshots older than this (e.g. 30m, 7d).
    older_than: Option<String>,
    /// Keep at least the newest N.
    keep: Option<usize>,
    #[serde(default)]
    dry_run: bool,
}

#[utoipa::path(post, path = "/api/workspaces/{name}/prune", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")),
    request_body = PruneBody,
    responses(
        (status = 200, description = "`{\"workspace\", \"dry_run\", \"deleted\": [tags]}`", body = Value),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace (`not-found`)", body = ErrorBody),
        (status = 409, description = "Busy (`conflict`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn prune_snapshots(
    State(st): State<Shared>,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<PruneBody>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    let mut args = vec!["snapshot".into(), "prune".into(), name.clone()];
    if let Some(o) = &b.older_than {
        args.push(format!("--older-than={}", text("older_than", o, 64)?));
    }
    if let Some(k) = b.keep {
        args.push(format!("--keep={k}"));
    }
    if b.dry_run {
        args.push("--dry-run".into());
    }
    Ok(Json(
        child::run(&st, args, op(&name, "snapshot-prune")).await?,
    ))
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct ExportBody {
    /// An absolute path on the server for the archive (tar + zstd); it must not exist.
    file: String,
    /// Export even a snapshot whose capture found delivered secrets in it.
    #[serde(default)]
    allow_secrets: bool,
}

#[utoipa::path(post, path = "/api/workspaces/{name}/snapshots/{tag}/export", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"),
        ("tag" = String, Path, description = "Snapshot tag", pattern = r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,127}$")),
    request_body = ExportBody,
    responses(
        (status = 200, description = "`{\"workspace\", \"tag\", \"file\", \"bytes\"}`", body = Value),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 409, description = "The file exists (`conflict`)", body = ErrorBody),
        (status = 422, description = "The capture found delivered secrets in it and \
            `allow_secrets` is not set (`snapshot-refused`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn export_snapshot(
    State(st): State<Shared>,
    Path((name, tag)): Path<(String, String)>,
    JsonBody(b): JsonBody<ExportBody>,
) -> Result<Json<Value>, ApiError> {
    check_ws(&name)?;
    check_tag(&tag)?;
    let file = text("file", &b.file, 4096)?;
    if !file.starts_with('/') {
        return Err(ApiError::usage("file must be an absolute path"));
    }
    let mut args = vec!["snapshot".into(), "export".into(), name.clone(), tag, file];
    if b.allow_secrets {
        args.push("--allow-secrets".into());
    }
    Ok(Json(
        child::run(&st, args, op(&name, "snapshot-export")).await?,
    ))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ArchiveQuery {
    /// Send even a snapshot whose capture found delivered secrets in it.
    #[serde(default)]
    allow_secrets: bool,
}

/// The snapshot as one archive (tar + zstd, manifest first), the same bytes `snapshot export`
/// writes, downloaded: `microagent snapshot import FILE` on any host restores it.
#[utoipa::path(get, path = "/api/workspaces/{name}/snapshots/{tag}/archive", tag = "snapshots",
    params(
        ("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"),
        ("tag" = String, Path, description = "Snapshot tag", pattern = r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,127}$"),
        ArchiveQuery),
    responses(
        (status = 200, description = "The archive, streamed (`Content-Length` and a file name \
            in `Content-Disposition`)", content_type = "application/zstd", body = Vec<u8>),
        (status = 400, description = "Invalid name or tag (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 409, description = "Busy (`conflict`)", body = ErrorBody),
        (status = 422, description = "The capture found delivered secrets in it and \
            `allow_secrets` is not set, or a file fails its digest (`snapshot-refused`)", body = ErrorBody),
    ))]
async fn download_snapshot(
    State(st): State<Shared>,
    Path((name, tag)): Path<(String, String)>,
    QueryArgs(q): QueryArgs<ArchiveQuery>,
) -> Result<Response, ApiError> {
    check_ws(&name)?;
    check_tag(&tag)?;
    // The CLI writes the archive (its lock, its secret refusal, its exit codes) into a staging
    // directory of the state root; the file is unlinked as soon as it is open, so nothing is
    // left behind however the download ends.
    let dir = st.root.join(EXPORT_STAGING);
    let id = st.hub.next_op_id();
    let file = dir.join(format!("{name}-{id}-{}.tar.zst", std::process::id()));
    let d = dir.clone();
    blocking(move || {
        std::fs::create_dir_all(&d)
            .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", d.display())))
    })
    .await?;
    let mut args = vec![
        "snapshot".to_string(),
        "export".into(),
        name.clone(),
        tag.clone(),
        file.to_string_lossy().into_owned(),
    ];
    if q.allow_secrets {
        args.push("--allow-secrets".into());
    }
    let result = child::run(&st, args, op(&name, "snapshot-download")).await;
    let opened = match result {
        Ok(_) => tokio::fs::File::open(&file)
            .await
            .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", file.display()))),
        Err(e) => Err(e),
    };
    let _ = tokio::fs::remove_file(&file).await;
    let f = opened?;
    let len = f
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("cannot stat the archive: {e}")))?
        .len();
    let stream = futures_util::stream::unfold(Some(f), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), Some(f)))
            }
            // The body ends there, cut (shorter than Content-Length): the client cannot take
            // it for a whole archive, and import would refuse it anyway.
            Err(e) => Some((Err(e), None)),
        }
    });
    let disposition = format!("attachment; filename=\"{name}-{tag}.tar.zst\"");
    let mut resp = axum::body::Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/zstd"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    // Name and tag are checked above: letters, digits and `-_.:+` only, safe in a quoted string.
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// Where downloads are staged, under the state root.
pub const EXPORT_STAGING: &str = "serve-exports";

/// Removes staged downloads a server that died mid-way left (a live server unlinks each one
/// as soon as it is open, so only files of a crashed one stay; an hour spares a slow export
/// of another server on the same root that is still being written).
pub fn sweep_staging(root: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(root.join(EXPORT_STAGING)) else {
        return;
    };
    for e in entries.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if old {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct ForkBody {
    /// The fork's name; with `count`, the prefix of NAME-1..NAME-N.
    #[schema(pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")]
    name: String,
    /// How many forks (1 to 1000), all or nothing.
    #[schema(minimum = 1, maximum = 1000)]
    count: Option<u32>,
    /// Each fork halts and is deleted after this long (e.g. 30m, 2h).
    ttl: Option<String>,
}

#[utoipa::path(post, path = "/api/workspaces/{name}/snapshots/{tag}/fork", tag = "snapshots",
    params(("name" = String, Path, description = "Workspace name", pattern = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"),
        ("tag" = String, Path, description = "Snapshot tag", pattern = r"^[A-Za-z0-9_:+-][A-Za-z0-9_.:+-]{0,127}$")),
    request_body = ForkBody,
    responses(
        (status = 201, description = "`{\"forked\": [{\"name\", \"pid\", \"from\"}]}`, all running", body = Value),
        (status = 400, description = "Bad input (`usage`)", body = ErrorBody),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 404, description = "No such workspace or snapshot (`not-found`)", body = ErrorBody),
        (status = 409, description = "A fork name is taken (`conflict`)", body = ErrorBody),
        (status = 422, description = "Snapshot refused", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn fork_snapshot(
    State(st): State<Shared>,
    Path((name, tag)): Path<(String, String)>,
    JsonBody(b): JsonBody<ForkBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    check_ws(&name)?;
    check_tag(&tag)?;
    check_ws(&b.name)?;
    let mut args = vec![
        "create".to_string(),
        b.name.clone(),
        format!("--from-snapshot={name}:{tag}"),
    ];
    if let Some(c) = b.count {
        args.push(format!("--count={c}"));
    }
    if let Some(t) = &b.ttl {
        args.push(format!("--ttl={}", text("ttl", t, 64)?));
    }
    let v = child::run(&st, args, op(&name, "fork")).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

// ----- events, document, dashboard ----------------------------------------------------------

#[utoipa::path(get, path = "/api/events", tag = "events",
    responses(
        (status = 200, description = "Server-sent events: `hello`; `workspace` (`{\"name\", \
            \"state\", \"previous\", \"removed\"}`) when a workspace appears, changes state or goes; \
            `snapshots` (`{\"workspace\", \"count\"}`) when its snapshots change; `operation` \
            (`{\"id\", \"workspace\", \"action\", \"status\": \"started\"|\"finished\", \"ok\", \
            \"error\"}`); `progress` (`{\"id\", \"workspace\", \"action\", \"what\", \"done\", \
            \"total\", \"unit\"}`); `resync` when the client fell behind",
            content_type = "text/event-stream", body = String),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
    ))]
async fn events_stream(State(st): State<Shared>) -> impl IntoResponse {
    events::client_stream(&st)
}

#[utoipa::path(get, path = "/api/openapi.json", tag = "events",
    responses(
        (status = 200, description = "This document (OpenAPI 3)", body = Value),
        (status = 401, description = "No or wrong token", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
    ))]
async fn openapi_json(State(st): State<Shared>) -> Response {
    let body = st.openapi.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

#[utoipa::path(get, path = "/", tag = "dashboard",
    responses(
        (status = 200, description = "The dashboard", content_type = "text/html", body = String),
        (status = 401, description = "Not signed in: the sign-in form", content_type = "text/html", body = String),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
    ))]
async fn dashboard() -> Html<&'static str> {
    Html(INDEX_HTML)
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LoginQuery {
    /// The token; when right, the answer sets the session cookie and goes to the dashboard.
    token: Option<String>,
}

#[utoipa::path(get, path = "/login", tag = "dashboard", security(()),
    params(LoginQuery),
    responses(
        (status = 200, description = "The sign-in form", content_type = "text/html", body = String),
        (status = 303, description = "Signed in: cookie set, on to `/`"),
        (status = 401, description = "Wrong token", content_type = "text/html", body = String),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
    ))]
async fn login_form(State(st): State<Shared>, QueryArgs(q): QueryArgs<LoginQuery>) -> Response {
    match q.token {
        None => Html(security::login_page(false)).into_response(),
        Some(t) => sign_in(&st, &t),
    }
}

#[derive(Deserialize, ToSchema)]
struct LoginForm {
    token: String,
}

#[utoipa::path(post, path = "/login", tag = "dashboard", security(()),
    request_body(content = LoginForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 303, description = "Signed in: cookie set, on to `/`"),
        (status = 400, description = "No token field", body = ErrorBody),
        (status = 401, description = "Wrong token", content_type = "text/html", body = String),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
        (status = 413, description = "Body over 64 KiB (`too-large`)", body = ErrorBody),
    ))]
async fn login_submit(State(st): State<Shared>, body: Bytes) -> Response {
    let form: Result<LoginForm, _> = serde_urlencoded_form(&body);
    match form {
        Ok(f) => sign_in(&st, &f.token),
        Err(e) => e.into_response(),
    }
}

/// Parses the form here rather than with axum's `Form`, whose rejections are plain text: this
/// answers in the API's JSON.
fn serde_urlencoded_form(body: &[u8]) -> Result<LoginForm, ApiError> {
    serde_urlencoded::from_bytes(body).map_err(|e| ApiError::usage(format!("bad form: {e}")))
}

fn sign_in(st: &Shared, given: &str) -> Response {
    if !super::token::matches(&st.token, given.trim()) {
        return (StatusCode::UNAUTHORIZED, Html(security::login_page(true))).into_response();
    }
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&session_cookie(&st.token)) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

#[utoipa::path(get, path = "/assets/{file}", tag = "dashboard", security(()),
    params(("file" = String, Path, description = "app.js or app.css")),
    responses(
        (status = 200, description = "A dashboard asset, built into the binary", body = String),
        (status = 404, description = "No such asset", body = ErrorBody),
        (status = 403, description = "A request from another Origin (`forbidden-origin`)", body = ErrorBody),
    ))]
async fn asset(Path(file): Path<String>) -> Response {
    let (ct, body) = match file.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", APP_JS),
        "app.css" => ("text/css; charset=utf-8", APP_CSS),
        _ => {
            return ApiError::new(StatusCode::NOT_FOUND, "not-found", "no such asset")
                .into_response()
        }
    };
    ([(header::CONTENT_TYPE, ct)], body).into_response()
}
