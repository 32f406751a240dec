//! `microagent serve` against the CLI, side by side in one run: latency of list and status
//! with 100 workspaces, over HTTP and as `microagent --json` processes; then (with KVM) the
//! time from a fork request to the fork's `running` event on the event stream. Prints one
//! table; asserts nothing about time.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

const WORKSPACES: usize = 100;
const ROUNDS: usize = 30;

fn ma(home: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", home)
        .args(args)
        .output()
        .expect("run microagent");
    assert!(
        out.status.success(),
        "microagent {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Median and 90th percentile, in milliseconds.
fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[v.len() / 2]), ms(v[v.len() * 9 / 10]))
}

fn main() {
    let home = std::env::temp_dir().join(format!("ma-bench-api-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&home);
    std::fs::create_dir_all(&home).unwrap();
    for i in 0..WORKSPACES {
        ma(
            &home,
            &[
                "create",
                &format!("w{i}"),
                "--kernel",
                "builtin:testguest",
                "--mem",
                "64",
                "--cmdline",
                "mode=counter mem=2 tick_ms=20",
            ],
        );
    }
    let mut server = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", &home)
        .args(["--json", "serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let base = v["url"].as_str().unwrap().trim_end_matches('/').to_string();
    let token = std::fs::read_to_string(home.join("serve-token")).unwrap();
    let token = token.trim().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: String| {
            let rb = http.get(format!("{base}{path}")).bearer_auth(&token);
            async move {
                let t = Instant::now();
                let r = rb.send().await.unwrap();
                assert!(r.status().is_success());
                let _ = r.bytes().await.unwrap();
                t.elapsed()
            }
        };
        // Warm both paths once (page cache, connection) before timing.
        get("/api/workspaces".into()).await;
        ma(&home, &["--json", "list"]);
        let mut rows = Vec::new();
        for (what, path, cli) in [
            (
                "list",
                "/api/workspaces".to_string(),
                vec!["--json", "list"],
            ),
            (
                "status",
                "/api/workspaces/w50".to_string(),
                vec!["--json", "status", "w50"],
            ),
        ] {
            let mut api = Vec::new();
            let mut direct = Vec::new();
            for _ in 0..ROUNDS {
                api.push(get(path.clone()).await);
                let t = Instant::now();
                ma(&home, &cli);
                direct.push(t.elapsed());
            }
            rows.push((what, stats(api), stats(direct)));
        }
        let fork = if Path::new("/dev/kvm").exists() {
            ma(&home, &["start", "w0"]);
            ma(&home, &["snapshot", "create", "w0", "--tag", "base"]);
            let events = http
                .get(format!("{base}/api/events"))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            let mut stream = events.bytes_stream();
            let t = Instant::now();
            let post = async {
                let r = http
                    .post(format!("{base}/api/workspaces/w0/snapshots/base/fork"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"name": "f"}))
                    .send()
                    .await;
                (r, t.elapsed())
            };
            let ((resp, answered), seen) = tokio::join!(post, async {
                let mut buf = String::new();
                while let Some(Ok(c)) = stream.next().await {
                    buf.push_str(&String::from_utf8_lossy(&c));
                    let running = buf
                        .lines()
                        .filter_map(|l| l.strip_prefix("data: "))
                        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                        .any(|v| v["name"] == "f" && v["state"] == "running");
                    if running {
                        return Some(t.elapsed());
                    }
                    if t.elapsed() > Duration::from_secs(120) {
                        break;
                    }
                }
                None
            });
            assert!(resp.unwrap().status().is_success());
            Some((answered, seen))
        } else {
            None
        };
        (rows, fork)
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", &home)
        .args(["halt", "w0"])
        .output();
    let _ = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", &home)
        .args(["delete", "f", "--yes"])
        .output();
    let _ = std::fs::remove_dir_all(&home);

    println!("\nAPI vs CLI, {WORKSPACES} workspaces, {ROUNDS} rounds each (ms)");
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>12} {:>10}",
        "request", "API median", "API p90", "CLI median", "CLI p90", "CLI/API"
    );
    for (what, (am, ap), (cm, cp)) in rows.0 {
        println!(
            "{what:<8} {am:>12.2} {ap:>12.2} {cm:>12.2} {cp:>12.2} {:>10.1}",
            cm / am
        );
    }
    match rows.1 {
        Some((answered, seen)) => println!(
            "fork of 1: request answered after {:.0} ms; `running` event after {}",
            answered.as_secs_f64() * 1000.0,
            seen.map(|d| format!("{:.0} ms", d.as_secs_f64() * 1000.0))
                .unwrap_or_else(|| "never (within 120 s)".into())
        ),
        None => println!("fork: skipped, no /dev/kvm"),
    }
}
