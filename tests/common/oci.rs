//! Building OCI images for tests: layers (tar), OCI layouts, a private registry, and a state
//! root for image tests. Shared by tests/images.rs and the Linux-guest tests that need an image.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

pub const MTIME: u64 = 1_700_000_000;
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

// ---------------------------------------------------------------------------------------------
// Tools and the agent binary.

pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// True when every tool is installed; otherwise prints why the test is skipped.
pub fn tools_or_skip(test: &str, tools: &[(&str, &str)]) -> bool {
    for (t, package) in tools {
        if tool(t).is_none() {
            super::require::skip(
                test,
                "tools",
                &format!("{t} is not installed (apt-get install {package})"),
            );
            return false;
        }
    }
    true
}

pub const BASE_TOOLS: &[(&str, &str)] = &[
    ("mkfs.ext4", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("busybox", "busybox-static"),
];
pub const REGISTRY_TOOLS: &[(&str, &str)] =
    &[("skopeo", "skopeo"), ("docker-registry", "docker-registry")];

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The static guest agent: `$MICROAGENT_AGENT`, a release build in target/, else built here
/// (into its own target directory, so it never waits on the lock of the running `cargo test`).
pub fn agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("MICROAGENT_AGENT").filter(|v| !v.is_empty()) {
                return PathBuf::from(p);
            }
            let triple = "x86_64-unknown-linux-gnu/release/microagent-agent";
            let prebuilt = workspace_root().join("target").join(triple);
            if prebuilt.is_file() {
                return prebuilt;
            }
            let target_dir = workspace_root().join("target/image-tests-agent");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let st = Command::new(cargo)
                .current_dir(workspace_root())
                .args([
                    "build",
                    "--release",
                    "-p",
                    "guest-agent",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env("CARGO_TARGET_DIR", &target_dir)
                .status()
                .expect("run cargo to build the guest agent");
            assert!(st.success(), "building the static guest agent failed");
            target_dir.join(triple)
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Running microagent with a private state root (never through the process-wide environment).

pub struct Home {
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
}

impl Home {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ma-images-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Home {
            dir,
            env: vec![
                ("MICROAGENT_AGENT".into(), agent().display().to_string()),
                // No docker credentials of whoever runs the tests.
                ("DOCKER_CONFIG".into(), "/nonexistent".into()),
            ],
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(super::bin());
        c.args(args)
            .env("MICROAGENT_HOME", self.state())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(self.command(args), Duration::from_secs(300))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "microagent {args:?} failed ({:?}):\n{}\n{}",
            o.status,
            super::stdout(&o),
            super::stderr(&o)
        );
        super::stdout(&o)
    }

    /// `image pull --json`: the built rootfs path and the JSON answer.
    pub fn pull(&self, reference: &str, extra: &[&str]) -> (PathBuf, Value) {
        let mut args = vec!["--json", "image", "pull", reference, "--headroom", "16"];
        args.extend_from_slice(extra);
        let v: Value = serde_json::from_str(self.ok(&args).trim()).unwrap();
        (PathBuf::from(v["rootfs"].as_str().unwrap()), v)
    }

    /// A pull that must fail: its exit code and stderr.
    pub fn pull_err(&self, reference: &str) -> (i32, String) {
        let o = self.run(&["image", "pull", reference, "--headroom", "16"]);
        assert!(
            !o.status.success(),
            "pull of {reference} succeeded:\n{}",
            super::stdout(&o)
        );
        (o.status.code().unwrap_or(-1), super::stderr(&o))
    }

    /// Everything in the image cache but its lock file: must be nothing after a refused image.
    pub fn cache_listing(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state().join("images"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock")
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        // Stop any VMM a failed test left behind.
        if let Ok(entries) = std::fs::read_dir(self.state().join("workspaces")) {
            for e in entries.flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path().join("vmm.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // SAFETY: killing a VMM this test started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run_with_timeout(mut c: Command, timeout: Duration) -> Output {
    let child = c.spawn().expect("spawn");
    let pid = child.id() as i32;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: killing our own child, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        true
    });
    let out = child.wait_with_output().expect("wait");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        !killer.join().unwrap(),
        "{c:?} did not finish within {timeout:?}"
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Layers and OCI layouts written by hand.

pub struct Layer(pub tar::Builder<Vec<u8>>);

impl Layer {
    pub fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }

    pub fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(MTIME);
        h.set_size(size);
        h
    }

    pub fn dir(mut self, path: &str, mode: u32) -> Self {
        self.dir_owned(path, mode, 0, 0);
        self
    }

    pub fn dir_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64) {
        let mut h = Self::header(tar::EntryType::Directory, mode, uid, gid, 0);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        self.file_owned(path, mode, 0, 0, data);
        self
    }

    pub fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) {
        let mut h = Self::header(tar::EntryType::Regular, mode, uid, gid, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
    }

    pub fn link(mut self, kind: tar::EntryType, path: &str, target: &str) -> Self {
        let mut h = Self::header(kind, 0o777, 0, 0, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn node(
        mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Self {
        let mut h = Self::header(kind, mode, 0, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// An entry with a name or link the tar crate would refuse to write (`..`, absolute).
    pub fn raw(mut self, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) -> Self {
        let mut h = Self::header(kind, 0o644, 0, 0, data.len() as u64);
        {
            let old = h.as_old_mut();
            old.name = [0; 100];
            old.name[..name.len()].copy_from_slice(name.as_bytes());
            old.linkname = [0; 100];
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        let buf = self.0.get_mut();
        buf.extend_from_slice(h.as_bytes());
        buf.extend_from_slice(data);
        buf.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        self
    }

    pub fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

pub fn sha256(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    format!(
        "sha256:{}",
        d.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

pub fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

pub type Mutation = Box<dyn Fn(usize, Vec<u8>) -> Vec<u8>>;

/// How to write a layout; the defaults give a well-formed linux/amd64 image tagged `v1`.
pub struct LayoutOpts {
    pub arch: &'static str,
    /// Put the manifest inside an index with this platform (a multi-platform image).
    pub in_index: bool,
    /// Changes a layer's compressed blob before it is named (digest and size follow it).
    pub mutate: Option<Mutation>,
}

impl Default for LayoutOpts {
    fn default() -> Self {
        LayoutOpts {
            arch: "amd64",
            in_index: false,
            mutate: None,
        }
    }
}

pub struct Written {
    pub manifest_digest: String,
    pub layer_blobs: Vec<PathBuf>,
}

pub fn write_blob(dir: &Path, bytes: &[u8]) -> (String, u64, PathBuf) {
    let d = sha256(bytes);
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    (d, bytes.len() as u64, p)
}

pub fn write_layout(dir: &Path, tars: &[Vec<u8>], opts: &LayoutOpts) -> Written {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let mut layer_blobs = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        diff_ids.push(sha256(t));
        let mut blob = gzip(t);
        if let Some(m) = &opts.mutate {
            blob = m(i, blob);
        }
        let (d, size, p) = write_blob(dir, &blob);
        layers.push(json!({"mediaType": OCI_LAYER_GZIP, "digest": d, "size": size}));
        layer_blobs.push(p);
    }
    let config = json!({
        "architecture": opts.arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs, _) = write_blob(dir, config.to_string().as_bytes());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cd, "size": cs},
        "layers": layers,
    });
    let (md, ms, _) = write_blob(dir, manifest.to_string().as_bytes());
    let ref_name = json!({"org.opencontainers.image.ref.name": "v1"});
    let top = if opts.in_index {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": md, "size": ms,
                           "platform": {"architecture": opts.arch, "os": "linux"}}],
        });
        let (id, is, _) = write_blob(dir, index.to_string().as_bytes());
        json!({"mediaType": OCI_INDEX, "digest": id, "size": is, "annotations": ref_name})
    } else {
        json!({"mediaType": OCI_MANIFEST, "digest": md, "size": ms, "annotations": ref_name})
    };
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    Written {
        manifest_digest: md,
        layer_blobs,
    }
}

// A private registry.

pub struct Registry {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl Registry {
    /// `docker-registry` on a free loopback port, storage and config in a temporary directory;
    /// with `htpasswd`, basic auth for `user:secret`.
    pub fn start(name: &str, htpasswd: bool) -> Registry {
        let dir = std::env::temp_dir().join(format!("ma-registry-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut auth = String::new();
        if htpasswd {
            let hash = Command::new("python3")
                .args(["-W", "ignore", "-c", "import crypt; print(crypt.crypt('secret', '$2b$10$' + 'abcdefghijklmnopqrstuu'))"])
                .output()
                .unwrap();
            let hash = String::from_utf8(hash.stdout).unwrap();
            assert!(hash.starts_with("$2b$"), "no bcrypt from python3's crypt");
            std::fs::write(dir.join("htpasswd"), format!("user:{}\n", hash.trim())).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.join("htpasswd").display()
            );
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
            dir.join("storage").display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(tool("docker-registry").unwrap())
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let r = Registry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut b = [0u8; 12];
                if s.read_exact(&mut b).is_ok() && b.starts_with(b"HTTP/") {
                    return r;
                }
            }
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                std::fs::read_to_string(r.dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn reference(&self, repo: &str) -> String {
        format!("127.0.0.1:{}/{repo}", self.port)
    }

    /// `skopeo copy` from a layout (or any skopeo source) into this registry.
    pub fn push(&self, src: &str, repo: &str, creds: Option<&str>) {
        let mut c = Command::new(tool("skopeo").unwrap());
        c.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if let Some(cr) = creds {
            c.args(["--dest-creds", cr]);
        }
        let o = c
            .arg(src)
            .arg(format!("docker://{}", self.reference(repo)))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The registry's stored copy of a blob.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.dir
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
