//! Forking on a host that has never seen the snapshot, side by side in one run: a 1 GiB test
//! guest that touched 10% of its memory is snapshotted on host A and pushed to a remote (moto on
//! loopback, see tests/common/s3.rs). Host B then either
//!   - forks straight from the remote: `create --from-snapshot REMOTE/NAME:TAG`, or
//!   - takes the whole-archive path: the archive (made once with `snapshot export` and uploaded)
//!     is downloaded (with the same S3 client), imported, and forked.
//!
//! Timed from the first command to the fork's first `count` line; bytes are what came from the
//! remote. Prints one table; never asserts on time.

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
    let mut remote_bytes = 0;
    let mut archive_s = Vec::new();
    for round in 0..rounds {
        // Fork straight from the remote, on a host that has never seen it.
        let b = base.join(format!("b{round}"));
        fresh(&b);
        ma(&b, &env, &remote_args);
        let t0 = Instant::now();
        let out: serde_json::Value = serde_json::from_str(&ma(
            &b,
            &env,
            &["--json", "create", "f", "--from-snapshot", "r/w:t"],
        ))
        .unwrap();
        wait_counting(&b, "f");
        remote_s.push(t0.elapsed().as_secs_f64());
        remote_bytes = out["fetched"]["bytes_transferred"].as_u64().unwrap_or(0);
        halt_all(&b, &env);
        let _ = std::fs::remove_dir_all(&b);

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
    let (r, w) = (med(remote_s.clone()), med(archive_s.clone()));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "remote fork, {mem} MiB test guest that touched {touched} MiB; snapshot pushed: {} chunks ({} zero), {:.1} MiB uploaded",
        push["stats"]["chunks_total"], push["stats"]["chunks_zero"],
        mib(push["stats"]["bytes_transferred"].as_u64().unwrap_or(0))
    );
    println!(
        "| path | to first count (median of {rounds}) | fetched from the remote | time ratio |"
    );
    println!("|---|---|---|---|");
    println!(
        "| create --from-snapshot r/w:t (chunks) | {r:.2} s | {:.1} MiB | {:.2}x |",
        mib(remote_bytes),
        r / w
    );
    println!(
        "| download + import + fork (archive) | {w:.2} s | {:.1} MiB | 1.00x |",
        mib(archive_bytes)
    );
    println!("samples: remote {remote_s:.2?}, archive {archive_s:.2?}");
}
