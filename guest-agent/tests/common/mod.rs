//! Shared test fixtures: an agent on a Unix socket in a temporary directory.
#![allow(dead_code)]

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use guest_agent::{Client, Server, ServerConfig};

/// A directory removed (recursively) on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "guest-agent-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent serving a Unix socket, with everything it touches inside its own temporary directory.
/// Freezing is limited to nothing unless a test says otherwise: a test must never freeze the host.
pub struct TestAgent {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub server: Server,
}

impl TestAgent {
    pub fn start() -> Self {
        Self::start_with(|_| {})
    }

    pub fn start_with(adjust: impl FnOnce(&mut ServerConfig)) -> Self {
        let dir = TempDir::new("agent");
        let etc = dir.path().join("etc");
        std::fs::create_dir_all(&etc).expect("create etc");
        let mut config = ServerConfig {
            secrets_dir: dir.path().join("secrets"),
            freeze_only: Some(Vec::new()),
            etc_dir: etc,
            set_kernel_hostname: false,
            log_errors: false,
            vm_sysctl_dir: None,
            ..ServerConfig::default()
        };
        adjust(&mut config);
        assert!(
            config.freeze_only.is_some(),
            "tests must limit freezing to their own mounts"
        );
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).expect("bind agent socket");
        let server = Server::new(config);
        server.spawn(listener).expect("start agent");
        Self {
            dir,
            socket,
            server,
        }
    }

    pub fn client(&self) -> Client {
        Client::connect_unix(&self.socket).expect("connect to agent")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// `argv` as an exec request.
pub fn cmd(argv: &[&str]) -> guest_agent::protocol::messages::ExecRequest {
    guest_agent::protocol::messages::ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift), as a reader of `len` bytes.
pub struct PseudoRandom {
    state: u64,
    left: u64,
}

impl PseudoRandom {
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            state: seed | 1,
            left: len,
        }
    }
}

impl std::io::Read for PseudoRandom {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for chunk in buf[..n].chunks_mut(8) {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let bytes = self.state.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Runs a shell that traps SIGINT with `exit 130`, sends it SIGINT through the agent once it says
/// ready, and checks it exited 130: the signal reached the running command. The trap is set before
/// "ready", so the signal cannot come before the shell handles it.
pub fn sigint_reaches_a_trapping_shell(client: &Client) {
    use guest_agent::client::ExecEvent;
    use guest_agent::protocol::messages::ExecRequest;
    let call = client
        .exec_start(ExecRequest {
            // A signal that never arrives ends in a timeout (a SIGKILL), not a hung test.
            timeout_ms: Some(20_000),
            ..cmd(&[
                "sh",
                "-c",
                "trap 'exit 130' INT; echo ready; while :; do sleep 1; done",
            ])
        })
        .unwrap();
    assert_eq!(
        call.next_event().unwrap(),
        ExecEvent::Stdout(b"ready\n".to_vec())
    );
    call.signal(libc::SIGINT).unwrap();
    match call.next_event().unwrap() {
        ExecEvent::Exited(status) => assert_eq!(status.code, Some(130), "{status:?}"),
        other => panic!("unexpected {other:?}"),
    }
}
