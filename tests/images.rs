//! End-to-end tests of OCI images: `microagent image pull|list|rm` and `create --image`.
//!
//! The test image is built here from files: two gzip layers with a whiteout, an opaque
//! directory, a symlink, a hard link, setuid and setgid files, a device node, a fifo and a long
//! path. It is written as an OCI layout, pushed with `skopeo copy` to a real registry (Debian's
//! `docker-registry`, started by each test on a free 127.0.0.1 port with its own storage) and
//! saved as a docker archive; each source must give an ext4 image whose contents, read back
//! with `debugfs` (no mount), are exactly the image plus the agent and init. Hostile images must
//! be refused with a clear error, write nothing outside their build directory and leave no
//! cache entry behind.
//!
//! Needs e2fsprogs, busybox-static, skopeo and docker-registry; a test whose tools are missing
//! says so and is skipped.

mod common;
use common::oci::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// The test image and what its ext4 image must hold.

const LONG_DIR: &str = "usr/share/a-directory-name-long-enough-that-the-whole-path-needs-a-gnu-or-pax-long-name-record-in-tar";

fn big_data() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn test_layers() -> Vec<Vec<u8>> {
    let mut l1 = Layer::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("home", 0o755)
        .dir("opaque", 0o755)
        .dir("opaque/sub", 0o755)
        .dir("dev", 0o755)
        .dir("proc", 0o555)
        .dir("sys", 0o555)
        .dir("run", 0o755)
        .dir("tmp", 0o1777)
        .dir("usr", 0o755)
        .dir("usr/lib", 0o755)
        .dir("usr/share", 0o755)
        .dir("var", 0o755)
        .file("etc/hello", 0o644, b"hello v1\n")
        .file("etc/remove-me", 0o644, b"bye\n")
        .file("opaque/lower", 0o644, b"lower\n")
        .file("opaque/sub/deeper", 0o644, b"deeper\n")
        .file("bin/tool", 0o4755, b"#!/bin/sh\necho tool\n")
        .link(tar::EntryType::Link, "bin/tool-hard", "bin/tool")
        .link(tar::EntryType::Symlink, "bin/tool-link", "tool")
        .file("usr/lib/big", 0o644, &big_data())
        .node(tar::EntryType::Char, "dev/null", 0o666, 1, 3)
        .node(tar::EntryType::Fifo, "var/fifo", 0o640, 0, 0);
    l1.dir_owned("home/user", 0o750, 1000, 1000);
    l1.file_owned("home/user/notes", 0o600, 1000, 1000, b"mine\n");
    l1.dir_owned(LONG_DIR, 0o755, 0, 0);
    l1.file_owned(&format!("{LONG_DIR}/file.txt"), 0o644, 0, 0, b"long\n");
    let mut l2 = Layer::new()
        .file("etc/.wh.remove-me", 0o644, b"")
        .file("opaque/.wh..wh..opq", 0o644, b"")
        .file("opaque/upper", 0o644, b"upper\n")
        .file("etc/hello", 0o640, b"hello v2\n");
    l2.file_owned("bin/setgid-tool", 0o2755, 0, 50, b"#!/bin/sh\n");
    vec![l1.tar(), l2.tar()]
}

/// One expected inode: `ls -p` mode (type and permissions), owner, and what to check inside.
struct Want {
    mode: u32,
    uid: u32,
    gid: u32,
    data: Option<Vec<u8>>,
}

fn want(mode: u32, data: Option<&[u8]>) -> Want {
    Want {
        mode,
        uid: 0,
        gid: 0,
        data: data.map(|d| d.to_vec()),
    }
}

fn expected() -> BTreeMap<String, Want> {
    let mut m = BTreeMap::new();
    for (d, mode) in [
        ("/bin", 0o755),
        ("/etc", 0o755),
        ("/home", 0o755),
        ("/opaque", 0o755),
        ("/dev", 0o755),
        ("/proc", 0o555),
        ("/sys", 0o555),
        ("/run", 0o755),
        ("/tmp", 0o1777),
        ("/usr", 0o755),
        ("/usr/lib", 0o755),
        ("/usr/share", 0o755),
        ("/var", 0o755),
        (&format!("/{LONG_DIR}") as &str, 0o755),
    ] {
        m.insert(d.to_string(), want(0o040000 | mode, None));
    }
    m.insert("/etc/hello".into(), want(0o100640, Some(b"hello v2\n")));
    m.insert("/opaque/upper".into(), want(0o100644, Some(b"upper\n")));
    m.insert(
        "/bin/tool".into(),
        want(0o104755, Some(b"#!/bin/sh\necho tool\n")),
    );
    m.insert(
        "/bin/tool-hard".into(),
        want(0o104755, Some(b"#!/bin/sh\necho tool\n")),
    );
    m.insert("/bin/tool-link".into(), want(0o120777, None));
    m.insert(
        "/bin/setgid-tool".into(),
        Want {
            gid: 50,
            ..want(0o102755, Some(b"#!/bin/sh\n"))
        },
    );
    m.insert("/usr/lib/big".into(), want(0o100644, Some(&big_data())));
    m.insert(
        format!("/{LONG_DIR}/file.txt"),
        want(0o100644, Some(b"long\n")),
    );
    m.insert("/dev/null".into(), want(0o020666, None));
    m.insert("/var/fifo".into(), want(0o010640, None));
    m.insert(
        "/home/user".into(),
        Want {
            uid: 1000,
            gid: 1000,
            ..want(0o040750, None)
        },
    );
    m.insert(
        "/home/user/notes".into(),
        Want {
            uid: 1000,
            gid: 1000,
            ..want(0o100600, Some(b"mine\n"))
        },
    );
    // What microagent adds.
    m.insert("/.microagent".into(), want(0o040755, None));
    m.insert("/.microagent/agent".into(), want(0o100755, None));
    m.insert("/.microagent/busybox".into(), want(0o100755, None));
    m.insert("/.microagent/init".into(), want(0o100755, None));
    m.insert("/.microagent/config.json".into(), want(0o100644, None));
    m.insert("/dev/console".into(), want(0o020600, None));
    m.insert("/lost+found".into(), want(0o040700, None));
    m
}

// ---------------------------------------------------------------------------------------------
// Reading an ext4 image with debugfs.

#[derive(Debug, Clone)]
struct Node {
    inode: u64,
    mode: u32,
    uid: u32,
    gid: u32,
}

fn debugfs(img: &Path, request: &str) -> Vec<u8> {
    let o = Command::new(tool("debugfs").unwrap())
        .arg("-R")
        .arg(request)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "debugfs {request}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Every path in the image (`ls -p` of each directory).
fn walk(img: &Path) -> BTreeMap<String, Node> {
    let mut all = BTreeMap::new();
    let mut dirs = vec!["/".to_string()];
    while let Some(dir) = dirs.pop() {
        let listing =
            String::from_utf8_lossy(&debugfs(img, &format!("ls -p \"{dir}\""))).into_owned();
        for line in listing.lines().filter(|l| l.starts_with('/')) {
            let f: Vec<&str> = line.split('/').collect();
            let (name, mode) = (f[5], u32::from_str_radix(f[2], 8).unwrap());
            if name.is_empty() || name == "." || name == ".." || f[1] == "0" {
                continue;
            }
            let path = if dir == "/" {
                format!("/{name}")
            } else {
                format!("{dir}/{name}")
            };
            if mode & 0o170000 == 0o040000 {
                dirs.push(path.clone());
            }
            all.insert(
                path,
                Node {
                    inode: f[1].parse().unwrap(),
                    mode,
                    uid: f[3].parse().unwrap(),
                    gid: f[4].parse().unwrap(),
                },
            );
        }
    }
    all
}

/// Checks that `img` holds exactly the test image plus microagent's files.
fn check_tree(img: &Path) {
    let got = walk(img);
    let want = expected();
    let got_paths: BTreeSet<&String> = got.keys().collect();
    let want_paths: BTreeSet<&String> = want.keys().collect();
    assert_eq!(
        got_paths,
        want_paths,
        "paths differ: extra {:?}, missing {:?}",
        got_paths.difference(&want_paths).collect::<Vec<_>>(),
        want_paths.difference(&got_paths).collect::<Vec<_>>()
    );
    for (p, w) in &want {
        let n = &got[p];
        assert_eq!(
            (n.mode, n.uid, n.gid),
            (w.mode, w.uid, w.gid),
            "{p}: mode {:o}",
            n.mode
        );
        if let Some(d) = &w.data {
            assert!(
                debugfs(img, &format!("cat \"{p}\"")) == *d,
                "{p}: contents differ"
            );
        }
    }
    // The hard link shares the inode; the symlink points where it did; devices keep numbers.
    assert_eq!(got["/bin/tool"].inode, got["/bin/tool-hard"].inode);
    let stat =
        |p: &str| String::from_utf8_lossy(&debugfs(img, &format!("stat \"{p}\""))).into_owned();
    assert!(stat("/bin/tool").contains("Links: 2"));
    assert!(
        stat("/bin/tool-link").contains("Fast link dest: \"tool\""),
        "{}",
        stat("/bin/tool-link")
    );
    assert!(stat("/dev/null").contains("Device major/minor number: 01:03"));
    assert!(stat("/dev/console").contains("Device major/minor number: 05:01"));
    assert!(
        stat("/etc/hello").contains(&format!("{MTIME:x}")),
        "mtime kept"
    );
    // The agent and init in place.
    assert!(
        debugfs(img, "cat /.microagent/agent") == std::fs::read(agent()).unwrap(),
        "agent differs"
    );
    assert!(
        debugfs(img, "cat /.microagent/busybox")
            == std::fs::read(tool("busybox").unwrap()).unwrap()
    );
    let init = String::from_utf8(debugfs(img, "cat /.microagent/init")).unwrap();
    assert!(init.starts_with("#!/.microagent/busybox sh\n"), "{init}");
    for needle in [
        "mount -t proc",
        "mount -t sysfs",
        "devtmpfs",
        "mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run",
        "mount -t tmpfs -o nosuid,nodev,noexec,mode=0700 secrets /run/secrets",
        "/.microagent/agent 2>/dev/console",
    ] {
        assert!(init.contains(needle), "init lacks {needle:?}:\n{init}");
    }
    let cfg: Value = serde_json::from_slice(&debugfs(img, "cat /.microagent/config.json")).unwrap();
    assert_eq!(cfg["Cmd"], json!(["/bin/sh"]));
    // And the file system is clean.
    let fsck = Command::new(tool("e2fsck").unwrap())
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

// ---------------------------------------------------------------------------------------------
fn sha_of_file(p: &Path) -> String {
    sha256(&std::fs::read(p).unwrap())
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn registry_pull_builds_the_exact_image_and_caches_it() {
    let test = "registry_pull_builds_the_exact_image_and_caches_it";
    if !tools_or_skip(test, BASE_TOOLS) || !tools_or_skip(test, REGISTRY_TOOLS) {
        return;
    }
    let h = Home::new("registry");
    let layout = h.dir.join("layout");
    let written = write_layout(&layout, &test_layers(), &LayoutOpts::default());
    let reg = Registry::start("pull", false);
    reg.push(&format!("oci:{}:v1", layout.display()), "test/img:v1", None);
    let reference = reg.reference("test/img:v1");

    let (img, v) = h.pull(&reference, &[]);
    assert_eq!(v["built"], json!(true));
    assert_eq!(v["image"]["digest"], json!(written.manifest_digest));
    assert_eq!(v["image"]["layers"], json!(2));
    assert_eq!(
        img,
        h.state()
            .join("images")
            .join(format!("sha256-{}", &written.manifest_digest[7..]))
            .join("rootfs.ext4")
    );
    check_tree(&img);
    // Sized to content plus headroom: the files are ~0.3 MiB (+ agent and busybox).
    let size = std::fs::metadata(&img).unwrap().len();
    assert!(size < 128 << 20, "image is {size} bytes");

    // Again: the cache answers, nothing is built.
    let (img2, v2) = h.pull(&reference, &[]);
    assert_eq!((img2, v2["built"].clone()), (img.clone(), json!(false)));
    let list: Value = serde_json::from_str(&h.ok(&["--json", "image", "list"])).unwrap();
    assert_eq!(list["images"].as_array().unwrap().len(), 1);
    assert_eq!(
        list["images"][0]["meta"]["references"],
        json!([format!("{}", reference)])
    );

    // create --image copies the cached disk; with the registry gone, the cache still serves.
    // (A Linux kernel path, so the image's boot arguments are the default; never booted here.)
    let kernel = h.dir.join("vmlinux");
    std::fs::write(&kernel, b"not booted").unwrap();
    let kernel = kernel.display().to_string();
    h.ok(&["create", "ws1", "--kernel", &kernel, "--image", &reference]);
    drop(reg);
    h.ok(&["create", "ws2", "--kernel", &kernel, "--image", &reference]);
    for ws in ["ws1", "ws2"] {
        let dir = h.state().join("workspaces").join(ws);
        let disk = dir.join("rootfs.ext4");
        assert_eq!(std::fs::metadata(&disk).unwrap().len(), size);
        assert_eq!(debugfs(&disk, "cat /etc/hello"), b"hello v2\n");
        let cfg: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(
            cfg["image"],
            json!(format!("{reference}@{}", written.manifest_digest))
        );
        assert!(
            cfg["cmdline"].as_str().unwrap().contains(
                "root=/dev/vda rootfstype=ext4 rw rootflags=noinit_itable init=/.microagent/init"
            ),
            "{cfg}"
        );
    }
    // The workspace's disk is its own: writing to it leaves the cache alone.
    let before = sha_of_file(&img);
    let ws_disk = h.state().join("workspaces/ws1/rootfs.ext4");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ws_disk)
        .unwrap()
        .write_all(b"scribble")
        .unwrap();
    assert_eq!(sha_of_file(&img), before);

    // rm by reference: gone from the list, and its directory with it.
    h.ok(&["image", "rm", &reference]);
    assert!(!img.exists());
    assert!(h.cache_listing().is_empty(), "{:?}", h.cache_listing());
    let o = h.run(&["image", "rm", &reference]);
    assert_eq!(o.status.code(), Some(3), "{}", common::stderr(&o));
}

#[test]
fn oci_layout_and_docker_archive_give_the_same_image() {
    let test = "oci_layout_and_docker_archive_give_the_same_image";
    if !tools_or_skip(test, BASE_TOOLS) {
        return;
    }
    let h = Home::new("local");
    let layout = h.dir.join("layout");
    let written = write_layout(&layout, &test_layers(), &LayoutOpts::default());
    let (img, v) = h.pull(&format!("oci:{}:v1", layout.display()), &[]);
    assert_eq!(v["image"]["digest"], json!(written.manifest_digest));
    check_tree(&img);
    // Without a tag, the layout's only image.
    let (img2, v2) = h.pull(&format!("oci:{}", layout.display()), &[]);
    assert_eq!((img2, v2["built"].clone()), (img, json!(false)));
    let (code, err) = h.pull_err(&format!("oci:{}:v9", layout.display()));
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("no image tagged \"v9\"") && err.contains("v1"),
        "{err}"
    );

    if !tools_or_skip(&format!("{test} (docker archive)"), &[("skopeo", "skopeo")]) {
        return;
    }
    let archive = h.dir.join("img.tar");
    let o = Command::new(tool("skopeo").unwrap())
        .args(["--insecure-policy", "copy"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker-archive:{}:test/img:v1", archive.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (img3, v3) = h.pull(&format!("docker-archive:{}", archive.display()), &[]);
    assert_eq!(v3["built"], json!(true));
    check_tree(&img3);
    // By its tag, too; the same cache entry.
    let (img4, v4) = h.pull(
        &format!("docker-archive:{}:test/img:v1", archive.display()),
        &[],
    );
    assert_eq!((img4, v4["built"].clone()), (img3, json!(false)));
}

/// Pulls a hostile layout and checks the refusal: exit code, message, nothing left behind.
fn refused(h: &Home, layout: &Path, code: i32, needles: &[&str]) {
    let (got, err) = h.pull_err(&format!("oci:{}:v1", layout.display()));
    eprintln!("refused as expected: {}", err.trim());
    assert_eq!(got, code, "{err}");
    for n in needles {
        assert!(err.contains(n), "error lacks {n:?}: {err}");
    }
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(
        h.cache_listing().is_empty(),
        "the cache kept {:?} after: {err}",
        h.cache_listing()
    );
}

#[test]
fn hostile_images_are_refused_and_leave_nothing() {
    let test = "hostile_images_are_refused_and_leave_nothing";
    if !tools_or_skip(test, BASE_TOOLS) {
        return;
    }
    let mut h = Home::new("hostile");
    let layout = h.dir.join("layout");
    let passwd = sha_of_file(Path::new("/etc/passwd"));
    let outside = std::env::temp_dir().join(format!("ma-escape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&outside);
    std::fs::create_dir_all(&outside).unwrap();
    let ok_layer = Layer::new()
        .dir("etc", 0o755)
        .file("etc/ok", 0o644, b"ok\n")
        .tar();

    // 1. A path that climbs out of the root.
    let bad = Layer::new()
        .dir("etc", 0o755)
        .raw(tar::EntryType::Regular, "../../etc/passwd", "", b"pwned\n")
        .tar();
    write_layout(&layout, &[ok_layer.clone(), bad], &LayoutOpts::default());
    refused(
        &h,
        &layout,
        2,
        &[
            "layer 2",
            "../../etc/passwd",
            "climbs out of the image root",
        ],
    );
    assert!(!h.state().join("etc").exists() && !h.state().join("images/etc").exists());

    // 2. A symlink that leads out, then a write through it.
    let up = "../".repeat(12);
    let target = format!(
        "{up}{}",
        outside.display().to_string().trim_start_matches('/')
    );
    let bad = Layer::new()
        .link(tar::EntryType::Symlink, "escape", &target)
        .raw(tar::EntryType::Regular, "escape/pwned", "", b"pwned\n")
        .tar();
    write_layout(&layout, &[bad], &LayoutOpts::default());
    refused(
        &h,
        &layout,
        2,
        &[
            "layer 1",
            "escape/pwned",
            "symlink /escape",
            "leads outside the image root",
        ],
    );
    // An absolute symlink is the image's own root: the write lands inside the image.
    let contained = Layer::new()
        .link(
            tar::EntryType::Symlink,
            "abs",
            &outside.display().to_string(),
        )
        .raw(tar::EntryType::Regular, "abs/inside", "", b"inside\n")
        .tar();
    write_layout(&layout, &[contained], &LayoutOpts::default());
    let (img, _) = h.pull(&format!("oci:{}:v1", layout.display()), &[]);
    assert_eq!(
        debugfs(&img, &format!("cat \"{}/inside\"", outside.display())),
        b"inside\n"
    );
    h.ok(&["image", "rm", &format!("oci:{}:v1", layout.display())]);
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written outside"
    );

    // 3. A blob whose bytes do not match its digest.
    let w = write_layout(
        &layout,
        &[ok_layer.clone(), test_layers()[1].clone()],
        &LayoutOpts::default(),
    );
    let mut blob = std::fs::read(&w.layer_blobs[1]).unwrap();
    let mid = blob.len() / 2;
    blob[mid] ^= 0xff;
    std::fs::write(&w.layer_blobs[1], blob).unwrap();
    refused(&h, &layout, 2, &["layer 2", "digest mismatch"]);

    // 4. Only another architecture: in an index, and as a plain manifest.
    write_layout(
        &layout,
        std::slice::from_ref(&ok_layer),
        &LayoutOpts {
            arch: "arm64",
            in_index: true,
            ..Default::default()
        },
    );
    refused(&h, &layout, 2, &["no linux/amd64 image", "linux/arm64"]);
    write_layout(
        &layout,
        std::slice::from_ref(&ok_layer),
        &LayoutOpts {
            arch: "arm64",
            ..Default::default()
        },
    );
    refused(&h, &layout, 2, &["no linux/amd64 image", "linux/arm64"]);

    // 5. A truncated layer, correctly named (digest and size of the short blob).
    write_layout(
        &layout,
        &[ok_layer.clone(), test_layers()[0].clone()],
        &LayoutOpts {
            mutate: Some(Box::new(
                |i, b: Vec<u8>| if i == 1 { b[..b.len() / 2].to_vec() } else { b },
            )),
            ..Default::default()
        },
    );
    refused(&h, &layout, 2, &["layer 2", "truncated or corrupt"]);
    // ... and one cut short on disk (the manifest still names the whole blob).
    let w = write_layout(
        &layout,
        &[ok_layer.clone(), test_layers()[0].clone()],
        &LayoutOpts::default(),
    );
    let blob = std::fs::read(&w.layer_blobs[1]).unwrap();
    std::fs::write(&w.layer_blobs[1], &blob[..blob.len() / 3]).unwrap();
    refused(&h, &layout, 2, &["layer 2", "mismatch"]);

    // 6. A decompression bomb: a few KiB of gzip that inflate to 40 MiB, past an 8 MiB bound;
    // and `create --image` of it leaves no workspace.
    let bomb = Layer::new()
        .dir("etc", 0o755)
        .file("etc/zeros", 0o644, &vec![0u8; 40 << 20])
        .tar();
    write_layout(&layout, &[ok_layer.clone(), bomb], &LayoutOpts::default());
    h.env
        .push(("MICROAGENT_IMAGE_MAX_LAYER_MIB".into(), "8".into()));
    refused(
        &h,
        &layout,
        2,
        &[
            "layer 2",
            "inflates past 8 MiB",
            "MICROAGENT_IMAGE_MAX_LAYER_MIB",
        ],
    );
    let o = h.run(&[
        "create",
        "bomb",
        "--image",
        &format!("oci:{}:v1", layout.display()),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", common::stderr(&o));
    assert!(!h.state().join("workspaces/bomb").exists());
    assert!(h.cache_listing().is_empty(), "{:?}", h.cache_listing());

    assert_eq!(sha_of_file(Path::new("/etc/passwd")), passwd);
    let _ = std::fs::remove_dir_all(&outside);
}

#[test]
fn registry_refusals_tampered_blob_and_foreign_architecture() {
    let test = "registry_refusals_tampered_blob_and_foreign_architecture";
    if !tools_or_skip(test, BASE_TOOLS) || !tools_or_skip(test, REGISTRY_TOOLS) {
        return;
    }
    let h = Home::new("registry-hostile");
    let reg = Registry::start("hostile", false);
    let layout = h.dir.join("layout");
    let w = write_layout(&layout, &test_layers(), &LayoutOpts::default());
    reg.push(
        &format!("oci:{}:v1", layout.display()),
        "test/tampered:v1",
        None,
    );
    // The registry's stored copy changes under it: it serves bytes that are not the blob.
    let stored = reg.blob_file(&sha256(&std::fs::read(&w.layer_blobs[0]).unwrap()));
    let mut bytes = std::fs::read(&stored).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    let (code, err) = h.pull_err(&reg.reference("test/tampered:v1"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("layer 1") && err.contains("digest mismatch"),
        "{err}"
    );
    assert!(h.cache_listing().is_empty(), "{:?}", h.cache_listing());

    // A multi-platform image without linux/amd64.
    write_layout(
        &layout,
        &test_layers(),
        &LayoutOpts {
            arch: "arm64",
            in_index: true,
            ..Default::default()
        },
    );
    reg.push(&format!("oci:{}:v1", layout.display()), "test/arm:v1", None);
    let (code, err) = h.pull_err(&reg.reference("test/arm:v1"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no linux/amd64 image") && err.contains("linux/arm64"),
        "{err}"
    );

    // Missing things are "not found".
    let (code, err) = h.pull_err(&reg.reference("test/nothing:v1"));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(h.cache_listing().is_empty(), "{:?}", h.cache_listing());
}

#[test]
fn registry_credentials_from_the_flag_and_docker_config() {
    let test = "registry_credentials_from_the_flag_and_docker_config";
    if !tools_or_skip(test, BASE_TOOLS)
        || !tools_or_skip(test, REGISTRY_TOOLS)
        || !tools_or_skip(test, &[("python3", "python3")])
    {
        return;
    }
    let mut h = Home::new("auth");
    let reg = Registry::start("auth", true);
    let layout = h.dir.join("layout");
    write_layout(&layout, &test_layers(), &LayoutOpts::default());
    reg.push(
        &format!("oci:{}:v1", layout.display()),
        "private/img:v1",
        Some("user:secret"),
    );
    let reference = reg.reference("private/img:v1");

    let (code, err) = h.pull_err(&reference);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--registry-auth"), "{err}");
    let o = h.run(&["image", "pull", &reference, "--registry-auth", "user:wrong"]);
    assert!(!o.status.success());

    let (img, _) = h.pull(&reference, &["--registry-auth", "user:secret"]);
    check_tree(&img);
    h.ok(&["image", "rm", &reference]);

    // docker's config.json, as `docker login` writes it.
    let docker = h.dir.join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    let auth = base64("user:secret");
    std::fs::write(
        docker.join("config.json"),
        json!({"auths": {format!("127.0.0.1:{}", reg.port): {"auth": auth}}}).to_string(),
    )
    .unwrap();
    h.env.retain(|(k, _)| k != "DOCKER_CONFIG");
    h.env
        .push(("DOCKER_CONFIG".into(), docker.display().to_string()));
    let (img, v) = h.pull(&reference, &[]);
    assert_eq!(v["built"], json!(true));
    check_tree(&img);
}

fn base64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn pull_progress_on_a_terminal_quiet_with_json() {
    let test = "pull_progress_on_a_terminal_quiet_with_json";
    if !tools_or_skip(test, BASE_TOOLS)
        || !tools_or_skip(test, REGISTRY_TOOLS)
        || !tools_or_skip(test, &[("script", "util-linux")])
    {
        return;
    }
    let h = Home::new("progress");
    let reg = Registry::start("progress", false);
    let layout = h.dir.join("layout");
    write_layout(&layout, &test_layers(), &LayoutOpts::default());
    reg.push(&format!("oci:{}:v1", layout.display()), "test/img:v1", None);
    let reference = reg.reference("test/img:v1");
    // `script` gives the command a terminal and copies what it shows.
    let on_tty = |args: &str| -> String {
        let cmd = format!("{} {args}", common::bin().display());
        let mut c = Command::new(tool("script").unwrap());
        c.args(["-qefc", &cmd, "/dev/null"])
            .env("MICROAGENT_HOME", h.state())
            .envs(h.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let o = run_with_timeout(c, Duration::from_secs(300));
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let shown = on_tty(&format!("image pull {reference} --headroom 16"));
    for n in [
        "pulling layer 1/2",
        "pulling layer 2/2",
        "KiB",
        "unpacking layer 2/2",
        "building ext4",
        "pulled ",
    ] {
        assert!(shown.contains(n), "progress lacks {n:?}:\n{shown}");
    }
    let quiet = on_tty(&format!(
        "--json image pull {reference} --headroom 16 --force"
    ));
    assert!(
        !quiet.contains("pulling layer") && !quiet.contains("unpacking"),
        "{quiet}"
    );
    let v: Value = serde_json::from_str(quiet.trim()).unwrap();
    assert_eq!(v["built"], json!(true));
    // Not a terminal: no progress either.
    let o = h.run(&["image", "pull", &reference, "--headroom", "16", "--force"]);
    assert!(o.status.success());
    assert!(common::stderr(&o).is_empty(), "{}", common::stderr(&o));
}

#[test]
fn unprivileged_build_gives_the_same_image() {
    let test = "unprivileged_build_gives_the_same_image";
    if !tools_or_skip(test, BASE_TOOLS) || !tools_or_skip(test, &[("setpriv", "util-linux")]) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("{test}: skipped: needs root to drop to another user (the other tests already run unprivileged)");
        return;
    }
    // As nobody: owners, the setuid bit's owner and device nodes reach the image via debugfs.
    let h = Home::new("unprivileged");
    let layout = h.dir.join("layout");
    write_layout(&layout, &test_layers(), &LayoutOpts::default());
    let st = Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&h.dir)
        .status()
        .unwrap();
    assert!(st.success());
    let agent_copy = h.dir.join("agent");
    std::fs::copy(agent(), &agent_copy).unwrap();
    let mut c = Command::new(tool("setpriv").unwrap());
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(common::bin())
        .args(["--json", "image", "pull", "--headroom", "16"])
        .arg(format!("oci:{}:v1", layout.display()))
        .env("MICROAGENT_HOME", h.state())
        .env("MICROAGENT_AGENT", &agent_copy)
        .env("DOCKER_CONFIG", "/nonexistent")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let o = run_with_timeout(c, Duration::from_secs(300));
    assert!(
        o.status.success(),
        "unprivileged pull: {}",
        common::stderr(&o)
    );
    let v: Value = serde_json::from_str(common::stdout(&o).trim()).unwrap();
    check_tree(Path::new(v["rootfs"].as_str().unwrap()));
}

/// Splits a README command line as a shell would for these simple cases: words, and '...'
/// quoted words.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {line:?}");
    if in_word {
        words.push(cur);
    }
    words
}

/// Whether `got` is the README's `want` line, where `…` stands for any text (pids, times, paths).
fn line_matches(want: &str, got: &str) -> bool {
    let parts: Vec<&str> = want.split('…').collect();
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let got = norm(got);
    let mut rest = got.as_str();
    for (i, p) in parts.iter().enumerate() {
        let p = norm(p);
        if i == 0 {
            let Some(r) = rest.strip_prefix(p.as_str()) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p.as_str());
        } else {
            let Some(at) = rest.find(p.as_str()) else {
                return false;
            };
            rest = &rest[at + p.len()..];
        }
    }
    rest.is_empty()
}

#[test]
fn readme_lines_match_with_ellipses() {
    assert!(line_matches(
        "workspace w started (pid …)",
        "workspace w started (pid 42)"
    ));
    assert!(line_matches(
        "TAG  SIZE …  KIND",
        "TAG SIZE CREATED IMAGE KIND"
    ));
    assert!(!line_matches("v1", "v2"));
    assert!(!line_matches("a … c", "a b d"));
    assert_eq!(
        shell_words("exec b -- sh -c 'echo v1 > /s; cat /s'"),
        ["exec", "b", "--", "sh", "-c", "echo v1 > /s; cat /s"]
    );
}

/// The README's walk-through, run as typed on what a fresh machine has after the set-up: no
/// --kernel (the default kernel), no MICROAGENT_* variables (the agent built into the binary), an
/// image that started as a docker archive and is served by a local registry. Each command's
/// output is compared with the lines the README shows for it.
#[test]
fn readme_walkthrough_runs_as_typed() {
    let test = "readme_walkthrough_runs_as_typed";
    if !tools_or_skip(test, BASE_TOOLS)
        || !tools_or_skip(test, REGISTRY_TOOLS)
        || !common::kvm_or_skip(test)
    {
        return;
    }
    let kernels: Value = serde_json::from_str(&common::stdout(
        &Home::new("walkthrough-kernels").run(&["--json", "kernel", "list"]),
    ))
    .unwrap();
    if !kernels["kernels"]
        .as_array()
        .is_some_and(|k| k.iter().any(|k| k["default"] == true))
    {
        common::require::skip(
            test,
            "linux",
            "this host's default kernel is not built (`microagent kernel build`; scripts/test.sh builds it)",
        );
        return;
    }
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let block = readme
        .split("<!-- walkthrough: tests/images.rs runs this block -->")
        .nth(1)
        .and_then(|r| r.split("```console\n").nth(1))
        .and_then(|r| r.split("\n```").next())
        .expect("the README has the walk-through block");

    // A small image with a shell: the host's static busybox, saved as a docker archive, pushed.
    let mut h = Home::new("walkthrough");
    h.env = vec![("DOCKER_CONFIG".into(), "/nonexistent".into())];
    let busybox = std::fs::read(tool("busybox").unwrap()).unwrap();
    let mut layer = Layer::new()
        .dir("bin", 0o755)
        .dir("etc", 0o755)
        .dir("root", 0o700)
        .dir("tmp", 0o1777)
        .file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "cat", "echo", "uname", "ls", "sleep"] {
        layer = layer.link(tar::EntryType::Symlink, &format!("bin/{applet}"), "busybox");
    }
    let layout = h.dir.join("layout");
    write_layout(&layout, &[layer.tar()], &LayoutOpts::default());
    let archive = h.dir.join("tools.tar");
    let o = Command::new(tool("skopeo").unwrap())
        .args(["--insecure-policy", "copy"])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker-archive:{}:tools:1", archive.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reg = Registry::start("walkthrough", false);
    reg.push(
        &format!("docker-archive:{}", archive.display()),
        "tools:1",
        None,
    );
    let registry = reg.reference("");
    let registry = registry.trim_end_matches('/');

    let mut lines = block.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(cmd) = line.strip_prefix("$ microagent ") else {
            panic!("README walk-through: expected a `$ microagent` line, got {line:?}");
        };
        let mut want = Vec::new();
        while let Some(l) = lines.peek() {
            if l.starts_with("$ ") {
                break;
            }
            want.push(
                lines
                    .next()
                    .unwrap_or_default()
                    .replace("localhost:5000", registry),
            );
        }
        let cmd = cmd.replace("localhost:5000", registry);
        let args = shell_words(&cmd);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        eprintln!("$ microagent {cmd}");
        let o = run_with_timeout(h.command(&argv), Duration::from_secs(600));
        let out = common::stdout(&o);
        assert!(
            o.status.success(),
            "`microagent {cmd}` failed ({:?}):\n{out}\n{}",
            o.status,
            common::stderr(&o)
        );
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(
            got.len(),
            want.len(),
            "`microagent {cmd}` printed\n{out}\nthe README shows\n{}",
            want.join("\n")
        );
        for (w, g) in want.iter().zip(&got) {
            assert!(
                line_matches(w, g),
                "`microagent {cmd}` printed {g:?}, the README shows {w:?}"
            );
        }
    }
}

#[test]
fn bad_references_and_missing_sources() {
    let h = Home::new("refs");
    let o = h.run(&["image", "pull", "Not/Valid"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        common::stderr(&o).contains("invalid image reference"),
        "{}",
        common::stderr(&o)
    );
    let o = h.run(&["image", "pull", "oci:/nonexistent/layout:v1"]);
    assert_eq!(o.status.code(), Some(3), "{}", common::stderr(&o));
    let o = h.run(&["image", "pull", "docker-archive:/nonexistent.tar"]);
    assert_eq!(o.status.code(), Some(3), "{}", common::stderr(&o));
    let o = h.run(&[
        "--json",
        "create",
        "w",
        "--kernel",
        "builtin:testguest",
        "--image",
        "oci:/nonexistent",
    ]);
    assert_eq!(o.status.code(), Some(3));
    let e: Value = serde_json::from_str(common::stderr(&o).trim()).unwrap();
    assert_eq!(e["error"]["code"], json!("not-found"));
    assert!(!h.state().join("workspaces/w").exists());
}
