//! Networking through a VM's own passt, side by side with the host's loopback in one run:
//! guest -> host TCP throughput, request round trip (one connection, 1-byte ping-pong through
//! a published port to an echo server in the guest) and the time from a fork request to the
//! fork's first successful request. The same busybox tools on both sides.
//!
//! Needs /dev/kvm, passt, busybox-static, e2fsprogs and this host's default kernel
//! (`microagent kernel build`). Prints a table; never asserts on time.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Bytes sent guest -> host. Small: on this nested KVM the guest kernel is emulated, so each
/// round trip through its TCP stack costs ~25 ms, and busybox nc's 1 KiB writes under Nagle's
/// algorithm send one segment per round trip (measured: 256 KiB in ~8 s); MICROAGENT_BENCH_NET_KIB
/// sets it (hardware KVM takes far more).
fn send_bytes() -> u64 {
    env_usize("MICROAGENT_BENCH_NET_KIB", 256) as u64 * 1024
}
const PINGS: usize = 200;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_microagent"))
}

fn ma(home: &Path, args: &[&str]) -> Result<String, String> {
    let o = Command::new(bin())
        .args(args)
        .env("MICROAGENT_HOME", home)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!(
            "microagent {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// A rootfs with busybox and the static agent (scripts/build-rootfs.sh).
fn rootfs(dir: &Path) -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let agent = dir.join("agent");
    std::fs::write(&agent, guest_agent_embed::AGENT).map_err(|e| e.to_string())?;
    // build-rootfs.sh keeps the mode, and /sbin/init starts the agent only when executable.
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    let out = dir.join("rootfs.ext4");
    let st = Command::new(root.join("scripts/build-rootfs.sh"))
        .arg(&out)
        .args(["--size", "64", "--add"])
        .arg(format!(
            "{}:/usr/sbin/microagent-guest-agent",
            agent.display()
        ))
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    st.success()
        .then_some(out)
        .ok_or_else(|| "build-rootfs.sh failed".to_string())
}

/// Accepts one connection and returns (bytes, seconds from first to last byte).
fn sink(l: TcpListener) -> std::thread::JoinHandle<(u64, f64)> {
    std::thread::spawn(move || {
        let Ok((mut c, _)) = l.accept() else {
            return (0, f64::NAN);
        };
        let mut b = vec![0u8; 1 << 16];
        let mut n = 0u64;
        let mut first = None;
        loop {
            match c.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    first.get_or_insert_with(Instant::now);
                    n += k as u64;
                }
            }
        }
        (n, first.map_or(f64::NAN, |t| secs(t.elapsed())))
    })
}

/// MiB/s of `send_bytes()` zeros sent by `send` (given the sink's port) into a host sink.
fn throughput(send: impl FnOnce(u16) -> Result<(), String>) -> Result<f64, String> {
    let l = TcpListener::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    let h = sink(l);
    send(port)?;
    let (n, s) = h.join().map_err(|_| "sink panicked")?;
    if n != send_bytes() {
        return Err(format!("sink got {n} bytes of {}", send_bytes()));
    }
    Ok(n as f64 / f64::from(1u32 << 20) / s)
}

/// Median round trip (ms) of one byte over one connection to an echo server at `port`.
fn ping_pong(port: u16) -> Result<f64, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut b = [0u8; 1];
    // passt accepts on the published port before the guest's server listens (then resets the
    // connection): a connection counts once one byte has come back.
    let mut c = loop {
        let attempt = TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
            c.set_nodelay(true)?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            c.write_all(&[0])?;
            c.read_exact(&mut b)?;
            Ok(c)
        });
        match attempt {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(format!("echo: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    };
    let mut times = Vec::new();
    for i in 0..PINGS {
        let t = Instant::now();
        c.write_all(&[i as u8]).map_err(|e| e.to_string())?;
        c.read_exact(&mut b).map_err(|e| format!("echo: {e}"))?;
        times.push(secs(t.elapsed()) * 1000.0);
    }
    Ok(median(&times))
}

fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn main() {
    if !have_kvm() {
        println!("net benchmark skipped: /dev/kvm is not available");
        return;
    }
    let dir = scratch("bench-net");
    let home = dir.join("home");
    if let Err(e) = run(&dir, &home) {
        println!("net benchmark skipped: {e}");
    }
    halt_all(&home);
}

/// Stops every VM (and so its passt) the run left, whether it finished or gave up half-way.
fn halt_all(home: &Path) {
    let Ok(list) = ma(home, &["--json", "list"]) else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
    for w in v["workspaces"].as_array().into_iter().flatten() {
        if let Some(name) = w["name"].as_str() {
            let _ = ma(home, &["halt", name]);
        }
    }
}

fn run(dir: &Path, home: &Path) -> Result<(), String> {
    let (dir, home) = (dir.to_path_buf(), home.to_path_buf());
    let v: serde_json::Value = serde_json::from_str(&ma(&home, &["--json", "kernel", "list"])?)
        .map_err(|e| e.to_string())?;
    if !v["kernels"]
        .as_array()
        .is_some_and(|k| k.iter().any(|k| k["default"] == true))
    {
        return Err("no default kernel (`microagent kernel build`)".into());
    }
    let rootfs = rootfs(&dir)?;
    let rootfs = rootfs.to_string_lossy();
    let cmdline = format!(
        "console=ttyS0 panic=-1 quiet root=/dev/vda rw {}",
        "init_on_free=1"
    );
    ma(
        &home,
        &[
            "create",
            "n",
            "--rootfs",
            &rootfs,
            "--cmdline",
            &cmdline,
            "--publish",
            ":7777",
        ],
    )?;
    ma(&home, &["start", "n"])?;
    // The rootfs has no network set-up of its own: the same addresses the images configure.
    ma(
        &home,
        &[
            "exec",
            "n",
            "--",
            "sh",
            "-c",
            "ip link set lo up; ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; \
             ip route add default via 10.0.2.2",
        ],
    )?;

    // Guest -> host throughput, against the same transfer over the host's loopback.
    let guest_tp = throughput(|port| {
        ma(
            &home,
            &[
                "exec",
                "n",
                "--",
                "sh",
                "-c",
                &format!(
                    "head -c {} /dev/zero | nc -w 30 10.0.2.2 {port}",
                    send_bytes()
                ),
            ],
        )
        .map(|_| ())
    })?;
    let host_tp = throughput(|port| {
        let st = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "head -c {} /dev/zero | busybox nc -w 30 127.0.0.1 {port}",
                send_bytes()
            ))
            .status()
            .map_err(|e| e.to_string())?;
        st.success().then_some(()).ok_or("host nc failed".into())
    })?;

    // Round trip: an echo server in the guest behind the published port (detached, so it is
    // also in the snapshot forked below), and one on the host.
    ma(
        &home,
        &[
            "exec",
            "n",
            "--",
            "sh",
            "-c",
            "setsid nc -ll -p 7777 -e cat </dev/null >/dev/null 2>&1 &",
        ],
    )?;
    let st: serde_json::Value =
        serde_json::from_str(&ma(&home, &["--json", "status", "n"])?).map_err(|e| e.to_string())?;
    let published: u16 = st["published"][0]
        .as_str()
        .and_then(|p| p.split(':').next()?.parse().ok())
        .ok_or_else(|| format!("no published port: {st}"))?;
    let guest_rtt = ping_pong(published)?;
    let hp = free_port();
    let mut host_echo = Command::new("busybox")
        .args(["nc", "-ll", "-p", &hp.to_string(), "-e", "cat"])
        .spawn()
        .map_err(|e| e.to_string())?;
    let host_rtt = ping_pong(hp)?;
    let _ = host_echo.kill();
    // Said now, so a run that gives up at the fork below still reports these.
    eprintln!(
        "guest -> host {} KiB: {guest_tp:.3} MiB/s through passt, {host_tp:.1} on loopback; \
         1-byte round trip {guest_rtt:.2} ms through passt, {host_rtt:.3} ms on loopback",
        send_bytes() >> 10
    );

    // Fork -> first successful request through the fork's own published port (its echo server,
    // started before the capture, is in the snapshot).
    ma(&home, &["snapshot", "create", "n", "--tag", "b"])?;
    ma(&home, &["halt", "n"])?;
    let t = Instant::now();
    ma(&home, &["create", "f", "--from-snapshot", "n:b"])?;
    let forked = secs(t.elapsed());
    let st: serde_json::Value =
        serde_json::from_str(&ma(&home, &["--json", "status", "f"])?).map_err(|e| e.to_string())?;
    let port: u16 = st["published"][0]
        .as_str()
        .and_then(|p| p.split(':').next()?.parse().ok())
        .ok_or_else(|| format!("no published port: {st}"))?;
    let first_ok = loop {
        let ok = TcpStream::connect(("127.0.0.1", port)).and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            c.write_all(b"x")?;
            let mut b = [0u8; 1];
            c.read_exact(&mut b)
        });
        if ok.is_ok() {
            break secs(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(120) {
            return Err("the fork never answered".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = ma(&home, &["delete", "f", "--yes"]);
    let _ = ma(&home, &["delete", "n", "--yes"]);
    let _ = std::fs::remove_dir_all(&dir);

    println!("Networking through passt vs the host's loopback (same busybox tools, one run)\n");
    print_table(
        &["what", "through passt", "host loopback", "ratio"],
        &[
            vec![
                format!("guest -> host TCP, {} KiB (MiB/s)", send_bytes() >> 10),
                f(guest_tp, 1),
                f(host_tp, 1),
                ratio(guest_tp, host_tp),
            ],
            vec![
                format!("1-byte round trip, median of {PINGS} (ms)"),
                f(guest_rtt, 3),
                f(host_rtt, 3),
                ratio(guest_rtt, host_rtt),
            ],
            vec![
                "fork command returns (s)".into(),
                f(forked, 3),
                "-".into(),
                "-".into(),
            ],
            vec![
                "fork request -> first successful request (s)".into(),
                f(first_ok, 3),
                "-".into(),
                "-".into(),
            ],
        ],
    );
    Ok(())
}
