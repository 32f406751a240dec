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
//! That guest has no disk; the rootfs part (with `MICROAGENT_TEST_KERNEL`) weighs fetching a
//! rootfs whole before the fork starts against what a Linux guest's fork reads of it (see
//! `rootfs_part`). `MICROAGENT_BENCH_REMOTE_PARTS=memory` or `rootfs` runs one part.
//! Prints a table per part; never asserts on time.

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

/// The S3 client (object_store) the remote path uses, for the bench's own transfers.
fn client(s3: &s3::S3) -> object_store::aws::AmazonS3 {
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(s3::BUCKET)
        .with_endpoint(&s3.endpoint)
        .with_allow_http(true)
        .with_region("us-east-1")
        .with_access_key_id(&s3.key_id)
        .with_secret_access_key(&s3.secret)
        .build()
        .expect("S3 client")
}

/// The archive's download, through the same S3 client (object_store) the remote path uses.
fn download(s3: &s3::S3, key: &str, to: &Path) {
    use object_store::ObjectStoreExt;
    let store = client(s3);
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
    // `memory`, `rootfs` or both (the default): the parts are independent.
    let parts = std::env::var("MICROAGENT_BENCH_REMOTE_PARTS")
        .unwrap_or_else(|_| "memory,rootfs".to_string());
    if parts.contains("memory") {
        memory_part(&s3, &env, &base, mem, rounds);
    }
    if parts.contains("rootfs") {
        rootfs_part(&s3, &env, &base);
    }
    remove(&base);
}

/// Removes a bench directory; a page server of a halted fork may still be writing its snapshot
/// directory for a moment (it stops by itself once idle), so a failed pass is tried again.
fn remove(dir: &Path) {
    for _ in 0..50 {
        if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("remote bench: could not remove {}", dir.display());
}

/// A 1 GiB test guest that touched 10%: lazy fork, eager fork and the archive path.
fn memory_part(s3: &s3::S3, env: &[(String, String)], base: &Path, mem: u64, rounds: usize) {
    let a = base.join("a");
    fresh(&a);

    // Host A: the guest touches 10% of its memory, then is snapshotted and pushed.
    let touched = (mem / 10).max(1);
    let cmdline = format!("mode=counter mem={touched} tick_ms=20");
    let mem_s = mem.to_string();
    ma(
        &a,
        env,
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
    ma(&a, env, &["start", "w"]);
    wait_counting(&a, "w");
    ma(&a, env, &["snapshot", "create", "w", "--tag", "t"]);
    ma(&a, env, &["halt", "w"]);
    // One fork through the page server records the working set, which the push takes along.
    ma(
        &a,
        env,
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
    ma(&a, env, &["halt", "rec"]);
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
    ma(&a, env, &remote_args);
    let push: serde_json::Value =
        serde_json::from_str(&ma(&a, env, &["--json", "snapshot", "push", "w", "t", "r"])).unwrap();
    let archive = base.join("w-t.tar.zst");
    ma(
        &a,
        env,
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
            ma(&b, env, &remote_args);
            let mut args = vec!["create", "f", "--from-snapshot", "r/w:t"];
            if eager {
                args.extend(["--memory", "eager"]);
            }
            let t0 = Instant::now();
            ma(&b, env, &args);
            wait_counting(&b, "f");
            times.push(t0.elapsed().as_secs_f64());
            *bytes = cached_chunks(&b);
            halt_all(&b, env);
            remove(&b);
        }

        // The whole-archive path: download, import, fork.
        let c = base.join(format!("c{round}"));
        fresh(&c);
        let file = c.join("w-t.tar.zst");
        let t0 = Instant::now();
        download(s3, "bench/archives/w-t.tar.zst", &file);
        ma(
            &c,
            env,
            &[
                "snapshot",
                "import",
                &file.display().to_string(),
                "--as",
                "w",
            ],
        );
        ma(&c, env, &["create", "f", "--from-snapshot", "w:t"]);
        wait_counting(&c, "f");
        archive_s.push(t0.elapsed().as_secs_f64());
        halt_all(&c, env);
        remove(&c);
    }
    halt_all(&a, env);
    remove(&a);

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
        "| path | to first count (median of {rounds}) | fetched from the remote by then | time ratio | rootfs |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| create --from-snapshot r/w:t (memory on first touch) | {r:.2} s | {:.1} MiB ({} chunks) | {:.2}x | none (this guest has no disk) |",
        mib(remote_bytes.0),
        remote_bytes.1,
        r / w
    );
    println!(
        "| create --from-snapshot r/w:t --memory eager (all chunks first) | {e:.2} s | {:.1} MiB ({} chunks) | {:.2}x | none |",
        mib(eager_bytes.0),
        eager_bytes.1,
        e / w
    );
    println!(
        "| download + import + fork (archive) | {w:.2} s | {:.1} MiB | 1.00x | none |",
        mib(archive_bytes)
    );
    println!("samples: lazy {remote_s:.2?}, eager {eager_s:.2?}, archive {archive_s:.2?}");
}

/// `cat /sys/block/vda/stat` in the guest: read requests completed and bytes read from its disk
/// since it booted (a fork's counters go on from its snapshot's).
fn disk_reads(home: &Path, env: &[(String, String)], name: &str) -> (u64, u64) {
    let out = ma(
        home,
        env,
        &["exec", name, "--", "cat", "/sys/block/vda/stat"],
    );
    let f: Vec<u64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    assert!(f.len() >= 3, "not a block stat line: {out}");
    (f[0], f[2] * 512)
}

/// Host directories put into the image on top of busybox and the agent, so that the rootfs is
/// the size of a real image (python:3.11-slim is about 150 MiB) with real binaries' compression.
const IMAGE_CONTENT: &[&str] = &["/usr/lib/python3.11", "/usr/lib/gcc"];

fn image_rootfs(dir: &Path) -> Option<(PathBuf, u64)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let agent = dir.join("agent");
    std::fs::write(&agent, guest_agent_embed::AGENT).ok()?;
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).ok()?;
    let mut content_mib = 0;
    let mut adds = vec![format!(
        "{}:/usr/sbin/microagent-guest-agent",
        agent.display()
    )];
    for d in IMAGE_CONTENT.iter().filter(|d| Path::new(d).is_dir()) {
        let du = Command::new("du").args(["-sm", d]).output().ok()?;
        content_mib += String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        adds.push(format!("{d}:{d}"));
    }
    let size = (content_mib * 3 / 2 + 64).next_multiple_of(64);
    let out = dir.join("rootfs.ext4");
    let mut cmd = Command::new(root.join("scripts/build-rootfs.sh"));
    cmd.arg(&out).args(["--size", &size.to_string()]);
    for a in &adds {
        cmd.args(["--add", a]);
    }
    let st = cmd.stdout(std::process::Stdio::null()).status().ok()?;
    st.success().then_some((out, content_mib))
}

/// Whether a rootfs is better fetched whole before a remote fork starts (what `create
/// --from-snapshot REMOTE/...` does) or lazily: a Linux guest (the test kernel) on an image-sized
/// rootfs is snapshotted on host A after its boot and an exec, and pushed. Measured: the
/// rootfs's non-zero chunks (what the whole fetch moves) and the time to GET them from the
/// remote, 4 at a time like the CLI; and on host B, the disk bytes the fork read from its
/// snapshot until its first useful output (an exec's answer, which is that very count).
fn rootfs_part(s3: &s3::S3, env: &[(String, String)], base: &Path) {
    let Some(kernel) = std::env::var_os("MICROAGENT_TEST_KERNEL") else {
        println!("rootfs part skipped: MICROAGENT_TEST_KERNEL (a Linux guest kernel) is not set");
        return;
    };
    let kernel = kernel.to_string_lossy().into_owned();
    let dir = base.join("img");
    fresh(&dir);
    let Some((rootfs, content_mib)) = image_rootfs(&dir) else {
        println!("rootfs part skipped: scripts/build-rootfs.sh failed");
        return;
    };
    let rootfs_s = rootfs.display().to_string();
    let a = base.join("la");
    fresh(&a);
    let remote_args = [
        "remote",
        "add",
        "r",
        "s3://snaps/bench",
        "--endpoint",
        &s3.endpoint,
    ];
    ma(&a, env, &remote_args);
    ma(
        &a,
        env,
        &[
            "create",
            "lx",
            "--kernel",
            &kernel,
            "--rootfs",
            &rootfs_s,
            "--mem",
            "256",
            "--net",
            "none",
            "--cmdline",
            "console=ttyS0 panic=-1 quiet root=/dev/vda rw",
        ],
    );
    ma(&a, env, &["start", "lx"]);
    // The snapshot is of a guest that did some work, as a warm one would have.
    ma(
        &a,
        env,
        &["exec", "lx", "--", "sh", "-c", "ls -R /usr/lib >/dev/null"],
    );
    let before = disk_reads(&a, env, "lx");
    ma(&a, env, &["snapshot", "create", "lx", "--tag", "t"]);
    ma(&a, env, &["snapshot", "push", "lx", "t", "r"]);
    halt_all(&a, env);

    // What a whole fetch moves: the rootfs's distinct non-zero chunks, as stored (compressed).
    let store = client(s3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let index: serde_json::Value = {
        use object_store::ObjectStoreExt;
        let b = rt
            .block_on(async {
                store
                    .get(&object_store::path::Path::from("bench/snapshots/lx/t.json"))
                    .await?
                    .bytes()
                    .await
            })
            .expect("the index");
        serde_json::from_slice(&b).expect("index JSON")
    };
    let file = index["files"]
        .as_array()
        .and_then(|fs| fs.iter().find(|f| f["name"] == "rootfs.ext4"))
        .expect("rootfs.ext4 in the index")
        .clone();
    let rootfs_bytes = file["size"].as_u64().unwrap_or(0);
    let chunks: Vec<String> = {
        let mut seen = std::collections::BTreeSet::new();
        file["chunks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str().map(str::to_string))
            .filter(|c| seen.insert(c.clone()))
            .collect()
    };
    let all_chunks = file["chunks"].as_array().map_or(0, |c| c.len());
    let t0 = Instant::now();
    let whole_bytes: u64 = rt.block_on(async {
        use futures_util::StreamExt;
        use object_store::ObjectStoreExt;
        futures_util::stream::iter(chunks.iter().map(|d| {
            let store = &store;
            async move {
                let key = object_store::path::Path::from(format!("bench/chunks/{d}"));
                let b = store.get(&key).await?.bytes().await?;
                Ok::<u64, object_store::Error>(b.len() as u64)
            }
        }))
        .buffer_unordered(4)
        .map(|r| r.expect("a rootfs chunk"))
        .fold(0u64, |acc, n| async move { acc + n })
        .await
    });
    let whole_s = t0.elapsed().as_secs_f64();

    // Host B forks from the remote; its first useful output is how much of the disk it read.
    let b = base.join("lb");
    fresh(&b);
    ma(&b, env, &remote_args);
    let t0 = Instant::now();
    let wall0 = std::time::SystemTime::now();
    let created: serde_json::Value = serde_json::from_str(
        ma(
            &b,
            env,
            &["--json", "create", "f", "--from-snapshot", "r/lx:t"],
        )
        .lines()
        .last()
        .unwrap_or("{}"),
    )
    .unwrap_or_default();
    let create_s = t0.elapsed().as_secs_f64();
    // Everything before the fork's VMM starts: fetch, assembly and checks, its disk copy.
    let vmm_s = std::fs::metadata(ws(&b, "f").join("vmm.log"))
        .and_then(|m| m.created())
        .ok()
        .and_then(|t| t.duration_since(wall0).ok())
        .map_or(f64::NAN, |d| d.as_secs_f64());
    let after = disk_reads(&b, env, "f");
    let first_s = t0.elapsed().as_secs_f64();
    halt_all(&b, env);
    let (reqs, read) = (after.0 - before.0, after.1 - before.1);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    // At best the reads fall in as few chunks as their size allows, at worst one chunk each.
    let chunk = 4u64 << 20;
    let lazy_lo = read.div_ceil(chunk).min(chunks.len() as u64);
    let lazy_hi = reqs.min(chunks.len() as u64);
    let per_chunk = whole_bytes as f64 / chunks.len().max(1) as f64;
    println!(
        "\nrootfs of a remote fork: Linux guest (256 MiB) on a {:.0} MiB ext4 image ({content_mib} MiB of host libraries on busybox + agent), after boot and `ls -R /usr/lib`",
        mib(rootfs_bytes)
    );
    println!("| rootfs | bytes | chunks | time |");
    println!("|---|---|---|---|");
    println!(
        "| fetched whole before the fork starts (today) | {:.1} MiB stored (compressed) | {} non-zero of {all_chunks} | GET {whole_s:.2} s (4 at a time) |",
        mib(whole_bytes),
        chunks.len()
    );
    println!(
        "| read by the fork until its first output | {:.1} KiB in {reqs} requests | {lazy_lo}-{lazy_hi} chunks if lazy (~{:.1}-{:.1} MiB) | VMM started {vmm_s:.2} s, create returned {create_s:.2} s, first output {first_s:.2} s |",
        read as f64 / 1024.0,
        mib((lazy_lo as f64 * per_chunk) as u64),
        mib((lazy_hi as f64 * per_chunk) as u64)
    );
    println!(
        "create fetched {} chunks, {:.1} MiB (manifest, state, rootfs); whole rootfs GET = {:.0}% of the time to first output",
        created["fetched"]["chunks_transferred"],
        mib(created["fetched"]["bytes_transferred"]
            .as_u64()
            .unwrap_or(0)),
        100.0 * whole_s / first_s.max(1e-9)
    );
}
