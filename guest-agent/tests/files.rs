//! `read-file` / `write-file` end to end: a 64 MiB round trip, modes and owners, failures.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{PseudoRandom, TestAgent};
use guest_agent::protocol::messages::{ErrorKind, WriteFileRequest};
use guest_agent::ClientError;
use sha2::{Digest, Sha256};

const BIG: u64 = 64 * 1024 * 1024;

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct HashingWriter {
    hasher: Sha256,
    len: u64,
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.hasher.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_req(path: &std::path::Path, mode: u32) -> WriteFileRequest {
    WriteFileRequest {
        path: path.to_str().unwrap().to_owned(),
        mode,
        uid: None,
        gid: None,
        create_dirs: false,
    }
}

#[test]
fn sixty_four_mib_round_trip_keeps_the_digest() {
    let agent = TestAgent::start();
    let client = agent.client();
    let path = agent.path("big.bin");
    let mut source = HashingReader {
        inner: PseudoRandom::new(0x5eed, BIG),
        hasher: Sha256::new(),
    };
    let written = client
        .write_file(
            WriteFileRequest {
                uid: Some(1234),
                gid: Some(2345),
                ..write_req(&path, 0o640)
            },
            &mut source,
        )
        .unwrap();
    assert_eq!(written, BIG);
    let sent_digest = source.hasher.finalize();

    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), BIG);
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));

    let mut sink = HashingWriter {
        hasher: Sha256::new(),
        len: 0,
    };
    let (info, received) = client.read_file(path.to_str().unwrap(), &mut sink).unwrap();
    assert_eq!(received, BIG);
    assert_eq!(sink.len, BIG);
    assert_eq!(info.size, BIG);
    assert_eq!(info.mode & 0o7777, 0o640);
    assert_eq!((info.uid, info.gid), (1234, 2345));
    assert_eq!(sink.hasher.finalize(), sent_digest);
    // No temporary file left behind.
    let leftovers: Vec<_> = std::fs::read_dir(agent.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("agent-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn write_replaces_atomically_and_creates_dirs() {
    let agent = TestAgent::start();
    let client = agent.client();
    let path = agent.path("a/b/c.txt");
    let req = WriteFileRequest {
        create_dirs: true,
        ..write_req(&path, 0o600)
    };
    client.write_file(req.clone(), &b"one"[..]).unwrap();
    client.write_file(req, &b"two, longer"[..]).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"two, longer");
    // An empty file is a file too.
    client
        .write_file(write_req(&path, 0o644), &b""[..])
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777,
        0o644
    );
}

struct FailingReader(usize);

impl Read for FailingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0 == 0 {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(b'x');
        self.0 -= n;
        Ok(n)
    }
}

#[test]
fn failed_uploads_leave_the_target_untouched() {
    let agent = TestAgent::start();
    let client = agent.client();
    let path = agent.path("keep.txt");
    std::fs::write(&path, b"original").unwrap();
    match client.write_file(write_req(&path, 0o644), FailingReader(1 << 20)) {
        Err(ClientError::Source(_)) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"original");
    // The cancelled upload's temporary file goes away.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let tmp = std::fs::read_dir(agent.dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("agent-tmp"));
        if !tmp {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "temporary file left behind"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    match client.write_file(write_req(&agent.path("no/such/dir/f"), 0o644), &b"x"[..]) {
        Err(ClientError::Remote {
            kind: ErrorKind::NotFound,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    match client.write_file(
        WriteFileRequest {
            path: "relative/path".into(),
            ..write_req(&path, 0o644)
        },
        &b"x"[..],
    ) {
        Err(ClientError::Remote {
            kind: ErrorKind::InvalidRequest,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    match client.write_file(write_req(&path, 0o170000), &b"x"[..]) {
        Err(ClientError::Remote {
            kind: ErrorKind::InvalidRequest,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"original");
}

#[test]
fn read_errors_are_typed() {
    let agent = TestAgent::start();
    let client = agent.client();
    let missing = agent.path("missing");
    match client.read_file(missing.to_str().unwrap(), std::io::sink()) {
        Err(ClientError::Remote {
            kind: ErrorKind::NotFound,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    match client.read_file(agent.dir.path().to_str().unwrap(), std::io::sink()) {
        Err(ClientError::Remote { .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    assert!(client.ping().is_ok());
}
