//! A Linux guest with the guest agent, end to end: boot, exec, deliver a secret, snapshot (the
//! secret's bytes must not be in the memory file), fork, exec in the fork (the client reconnects)
//! and read the secret there. Needs MICROAGENT_TEST_KERNEL and MICROAGENT_TEST_ROOTFS (an ext4
//! image with the agent at /usr/sbin/microagent-guest-agent), which scripts/test.sh builds.

mod common;
use common::*;
use std::path::PathBuf;

#[path = "common/serve.rs"]
mod serve;

fn inputs_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    if !kvm_or_skip(test) {
        return None;
    }
    match (
        std::env::var_os("MICROAGENT_TEST_KERNEL"),
        std::env::var_os("MICROAGENT_TEST_ROOTFS"),
    ) {
        (Some(k), Some(r)) => Some((k.into(), r.into())),
        _ => {
            common::require::skip(test, "linux", "MICROAGENT_TEST_KERNEL and MICROAGENT_TEST_ROOTFS are not set (scripts/test.sh sets them)");
            None
        }
    }
}

#[test]
fn linux_exec_secrets_snapshot_fork() {
    let Some((kernel, rootfs)) = inputs_or_skip("linux_exec_secrets_snapshot_fork") else {
        return;
    };
    let h = Home::new("linux-agent");
    h.ok(&[
        "create",
        "lx",
        "--kernel",
        kernel.to_str().unwrap(),
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--mem",
        "256",
        "--cmdline",
        "console=ttyS0 panic=-1 quiet root=/dev/vda rw init_on_free=1",
    ]);
    // `start` returns once the agent answers.
    let t = std::time::Instant::now();
    h.ok(&["start", "lx"]);
    eprintln!("boot to agent: {:.1} s", t.elapsed().as_secs_f64());

    let uname = h.run(&["exec", "lx", "--", "uname", "-a"]);
    assert!(uname.status.success(), "{}", stderr(&uname));
    assert!(stdout(&uname).starts_with("Linux "), "{}", stdout(&uname));
    let code = h.run(&[
        "exec",
        "lx",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ]);
    assert_eq!(code.status.code(), Some(3));
    assert_eq!(stdout(&code), "out\n");
    assert_eq!(stderr(&code), "err\n");
    api_exec_streams(&h);

    // Guest-initiated vsock: a program in the guest connects to host port 7000, which the VMM
    // forwards to `<vsock.sock>_7000` where this test listens.
    let listener =
        std::os::unix::net::UnixListener::bind(h.ws("lx").join("vsock.sock_7000")).unwrap();
    // The jailed VMM connects as the workspace's own uid and group, not as root: the socket must
    // let it write. 0666 opens it to nobody else, since the workspace directory is closed to all
    // but root and that group.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            h.ws("lx").join("vsock.sock_7000"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
    }
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut conn, _) = listener.accept().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(conn.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        conn.write_all(b"ok\n").unwrap();
        line
    });
    let sent = h.run(&[
        "exec",
        "lx",
        "--",
        "/usr/sbin/microagent-guest-agent",
        "--send-line",
        "7000",
        "hello from linux",
    ]);
    assert!(sent.status.success(), "{}", stderr(&sent));
    assert_eq!(stdout(&sent), "ok\n");
    assert_eq!(server.join().unwrap(), "hello from linux\n");

    let secret = format!("s3cr3t-{}-{}", std::process::id(), t.elapsed().as_nanos());
    let file = h.dir.join("secret");
    std::fs::write(&file, &secret).unwrap();
    let set = h.ok(&[
        "secret",
        "set",
        "lx",
        "TOKEN",
        "--from-file",
        file.to_str().unwrap(),
    ]);
    assert!(set.contains("(delivered)"), "{set}");
    let mode = std::fs::metadata(h.ws("lx").join("secrets/TOKEN")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    h.ok(&["snapshot", "create", "lx", "--tag", "base"]);
    let mem = std::fs::read(h.ws("lx").join("snapshots/base/memory.bin")).unwrap();
    assert!(
        !mem.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "the secret's bytes are in memory.bin"
    );
    drop(mem);
    // The source got its secret back after the capture.
    assert_eq!(
        stdout(&h.run(&["exec", "lx", "--", "cat", "/run/secrets/TOKEN"])),
        secret
    );

    h.ok(&["create", "fk", "--from-snapshot", "lx:base"]);
    let got = h.run(&["exec", "fk", "--", "cat", "/run/secrets/TOKEN"]);
    assert!(got.status.success(), "{}", stderr(&got));
    assert_eq!(stdout(&got), secret, "rehydrated in the fork");
    assert_eq!(
        stdout(&h.run(&["exec", "fk", "--", "hostname"])).trim(),
        "fk"
    );
    let id_a = stdout(&h.run(&["exec", "fk", "--", "cat", "/etc/machine-id"]));
    assert_eq!(id_a.trim().len(), 32, "{id_a}");
    h.ok(&["delete", "fk", "--yes"]);
    h.ok(&["delete", "lx", "--yes"]);
}

/// The API's exec against the real agent: the command's stdout and stderr arrive as events
/// while it runs (the first line well before the command ends), then its exit status.
fn api_exec_streams(h: &Home) {
    use futures_util::StreamExt;
    use serde_json::{json, Value};
    let s = serve::Server::start(h);
    serve::rt().block_on(async {
        let r = s
            .req(reqwest::Method::POST, "/api/workspaces/lx/exec")
            .json(&json!({"argv": ["sh", "-c", "echo out; echo err >&2; sleep 2; echo late; exit 3"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let start = std::time::Instant::now();
        let (mut body, mut first_at, mut exit_at) = (String::new(), None, None);
        let mut stream = r.bytes_stream();
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            let evs = serve::parse_sse(&body);
            if first_at.is_none() && evs.iter().any(|(n, v)| n == "stdout" && v["text"] == "out\n") {
                first_at = Some(start.elapsed());
            }
            if exit_at.is_none() && evs.iter().any(|(n, _)| n == "exit") {
                exit_at = Some(start.elapsed());
            }
        }
        let evs = serve::parse_sse(&body);
        let text = |name: &str| -> String {
            evs.iter()
                .filter(|(n, _)| n == name)
                .filter_map(|(_, v)| v["text"].as_str())
                .collect()
        };
        assert_eq!(text("stdout"), "out\nlate\n", "{body}");
        assert_eq!(text("stderr"), "err\n", "{body}");
        let last: Option<&(String, Value)> = evs.last();
        assert_eq!(last, Some(&("exit".to_string(), json!({"code": 3}))), "{body}");
        // Streamed, not collected: the first line came while the guest still slept.
        let (first, exit) = (first_at.unwrap(), exit_at.unwrap());
        assert!(
            exit.saturating_sub(first) >= std::time::Duration::from_millis(1500),
            "first line at {first:?}, exit at {exit:?}: the output was held back"
        );
        eprintln!("api exec: first line at {first:?}, exit at {exit:?}");
    });
}
