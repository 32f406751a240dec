//! `microagent serve` over real HTTP: the token, the Origin check, the body bound, the OpenAPI
//! document against the routes really served, and a whole flow with the test guest (create,
//! start, snapshot, list, edit, fork 2) whose state changes arrive on the event stream.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

/// A running `microagent serve` on a free loopback port; killed on drop (before its `Home`).
struct Server {
    child: Child,
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Server {
    fn start(h: &Home) -> Server {
        let mut child = Command::new(bin())
            .env("MICROAGENT_HOME", &h.dir)
            .args(["--json", "serve", "--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        let base = v["url"].as_str().unwrap().trim_end_matches('/').to_string();
        let token = std::fs::read_to_string(h.dir.join("serve-token")).unwrap();
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Server {
            child,
            base,
            token: token.trim().to_string(),
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends and returns (status, JSON body or Null).
    async fn call(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        self.call(self.req(reqwest::Method::GET, path)).await
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        self.call(self.req(method, path).json(&body)).await
    }

    /// Sends and insists on `want`, returning the body.
    async fn expect(&self, method: reqwest::Method, path: &str, body: Value, want: u16) -> Value {
        let (s, v) = self.send(method.clone(), path, body).await;
        assert_eq!(s, want, "{method} {path}: {v}");
        v
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Collects `(event, data)` pairs from an SSE response until dropped.
fn collect_sse(resp: reqwest::Response) -> Arc<Mutex<Vec<(String, Value)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(Ok(chunk)) = stream.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let mut name = String::from("message");
                let mut data = String::new();
                for l in block.lines() {
                    if let Some(n) = l.strip_prefix("event: ") {
                        name = n.to_string();
                    } else if let Some(d) = l.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if !data.is_empty() {
                    let v = serde_json::from_str(&data).unwrap_or(Value::String(data));
                    out.lock().unwrap().push((name, v));
                }
            }
        }
    });
    seen
}

/// Waits until `pred` holds over the events seen so far.
async fn wait_event(
    seen: &Arc<Mutex<Vec<(String, Value)>>>,
    what: &str,
    pred: impl Fn(&str, &Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if seen.lock().unwrap().iter().any(|(n, v)| pred(n, v)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no event {what}; saw {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn token_origin_limits_and_errors() {
    let h = Home::new("api-security");
    let s = Server::start(&h);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(h.dir.join("serve-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "token file mode {mode:o}");
    rt().block_on(async {
        // No token, a wrong token: 401 and nothing else.
        let (st, v) = s.call(s.http.get(s.url("/api/workspaces"))).await;
        assert_eq!((st, code(&v)), (401, "unauthorized"), "{v}");
        let (st, v) = s
            .call(
                s.http
                    .get(s.url("/api/workspaces"))
                    .bearer_auth("0".repeat(64)),
            )
            .await;
        assert_eq!((st, code(&v)), (401, "unauthorized"), "{v}");
        assert!(v["workspaces"].is_null());
        // The right one.
        let (st, v) = s.get("/api/workspaces").await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["workspaces"], json!([]));

        // Every answer carries the CSP.
        let r = s
            .req(reqwest::Method::GET, "/api/workspaces")
            .send()
            .await
            .unwrap();
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"));

        // Another origin: 403, even with the token; this origin passes.
        let (st, v) = s
            .call(
                s.req(reqwest::Method::POST, "/api/workspaces")
                    .header("Origin", "http://evil.example")
                    .json(&json!({"name": "x"})),
            )
            .await;
        assert_eq!((st, code(&v)), (403, "forbidden-origin"), "{v}");
        let (st, v) = s
            .call(
                s.req(reqwest::Method::GET, "/api/workspaces")
                    .header("Origin", s.base.clone()),
            )
            .await;
        assert_eq!(st, 200, "{v}");

        // Bodies are bounded: declared or chunked.
        let big = json!({"name": "x", "cmdline": "a".repeat(100 * 1024)});
        let (st, v) = s
            .send(reqwest::Method::POST, "/api/workspaces", big.clone())
            .await;
        assert_eq!((st, code(&v)), (413, "too-large"), "{v}");
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(big.to_string().into_bytes())];
        let (st, v) = s
            .call(
                s.req(reqwest::Method::POST, "/api/workspaces")
                    .header("content-type", "application/json")
                    .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                        chunks,
                    ))),
            )
            .await;
        assert_eq!((st, code(&v)), (413, "too-large"), "{v}");

        // Bad input: bad JSON, unknown field, bad name, wrong media type.
        let (st, v) = s
            .call(
                s.req(reqwest::Method::POST, "/api/workspaces")
                    .header("content-type", "application/json")
                    .body("{not json"),
            )
            .await;
        assert_eq!((st, code(&v)), (400, "usage"), "{v}");
        let v = s
            .expect(
                reqwest::Method::POST,
                "/api/workspaces",
                json!({"name": "a", "bogus": 1}),
                400,
            )
            .await;
        assert_eq!(code(&v), "usage");
        let v = s
            .expect(
                reqwest::Method::POST,
                "/api/workspaces",
                json!({"name": "../x"}),
                400,
            )
            .await;
        assert_eq!(code(&v), "usage");
        let (st, v) = s
            .call(
                s.req(reqwest::Method::POST, "/api/workspaces")
                    .header("content-type", "text/plain")
                    .body(r#"{"name":"a"}"#),
            )
            .await;
        assert_eq!((st, code(&v)), (415, "unsupported-media-type"), "{v}");

        // A missing workspace, read by the library and acted on by the CLI: 404 not-found.
        for (m, p) in [
            (reqwest::Method::GET, "/api/workspaces/nope"),
            (reqwest::Method::POST, "/api/workspaces/nope/start"),
            (reqwest::Method::POST, "/api/workspaces/nope/halt"),
            (reqwest::Method::DELETE, "/api/workspaces/nope"),
            (reqwest::Method::GET, "/api/workspaces/nope/snapshots"),
            (reqwest::Method::DELETE, "/api/workspaces/nope/snapshots/t"),
        ] {
            let v = s.expect(m.clone(), p, json!({}), 404).await;
            assert_eq!(code(&v), "not-found", "{m} {p}: {v}");
            assert!(
                v["error"]["message"].as_str().unwrap().contains("nope"),
                "{v}"
            );
        }

        // The dashboard: a sign-in form without the cookie; the token once sets an HttpOnly,
        // SameSite=Strict cookie that then opens it.
        let r = s.http.get(s.url("/")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert!(r.text().await.unwrap().contains("<form"));
        let r = s
            .http
            .get(s.url(&format!("/login?token={}", "f".repeat(64))))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 401);
        assert!(r.headers().get("set-cookie").is_none());
        let r = s
            .http
            .get(s.url(&format!("/login?token={}", s.token)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 303);
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().unwrap().to_string();
        let r = s
            .http
            .get(s.url("/"))
            .header("cookie", pair.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let (st, _) = s
            .call(s.http.get(s.url("/api/workspaces")).header("cookie", pair))
            .await;
        assert_eq!(st, 200);
    });
}

#[test]
fn openapi_document_matches_the_routes_served() {
    let h = Home::new("api-openapi");
    let s = Server::start(&h);
    rt().block_on(async {
        let (st, doc) = s.get("/api/openapi.json").await;
        assert_eq!(st, 200);
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
        let paths = doc["paths"].as_object().unwrap();
        // The routes this server has: the document is built from the same registrations, so
        // each must be served: no route-less 404 and no 405 for a documented method.
        let mut ops = 0;
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let m: reqwest::Method = method.to_uppercase().parse().unwrap();
                assert!(
                    op["responses"].as_object().is_some_and(|r| !r.is_empty()),
                    "{method} {path} documents no responses"
                );
                let concrete = path
                    .replace("{name}", "no-such-ws")
                    .replace("{tag}", "t")
                    .replace("{file}", "app.css");
                let r = s
                    .req(m.clone(), &concrete)
                    .header("content-type", "application/json")
                    .body("{}")
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let is_stream = r
                    .headers()
                    .get("content-type")
                    .is_some_and(|c| c.to_str().unwrap_or("").starts_with("text/event-stream"));
                let body: Value = if is_stream {
                    Value::Null
                } else {
                    serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null)
                };
                assert_ne!(status, 405, "{method} {path} is documented but not served");
                assert_ne!(
                    code(&body),
                    "no-route",
                    "{method} {path} is documented but not served"
                );
                // A status the document does not list for this operation is a gap in it.
                assert!(
                    op["responses"].get(status.to_string()).is_some(),
                    "{method} {path} answered {status}, which its document does not list: {body}"
                );
                ops += 1;
            }
        }
        assert!(ops >= 20, "only {ops} operations documented");
        for must in [
            "/api/workspaces",
            "/api/workspaces/{name}/snapshots/{tag}/fork",
            "/api/events",
            "/api/openapi.json",
            "/",
        ] {
            assert!(paths.contains_key(must), "{must} missing from the document");
        }
        // A route that does not exist is not mistaken for one.
        let (st, v) = s.get("/api/nothing-here").await;
        assert_eq!((st, code(&v)), (404, "no-route"), "{v}");
    });
}

#[test]
fn full_flow_over_http_with_events() {
    if !kvm_or_skip("full_flow_over_http_with_events") {
        return;
    }
    let h = Home::new("api-flow");
    let s = Server::start(&h);
    use reqwest::Method as M;
    rt().block_on(async {
        let events = s.req(M::GET, "/api/events").send().await.expect("events");
        assert_eq!(events.status().as_u16(), 200);
        let seen = collect_sse(events);
        wait_event(&seen, "hello", |n, _| n == "hello").await;

        let v = s
            .expect(
                M::POST,
                "/api/workspaces",
                json!({"name": "w", "kernel": "builtin:testguest", "vcpus": 1, "mem_mib": 64,
                       "cmdline": "mode=counter mem=2 tick_ms=5"}),
                201,
            )
            .await;
        assert_eq!(v["created"]["name"], "w");
        // The same name again: the CLI's conflict, as a 409.
        let v = s
            .expect(
                M::POST,
                "/api/workspaces",
                json!({"name": "w", "kernel": "builtin:testguest"}),
                409,
            )
            .await;
        assert_eq!(code(&v), "conflict");
        // A snapshot of a stopped workspace: conflict too.
        let v = s
            .expect(M::POST, "/api/workspaces/w/snapshots", json!({}), 409)
            .await;
        assert_eq!(code(&v), "conflict", "{v}");

        let v = s
            .expect(M::POST, "/api/workspaces/w/start", json!({}), 200)
            .await;
        assert_eq!(v["state"], "running");
        let (_, st) = s.get("/api/workspaces/w").await;
        assert_eq!(st["state"], "running");
        wait_event(&seen, "w running", |n, v| {
            n == "workspace" && v["name"] == "w" && v["state"] == "running"
        })
        .await;
        h.wait_counts("w", &[20]);

        // exec checks its input before it streams (the test guest has no agent to run a
        // command, so the stream itself is not exercised here).
        let v = s
            .expect(M::POST, "/api/workspaces/w/exec", json!({"argv": []}), 400)
            .await;
        assert_eq!(code(&v), "usage");

        // The console tail streams the guest's output.
        let con = s
            .req(M::GET, "/api/workspaces/w/console")
            .send()
            .await
            .unwrap();
        let console = collect_sse(con);
        wait_event(&console, "console text", |n, v| {
            n == "console" && v["text"].as_str().is_some_and(|t| t.contains("count="))
        })
        .await;

        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/snapshots",
                json!({"tag": "base", "note": "first <b>one</b>"}),
                201,
            )
            .await;
        assert_eq!(v["snapshot"]["tag"], "base");
        assert_eq!(v["snapshot"]["kind"], "full");
        wait_event(&seen, "w snapshots", |n, v| {
            n == "snapshots" && v["workspace"] == "w"
        })
        .await;
        wait_event(&seen, "snapshot operation finished", |n, v| {
            n == "operation"
                && v["action"] == "snapshot-create"
                && v["status"] == "finished"
                && v["ok"] == true
        })
        .await;
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/snapshots",
                json!({"tag": "second", "kind": "diff"}),
                201,
            )
            .await;
        assert_eq!(v["snapshot"]["parent"], "base", "{v}");

        let (_, list) = s.get("/api/workspaces/w/snapshots").await;
        let snaps = list["snapshots"].as_array().unwrap();
        assert_eq!(snaps.len(), 2, "{list}");
        assert_eq!(snaps[0]["tag"], "base");
        assert_eq!(snaps[0]["note"], "first <b>one</b>");
        assert_eq!(snaps[0]["latest"], false);
        assert_eq!(snaps[0]["children"], json!(["second"]));
        assert_eq!(snaps[1]["latest"], true);
        let (_, found) = s.get("/api/workspaces/w/snapshots?search=FIRST").await;
        assert_eq!(found["snapshots"].as_array().unwrap().len(), 1, "{found}");

        // Edit the note; inspect shows it at once. A parent with dependents refuses to go.
        s.expect(
            M::PATCH,
            "/api/workspaces/w/snapshots/base",
            json!({"note": "edited"}),
            200,
        )
        .await;
        let (_, ins) = s.get("/api/workspaces/w/snapshots/base").await;
        assert_eq!(ins["note"], "edited", "{ins}");
        let v = s
            .expect(
                M::DELETE,
                "/api/workspaces/w/snapshots/base",
                json!({}),
                409,
            )
            .await;
        assert_eq!(code(&v), "conflict");
        let v = s
            .expect(M::GET, "/api/workspaces/w/snapshots/nope", json!({}), 404)
            .await;
        assert_eq!(code(&v), "not-found");

        // Fork two with a TTL: both run, and the stream tells of them.
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/snapshots/base/fork",
                json!({"name": "f", "count": 2, "ttl": "30m"}),
                201,
            )
            .await;
        let forked: Vec<&str> = v["forked"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(forked, ["f-1", "f-2"]);
        for f in ["f-1", "f-2"] {
            wait_event(&seen, f, |n, v| {
                n == "workspace" && v["name"] == f && v["state"] == "running"
            })
            .await;
            let (_, st) = s.get(&format!("/api/workspaces/{f}")).await;
            assert_eq!(st["state"], "running");
            assert_eq!(st["forked_from"], "w:base");
            assert!(st["expires_in_s"].as_u64().unwrap() > 1700, "{st}");
        }
        wait_event(&seen, "fork progress", |n, v| {
            n == "progress" && v["action"] == "fork" && v["done"] == 2 && v["total"] == 2
        })
        .await;

        // Halt and delete through the API: the stream says so.
        s.expect(M::POST, "/api/workspaces/w/halt", json!({}), 200)
            .await;
        wait_event(&seen, "w stopped", |n, v| {
            n == "workspace" && v["name"] == "w" && v["state"] == "stopped"
        })
        .await;
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/exec",
                json!({"argv": ["true"]}),
                409,
            )
            .await;
        assert_eq!(code(&v), "conflict", "{v}");
        for f in ["f-1", "f-2", "w"] {
            s.expect(M::DELETE, &format!("/api/workspaces/{f}"), json!({}), 200)
                .await;
        }
        wait_event(&seen, "w removed", |n, v| {
            n == "workspace" && v["name"] == "w" && v["removed"] == true
        })
        .await;
        let (_, all) = s.get("/api/workspaces").await;
        assert_eq!(all["workspaces"], json!([]));
    });
}

#[test]
fn cli_snapshot_and_api_delete_race_to_one_consistent_end() {
    if !kvm_or_skip("cli_snapshot_and_api_delete_race_to_one_consistent_end") {
        return;
    }
    let h = Home::new("api-race");
    h.ok(&[
        "create",
        "r",
        "--kernel",
        "builtin:testguest",
        "--mem",
        "64",
        "--cmdline",
        "mode=counter mem=2 tick_ms=5",
    ]);
    h.ok(&["start", "r"]);
    h.wait_counts("r", &[10]);
    let s = Server::start(&h);
    // The terminal and the API at once, on one workspace: the lock lets one in at a time.
    let home = h.dir.clone();
    let cli = std::thread::spawn(move || {
        microagent_in(
            Some(&home),
            &["--json", "snapshot", "create", "r", "--tag", "c"],
            Duration::from_secs(120),
        )
    });
    let (st, v) = rt().block_on(s.send(reqwest::Method::DELETE, "/api/workspaces/r", json!({})));
    let snap = cli.join().unwrap();
    let exists = h.ws("r").exists();
    eprintln!(
        "race: API {st}, CLI snapshot {}, workspace {}",
        snap.status,
        if exists { "kept" } else { "gone" }
    );
    match (st, snap.status.success()) {
        // The API won first, or came after the capture finished: the workspace is gone whole.
        (200, _) => assert!(!exists, "deleted, yet the workspace is still there"),
        // The capture held the lock: the API was told so, and the snapshot is whole.
        (409, true) => {
            assert_eq!(code(&v), "conflict", "{v}");
            assert!(exists);
            h.ok(&["snapshot", "inspect", "r", "c", "--verify"]);
        }
        other => panic!("no clear winner: API {other:?} {v}; CLI {}", stderr(&snap)),
    }
    if !exists {
        // The capture lost: it failed with a clear code, and left nothing behind.
        if !snap.status.success() {
            let e: Value = serde_json::from_str(stderr(&snap).trim()).unwrap_or(Value::Null);
            assert!(
                ["not-found", "conflict", "error"].contains(&code(&e)),
                "{}",
                stderr(&snap)
            );
        }
        let left: Vec<_> = std::fs::read_dir(h.dir.join("workspaces"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
