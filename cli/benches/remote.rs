//! Forking on a host that has never seen the snapshot, side by side in one run: a 1 GiB test
//! guest that touched 10% of its memory is snapshotted on host A, forked there once through the
//! page server (which records its working set), and pushed to a remote (moto on loopback, see
//! tests/common/s3.rs). Host B then either
//!   - forks straight from the remote: `create --from-snapshot REMOTE/NAME:TAG` (memory on first
//!     touch, the working set's chunks fetched ahead),
//!   - the same with `--memory eager`: every chunk pulled before the fork starts, or
//!   - takes the whole-archive path: the archive (made once with `snapshot export` and uploaded)
//!     is downloaded (with the same S3 client), imported, and forked.
//!
//! Timed from the first command to the fork's first `count` line; bytes are what came from the
//! remote until then (for the chunk paths: the compressed chunks in host B's chunk cache).
//! Prints one table; never asserts on time.

#[path = "../../tests/common/require.rs"]
mod require;
#[path = "../../tests/common/s3.rs"]
mod s3;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn ma(home: &Path, env: &[(String, String)], args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", home)
        .envs(env.iter().map(|(k, v)| (k, v)))
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

fn ws(home: &Path, name: &str) -> PathBuf {
    home.join("workspaces").join(name)
}

fn counting(home: &Path, name: &str) -> bool {
    std::fs::read_to_string(ws(home, name).join("console.log"))
        .map(|t| t.lines().any(|l| l.starts_with("cpu0 count=")))
        .unwrap_or(false)
}

fn wait_counting(home: &Path, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !counting(home, name) {
        assert!(Instant::now() < deadline, "{name} never counted");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The archive's download, through the same S3 client (object_store) the remote path uses.
fn download(s3: &s3::S3, key: &str, to: &Path) {
    use object_store::ObjectStoreExt;
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(s3::BUCKET)
        .with_endpoint(&s3.endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(&s3.key_id)
        .with_secret_access_key(&s3.secret)
        .build()
        .expect("S3 client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let bytes = rt
        .block_on(async {
            store
                .get(&object_store::path::Path::from(key))
                .await?
                .bytes()
                .await
        })
        .expect("download the archive");
    std::fs::write(to, &bytes).expect("write the archive");
}

/// Compressed bytes and count of the chunks in a host's chunk cache: what it fetched.
fn cached_chunks(home: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut n = 0;
    if let Ok(d) = std::fs::read_dir(home.join("remote-cache/chunks")) {
        for e in d.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if let Ok(m) = e.metadata() {
                bytes += m.len();
                n += 1;
            }
        }
    }
    (bytes, n)
}

fn fresh(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
}

fn halt_all(home: &Path, env: &[(String, String)]) {
    if let Ok(d) = std::fs::read_dir(home.join("workspaces")) {
        for e in d.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.starts_with('.') {
                let _ = Command::new(env!("CARGO_BIN_EXE_microagent"))
                    .env("MICROAGENT_HOME", home)
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .args(["halt", &n])
                    .output();
            }
        }
    }
}

fn main() {
    let mem: u64 = std::env::var("MICROAGENT_BENCH_MEM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rounds: usize = std::env::var("MICROAGENT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    if !Path::new("/dev/kvm").exists() {
        eprintln!("remote bench: skipped: no /dev/kvm");
        return;
    }
    let Some(s3) = s3::S3::start("remote bench") else {
        return;
    };
    let env = s3.env();
    let base = std::env::temp_dir().join(format!("ma-remote-bench-{}", std::process::id()));
    let a = base.join("a");
    fresh(&a);

    // Host A: the guest touches 10% of its memory, then is snapshotted and pushed.
    let touched = (mem / 10).max(1);
    let cmdline = format!("mode=counter mem={touched} tick_ms=20");
    let mem_s = mem.to_string();
    ma(
        &a,
        &env,
        &[
            "create",
            "w",
            "--kernel",
            "builtin:testguest",
            "--mem",
            &mem_s,
            "--cmdline",
            &cmdline,
        ],
    );
    ma(&a, &env, &["start", "w"]);
    wait_counting(&a, "w");
    ma(&a, &env, &["snapshot", "create", "w", "--tag", "t"]);
    ma(&a, &env, &["halt", "w"]);
    // One fork through the page server records the working set, which the push takes along.
    ma(
        &a,
        &env,
        &[
            "create",
            "rec",
            "--from-snapshot",
            "w:t",
            "--memory",
            "uffd",
        ],
    );
    wait_counting(&a, "rec");
    std::thread::sleep(Duration::from_millis(500));
    ma(&a, &env, &["halt", "rec"]);
    let ws_file = ws(&a, "w").join("snapshots/t/workingset.bin");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ws_file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let ws_pages = std::fs::metadata(&ws_file).map_or(0, |m| m.len().saturating_sub(52) / 4);
    let remote_args = [
        "remote",
        "add",
        "r",
        "s3://snaps/bench",
        "--endpoint",
        &s3.endpoint,
    ];
    ma(&a, &env, &remote_args);
    let push: serde_json::Value = serde_json::from_str(&ma(
        &a,
        &env,
        &["--json", "snapshot", "push", "w", "t", "r"],
    ))
    .unwrap();
    let archive = base.join("w-t.tar.zst");
    ma(
        &a,
        &env,
        &[
            "snapshot",
            "export",
            "w",
            "t",
            &archive.display().to_string(),
        ],
    );
    let archive_bytes = std::fs::metadata(&archive).unwrap().len();
    s3.put(
        "bench/archives/w-t.tar.zst",
        &std::fs::read(&archive).unwrap(),
    );

    let mut remote_s = Vec::new();
    let mut remote_bytes = (0, 0);
    let mut eager_s = Vec::new();
    let mut eager_bytes = (0, 0);
    let mut archive_s = Vec::new();
    for round in 0..rounds {
        // Fork straight from the remote, on a host that has never seen it: lazily (the
        // default), then with every chunk pulled first.
        for (eager, times, bytes) in [
            (false, &mut remote_s, &mut remote_bytes),
            (true, &mut eager_s, &mut eager_bytes),
        ] {
            let b = base.join(format!("b{round}-{eager}"));
            fresh(&b);
            ma(&b, &env, &remote_args);
            let mut args = vec!["create", "f", "--from-snapshot", "r/w:t"];
            if eager {
                args.extend(["--memory", "eager"]);
            }
            let t0 = Instant::now();
            ma(&b, &env, &args);
            wait_counting(&b, "f");
            times.push(t0.elapsed().as_secs_f64());
            *bytes = cached_chunks(&b);
            halt_all(&b, &env);
            let _ = std::fs::remove_dir_all(&b);
        }

        // The whole-archive path: download, import, fork.
        let c = base.join(format!("c{round}"));
        fresh(&c);
        let file = c.join("w-t.tar.zst");
        let t0 = Instant::now();
        download(&s3, "bench/archives/w-t.tar.zst", &file);
        ma(
            &c,
            &env,
            &[
                "snapshot",
                "import",
                &file.display().to_string(),
                "--as",
                "w",
            ],
        );
        ma(&c, &env, &["create", "f", "--from-snapshot", "w:t"]);
        wait_counting(&c, "f");
        archive_s.push(t0.elapsed().as_secs_f64());
        halt_all(&c, &env);
        let _ = std::fs::remove_dir_all(&c);
    }
    halt_all(&a, &env);
    let _ = std::fs::remove_dir_all(&base);

    let med = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[v.len() / 2]
    };
    let (r, e, w) = (
        med(remote_s.clone()),
        med(eager_s.clone()),
        med(archive_s.clone()),
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "remote fork, {mem} MiB test guest that touched {touched} MiB; snapshot pushed: {} chunks ({} zero), {:.1} MiB uploaded; working set {ws_pages} pages",
        push["stats"]["chunks_total"], push["stats"]["chunks_zero"],
        mib(push["stats"]["bytes_transferred"].as_u64().unwrap_or(0))
    );
    println!(
        "| path | to first count (median of {rounds}) | fetched from the remote by then | time ratio |"
    );
    println!("|---|---|---|---|");
    println!(
        "| create --from-snapshot r/w:t (memory on first touch) | {r:.2} s | {:.1} MiB ({} chunks) | {:.2}x |",
        mib(remote_bytes.0),
        remote_bytes.1,
        r / w
    );
    println!(
        "| create --from-snapshot r/w:t --memory eager (all chunks first) | {e:.2} s | {:.1} MiB ({} chunks) | {:.2}x |",
        mib(eager_bytes.0),
        eager_bytes.1,
        e / w
    );
    println!(
        "| download + import + fork (archive) | {w:.2} s | {:.1} MiB | 1.00x |",
        mib(archive_bytes)
    );
    println!("samples: lazy {remote_s:.2?}, eager {eager_s:.2?}, archive {archive_s:.2?}");
}
