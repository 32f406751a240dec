//! `microagent serve` over real HTTP: the token, the Origin check, the body bound, the OpenAPI
//! document against the routes really served, and a whole flow with the test guest (create,
//! start, snapshot, list, edit, fork 2) whose state changes arrive on the event stream.

mod common;
use common::*;

#[path = "common/serve.rs"]
mod serve;
use serve::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

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

/// A client that is still sending an oversized body when the server decides gets the 413, not
/// a reset: the server reads (up to 1 MiB) what it refuses before it answers and closes. Here
/// the client stops for 300 ms past the bound, then sends the rest: a server that answered and
/// closed at once would have the kernel reset the connection on those late bytes, the upload
/// would fail, and a client such as Python's requests never reads the answer then. Once with
/// the length declared, once chunked.
#[test]
fn an_oversized_body_sent_slowly_still_gets_its_413() {
    use std::io::{Read, Write};
    let h = Home::new("api-slow-413");
    let s = Server::start(&h);
    let addr = s.base.trim_start_matches("http://").trim_end_matches('/');
    let body = format!("{{\"name\": \"{}\"}}", "a".repeat(70 * 1024));
    for chunked in [false, true] {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let framing = if chunked {
            "Transfer-Encoding: chunked".to_string()
        } else {
            format!("Content-Length: {}", body.len())
        };
        let head = format!(
            "POST /api/workspaces HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nConnection: close\r\n{framing}\r\n\r\n",
            s.token
        );
        c.write_all(head.as_bytes()).unwrap();
        let (first, rest) = body.as_bytes().split_at(66 * 1024);
        let frame = |part: &[u8]| {
            if chunked {
                let mut v = format!("{:x}\r\n", part.len()).into_bytes();
                v.extend_from_slice(part);
                v.extend_from_slice(b"\r\n");
                v
            } else {
                part.to_vec()
            }
        };
        c.write_all(&frame(first)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        // The rest in small pieces: were the connection closed, the first piece would draw a
        // reset and a later write would fail, as a client's upload does (and then it never
        // reads the answer).
        for piece in rest.chunks(1024) {
            std::thread::sleep(Duration::from_millis(20));
            c.write_all(&frame(piece))
                .unwrap_or_else(|e| panic!("chunked {chunked}: the server cut the upload: {e}"));
        }
        if chunked {
            c.write_all(b"0\r\n\r\n").unwrap();
        }
        let mut answer = Vec::new();
        let read = c.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413") && answer.contains("too-large"),
            "chunked {chunked}: {read:?}, answer {answer:?}"
        );
    }
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
                bad_input_for_every_operation(&s, &m, path, &concrete, op).await;
                ops += 1;
            }
        }
        assert!(ops >= 20, "only {ops} operations documented");
        for must in [
            "/api/workspaces",
            "/api/workspaces/{name}/snapshots/{tag}/fork",
            "/api/workspaces/{name}/snapshots/{tag}/archive",
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

/// The bad input every operation must meet with its documented status and code: no token (401,
/// except the sign-in page and assets, which need none), a foreign Origin (403, even with the
/// token), and for those that take a body, bad JSON (400) and an oversized one (413).
async fn bad_input_for_every_operation(
    s: &Server,
    m: &reqwest::Method,
    path: &str,
    concrete: &str,
    op: &Value,
) {
    let public = op["security"] == json!([{}]);
    let has_body = op.get("requestBody").is_some();
    let documented = |status: u16| op["responses"].get(status.to_string()).is_some();
    let mut cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = Vec::new();
    if !public {
        let rb = s.http.request(m.clone(), s.url(concrete));
        cases.push(("no token", rb, 401, "unauthorized"));
        let rb = s
            .http
            .request(m.clone(), s.url(concrete))
            .bearer_auth("0".repeat(64));
        cases.push(("wrong token", rb, 401, "unauthorized"));
    }
    let rb = s
        .req(m.clone(), concrete)
        .header("Origin", "http://evil.example");
    cases.push(("foreign Origin", rb, 403, "forbidden-origin"));
    if has_body {
        let rb = s
            .req(m.clone(), concrete)
            .header("content-type", "application/json")
            .body("{not json");
        cases.push(("bad JSON", rb, 400, "usage"));
        // The server answers 413 without reading the body and drops the connection: a client
        // of its own, so the shared one's pool keeps no connection the server closed.
        let once = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let rb = once
            .request(m.clone(), s.url(concrete))
            .bearer_auth(&s.token)
            .header("content-type", "application/json")
            .body(format!("{{\"name\": \"{}\"}}", "a".repeat(70 * 1024)));
        cases.push(("oversized body", rb, 413, "too-large"));
    }
    for (what, rb, want, want_code) in cases {
        let r = rb.timeout(Duration::from_secs(30)).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        assert_eq!(status, want, "{m} {path} with {what}: {text}");
        assert!(
            documented(status),
            "{m} {path} answers {status} to {what}, which its document does not list"
        );
        // The dashboard's own 401 is the sign-in form, for a person; the rest answer in JSON.
        if path != "/" || status != 401 {
            let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
            assert_eq!(code(&v), want_code, "{m} {path} with {what}: {text}");
        }
    }
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

        // exec checks its input, and that there is an agent to run it, before it streams (the
        // test guest has none; the stream itself is exercised against a Linux guest's agent in
        // tests/linux_agent.rs).
        let v = s
            .expect(M::POST, "/api/workspaces/w/exec", json!({"argv": []}), 400)
            .await;
        assert_eq!(code(&v), "usage");
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/exec",
                json!({"argv": ["true"], "nope": 1}),
                400,
            )
            .await;
        assert_eq!(code(&v), "usage");
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/exec",
                json!({"argv": ["true"]}),
                409,
            )
            .await;
        assert_eq!(code(&v), "conflict", "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("agent"),
            "{v}"
        );

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

/// A test-guest workspace with the counter running and its layout line, for exact checks.
fn boot_counter(h: &Home, name: &str, extra: &str) {
    let cmdline = format!("mode=counter mem=2 tick_ms=5 layout=1 {extra}");
    h.ok(&[
        "create",
        name,
        "--kernel",
        "builtin:testguest",
        "--mem",
        "64",
        "--cmdline",
        cmdline.trim(),
    ]);
    h.ok(&["start", name]);
    h.wait_counts(name, &[10]);
}

#[test]
fn archive_download_imports_elsewhere_and_refuses_secrets() {
    if !kvm_or_skip("archive_download_imports_elsewhere_and_refuses_secrets") {
        return;
    }
    let h = Home::new("api-archive");
    boot_counter(&h, "w", "");
    h.ok(&["snapshot", "create", "w", "--tag", "x"]);
    let addr = state_addrs(&h.console("w"), 1)[0];
    let saved = memory_u64(&h.ws("w").join("snapshots/x"), addr);
    // A secret whose value the guest holds in memory (its command line is copied into guest
    // RAM at boot): the capture's scan finds it, and an archive would carry it off the host.
    let secret = "apiSecretValue7Qz";
    boot_counter(&h, "sec", &format!("note={secret}"));
    let key = h.dir.join("key.txt");
    std::fs::write(&key, secret).unwrap();
    h.ok(&[
        "secret",
        "set",
        "sec",
        "TOKEN",
        "--from-file",
        key.to_str().unwrap(),
    ]);
    let made: Value =
        serde_json::from_str(&h.ok(&["--json", "snapshot", "create", "sec", "--tag", "leaky"]))
            .unwrap();
    assert!(
        made.to_string().contains("TOKEN"),
        "the capture's scan did not find the secret: {made}"
    );
    let s = Server::start(&h);
    let file = h.dir.join("download.tar.zst");
    rt().block_on(async {
        let r = s
            .req(
                reqwest::Method::GET,
                "/api/workspaces/w/snapshots/x/archive",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.headers()["content-type"], "application/zstd");
        assert_eq!(
            r.headers()["content-disposition"],
            "attachment; filename=\"w-x.tar.zst\""
        );
        let declared: u64 = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        // Read as a stream, chunk by chunk, as a client saving a large archive would.
        let mut body = r.bytes_stream();
        let mut out = std::fs::File::create(&file).unwrap();
        let (mut got, mut chunks) = (0u64, 0);
        while let Some(c) = body.next().await {
            let c = c.expect("archive chunk");
            std::io::Write::write_all(&mut out, &c).unwrap();
            got += c.len() as u64;
            chunks += 1;
        }
        assert_eq!(got, declared);
        eprintln!("archive: {got} bytes in {chunks} chunks");
        // Nothing is left in the staging directory once the download is under way.
        let staged: Vec<_> = std::fs::read_dir(h.dir.join("serve-exports"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "staged files left: {staged:?}");

        // A capture holding a delivered secret: refused with the CLI's code unless asked for.
        let (st, v) = s.get("/api/workspaces/sec/snapshots/leaky/archive").await;
        assert_eq!((st, code(&v)), (422, "snapshot-refused"), "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains("TOKEN"),
            "{v}"
        );
        assert!(
            !v.to_string().contains(secret),
            "the refusal shows the value: {v}"
        );
        let (st, v) = s
            .send(
                reqwest::Method::POST,
                "/api/workspaces/sec/snapshots/leaky/export",
                json!({"file": h.dir.join("leaky.tar.zst")}),
            )
            .await;
        assert_eq!((st, code(&v)), (422, "snapshot-refused"), "{v}");
        let r = s
            .req(
                reqwest::Method::GET,
                "/api/workspaces/sec/snapshots/leaky/archive?allow_secrets=true",
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.bytes().await.unwrap().len() > 1000);

        // Bad input: each with its status and code.
        for (path, want, want_code) in [
            ("/api/workspaces/nope/snapshots/x/archive", 404, "not-found"),
            ("/api/workspaces/w/snapshots/nope/archive", 404, "not-found"),
            ("/api/workspaces/w/snapshots/.x/archive", 400, "usage"),
            (
                "/api/workspaces/w/snapshots/x/archive?allow_secrets=maybe",
                400,
                "usage",
            ),
        ] {
            let (st, v) = s.get(path).await;
            assert_eq!((st, code(&v)), (want, want_code), "{path}: {v}");
        }
    });
    drop(s);

    // Another state root restores the download: the guest continues from the captured count.
    let other = Home::new("api-archive-import");
    other.ok(&["snapshot", "import", file.to_str().unwrap(), "--as", "back"]);
    other.ok(&["start", "back", "--from-snapshot", "x"]);
    other.wait_counts("back", &[saved]);
    let first = counts(&other.console("back"))[0].1;
    assert!(
        first >= saved && first < saved + 1000,
        "continued at {first}, captured at {saved}"
    );
    other.ok(&["halt", "back"]);
}

/// Schemathesis (from PyPI) generates requests from `/api/openapi.json`, valid and not, and
/// checks that none gets a 5xx, that answers keep to the document and that requests violating
/// it or lacking the token are refused. Where a workspace name or tag is asked for, the read and
/// lifecycle routes are pointed at a real running test-guest workspace and snapshot, so the
/// generated bodies and queries reach the CLI and the VMM, not only the 404 path; a delete of
/// a workspace at a stopped one (schemathesis also reuses names it saw in answers: pinned, it
/// cannot delete the running one early); fork and export at a missing snapshot, since
/// generated bodies could fork up to 1000 VMs or write archives at generated server paths.
#[test]
fn schemathesis_finds_no_server_error() {
    const TEST: &str = "schemathesis_finds_no_server_error";
    if !kvm_or_skip(TEST) {
        return;
    }
    let version = Command::new("schemathesis").arg("--version").output();
    let version = match version {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => {
            common::require::skip(
                TEST,
                "tools",
                "schemathesis is not installed (pip install 'schemathesis>=4,<5')",
            );
            return;
        }
    };
    assert!(
        version.contains(" v4.") || version.contains(" 4."),
        "schemathesis {version}: the test is written for 4.x"
    );
    let h = Home::new("api-schemathesis");
    boot_counter(&h, "w", "");
    h.ok(&[
        "snapshot",
        "create",
        "w",
        "--tag",
        "base",
        "--note",
        "for schemathesis",
    ]);
    h.ok(&[
        "snapshot", "create", "w", "--tag", "second", "--type", "diff",
    ]);
    h.ok(&[
        "create",
        "stopped",
        "--kernel",
        "builtin:testguest",
        "--mem",
        "64",
    ]);
    // Generated workspaces name generated images: every registry is made unreachable (a proxy
    // that refuses), so the run never depends on the internet and a pull ends at once, as the
    // documented 504.
    let proxy = "http://127.0.0.1:9";
    let s = Server::start_env(
        &h,
        &[
            ("HTTPS_PROXY", proxy),
            ("HTTP_PROXY", proxy),
            ("ALL_PROXY", proxy),
            ("NO_PROXY", ""),
        ],
    );
    let config = h.dir.join("schemathesis.toml");
    std::fs::write(
        &config,
        r#"[[operations]]
include-path-regex = '^/api/workspaces/\{name\}/(start|halt|hibernate|exec|console|prune|snapshots|snapshots/\{tag\}|snapshots/\{tag\}/archive)$'
parameters = { name = "w", tag = "base" }

[[operations]]
include-path = "/api/workspaces/{name}"
include-method = "DELETE"
parameters = { name = "stopped" }

# A generated image is pulled through the refusing proxy: the documented 504 remote-unreachable
# (asserted exactly by unreachable_registry_is_a_gateway_timeout), not a server fault.
[[operations]]
include-name = "POST /api/workspaces"
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "504"]

[[operations]]
include-path-regex = '^/api/workspaces/\{name\}/snapshots/\{tag\}/(fork|export)$'
parameters = { name = "w", tag = "no-such-tag" }
"#,
    )
    .unwrap();
    let report = h.dir.join("junit.xml");
    let mut child = Command::new("schemathesis")
        .arg("--config-file")
        .arg(&config)
        .args(["run", &s.url("/api/openapi.json")])
        .args(["--header", &format!("Authorization: Bearer {}", s.token)])
        // No 5xx; and, since the document is the contract: every status and content type is
        // one it lists, what violates it is refused, and nothing passes without the token.
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             negative_data_rejection,ignored_auth",
        ])
        // The two endless streams (events, console tail) would hold each generated request
        // until its timeout; they take no input but the name and are tested above.
        .args(["--exclude-path", "/api/events"])
        .args(["--exclude-path", "/api/workspaces/{name}/console"])
        .args([
            "--max-examples",
            "15",
            "--max-time",
            "150",
            "--workers",
            "1",
        ])
        .args(["--request-timeout", "60", "--suppress-health-check", "all"])
        .args(["--report", "junit", "--report-junit-path"])
        .arg(&report)
        .env("NO_COLOR", "1")
        .current_dir(&h.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn schemathesis");
    // Its own time bound is --max-time; this one only catches a hang.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("schemathesis ran past 600 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(
        status.success(),
        "schemathesis found failures ({status}): see its report above"
    );
    // It really ran every operation it selected: all the document lists but the two streams
    // and the document itself (which schemathesis does not test).
    let (_, doc) = rt().block_on(s.get("/api/openapi.json"));
    let ops: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|p| p.as_object().unwrap().len())
        .sum();
    let want = ops - 3;
    assert!(
        text.contains(&format!("Selected: {want}/")) && text.contains(&format!("Tested: {want}")),
        "schemathesis did not test the {want} operations it should"
    );
    let junit = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(junit.contains("<testsuite"), "no JUnit report: {junit}");
    // The server is still up and consistent after the run.
    let (st, v) = rt().block_on(s.get("/api/workspaces"));
    assert_eq!(st, 200, "{v}");
}

/// An image whose registry cannot be reached is the remote's failure: 504
/// `remote-unreachable` (the CLI's exit 8), not a 500. Schemathesis found the 500.
#[test]
fn unreachable_registry_is_a_gateway_timeout() {
    let h = Home::new("api-registry");
    let proxy = "http://127.0.0.1:9";
    let s = Server::start_env(
        &h,
        &[
            ("HTTPS_PROXY", proxy),
            ("HTTP_PROXY", proxy),
            ("ALL_PROXY", proxy),
            ("NO_PROXY", ""),
        ],
    );
    let (st, v) = rt().block_on(s.send(
        reqwest::Method::POST,
        "/api/workspaces",
        json!({"name": "img", "image": "registry.example/tools:1"}),
    ));
    assert_eq!((st, code(&v)), (504, "remote-unreachable"), "{v}");
    assert!(!h.ws("img").exists(), "a workspace was left behind");
}

/// `live` through the API runs the CLI's `snapshot create --live`: the answer carries its pause
/// and copy rounds, the snapshot restores to the state at the stop, and bad input meets the
/// CLI's own usage errors (nothing captured, the guest still running).
#[test]
fn live_snapshot_over_http_restores_and_refuses_bad_bounds() {
    if !kvm_or_skip("live_snapshot_over_http_restores_and_refuses_bad_bounds") {
        return;
    }
    let h = Home::new("api-live");
    // The counter rewrites and verifies its 8 MiB as fast as it can: every round has pages to
    // copy again, and a page copied before its last write shows as an ERROR after the restore.
    h.ok(&[
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--mem",
        "64",
        "--cmdline",
        "mode=counter mem=8 tick_ms=0 layout=1",
    ]);
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[3]);
    let s = Server::start(&h);
    use reqwest::Method as M;
    rt().block_on(async {
        // Bad input first: each a 400 with the CLI's message, and nothing captured.
        for (body, says) in [
            (
                json!({"live": true, "max_pause": "20"}),
                "--max-pause \"20\" needs a unit",
            ),
            (
                json!({"live": true, "max_pause": "fast"}),
                "does not start with a number",
            ),
            (
                json!({"live": true, "max_pause": "2m"}),
                "unknown unit (use us, ms, s)",
            ),
            (
                json!({"live": true, "max_pause": "61s"}),
                "longer than a minute",
            ),
            (
                json!({"live": true, "kind": "diff"}),
                "--live captures a full snapshot",
            ),
            (
                json!({"live": true, "kind": "disk"}),
                "--live captures a full snapshot",
            ),
            (json!({"max_pause": "20ms"}), "max_pause needs live"),
            (json!({"live": "yes"}), "bad JSON body"),
        ] {
            let (st, v) = s
                .send(M::POST, "/api/workspaces/w/snapshots", body.clone())
                .await;
            assert_eq!((st, code(&v)), (400, "usage"), "{body}: {v}");
            let msg = v["error"]["message"].as_str().unwrap_or("");
            assert!(msg.contains(says), "{body}: {msg:?} lacks {says:?}");
        }
        let (_, list) = s.get("/api/workspaces/w/snapshots").await;
        assert_eq!(list["snapshots"], json!([]), "{list}");

        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/snapshots",
                json!({"tag": "hot", "live": true, "max_pause": "20ms"}),
                201,
            )
            .await;
        eprintln!(
            "live over HTTP: pause_ms {}, live {}",
            v["pause_ms"], v["live"]
        );
        assert_eq!(v["snapshot"]["tag"], "hot", "{v}");
        assert_eq!(v["snapshot"]["kind"], "full", "{v}");
        assert!(v["live"]["rounds"].as_u64().is_some_and(|r| r >= 1), "{v}");
        assert!(v["live"]["converged"].is_boolean(), "{v}");
        assert!(v["pause_ms"].as_f64().is_some_and(|p| p > 0.0), "{v}");
        assert_eq!(v["pause_ms"], v["live"]["pause_ms"], "{v}");
        // Without `live` the answer has the pause and no live report.
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/snapshots",
                json!({"tag": "cold"}),
                201,
            )
            .await;
        assert!(v["pause_ms"].as_f64().is_some_and(|p| p > 0.0), "{v}");
        assert!(v["live"].is_null(), "{v}");
    });
    // The guest ran on after the captures.
    let now = h.wait_counts("w", &[0]);
    h.wait_counts("w", &now);

    // Restored through the API, it continues from the count at the stop and passes its own
    // memory checks for several rounds.
    let addr = state_addrs(&h.console("w"), 1)[0];
    let saved = memory_u64(&h.ws("w").join("snapshots/hot"), addr);
    rt().block_on(async {
        let v = s
            .expect(
                M::POST,
                "/api/workspaces/w/start",
                json!({"from_snapshot": "hot", "force": true}),
                200,
            )
            .await;
        assert_eq!(v["state"], "running", "{v}");
    });
    h.wait_counts("w", &[saved + 5]);
    let first = counts(&h.console("w"))[0].1;
    // The saved count is printed once its round's rewrite ends: next, or already done.
    assert!(
        first == saved || first == saved + 1,
        "first count {first} after the restore, the snapshot holds {saved}"
    );
    h.ok(&["halt", "w"]);
}
