//! The VMM's sandbox, end to end: a running workspace and its fork run jailed (own namespaces,
//! pivot_root into a jail, unprivileged uid, no capabilities, no_new_privs, seccomp filters); a
//! system call outside the filter kills the VMM by SIGSYS and the CLI says so; a guest printing
//! without pause leaves a console log within its bound.
//!
//! The test-only requests (open a host path from inside the VMM, a forbidden system call) need
//! the binary built with `--features test-hooks`; without it those checks are skipped (printed).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{alive, kvm_or_skip, stderr, stdout, Home};

const CMDLINE: &str = "mode=counter mem=2 tick_ms=20";

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The `Key:` line of /proc/PID/status.
fn proc_status(pid: i32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status:\n{text}"))
        .trim()
        .to_string()
}

/// A stopped test-guest workspace that counts once started.
fn create_counter(h: &Home, name: &str) {
    h.ok(&[
        "create",
        name,
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        CMDLINE,
    ]);
}

fn status_json(h: &Home, name: &str) -> serde_json::Value {
    serde_json::from_str(&h.ok(&["--json", "status", name])).unwrap()
}

/// Checks everything the sandbox promises about `name`'s running VMM; returns its uid.
fn assert_confined(h: &Home, name: &str) -> u32 {
    let pid = h.pid(name).expect("vmm.pid");
    assert!(alive(pid), "{name}: VMM {pid} is not running");
    assert_eq!(proc_status(pid, "Seccomp"), "2", "{name}: seccomp mode");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1", "{name}: no_new_privs");
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000", "{name}");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000", "{name}");
    assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000", "{name}");
    // PID 1 of its own PID namespace.
    let nspid = proc_status(pid, "NSpid");
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "{name}: NSpid"
    );
    let uid: u32 = proc_status(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    if is_root() {
        assert_ne!(uid, 0, "{name}: the VMM still runs as root");
    }
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let its = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        assert_ne!(mine, its, "{name}: shares the {ns} namespace with the host");
    }

    // Its root is the jail the CLI reports, and the jail holds only what it needs.
    let s = status_json(h, name);
    assert_eq!(s["sandbox"]["jail"], true, "{s}");
    assert_eq!(s["sandbox"]["seccomp"], true, "{s}");
    assert_eq!(s["sandbox"]["uid"], uid, "{s}");
    let jail = s["sandbox"]["jail_root"].as_str().expect("jail_root");
    // Its root is a tmpfs of its own mount namespace, mounted on the jail directory the CLI
    // reports: the host sees that directory empty (no mount point or device node of the jail
    // is made on the host's filesystem) and the VMM sees its jail there.
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap_or_else(|| panic!("{name}: no root in its mountinfo:\n{mounts}"));
    assert!(
        root_mount.contains(" - tmpfs "),
        "{name}: its root is not a tmpfs of its own: {root_mount}"
    );
    assert!(
        root_mount
            .split(' ')
            .nth(5)
            .is_some_and(|o| o.split(',').any(|o| o == "ro")),
        "{name}: its root is writable: {root_mount}"
    );
    let host_root = std::fs::metadata("/").unwrap();
    let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    assert_ne!(
        root.dev(),
        host_root.dev(),
        "{name}: runs on the host's root"
    );
    let on_host: Vec<_> = std::fs::read_dir(jail)
        .unwrap_or_else(|e| panic!("{name}: {jail}: {e}"))
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        on_host.is_empty(),
        "{name}: the jail left {on_host:?} on the host in {jail}"
    );
    let inside =
        |p: &Path| Path::new(&format!("/proc/{pid}/root")).join(p.strip_prefix("/").unwrap());
    assert!(inside(&h.ws(name).join("config.json")).exists());
    assert!(inside(Path::new("/dev/kvm")).exists());
    for absent in ["/etc/hostname", "/etc/passwd", "/usr/bin", "/home"] {
        assert!(
            !inside(Path::new(absent)).exists(),
            "{name}: {absent} is visible in the jail"
        );
    }
    // The per-VM cgroup, where a hierarchy is writable; else the status says why.
    let cgroups = s["sandbox"]["cgroups"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if cgroups.is_empty() {
        assert!(
            s["sandbox"]["cgroup_note"].is_string(),
            "{name}: no cgroup and no reason: {s}"
        );
        eprintln!("{name}: no cgroup: {}", s["sandbox"]["cgroup_note"]);
    } else {
        let mine = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        for c in &cgroups {
            let c = c.as_str().unwrap();
            let leaf = Path::new(c)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            assert!(mine.contains(&leaf), "{name}: not in {c}:\n{mine}");
        }
    }
    uid
}

#[cfg(feature = "test-hooks")]
fn assert_cannot_open_host_paths(h: &Home, name: &str, other_ws: &str) {
    for path in [
        "/etc/hostname".to_string(),
        h.ws(other_ws).join("config.json").display().to_string(),
    ] {
        let js: serde_json::Value =
            serde_json::from_str(&h.ok(&["--json", "__test-hook", name, "open", &path])).unwrap();
        assert_eq!(js["ok"], false, "{name} opened {path}: {js}");
    }
    // The same request does open what the jail holds: the check above is not vacuous.
    let own = h.ws(name).join("config.json").display().to_string();
    let js: serde_json::Value =
        serde_json::from_str(&h.ok(&["--json", "__test-hook", name, "open", &own])).unwrap();
    assert_eq!(js["ok"], true, "{name} cannot open its own config: {js}");
}

#[cfg(not(feature = "test-hooks"))]
fn assert_cannot_open_host_paths(_: &Home, name: &str, _: &str) {
    eprintln!("{name}: open-a-host-path check skipped: build with --features test-hooks");
}

#[test]
fn a_running_workspace_and_its_fork_are_jailed_and_filtered() {
    if !kvm_or_skip("a_running_workspace_and_its_fork_are_jailed_and_filtered") {
        return;
    }
    let h = Home::new("sandbox-jail");
    create_counter(&h, "w");
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[3]);
    let uid_w = assert_confined(&h, "w");
    h.ok(&["snapshot", "create", "w", "--tag", "base"]);
    h.ok(&["create", "f", "--from-snapshot", "w:base"]);
    let before = h.wait_counts("f", &[0]);
    h.wait_counts("f", &[before[0] + 3]);
    let uid_f = assert_confined(&h, "f");
    if is_root() {
        assert_ne!(uid_w, uid_f, "two VMs share a uid");
    }
    assert_cannot_open_host_paths(&h, "f", "w");
    assert_cannot_open_host_paths(&h, "w", "f");
    // The guest still works after snapshots: a diff, and hibernate + resume, jailed.
    h.ok(&["snapshot", "create", "w", "--tag", "d1", "--type", "diff"]);
    h.ok(&["hibernate", "f"]);
    h.ok(&["start", "f"]);
    let c = h.wait_counts("f", &[0]);
    h.wait_counts("f", &[c[0] + 3]);
    assert_confined(&h, "f");
    h.ok(&["delete", "f", "--yes"]);

    // --no-jail --no-seccomp: for debugging, and shown as such.
    h.ok(&["halt", "w"]);
    h.ok(&["start", "w", "--no-jail", "--no-seccomp"]);
    let pid = h.pid("w").unwrap();
    assert_eq!(proc_status(pid, "Seccomp"), "0");
    let s = status_json(&h, "w");
    assert_eq!(s["sandbox"]["jail"], false, "{s}");
    assert_eq!(s["sandbox"]["seccomp"], false, "{s}");
    assert!(h.ok(&["status", "w"]).contains("no jail, no seccomp"));
    let l: serde_json::Value = serde_json::from_str(&h.ok(&["--json", "list"])).unwrap();
    assert_eq!(l["workspaces"][0]["sandbox"]["jail"], false, "{l}");
    h.ok(&["delete", "w", "--yes"]);

    // Recorded in the config when given at create.
    h.ok(&[
        "create",
        "n",
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        CMDLINE,
        "--no-seccomp",
    ]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(h.ws("n").join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["sandbox"]["seccomp"], false, "{cfg}");
    assert_eq!(cfg["sandbox"]["jail"], true, "{cfg}");
    h.ok(&["start", "n"]);
    let pid = h.pid("n").unwrap();
    assert_eq!(proc_status(pid, "Seccomp"), "0");
    assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
    h.ok(&["delete", "n", "--yes"]);
}

#[cfg(feature = "test-hooks")]
#[test]
fn a_forbidden_system_call_kills_the_vmm_and_the_cli_says_so() {
    if !kvm_or_skip("a_forbidden_system_call_kills_the_vmm_and_the_cli_says_so") {
        return;
    }
    let h = Home::new("sandbox-sigsys");
    create_counter(&h, "w");
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[2]);
    let pid = h.pid("w").unwrap();
    let o = h.run(&["__test-hook", "w", "forbidden-syscall"]);
    assert_eq!(o.status.code(), Some(7), "{}\n{}", stdout(&o), stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("workspace w"), "{err}");
    assert!(err.contains("SIGSYS"), "{err}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "the VMM survived a forbidden system call");
    let s = status_json(&h, "w");
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["failure"].as_str().unwrap().contains("SIGSYS"), "{s}");
    assert!(h.ok(&["list"]).contains("failed"));
    let log = std::fs::read_to_string(h.ws("w").join("vmm.log")).unwrap();
    assert!(log.contains("SIGSYS"), "{log}");
    // The kernel's audit record names the call, where the kernel log is readable.
    if std::fs::File::open("/dev/kmsg").is_ok() {
        assert!(log.contains("syscall 103"), "{log}");
    }
    // A failed workspace starts again.
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[2]);
    assert_eq!(status_json(&h, "w")["state"], "running");
    h.ok(&["delete", "w", "--yes"]);
}

#[test]
fn a_guest_printing_without_pause_leaves_a_bounded_console_log() {
    if !kvm_or_skip("a_guest_printing_without_pause_leaves_a_bounded_console_log") {
        return;
    }
    const BOUND: u64 = 64 * 1024;
    let h = Home::new("sandbox-console");
    h.ok(&[
        "create",
        "spam",
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        "mode=counter tick_ms=0",
        "--console-max-kib",
        "64",
    ]);
    h.ok(&["start", "spam"]);
    let log = h.ws("spam").join("console.log");
    // Print for a while: well past the bound (each count line is ~18 bytes).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut largest = 0;
    let mut last = 0;
    loop {
        let len = std::fs::metadata(&log).map_or(0, |m| m.len());
        largest = largest.max(len);
        assert!(len <= BOUND, "console.log is {len} bytes, bound {BOUND}");
        if let Some((_, n)) = common::counts(&h.console("spam")).last() {
            last = *n;
        }
        if last * 18 > 6 * BOUND || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        last * 18 > 3 * BOUND,
        "the guest printed too little to test the bound (count {last})"
    );
    assert!(
        largest > BOUND / 2,
        "the log never filled ({largest} bytes)"
    );
    // `console` shows the latest lines: counts newer than any seen before, in order.
    let out = h.ok(&["console", "spam"]);
    // The guest is still printing: the last line may be cut mid-number ("count=12" of "count=123").
    let complete = &out[..out.rfind('\n').map_or(0, |i| i + 1)];
    let counts: Vec<u64> = common::counts(complete).iter().map(|c| c.1).collect();
    assert!(counts.len() > 100, "{} lines", counts.len());
    assert!(
        counts.windows(2).all(|w| w[1] == w[0] + 1),
        "gaps or disorder"
    );
    assert!(*counts.last().unwrap() >= last, "console is behind the log");
    assert!(out.len() as u64 <= BOUND);
    // vmm.log stays small too.
    let vmm_log = std::fs::metadata(h.ws("spam").join("vmm.log"))
        .unwrap()
        .len();
    assert!(vmm_log < 1 << 20, "vmm.log is {vmm_log} bytes");
    // The next run starts a fresh log and keeps this one as console.log.1.
    h.ok(&["halt", "spam"]);
    h.ok(&["start", "spam"]);
    h.wait_counts("spam", &[0]);
    let prev = std::fs::metadata(h.ws("spam").join("console.log.1"))
        .unwrap()
        .len();
    assert!(prev > 0 && prev <= BOUND, "console.log.1 is {prev} bytes");
    h.ok(&["delete", "spam", "--yes"]);
}

/// A jailed VMM runs under its own uid, and the kernel clears the parent-death signal on a uid
/// change: the jail arms it again, so a VMM whose waiter is killed (a given-up fork batch, a
/// killed CLI) does not go on running unwatched.
#[test]
fn a_jailed_vmm_dies_with_its_waiter() {
    if !kvm_or_skip("a_jailed_vmm_dies_with_its_waiter") {
        return;
    }
    let h = Home::new("sandbox-pdeath");
    create_counter(&h, "w");
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[1]);
    let pid = h.pid("w").expect("vmm.pid");
    let uid = assert_confined(&h, "w");
    if is_root() {
        // Root runs the VMM under an id of its own: the case in which the kernel cleared it.
        assert_ne!(uid, 0);
    }
    let waiter: i32 = proc_status(pid, "PPid").parse().unwrap();
    assert!(waiter > 1, "VMM {pid} has no waiter (PPid {waiter})");
    // SAFETY: SIGKILL to the waiter this test's workspace started.
    assert_eq!(unsafe { libc::kill(waiter, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(pid),
        "VMM {pid} still runs 30 s after its waiter {waiter} was killed"
    );
    let _ = h.run(&["delete", "w", "--yes"]);
}

/// `kill PID` stops a workspace as `halt` does, whether it reaches the VMM (PID 1 of its
/// namespace, which ignored it when it had no handler) or its waiter (which died at once, left
/// its cgroups and jail directory behind and took the VMM down by SIGKILL): the workspace ends
/// stopped with no failure recorded, and nothing of the sandbox is left on the host.
#[test]
fn a_stop_signal_to_the_vmm_or_its_waiter_stops_the_workspace_cleanly() {
    if !kvm_or_skip("a_stop_signal_to_the_vmm_or_its_waiter_stops_the_workspace_cleanly") {
        return;
    }
    let h = Home::new("sandbox-sigterm");
    create_counter(&h, "w");
    for to_waiter in [false, true] {
        h.ok(&["start", "w"]);
        h.wait_counts("w", &[1]);
        let pid = h.pid("w").expect("vmm.pid");
        assert_confined(&h, "w");
        let s = status_json(&h, "w");
        let jail = s["sandbox"]["jail_root"].as_str().unwrap().to_string();
        let cgroups: Vec<String> = s["sandbox"]["cgroups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let waiter: i32 = proc_status(pid, "PPid").parse().unwrap();
        let target = if to_waiter { waiter } else { pid };
        // SAFETY: SIGTERM to a process this test's workspace started.
        assert_eq!(unsafe { libc::kill(target, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while (alive(pid) || alive(waiter)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let who = if to_waiter { "waiter" } else { "VMM" };
        assert!(
            !alive(pid) && !alive(waiter),
            "30 s after SIGTERM to the {who}: VMM {pid} alive {}, waiter {waiter} alive {}",
            alive(pid),
            alive(waiter)
        );
        let s = status_json(&h, "w");
        assert_eq!(s["state"], "stopped", "after SIGTERM to the {who}: {s}");
        assert!(s["failure"].is_null(), "after SIGTERM to the {who}: {s}");
        assert!(
            !Path::new(&jail).exists(),
            "after SIGTERM to the {who}: jail {jail} left behind"
        );
        for c in &cgroups {
            assert!(
                !Path::new(c).exists(),
                "after SIGTERM to the {who}: cgroup {c} left behind"
            );
        }
    }
    // A jailed page server stops on it too, through its waiter, and its fork says why it stops.
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[1]);
    h.ok(&["snapshot", "create", "w", "--tag", "s"]);
    h.ok(&["create", "f", "--from-snapshot", "w:s", "--memory", "uffd"]);
    let snap = h.ws("w").join("snapshots/s");
    let servers = processes_with_args(&["__pageserver", "--snapshot", snap.to_str().unwrap()]);
    let waiter = *servers
        .iter()
        .find(|p| proc_status(**p, "NSpid").split_whitespace().count() == 1)
        .unwrap_or_else(|| panic!("no page server waiter among {servers:?}"));
    // SAFETY: SIGTERM to the page server's waiter this test started.
    assert_eq!(unsafe { libc::kill(waiter, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while servers.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !servers.iter().any(|p| alive(*p)),
        "page server {servers:?} still there 30 s after SIGTERM to its waiter"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_json(&h, "f")["state"] == "running" && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let f = status_json(&h, "f");
    assert!(
        f["failure"]
            .as_str()
            .is_some_and(|m| m.contains("page server is gone")),
        "{f}"
    );
    h.ok(&["delete", "f", "--yes"]);
    h.ok(&["delete", "w", "--yes"]);
}

/// Live processes whose command line contains `args` in a row.
fn processes_with_args(args: &[&str]) -> Vec<i32> {
    let mut want = Vec::new();
    for a in args {
        want.extend_from_slice(a.as_bytes());
        want.push(0);
    }
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            cmdline
                .windows(want.len())
                .any(|w| w == want.as_slice())
                .then_some(pid)
        })
        .collect()
}

/// A jailed VMM writes entries of its workspace directory (its pid file, its sockets, its
/// console log, its snapshots), so a guest that took it over controls them. The test (root) does
/// what such a VMM could do as its own uid, and each time the CLI, which runs as root, must not
/// be turned against the host: a pid file naming another process, an API socket linked to
/// another workspace's, a console log or snapshot file linked to a host secret, and a link left
/// where the next start hands a path over to the new VMM's uid.
#[test]
fn a_compromised_vmms_files_do_not_turn_the_cli_against_the_host() {
    use std::os::unix::fs::symlink;
    if !kvm_or_skip("a_compromised_vmms_files_do_not_turn_the_cli_against_the_host") {
        return;
    }
    let h = Home::new("sandbox-hostile-files");
    let secret = h.dir.join("host-secret");
    std::fs::write(&secret, "host secret 7f3a9c").unwrap();
    create_counter(&h, "w");
    create_counter(&h, "v");
    for n in ["w", "v"] {
        h.ok(&["start", n]);
        h.wait_counts(n, &[1]);
    }
    let ws = h.ws("w");

    // The pid file names a bystander: `halt` stops the VMM and leaves the bystander alone.
    let mut bystander = std::process::Command::new("sleep")
        .arg("120")
        .spawn()
        .unwrap();
    let vmm = h.pid("w").unwrap();
    std::fs::write(ws.join("vmm.pid"), format!("{}\n", bystander.id())).unwrap();
    h.ok(&["halt", "w"]);
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "halt killed the process the pid file named"
    );
    assert!(!alive(vmm), "halt left the VMM {vmm} running");
    let _ = bystander.kill();
    let _ = bystander.wait();

    // The API socket links to another workspace's: `halt w` must not stop v.
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[1]);
    let vmm = h.pid("w").unwrap();
    std::fs::remove_file(ws.join("api.sock")).unwrap();
    symlink(h.ws("v").join("api.sock"), ws.join("api.sock")).unwrap();
    let _ = h.run(&["halt", "w"]);
    assert!(!alive(vmm), "halt left the VMM {vmm} running");
    assert_eq!(
        status_json(&h, "v")["state"],
        "running",
        "halting w stopped v through a linked socket"
    );

    // The console log links to a host file: `console` does not print it.
    h.ok(&["start", "w"]);
    h.wait_counts("w", &[1]);
    std::fs::remove_file(ws.join("console.log")).unwrap();
    symlink(&secret, ws.join("console.log")).unwrap();
    let o = h.run(&["console", "w"]);
    assert!(
        !stdout(&o).contains("7f3a9c") && !stderr(&o).contains("7f3a9c"),
        "console printed the host file: {}",
        stdout(&o)
    );

    // The vsock socket links to another workspace's: `exec w` (and with it secrets) does not
    // reach v's guest; it fails at once, naming why, instead of waiting for an agent.
    let vsock = ws.join("vsock.sock");
    std::fs::rename(&vsock, ws.join("vsock.sock.real")).unwrap();
    symlink(h.ws("v").join("vsock.sock"), &vsock).unwrap();
    let o = h.run(&["exec", "w", "--", "true"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not this workspace's VMM"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_file(&vsock).unwrap();
    std::fs::rename(ws.join("vsock.sock.real"), &vsock).unwrap();

    // A snapshot's memory file swapped for a link: verify and export refuse it, the archive
    // holds no host file.
    h.ok(&["snapshot", "create", "w", "--tag", "s"]);
    let mem = ws.join("snapshots/s/memory.bin");
    let size = std::fs::metadata(&mem).unwrap().len();
    std::fs::remove_file(&mem).unwrap();
    let big = h.dir.join("host-secret-big");
    std::fs::write(&big, vec![b'7'; size as usize]).unwrap();
    symlink(&big, &mem).unwrap();
    let o = h.run(&["snapshot", "inspect", "w", "s", "--verify"]);
    assert!(!o.status.success(), "verify accepted a linked memory file");
    assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    let archive = h.dir.join("out.tar.zst");
    let o = h.run(&["snapshot", "export", "w", "s", archive.to_str().unwrap()]);
    assert!(!o.status.success(), "export followed a linked memory file");
    assert!(!archive.exists());
    h.ok(&["halt", "w"]);

    // A link left where the next start hands a path to the new VMM: refused, target untouched.
    let victim = h.dir.join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::rename(ws.join("snapshots"), h.dir.join("snapshots-moved")).unwrap();
    symlink(&victim, ws.join("snapshots")).unwrap();
    let o = h.run(&["start", "w"]);
    assert!(
        !o.status.success(),
        "started through a linked snapshots directory"
    );
    assert!(stderr(&o).contains("symbolic link"), "{}", stderr(&o));
    let owner = std::fs::metadata(&victim).unwrap().uid();
    let mine = std::fs::metadata(&h.dir).unwrap().uid();
    assert_eq!(owner, mine, "the link's target changed hands");

    // A failure note of its own, linked to a host file: `status` does not show the file.
    std::fs::write(ws.join("vmm.pid"), "1\n").unwrap();
    symlink(&secret, ws.join("vmm.failed")).unwrap();
    let st = h.ok(&["--json", "status", "w"]);
    assert!(!st.contains("7f3a9c"), "status showed the host file: {st}");
    h.ok(&["halt", "v"]);

    // The halted workspace's disk (the VMM's file) linked to a host file: a disk snapshot, which
    // root takes, refuses it, so no later rollback hands that file to the guest as its disk.
    let image = h.dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    h.ok(&[
        "create",
        "d",
        "--kernel",
        "builtin:testguest",
        "--cmdline",
        CMDLINE,
        "--rootfs",
        image.to_str().unwrap(),
    ]);
    let disk = h.ws("d").join("rootfs.ext4");
    std::fs::remove_file(&disk).unwrap();
    symlink(&secret, &disk).unwrap();
    let o = h.run(&["snapshot", "create", "d", "--tag", "x", "--type", "disk"]);
    assert!(!o.status.success(), "a disk snapshot copied a linked disk");
    assert!(!h.ws("d").join("snapshots/x").exists());
}
