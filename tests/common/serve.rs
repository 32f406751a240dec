//! A real `microagent serve` for end-to-end tests, and the client side of its API: requests
//! with the token, JSON answers, server-sent event streams. Included by path
//! (`#[path = "common/serve.rs"] mod serve;`) from test crates that also have `mod common;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use crate::common::{bin, Home};

/// A running `microagent serve` on a free loopback port; killed on drop (before its `Home`).
pub struct Server {
    child: Child,
    pub base: String,
    pub token: String,
    pub http: reqwest::Client,
}

impl Server {
    pub fn start(h: &Home) -> Server {
        Self::start_env(h, &[])
    }

    /// As `start`, with extra environment variables for the server (and the CLI it runs).
    pub fn start_env(h: &Home, env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(bin())
            .env("MICROAGENT_HOME", &h.dir)
            .envs(env.iter().copied())
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

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(&self.token)
    }

    /// Sends and returns (status, JSON body or Null).
    pub async fn call(&self, rb: reqwest::RequestBuilder) -> (u16, Value) {
        let r = rb.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.call(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        self.call(self.req(method, path).json(&body)).await
    }

    /// Sends and insists on `want`, returning the body.
    pub async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
        want: u16,
    ) -> Value {
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

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// Collects `(event, data)` pairs from an SSE response until dropped.
pub fn collect_sse(resp: reqwest::Response) -> Arc<Mutex<Vec<(String, Value)>>> {
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
pub async fn wait_event(
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

/// The `(event, data)` pairs of a whole server-sent event body (data parsed as JSON when it is).
pub fn parse_sse(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in body.split("\n\n") {
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
            out.push((name, v));
        }
    }
    out
}
