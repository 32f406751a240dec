//! The host's way in: the VMM's hybrid vsock socket (`CONNECT <port>` / `OK <hostport>`), bounded
//! reconnect-with-retry after a connection reset (as after a restore or fork), and AF_VSOCK.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{cmd, TempDir, TestAgent};
use guest_agent::transport::hybrid::{self, HybridError};
use guest_agent::transport::vsock::{VsockListener, VMADDR_CID_ANY, VMADDR_CID_LOCAL};
use guest_agent::{Client, ClientError, RetryPolicy, Server, ServerConfig, AGENT_VSOCK_PORT};

/// What the fake VMM does with a `CONNECT`.
#[derive(Clone, Copy)]
enum Answer {
    /// Close without answering, like a VMM whose guest does not listen (yet).
    Refuse,
    /// Answer garbage.
    Garbage,
    /// `OK`, then splice the stream to the agent.
    Accept,
}

/// A stand-in for the VMM's hybrid vsock socket, in front of an in-process agent.
struct FakeVmm {
    _dir: TempDir,
    socket: PathBuf,
    connects: Arc<AtomicUsize>,
    /// Connections closed before a `CONNECT` line.
    silent: Arc<AtomicUsize>,
    refuse_first: Arc<AtomicUsize>,
    answer: Arc<Mutex<Answer>>,
    live: Arc<Mutex<Vec<UnixStream>>>,
}

impl FakeVmm {
    fn start(refuse_first: usize) -> Self {
        let dir = TempDir::new("vmm");
        let socket = hybrid::socket_path(dir.path());
        let listener = UnixListener::bind(&socket).unwrap();
        let server = Server::new(ServerConfig {
            secrets_dir: dir.path().join("secrets"),
            freeze_only: Some(Vec::new()),
            etc_dir: dir.path().to_owned(),
            set_kernel_hostname: false,
            log_errors: false,
            vm_sysctl_dir: None,
            ..ServerConfig::default()
        });
        let vmm = Self {
            _dir: dir,
            socket,
            connects: Arc::default(),
            silent: Arc::default(),
            refuse_first: Arc::new(AtomicUsize::new(refuse_first)),
            answer: Arc::new(Mutex::new(Answer::Accept)),
            live: Arc::default(),
        };
        let (connects, silent, refuse_first, answer, live) = (
            Arc::clone(&vmm.connects),
            Arc::clone(&vmm.silent),
            Arc::clone(&vmm.refuse_first),
            Arc::clone(&vmm.answer),
            Arc::clone(&vmm.live),
        );
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                connects.fetch_add(1, Ordering::SeqCst);
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                let mut ended = true;
                while stream.read_exact(&mut byte).is_ok() {
                    if byte[0] == b'\n' {
                        ended = false;
                        break;
                    }
                    line.push(byte[0]);
                }
                if ended && line.is_empty() {
                    silent.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                assert_eq!(line, format!("CONNECT {AGENT_VSOCK_PORT}").into_bytes());
                let refuse = refuse_first
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let what = if refuse {
                    Answer::Refuse
                } else {
                    *answer.lock().unwrap()
                };
                match what {
                    Answer::Refuse => drop(stream),
                    Answer::Garbage => {
                        let _ = stream.write_all(b"NO SUCH PORT\n");
                    }
                    Answer::Accept => {
                        stream.write_all(b"OK 1073741824\n").unwrap();
                        live.lock().unwrap().push(stream.try_clone().unwrap());
                        server.spawn_connection(stream);
                    }
                }
            }
        });
        vmm
    }

    /// Drops every guest connection, as a snapshot restore's transport reset does.
    fn reset_connections(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn quick_policy(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        initial_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(40),
    }
}

#[test]
fn connects_through_the_hybrid_vsock_socket() {
    let vmm = FakeVmm::start(0);
    let (stream, host_port) =
        hybrid::connect(&vmm.socket, AGENT_VSOCK_PORT, Duration::from_secs(2)).unwrap();
    assert_eq!(host_port, 1 << 30);
    let client = Client::new(stream).unwrap();
    assert_eq!(client.protocol_version(), 1);
    let out = client.exec_output(cmd(&["uname", "-s"])).unwrap();
    assert_eq!(out.stdout, b"Linux\n");
}

#[test]
fn retries_while_the_guest_does_not_listen_then_connects() {
    let vmm = FakeVmm::start(3);
    let client =
        Client::connect_hybrid_vsock_with_retry(&vmm.socket, AGENT_VSOCK_PORT, &quick_policy(10))
            .unwrap();
    client.ping().unwrap();
    assert_eq!(vmm.connects.load(Ordering::SeqCst), 4);
}

#[test]
fn retry_is_bounded() {
    let dir = TempDir::new("novmm");
    let missing = hybrid::socket_path(dir.path());
    let start = Instant::now();
    match Client::connect_hybrid_vsock_with_retry(&missing, AGENT_VSOCK_PORT, &quick_policy(5)) {
        Err(ClientError::GaveUp { attempts: 5, last }) => {
            assert!(
                matches!(*last, ClientError::Hybrid(HybridError::Connect { .. })),
                "{last}"
            )
        }
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    assert!(start.elapsed() < Duration::from_secs(2));

    let vmm = FakeVmm::start(usize::MAX);
    match Client::connect_hybrid_vsock_with_retry(&vmm.socket, AGENT_VSOCK_PORT, &quick_policy(4)) {
        Err(ClientError::GaveUp { attempts: 4, last }) => {
            assert!(
                matches!(*last, ClientError::Hybrid(HybridError::Refused { .. })),
                "{last}"
            )
        }
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    assert_eq!(vmm.connects.load(Ordering::SeqCst), 4);
}

#[test]
fn a_bad_vmm_answer_is_not_retried() {
    let vmm = FakeVmm::start(0);
    *vmm.answer.lock().unwrap() = Answer::Garbage;
    match Client::connect_hybrid_vsock_with_retry(&vmm.socket, AGENT_VSOCK_PORT, &quick_policy(5)) {
        Err(ClientError::Hybrid(HybridError::BadReply { reply, .. })) => {
            assert_eq!(reply, "NO SUCH PORT")
        }
        other => panic!("unexpected {:?}", other.map(|_| ())),
    }
    assert_eq!(vmm.connects.load(Ordering::SeqCst), 1);
}

/// A listener the caller's check refuses (a linked socket of another VMM) fails at once, is not
/// retried, and the check sees the connected stream: one that accepts it connects as before.
#[test]
fn a_refused_peer_is_not_retried() {
    let vmm = FakeVmm::start(0);
    let seen = AtomicUsize::new(0);
    let refuse = |s: &UnixStream| {
        assert!(s.peer_addr().is_ok());
        seen.fetch_add(1, Ordering::SeqCst);
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "not this workspace's VMM",
        ))
    };
    let err = Client::connect_hybrid_vsock_checked(
        &vmm.socket,
        AGENT_VSOCK_PORT,
        &quick_policy(5),
        &refuse,
    )
    .map(|_| ())
    .unwrap_err();
    assert!(
        matches!(err, ClientError::Hybrid(HybridError::Peer { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("not this workspace's VMM"),
        "{err}"
    );
    assert!(!err.is_transient());
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    // Nothing was sent to the refused listener.
    while vmm.connects.load(Ordering::SeqCst) < 1 {
        thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    while vmm.silent.load(Ordering::SeqCst) < 1 && t.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vmm.silent.load(Ordering::SeqCst), 1);
    let client = Client::connect_hybrid_vsock_checked(
        &vmm.socket,
        AGENT_VSOCK_PORT,
        &quick_policy(5),
        &|_| Ok(()),
    )
    .unwrap();
    assert_eq!(
        client.exec_output(cmd(&["echo", "ok"])).unwrap().stdout,
        b"ok\n"
    );
}

#[test]
fn after_a_transport_reset_the_client_reconnects() {
    let vmm = FakeVmm::start(0);
    let client =
        Client::connect_hybrid_vsock_with_retry(&vmm.socket, AGENT_VSOCK_PORT, &quick_policy(5))
            .unwrap();
    let call = client
        .exec_start(cmd(&["sh", "-c", "echo go; sleep 5"]))
        .unwrap();
    let _ = call.next_event().unwrap();
    // The restore: in-flight connections are reset, and the guest is briefly not reachable.
    vmm.refuse_first.store(2, Ordering::SeqCst);
    vmm.reset_connections();
    let err = call.next_event().unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "{err}");
    assert!(err.is_transient());
    drop(call);
    assert!(!client.is_connected());
    assert!(matches!(client.ping(), Err(ClientError::Disconnected(_))));
    drop(client);
    let client =
        Client::connect_hybrid_vsock_with_retry(&vmm.socket, AGENT_VSOCK_PORT, &quick_policy(10))
            .unwrap();
    assert_eq!(
        client.exec_output(cmd(&["echo", "back"])).unwrap().stdout,
        b"back\n"
    );
}

/// Runs the agent binary: the one cargo built for this test, or `GUEST_AGENT_BIN` (for example the
/// static release build the rootfs installs).
#[test]
fn the_agent_binary_serves_a_unix_socket() {
    let dir = TempDir::new("bin");
    let socket = dir.path().join("agent.sock");
    let binary = std::env::var_os("GUEST_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_microagent-agent")));
    let mut child = std::process::Command::new(binary)
        .arg("--unix")
        .arg(&socket)
        .args(["--secrets-dir"])
        .arg(dir.path().join("secrets"))
        .arg("--quiet")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = RetryPolicy::default().retry(|| Client::connect_unix(&socket));
    let result = client.and_then(|c| {
        let out = c.exec_output(cmd(&["sh", "-c", "echo static; exit 7"]))?;
        assert_eq!(
            (out.stdout.as_slice(), out.status.code),
            (&b"static\n"[..], Some(7))
        );
        c.version()
    });
    let _ = child.kill();
    let _ = child.wait();
    let version = result.unwrap();
    assert_eq!(version.protocol, 1);
    assert_eq!(version.agent, env!("CARGO_PKG_VERSION"));
}

#[test]
fn vsock_listener_over_loopback_when_available() {
    let listener = match VsockListener::bind(VMADDR_CID_ANY, u32::MAX) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("SKIPPED vsock test: cannot bind AF_VSOCK: {e}");
            return;
        }
    };
    let port = listener.local_port().unwrap();
    let agent = TestAgent::start();
    agent.server.spawn(listener).unwrap();
    match Client::connect_vsock(VMADDR_CID_LOCAL, port) {
        Ok(client) => {
            assert_eq!(
                client.exec_output(cmd(&["echo", "vsock"])).unwrap().stdout,
                b"vsock\n"
            );
        }
        Err(e) => eprintln!("SKIPPED vsock test: no vsock loopback transport: {e}"),
    }
}
