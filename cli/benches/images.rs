//! Pull + build of a ~100 MiB image from a local registry: `microagent image pull` against
//! `skopeo copy` + `umoci unpack` + `mkfs.ext4 -d`, side by side in one run, alternating.
//!
//! The image (three gzip layers: many small text files, a few large incompressible files, and a
//! layer of changes with whiteouts) is generated here, pushed with skopeo to Debian's
//! `docker-registry` on a free 127.0.0.1 port, and pulled from there by both pipelines. Each run
//! starts from an empty cache / empty directories. Time is wall clock; peak memory is the
//! largest resident set of any process of the pipeline (`wait4` rusage, which covers reaped
//! descendants such as mkfs.ext4). Like every benchmark here it prints and never asserts.
//!
//! `cargo bench -p microagent --bench images` (RUNS=N to change the 3 runs per pipeline).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest as _, Sha256};

fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn sha256(b: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<String>()
    )
}

/// A deterministic byte stream: `text` gives compressible words, otherwise incompressible noise.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn bytes(&mut self, n: usize, text: bool) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "alpha ",
            "kernel ",
            "vsock ",
            "snapshot ",
            "fork ",
            "ext4 ",
            "layer ",
            "agent\n",
            "microvm ",
            "digest ",
            "tar ",
            "image ",
        ];
        let mut v = Vec::with_capacity(n + 16);
        while v.len() < n {
            let r = self.next();
            if text {
                v.extend_from_slice(WORDS[(r % 12) as usize].as_bytes());
            } else {
                v.extend_from_slice(&r.to_le_bytes());
            }
        }
        v.truncate(n);
        v
    }
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(size);
    h
}

/// Three layers, ~100 MiB unpacked.
fn layers() -> Vec<Vec<u8>> {
    let mut g = Gen(0x2545_f491_4f6c_dd1d);
    // 1: ~45 MiB in 3000 text files across 60 directories.
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..60 {
        b.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            format!("usr/share/pkg{d}"),
            &[][..],
        )
        .unwrap();
        for f in 0..50 {
            let n = 1000 + (g.next() % 29_000) as usize;
            let data = g.bytes(n, true);
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, n as u64),
                format!("usr/share/pkg{d}/file{f}.txt"),
                &data[..],
            )
            .unwrap();
        }
    }
    let l1 = b.into_inner().unwrap();
    // 2: ~40 MiB in 5 incompressible binaries.
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(
        &mut header(tar::EntryType::Directory, 0o755, 0),
        "opt/bin",
        &[][..],
    )
    .unwrap();
    for i in 0..5 {
        let data = g.bytes(8 << 20, false);
        b.append_data(
            &mut header(tar::EntryType::Regular, 0o755, data.len() as u64),
            format!("opt/bin/tool{i}"),
            &data[..],
        )
        .unwrap();
    }
    let l2 = b.into_inner().unwrap();
    // 3: ~15 MiB of changes: replaced files, whiteouts, an opaque directory, links.
    let mut b = tar::Builder::new(Vec::new());
    for d in 0..20 {
        b.append_data(
            &mut header(tar::EntryType::Regular, 0, 0),
            format!("usr/share/pkg{d}/.wh.file0.txt"),
            &[][..],
        )
        .unwrap();
        for f in 1..20 {
            let data = g.bytes(30_000, true);
            b.append_data(
                &mut header(tar::EntryType::Regular, 0o644, data.len() as u64),
                format!("usr/share/pkg{d}/file{f}.txt"),
                &data[..],
            )
            .unwrap();
        }
    }
    b.append_data(
        &mut header(tar::EntryType::Regular, 0, 0),
        "usr/share/pkg59/.wh..wh..opq",
        &[][..],
    )
    .unwrap();
    let data = g.bytes(2 << 20, false);
    b.append_data(
        &mut header(tar::EntryType::Regular, 0o4755, data.len() as u64),
        "opt/bin/suid",
        &data[..],
    )
    .unwrap();
    b.append_link(
        &mut header(tar::EntryType::Link, 0o755, 0),
        "opt/bin/tool0-hard",
        "opt/bin/tool0",
    )
    .unwrap();
    b.append_link(
        &mut header(tar::EntryType::Symlink, 0o777, 0),
        "opt/bin/latest",
        "tool4",
    )
    .unwrap();
    let l3 = b.into_inner().unwrap();
    vec![l1, l2, l3]
}

fn write_layout(dir: &Path, tars: &[Vec<u8>]) -> u64 {
    let blob = |bytes: &[u8]| {
        let d = sha256(bytes);
        let p = dir.join("blobs/sha256").join(&d[7..]);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
        (d, bytes.len() as u64)
    };
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut compressed = 0;
    for t in tars {
        diff_ids.push(sha256(t));
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(t).unwrap();
        let (d, s) = blob(&e.finish().unwrap());
        compressed += s;
        layers.push(json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s}));
    }
    let config = json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (cd, cs) = blob(config.to_string().as_bytes());
    let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs}, "layers": layers});
    let (md, ms) = blob(manifest.to_string().as_bytes());
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": "bench"}}]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    compressed
}

/// A run: wall time, the peak RSS (KiB) of the largest process (the command or a descendant,
/// from wait4), and the command's own peak (its VmHWM, polled until it exits).
struct Measured {
    time: Duration,
    tree_kib: u64,
    own_kib: u64,
}

/// Runs a command to completion and measures it.
#[allow(clippy::zombie_processes)] // reaped by wait4, which also gives its rusage
fn measured(mut c: Command) -> Measured {
    let t = Instant::now();
    let child: Child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as i32;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let poller = std::thread::spawn(move || {
        let mut hwm = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            if let Some(v) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                hwm = hwm.max(v);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        hwm
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 reaps our own child and fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let elapsed = t.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let own_kib = poller.join().unwrap_or(0);
    let err = reader.join().unwrap_or_default();
    assert!(
        r == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{c:?} failed: {err}"
    );
    Measured {
        time: elapsed,
        tree_kib: ru.ru_maxrss as u64,
        own_kib,
    }
}

struct Registry(Child, PathBuf);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn start_registry(dir: &Path) -> (Registry, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::create_dir_all(dir).unwrap();
    let cfg = format!(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
        dir.join("storage").display()
    );
    std::fs::write(dir.join("config.yml"), cfg).unwrap();
    let child = Command::new(tool("docker-registry").unwrap())
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reg = Registry(child, dir.to_path_buf());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
            let mut b = [0u8; 5];
            if s.read_exact(&mut b).is_ok() {
                return (reg, port);
            }
        }
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn du_bytes(p: &Path) -> u64 {
    let o = Command::new("du").args(["-sb"]).arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut missing = Vec::new();
    for (t, pkg) in [
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("umoci", "umoci"),
        ("mkfs.ext4", "e2fsprogs"),
        ("busybox", "busybox-static"),
    ] {
        if tool(t).is_none() {
            missing.push(format!("{t} (apt-get install {pkg})"));
        }
    }
    if !missing.is_empty() {
        println!("images bench: skipped: missing {}", missing.join(", "));
        return;
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_microagent"));
    let agent = std::env::var_os("MICROAGENT_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/x86_64-unknown-linux-gnu/release/microagent-agent")
        });
    if !agent.is_file() {
        println!(
            "images bench: skipped: no guest agent at {} (build it: RUSTFLAGS=\"-C target-feature=+crt-static\" \
             cargo build --release -p guest-agent --target x86_64-unknown-linux-gnu, or set MICROAGENT_AGENT)",
            agent.display()
        );
        return;
    }
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let work = std::env::temp_dir().join(format!("ma-bench-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    let tars = layers();
    let unpacked: u64 = tars.iter().map(|t| t.len() as u64).sum();
    let layout = work.join("layout");
    let compressed = write_layout(&layout, &tars);
    drop(tars);
    let (registry, port) = start_registry(&work.join("registry"));
    let reference = format!("127.0.0.1:{port}/bench/img:bench");
    let st = Command::new(tool("skopeo").unwrap())
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:bench", layout.display()))
        .arg(format!("docker://{reference}"))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "skopeo push failed");
    const HEADROOM_MIB: u64 = 256;

    // (seconds, largest process KiB, the pipeline's own processes KiB), and step times.
    let mut ours: Vec<(f64, u64, u64)> = Vec::new();
    let mut theirs: Vec<(f64, [f64; 3], u64, u64)> = Vec::new();
    for run in 0..runs {
        // Alternate which goes first, so neither always finds a warmer page cache.
        for which in if run % 2 == 0 { [0, 1] } else { [1, 0] } {
            let dir = work.join(format!("run{run}-{which}"));
            std::fs::create_dir_all(&dir).unwrap();
            if which == 0 {
                let mut c = Command::new(&bin);
                c.args([
                    "--json",
                    "image",
                    "pull",
                    &reference,
                    "--headroom",
                    &HEADROOM_MIB.to_string(),
                ])
                .env("MICROAGENT_HOME", dir.join("home"))
                .env("MICROAGENT_AGENT", &agent)
                .env("DOCKER_CONFIG", "/nonexistent");
                let m = measured(c);
                ours.push((m.time.as_secs_f64(), m.tree_kib, m.own_kib));
            } else {
                let oci = dir.join("oci");
                let mut c = Command::new(tool("skopeo").unwrap());
                c.args(["--insecure-policy", "copy", "--src-tls-verify=false"])
                    .arg(format!("docker://{reference}"))
                    .arg(format!("oci:{}:bench", oci.display()));
                let pull = measured(c);
                let bundle = dir.join("bundle");
                let mut c = Command::new(tool("umoci").unwrap());
                c.arg("unpack");
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } != 0 {
                    c.arg("--rootless");
                }
                c.arg("--image")
                    .arg(format!("{}:bench", oci.display()))
                    .arg(&bundle);
                let unpack = measured(c);
                let rootfs = bundle.join("rootfs");
                let size_mib = du_bytes(&rootfs) * 11 / 10 / (1 << 20) + HEADROOM_MIB + 64;
                let mut c = Command::new(tool("mkfs.ext4").unwrap());
                c.args(["-q", "-F", "-b", "4096", "-I", "256", "-m", "0", "-d"])
                    .arg(&rootfs)
                    .arg(dir.join("rootfs.ext4"))
                    .arg(format!("{size_mib}M"));
                let ext4 = measured(c);
                let parts = [
                    pull.time.as_secs_f64(),
                    unpack.time.as_secs_f64(),
                    ext4.time.as_secs_f64(),
                ];
                theirs.push((
                    parts.iter().sum(),
                    parts,
                    pull.tree_kib.max(unpack.tree_kib).max(ext4.tree_kib),
                    pull.own_kib.max(unpack.own_kib),
                ));
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    drop(registry);
    let _ = std::fs::remove_dir_all(&work);

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "\nimages: pull + build of a {:.1} MiB image ({} layers, {:.1} MiB gzip) from a local registry, \
         {headroom} MiB headroom; median of {runs} runs each, alternating",
        mib(unpacked),
        3,
        mib(compressed),
        headroom = HEADROOM_MIB
    );
    println!("| pipeline                                   | total s | pull s | unpack s | ext4 s | peak RSS MiB | puller RSS MiB |");
    println!("|--------------------------------------------|--------:|-------:|---------:|-------:|-------------:|---------------:|");
    let med = |v: Vec<f64>| median(v);
    println!(
        "| microagent image pull (one process + mkfs) | {:>7.2} | {:>6} | {:>8} | {:>6} | {:>12.1} | {:>14.1} |",
        med(ours.iter().map(|o| o.0).collect()),
        "-",
        "-",
        "-",
        med(ours.iter().map(|o| o.1 as f64 / 1024.0).collect()),
        med(ours.iter().map(|o| o.2 as f64 / 1024.0).collect())
    );
    println!(
        "| skopeo copy + umoci unpack + mkfs.ext4 -d  | {:>7.2} | {:>6.2} | {:>8.2} | {:>6.2} | {:>12.1} | {:>14.1} |",
        med(theirs.iter().map(|o| o.0).collect()),
        med(theirs.iter().map(|o| o.1[0]).collect()),
        med(theirs.iter().map(|o| o.1[1]).collect()),
        med(theirs.iter().map(|o| o.1[2]).collect()),
        med(theirs.iter().map(|o| o.2 as f64 / 1024.0).collect()),
        med(theirs.iter().map(|o| o.3 as f64 / 1024.0).collect())
    );
    println!(
        "(peak RSS: the largest single process, mkfs.ext4 included (wait4); puller RSS: microagent's own \
         process, or the larger of skopeo and umoci (VmHWM))"
    );
}
