//! Snapshots in S3-compatible object storage, against a real S3 server (moto, see common/s3.rs)
//! on loopback: push and pull, dedup, interrupted transfers resumed, tampered chunks refused,
//! credential and bucket errors, and a second host (its own state root, never sharing the
//! first's files) forking the first host's test guest snapshot from the remote.

mod common;
use common::s3::{credentials_file, BUCKET, S3};
use common::*;
use std::path::Path;
use std::time::Duration;

/// One simulated host: a state root plus the credentials it uses.
struct Host {
    home: Home,
    env: Vec<(String, String)>,
}

impl Host {
    fn new(name: &str, s3: &S3) -> Host {
        Host {
            home: Home::new(name),
            env: s3.env(),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.run_env(args, &[])
    }

    fn run_env(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Output {
        let mut env = self.env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        microagent_env(Some(&self.home.dir), args, &env, Duration::from_secs(180))
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "microagent {args:?} failed ({:?}):\n{}\n{}",
            o.status,
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// The command's JSON answer: its last line (a fork batch prints a line per fork first).
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        let last = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
    }

    fn add_remote(&self, s3: &S3, name: &str, prefix: &str) {
        self.ok(&[
            "remote",
            "add",
            name,
            &format!("s3://{BUCKET}/{prefix}"),
            "--endpoint",
            &s3.endpoint,
        ]);
    }

    /// Boots the counter test guest and waits until it counts.
    fn boot(&self, name: &str) {
        self.ok(&[
            "create",
            name,
            "--kernel",
            "builtin:testguest",
            "--mem",
            "128",
            "--cmdline",
            // A 16 MiB region of which only the first 5% keeps changing: a second snapshot
            // shares most memory chunks with the first.
            "mode=counter mem=16 hot_pct=5 tick_ms=5 layout=1",
        ]);
        self.ok(&["start", name]);
        self.home.wait_counts(name, &[10]);
    }

    fn saved_count(&self, name: &str, tag: &str) -> u64 {
        let addr = state_addrs(&self.home.console(name), 1)[0];
        memory_u64(&self.home.ws(name).join("snapshots").join(tag), addr)
    }
}

fn setup(test: &str) -> Option<S3> {
    if !kvm_or_skip(test) {
        return None;
    }
    S3::start(test)
}

fn one_line(o: &std::process::Output) -> String {
    let e = stderr(o);
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e:?}");
    e
}

fn stat(v: &serde_json::Value, k: &str) -> u64 {
    v["stats"][k]
        .as_u64()
        .unwrap_or_else(|| panic!("no stats.{k} in {v}"))
}

fn same_files(a: &Path, b: &Path) {
    for f in ["manifest.json", "vmstate.bin", "memory.bin"] {
        assert!(
            std::fs::read(a.join(f)).unwrap() == std::fs::read(b.join(f)).unwrap(),
            "{f} differs after the round trip"
        );
    }
}

#[test]
fn push_pull_and_dedup() {
    let Some(s3) = setup("push_pull_and_dedup") else {
        return;
    };
    let a = Host::new("remote-a", &s3);
    a.add_remote(&s3, "r", "team/snaps");
    let l = a.json(&["remote", "list"]);
    assert_eq!(l["remotes"][0]["name"], "r", "{l}");
    assert_eq!(l["remotes"][0]["prefix"], "team/snaps", "{l}");
    a.boot("w");
    a.ok(&["snapshot", "create", "w", "--tag", "t1"]);
    let p1 = a.json(&["snapshot", "push", "w", "t1", "r"]);
    let distinct = stat(&p1, "chunks_distinct");
    assert_eq!(stat(&p1, "chunks_transferred"), distinct, "{p1}");
    assert!(stat(&p1, "chunks_zero") > 0, "holes are not uploaded: {p1}");
    // Compressed chunks, and nothing for the zero ones: far below the files' size.
    assert!(
        stat(&p1, "bytes_transferred") * 4 < stat(&p1, "bytes_logical"),
        "{p1}"
    );
    assert!(s3.exists("team/snaps/snapshots/w/t1.json"));

    // A second snapshot of the same workspace: only its new chunks go up.
    a.home.wait_counts("w", &[a.saved_count("w", "t1") + 50]);
    a.ok(&["snapshot", "create", "w", "--tag", "t2"]);
    let p2 = a.json(&["snapshot", "push", "w", "t2", "r"]);
    let (sent, have) = (stat(&p2, "chunks_transferred"), stat(&p2, "chunks_present"));
    assert!(sent > 0, "{p2}");
    assert!(
        sent < stat(&p2, "chunks_distinct"),
        "dedup did nothing: {p2}"
    );
    assert_eq!(sent + have, stat(&p2, "chunks_distinct"), "{p2}");
    // Pushing again is a no-op.
    let p3 = a.json(&["snapshot", "push", "w", "t2", "r"]);
    assert_eq!(stat(&p3, "chunks_transferred"), 0, "{p3}");

    // Pull into another workspace on the same host: byte-identical, and it restores.
    let pulled = a.json(&["snapshot", "pull", "r/w:t2", "--as", "copy"]);
    assert_eq!(pulled["workspace"], "copy", "{pulled}");
    // Every chunk was already in... no: this host's cache starts empty, so all were fetched.
    assert_eq!(
        stat(&pulled, "chunks_transferred"),
        stat(&pulled, "chunks_distinct"),
        "{pulled}"
    );
    same_files(
        &a.home.ws("w").join("snapshots/t2"),
        &a.home.ws("copy").join("snapshots/t2"),
    );
    a.ok(&["snapshot", "inspect", "copy", "t2", "--verify"]);
    // t1 shares most chunks with t2: pulled from the host's cache.
    let p = a.json(&["snapshot", "pull", "r/w:t1", "--as", "copy"]);
    assert!(stat(&p, "chunks_present") > 0, "{p}");
    assert!(
        stat(&p, "chunks_transferred") < stat(&p, "chunks_distinct"),
        "{p}"
    );
    // Pulling what is already there is a conflict, and a missing snapshot is not found.
    let o = a.run(&["snapshot", "pull", "r/w:t1", "--as", "copy"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let o = a.run(&["snapshot", "pull", "r/w:nope"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(one_line(&o).contains("has no snapshot w:nope"));
    // With the chunk cache bounded (here to nothing), a pull keeps only the chunks it needs:
    // the others go, least recently used first.
    let o = a.run_env(
        &["snapshot", "pull", "r/w:t2", "--as", "bounded"],
        &[("MICROAGENT_REMOTE_CACHE_MAX_MIB", "0")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let index: serde_json::Value =
        serde_json::from_slice(&s3.get("team/snaps/snapshots/w/t2.json")).expect("index JSON");
    let t2: std::collections::HashSet<String> = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["chunks"].as_array().unwrap().iter())
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    let cached: std::collections::HashSet<String> =
        std::fs::read_dir(a.home.dir.join("remote-cache/chunks"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.len() == 64)
            .collect();
    assert_eq!(cached, t2, "the cache keeps exactly what the pull needs");
    a.ok(&["snapshot", "inspect", "bounded", "t2", "--verify"]);
    a.ok(&["remote", "remove", "r"]);
    assert_eq!(
        a.json(&["remote", "list"])["remotes"],
        serde_json::json!([])
    );
    a.ok(&["delete", "w", "--yes"]);
}

#[test]
fn interrupted_push_and_pull_resume() {
    let Some(s3) = setup("interrupted_push_and_pull_resume") else {
        return;
    };
    let a = Host::new("remote-int-a", &s3);
    a.add_remote(&s3, "r", "p");
    a.boot("w");
    a.ok(&["snapshot", "create", "w", "--tag", "t"]);
    a.ok(&["halt", "w"]);
    // Killed after two chunks: the snapshot is not on the remote (no index).
    let o = a.run_env(
        &["snapshot", "push", "w", "t", "r"],
        &[("MICROAGENT_TEST_CRASH_AT", "push-chunk-2")],
    );
    assert_eq!(o.status.code(), None, "not killed: {}", stderr(&o));
    assert!(
        !s3.exists("p/snapshots/w/t.json"),
        "half-pushed snapshot visible"
    );
    let b = Host::new("remote-int-b", &s3);
    b.add_remote(&s3, "r", "p");
    let o = b.run(&["snapshot", "pull", "r/w:t"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // Run again: the chunks already there are skipped.
    let p = a.json(&["snapshot", "push", "w", "t", "r"]);
    assert!(stat(&p, "chunks_present") >= 2, "{p}");
    assert_eq!(
        stat(&p, "chunks_present") + stat(&p, "chunks_transferred"),
        stat(&p, "chunks_distinct"),
        "{p}"
    );

    // A pull killed after two chunks: nothing visible on host B, the chunks kept.
    let o = b.run_env(
        &["snapshot", "pull", "r/w:t"],
        &[("MICROAGENT_TEST_CRASH_AT", "pull-chunk-2")],
    );
    assert_eq!(o.status.code(), None, "not killed: {}", stderr(&o));
    assert!(!b.home.ws("w").exists(), "half-pulled workspace visible");
    // Killed while assembling: still nothing visible.
    let o = b.run_env(
        &["snapshot", "pull", "r/w:t"],
        &[("MICROAGENT_TEST_CRASH_AT", "pull-assembled")],
    );
    assert_eq!(o.status.code(), None, "not killed: {}", stderr(&o));
    assert!(!b.home.ws("w").exists(), "half-pulled workspace visible");
    let p = b.json(&["snapshot", "pull", "r/w:t"]);
    assert_eq!(stat(&p, "chunks_transferred"), 0, "resumed from cache: {p}");
    assert_eq!(
        stat(&p, "chunks_present"),
        stat(&p, "chunks_distinct"),
        "{p}"
    );
    same_files(
        &a.home.ws("w").join("snapshots/t"),
        &b.home.ws("w").join("snapshots/t"),
    );
    // Staging leftovers of the killed pulls are gone.
    let staging = b.home.dir.join("remote-cache/staging");
    let left: Vec<_> = std::fs::read_dir(&staging)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "staging leftovers: {left:?}");
}

#[test]
fn tampered_chunk_is_refused() {
    let Some(s3) = setup("tampered_chunk_is_refused") else {
        return;
    };
    let a = Host::new("remote-tamper-a", &s3);
    a.add_remote(&s3, "r", "");
    a.boot("w");
    a.ok(&["snapshot", "create", "w", "--tag", "t"]);
    a.ok(&["halt", "w"]);
    a.ok(&["snapshot", "push", "w", "t", "r"]);
    let index: serde_json::Value =
        serde_json::from_slice(&s3.get("snapshots/w/t.json")).expect("index JSON");
    let mem = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "memory.bin")
        .expect("memory.bin in the index");
    let digest = mem["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|c| c.as_str())
        .expect("a non-zero memory chunk")
        .to_string();
    // Same length, valid zstd, one byte different: only the digest can tell.
    let original = zstd::bulk::decompress(&s3.get(&format!("chunks/{digest}")), 4 << 20).unwrap();
    let mut evil = original.clone();
    evil[original.len() / 2] ^= 0x5a;
    s3.put(
        &format!("chunks/{digest}"),
        &zstd::bulk::compress(&evil, 3).unwrap(),
    );

    let b = Host::new("remote-tamper-b", &s3);
    b.add_remote(&s3, "r", "");
    let o = b.run(&["snapshot", "pull", "r/w:t"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    let e = one_line(&o);
    assert!(e.contains(&digest) && e.contains("corrupt"), "{e}");
    assert!(!b.home.ws("w").exists(), "a tampered snapshot was imported");
    assert!(
        !b.home
            .dir
            .join("remote-cache/chunks")
            .join(&digest)
            .exists(),
        "a tampered chunk was cached"
    );
    // The same for a fork straight from the remote with every chunk pulled first.
    let o = b.run(&[
        "create",
        "f",
        "--from-snapshot",
        "r/w:t",
        "--memory",
        "eager",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(!b.home.ws("f").exists());
    // With its memory on first touch, the fork stops when it needs that chunk (at once here:
    // the chunk holds the guest's code), naming it; the chunk is not kept.
    let o = b.run(&["create", "g", "--from-snapshot", "r/w:t"]);
    if o.status.success() {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while b.json(&["status", "g"])["state"] == "running" {
            assert!(
                std::time::Instant::now() < deadline,
                "the fork runs on a corrupt chunk"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let said = format!(
        "{}{}",
        stderr(&o),
        std::fs::read_to_string(b.home.ws("g").join("vmm.log")).unwrap_or_default()
    );
    assert!(said.contains(&digest) && said.contains("corrupt"), "{said}");
    assert!(counts(&b.home.console("g")).is_empty(), "it counted");
    assert!(
        !b.home
            .dir
            .join("remote-cache/chunks")
            .join(&digest)
            .exists(),
        "a tampered chunk was cached"
    );
    let _ = b.run(&["delete", "g", "--yes"]);
}

#[test]
fn credentials_bucket_and_unreachable_errors() {
    let Some(s3) = setup("credentials_bucket_and_unreachable_errors") else {
        return;
    };
    let a = Host::new("remote-err", &s3);
    a.add_remote(&s3, "r", "x");
    a.boot("w");
    a.ok(&["snapshot", "create", "w", "--tag", "t"]);
    a.ok(&["halt", "w"]);
    // Wrong secret, from the environment.
    let o = a.run_env(
        &["snapshot", "push", "w", "t", "r"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong")],
    );
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    assert!(one_line(&o).contains("refused access"), "{}", stderr(&o));
    // An unknown key, from the shared credentials file (no key in the environment).
    let creds = credentials_file(&a.home.dir, "AKIAUNKNOWNKEY000000", "nope");
    let mut env: Vec<(String, String)> = a
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY") && !k.starts_with("AWS_SECRET"))
        .cloned()
        .collect();
    env.push((
        "AWS_SHARED_CREDENTIALS_FILE".into(),
        creds.display().to_string(),
    ));
    let o = microagent_env(
        Some(&a.home.dir),
        &["snapshot", "pull", "r/w:t", "--as", "other"],
        &env,
        Duration::from_secs(60),
    );
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    one_line(&o);
    // A bucket that does not exist.
    a.ok(&[
        "remote",
        "add",
        "nob",
        "s3://no-such-bucket/x",
        "--endpoint",
        &s3.endpoint,
    ]);
    let o = a.run(&["snapshot", "push", "w", "t", "nob"]);
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    assert!(
        one_line(&o).contains("bucket no-such-bucket does not exist"),
        "{}",
        stderr(&o)
    );
    let o = a.run(&["snapshot", "pull", "nob/w:t", "--as", "other"]);
    assert_eq!(o.status.code(), Some(9), "{}", stderr(&o));
    // Nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    a.ok(&[
        "remote",
        "add",
        "dead",
        "s3://snaps/x",
        "--endpoint",
        &format!("http://127.0.0.1:{dead}"),
    ]);
    let o = a.run(&["snapshot", "push", "w", "t", "dead"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(one_line(&o).contains("unreachable"), "{}", stderr(&o));
    let o = a.run(&["create", "f", "--from-snapshot", "dead/w:t"]);
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    // Usage errors.
    for (args, code) in [
        (vec!["remote", "add", "r", "s3://snaps/x"], 4),
        (vec!["remote", "add", "bad name", "s3://snaps/x"], 2),
        (vec!["remote", "add", "q", "http://snaps/x"], 2),
        (vec!["snapshot", "pull", "r:w:t"], 2),
        (vec!["snapshot", "push", "w", "t", "ghost"], 3),
    ] {
        let o = a.run(&args);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn second_host_forks_from_the_remote() {
    let Some(mut s3) = setup("second_host_forks_from_the_remote") else {
        return;
    };
    let a = Host::new("remote-host-a", &s3);
    a.add_remote(&s3, "r", "fleet");
    a.boot("w");
    a.ok(&["snapshot", "create", "w", "--tag", "t"]);
    let want = a.saved_count("w", "t");
    a.ok(&["snapshot", "push", "w", "t", "r"]);
    a.ok(&["halt", "w"]);

    // Host B: its own state root, credentials only in its shared credentials file.
    let b_home = Home::new("remote-host-b");
    let creds = credentials_file(&b_home.dir, &s3.key_id, &s3.secret);
    let b = Host {
        home: b_home,
        env: vec![
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                creds.display().to_string(),
            ),
            ("AWS_REGION".into(), "us-east-1".into()),
        ],
    };
    // The endpoint by name: the page server resolves it inside its jail.
    b.ok(&[
        "remote",
        "add",
        "r",
        &format!("s3://{BUCKET}/fleet"),
        "--endpoint",
        &s3.endpoint.replace("127.0.0.1", "localhost"),
    ]);
    let out = b.json(&["create", "f", "--from-snapshot", "r/w:t", "--count", "2"]);
    assert!(
        out["fetched"]["chunks_transferred"].as_u64().unwrap() > 0,
        "{out}"
    );
    // The memory stayed on the remote: the forks' page server fetches it on first touch.
    let lazy = out["fetched"]["chunks_lazy"].as_u64().unwrap_or(0);
    assert!(lazy > 0, "{out}");
    let index: serde_json::Value =
        serde_json::from_slice(&s3.get("fleet/snapshots/w/t.json")).expect("index JSON");
    let distinct: std::collections::HashSet<String> = index["files"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|f| f["chunks"].as_array().unwrap().iter())
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect();
    for f in ["f-1", "f-2"] {
        // The fork continues exactly: its first count follows the captured one.
        b.home.wait_counts(f, &[want]);
        let first = counts(&b.home.console(f))[0].1;
        assert!(
            first >= want && first < want + 1000,
            "{f} started at {first}, snapshot at {want}"
        );
        let st = b.json(&["status", f]);
        assert_eq!(st["forked_from"], "r/w:t", "{st}");
    }
    assert!(!b.home.ws("w").exists(), "the cache is not a workspace");
    // The server that fetches those chunks from the network is confined like a VMM.
    assert_remote_pageserver_confined(&b.home.dir, &creds);
    // Running forks touch a part of the memory only (the guest keeps rewriting 5% of its
    // region): the chunks they never touched were never fetched.
    let cached = cache_count(&b.home.dir);
    assert!(
        cached < distinct.len(),
        "{cached} of {} chunks fetched",
        distinct.len()
    );
    // A second fork on the same host uses the host's cache: nothing fetched but the index.
    let again = b.json(&["create", "g", "--from-snapshot", "r/w:t"]);
    assert!(
        again["fetched"]["chunks_transferred"].as_u64() == Some(0),
        "{again}"
    );
    b.home.wait_counts("g", &[want]);
    for f in ["f-1", "f-2", "g"] {
        b.ok(&["halt", f]);
    }

    // Two forks of the remote snapshot started at once on another fresh host: one pulls, the
    // other waits for it and forks from the cache; both run on from the snapshot.
    let d = Host::new("remote-host-d", &s3);
    d.add_remote(&s3, "r", "fleet");
    let outs: Vec<serde_json::Value> = std::thread::scope(|sc| {
        let d = &d;
        let hs: Vec<_> = ["p", "q"]
            .into_iter()
            .map(|n| sc.spawn(move || d.json(&["create", n, "--from-snapshot", "r/w:t"])))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pulled: Vec<u64> = outs
        .iter()
        .map(|o| {
            o["fetched"]["chunks_transferred"]
                .as_u64()
                .unwrap_or(u64::MAX)
        })
        .collect();
    assert!(
        pulled.contains(&0) && pulled.iter().any(|n| *n > 0 && *n != u64::MAX),
        "one pulls, the other uses the cache: {outs:?}"
    );
    for f in ["p", "q"] {
        d.home.wait_counts(f, &[want]);
        d.ok(&["halt", f]);
    }

    // A working set recorded on host A (by a fork served through the page server) goes up
    // with the next push, and a new host fetching the snapshot gets it: its page server
    // fetches those chunks ahead.
    a.ok(&["create", "u", "--from-snapshot", "w:t", "--memory", "uffd"]);
    a.home.wait_counts("u", &[want]);
    a.ok(&["halt", "u"]);
    let recorded = a.home.ws("w").join("snapshots/t/workingset.bin");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !recorded.exists() {
        assert!(std::time::Instant::now() < deadline, "no working set");
        std::thread::sleep(Duration::from_millis(20));
    }
    a.ok(&["snapshot", "push", "w", "t", "r"]);
    assert!(s3.exists("fleet/snapshots/w/t.workingset"));
    // The recorded working set swapped for a link to a host file (the jailed page server and
    // VMM write that directory): a push does not upload the file.
    let secret = a.home.dir.join("host-secret");
    std::fs::write(&secret, "host secret 7f3a9c").unwrap();
    let real = recorded.with_extension("real");
    std::fs::rename(&recorded, &real).unwrap();
    std::os::unix::fs::symlink(&secret, &recorded).unwrap();
    a.ok(&["snapshot", "push", "w", "t", "r"]);
    let up = s3.get("fleet/snapshots/w/t.workingset");
    assert!(
        !String::from_utf8_lossy(&up).contains("7f3a9c"),
        "push uploaded the host file"
    );
    std::fs::remove_file(&recorded).unwrap();
    std::fs::rename(&real, &recorded).unwrap();
    let e = Host::new("remote-host-e", &s3);
    e.add_remote(&s3, "r", "fleet");
    // With the chunk cache bounded to nothing, the jailed page server evicts as it fetches
    // (each chunk it writes is the only one kept) and serves on.
    let o = e.run_env(
        &["create", "v", "--from-snapshot", "r/w:t"],
        &[("MICROAGENT_REMOTE_CACHE_MAX_MIB", "0")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let here = e
        .home
        .dir
        .join("remote-cache/lazy/r/workspaces/w/snapshots/t/workingset.bin");
    assert!(
        std::fs::read(&here).ok() == std::fs::read(&recorded).ok(),
        "the working set did not come along"
    );
    e.home.wait_counts("v", &[want]);
    assert!(counts(&e.home.console("v"))[0].1 >= want);
    assert_remote_pageserver_confined(&e.home.dir, Path::new("/root"));
    e.ok(&["halt", "v"]);

    // The remote dies mid-transfer: a clear error, nothing half-visible.
    let c = Host::new("remote-host-c", &s3);
    c.add_remote(&s3, "r", "fleet");
    let mut env = c.env.clone();
    env.push(("MICROAGENT_TEST_SLOW_AT".into(), "pull-chunk:400".into()));
    let home = c.home.dir.clone();
    let fork = std::thread::spawn(move || {
        microagent_env(
            Some(&home),
            &["create", "h", "--from-snapshot", "r/w:t"],
            &env,
            Duration::from_secs(120),
        )
    });
    let cache = c.home.dir.join("remote-cache/chunks");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::fs::read_dir(&cache).map_or(0, |d| d.count()) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no chunk ever arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    s3.kill();
    let o = fork.join().unwrap();
    assert_eq!(o.status.code(), Some(8), "{}", stderr(&o));
    assert!(one_line(&o).contains("unreachable"), "{}", stderr(&o));
    assert!(!c.home.ws("h").exists(), "a fork of a half-pulled snapshot");
    for d in ["snapshots", "lazy"] {
        let cached = c.home.dir.join(format!("remote-cache/{d}/r/workspaces/w"));
        assert!(!cached.exists(), "a half-pulled snapshot in the cache");
    }
}

/// Over TLS, as a real S3 endpoint is: the jailed page server checks the endpoint's certificate
/// against the CA named in `SSL_CERT_FILE` (bound into its jail, the rest of the host's files
/// not) and fills the fork's memory from there.
#[test]
fn remote_fork_over_tls_from_the_jail() {
    let test = "remote_fork_over_tls_from_the_jail";
    if !kvm_or_skip(test) {
        return;
    }
    let certs = std::env::temp_dir().join(format!("ma-s3-tls-{}", std::process::id()));
    let Some(s3) = S3::start_tls(test, &certs) else {
        return;
    };
    assert!(s3.endpoint.starts_with("https://"), "{}", s3.endpoint);
    let a = Host::new("remote-tls-a", &s3);
    a.add_remote(&s3, "r", "tls");
    a.boot("w");
    a.ok(&["snapshot", "create", "w", "--tag", "t"]);
    let want = a.saved_count("w", "t");
    a.ok(&["snapshot", "push", "w", "t", "r"]);
    a.ok(&["halt", "w"]);

    let b = Host::new("remote-tls-b", &s3);
    b.add_remote(&s3, "r", "tls");
    let out = b.json(&["create", "f", "--from-snapshot", "r/w:t"]);
    assert!(
        out["fetched"]["chunks_lazy"].as_u64().unwrap_or(0) > 0,
        "{out}"
    );
    b.home.wait_counts("f", &[want]);
    assert!(counts(&b.home.console("f"))[0].1 >= want);
    // (It checks that the server fetched memory chunks itself, so through TLS.)
    assert_remote_pageserver_confined(&b.home.dir, &certs.join("key.pem"));
    b.ok(&["halt", "f"]);
    drop(s3);
    let _ = std::fs::remove_dir_all(&certs);
}

/// The `Key:` line of /proc/PID/status.
fn proc_status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{text}"))
        .trim()
        .to_string()
}

/// The page server of a remote snapshot under `home` (a waiter on the host and its jailed child,
/// both `microagent __pageserver --snapshot DIR`) runs in its sandbox: a seccomp filter, no
/// capabilities, the remote page servers' own uid, PID 1 of its own PID namespace, its own mount
/// namespace holding its snapshot and the chunk cache but not the host's files (the credentials
/// file among them), and the host's network namespace, which it needs to reach the remote.
fn assert_remote_pageserver_confined(home: &Path, hidden: &Path) {
    let mut servers = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "__pageserver")
            && args.iter().any(|a| Path::new(a).starts_with(home))
        {
            servers.push(pid);
        }
    }
    let children: Vec<u32> = servers
        .iter()
        .copied()
        .filter(|p| {
            proc_status(*p, "PPid")
                .parse::<u32>()
                .is_ok_and(|pp| servers.contains(&pp))
        })
        .collect();
    assert_eq!(
        (servers.len(), children.len()),
        (2, 1),
        "one page server (waiter and jailed child) for the remote snapshot: {servers:?}"
    );
    let pid = children[0];
    assert_eq!(proc_status(pid, "Seccomp"), "2", "seccomp mode");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    for k in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(proc_status(pid, k), "0000000000000000", "{k}");
    }
    let nspid = proc_status(pid, "NSpid");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "NSpid"
    );
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let uid = proc_status(pid, "Uid");
        assert_eq!(
            uid.split_whitespace().next(),
            Some("999999"),
            "the remote page servers' uid: {uid}"
        );
    }
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "shares the {ns} namespace with the host");
    }
    let mine = std::fs::read_link("/proc/self/ns/net").unwrap();
    let its = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(
        mine, its,
        "the host's network namespace, to reach the remote"
    );
    let snap = home.join("remote-cache/lazy/r/workspaces/w/snapshots/t");
    // Confined, it still does its work: the memory chunks it fetched went into the host's cache
    // (as its uid), and nothing failed on the way (a write refused, a call denied).
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::MetadataExt;
        let by_server = std::fs::read_dir(home.join("remote-cache/chunks"))
            .unwrap()
            .flatten()
            .filter(|e| e.metadata().is_ok_and(|m| m.uid() == 999_999))
            .count();
        assert!(by_server > 0, "the page server put no chunk in the cache");
    }
    let log = std::fs::read_to_string(snap.join("pageserver.log")).unwrap_or_default();
    assert!(
        !log.lines()
            .any(|l| l.contains(" WARN ") || l.contains(" ERROR ")),
        "{log}"
    );
    let inside =
        |p: &Path| Path::new(&format!("/proc/{pid}/root")).join(p.strip_prefix("/").unwrap());
    assert!(inside(&snap.join("memory.bin")).exists(), "its snapshot");
    assert!(
        inside(&home.join("remote-cache/chunks")).is_dir(),
        "the cache"
    );
    for absent in [
        hidden,
        &home.join("workspaces"),
        &home.join("remotes.json"),
        Path::new("/etc/passwd"),
        Path::new("/usr/bin"),
        Path::new("/root"),
    ] {
        assert!(
            !inside(absent).exists(),
            "{} is visible in the page server's jail",
            absent.display()
        );
    }
}

/// Chunks in a host's chunk cache.
fn cache_count(home: &Path) -> usize {
    std::fs::read_dir(home.join("remote-cache/chunks"))
        .map(|d| {
            d.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn remote_killed_mid_fork_stops_the_fork_naming_the_chunk() {
    let Some(mut s3) = setup("remote_killed_mid_fork_stops_the_fork_naming_the_chunk") else {
        return;
    };
    let a = Host::new("remote-kill-a", &s3);
    a.add_remote(&s3, "r", "k");
    // Every round verifies and rewrites the whole 16 MiB region: a fork needs several memory
    // chunks before it counts on.
    a.ok(&[
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--mem",
        "128",
        "--cmdline",
        "mode=counter mem=16 tick_ms=5 layout=1",
    ]);
    a.ok(&["start", "w"]);
    a.home.wait_counts("w", &[10]);
    a.ok(&["snapshot", "create", "w", "--tag", "t"]);
    let want = a.saved_count("w", "t");
    a.ok(&["snapshot", "push", "w", "t", "r"]);
    a.ok(&["halt", "w"]);

    let b = Host::new("remote-kill-b", &s3);
    b.add_remote(&s3, "r", "k");
    // Each memory chunk takes a while to come: the remote dies while the fork needs more.
    let o = b.run_env(
        &["--json", "create", "f", "--from-snapshot", "r/w:t"],
        &[("MICROAGENT_TEST_SLOW_AT", "lazy-chunk:1500")],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let eager = cache_count(&b.home.dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while cache_count(&b.home.dir) == eager {
        assert!(
            std::time::Instant::now() < deadline,
            "no memory chunk ever arrived"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    s3.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let st = b.json(&["status", "f"]);
        if st["state"] != "running" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the fork runs on without its memory: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(b.home.ws("f").join("vmm.log")).unwrap_or_default();
    assert!(
        log.contains("memory.bin chunk")
            && log.contains("is missing")
            && log.contains("unreachable"),
        "the error does not name the chunk: {log}"
    );
    eprintln!(
        "the fork stopped: {}",
        log.lines()
            .find(|l| l.contains("memory.bin chunk"))
            .unwrap_or("")
    );
    // `status` says why, not only that it crashed.
    let st = b.json(&["status", "f"]);
    assert_eq!(st["state"], "crashed", "{st}");
    assert!(
        st["failure"]
            .as_str()
            .is_some_and(|f| f.contains("memory.bin chunk")),
        "status does not say why the fork stopped: {st}"
    );
    // It never ran on memory it was not given: no mismatch, and every count it printed
    // continues the snapshot's.
    let console = b.home.console("f");
    assert!(!console.contains("ERROR"), "{console}");
    assert!(
        counts(&console).iter().all(|(_, c)| *c >= want),
        "{console}"
    );
    let _ = b.run(&["delete", "f", "--yes"]);
}
