//! `prepare-snapshot` and `after-restore`: scrubbing, secrets, identity, reseeding, and freeze/thaw
//! of a real loop-mounted ext4 filesystem.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use common::{TempDir, TestAgent};
use guest_agent::protocol::messages::{
    AfterRestoreRequest, ErrorKind, Identity, PrepareRequest, Secret,
};
use guest_agent::server::freeze;
use guest_agent::ClientError;

fn scrub_only() -> PrepareRequest {
    PrepareRequest {
        freeze: false,
        scrub_secrets: true,
        auto_thaw_ms: None,
    }
}

fn secret(name: &str, data: &[u8]) -> Secret {
    Secret {
        name: name.into(),
        data: data.to_vec().into(),
    }
}

#[test]
fn scrub_zeroes_the_bytes_a_kept_descriptor_sees_and_removes_the_files() {
    let agent = TestAgent::start();
    let secrets = agent.path("secrets");
    std::fs::create_dir_all(secrets.join("nested")).unwrap();
    let value = b"SUPERSECRET-0123456789-the-token";
    std::fs::write(secrets.join("token"), value).unwrap();
    std::fs::write(secrets.join("nested/key"), vec![0xa5u8; 200_000]).unwrap();
    let kept = File::open(secrets.join("token")).unwrap();
    let kept_nested = File::open(secrets.join("nested/key")).unwrap();

    let report = agent.client().prepare_snapshot(scrub_only()).unwrap();

    let mut scrubbed: Vec<_> = report
        .scrubbed
        .iter()
        .map(|s| (s.name.as_str(), s.bytes))
        .collect();
    scrubbed.sort();
    assert_eq!(
        scrubbed,
        vec![("nested/key", 200_000), ("token", value.len() as u64)]
    );
    assert!(report.frozen.is_empty());
    assert!(!secrets.join("token").exists());
    assert!(!secrets.join("nested").exists());
    assert!(secrets.is_dir(), "the secrets directory itself stays");
    let mut buf = vec![0xffu8; value.len()];
    kept.read_exact_at(&mut buf, 0).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "kept descriptor still sees {buf:?}"
    );
    let mut buf = vec![0xffu8; 200_000];
    kept_nested.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // A second prepare finds nothing to scrub.
    let report = agent.client().prepare_snapshot(scrub_only()).unwrap();
    assert!(report.scrubbed.is_empty());
}

#[test]
fn prepare_drops_caches_and_compacts_and_survives_a_kernel_without_the_knobs() {
    // A stand-in for /proc/sys/vm: the agent writes into files that exist and creates none.
    let vm = TempDir::new("sysctl-vm");
    std::fs::write(vm.path().join("drop_caches"), "").unwrap();
    std::fs::write(vm.path().join("compact_memory"), "").unwrap();
    let dir = vm.path().to_owned();
    let agent = TestAgent::start_with(|c| c.vm_sysctl_dir = Some(dir));
    agent.client().prepare_snapshot(scrub_only()).unwrap();
    let read = |f: &str| std::fs::read_to_string(vm.path().join(f)).unwrap();
    assert_eq!(read("drop_caches"), "3");
    assert_eq!(read("compact_memory"), "1");

    // Without the knobs (no CONFIG_COMPACTION, say) prepare still succeeds and creates nothing.
    std::fs::remove_file(vm.path().join("compact_memory")).unwrap();
    std::fs::remove_file(vm.path().join("drop_caches")).unwrap();
    agent.client().prepare_snapshot(scrub_only()).unwrap();
    assert!(!vm.path().join("compact_memory").exists());
    assert!(!vm.path().join("drop_caches").exists());
}

#[test]
fn scrub_of_a_missing_secrets_dir_is_empty() {
    let agent = TestAgent::start();
    let report = agent.client().prepare_snapshot(scrub_only()).unwrap();
    assert!(report.scrubbed.is_empty());
}

#[test]
fn after_restore_writes_secrets_back_0600_and_replaces_old_ones() {
    let agent = TestAgent::start();
    let client = agent.client();
    let report = client
        .after_restore(AfterRestoreRequest {
            secrets: vec![secret("api-key", b"k1"), secret("db", b"password")],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.secrets_written, vec!["api-key", "db"]);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let dir = agent.path("secrets");
    assert_eq!(std::fs::read(dir.join("api-key")).unwrap(), b"k1");
    assert_eq!(
        std::fs::metadata(dir.join("db"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    client
        .after_restore(AfterRestoreRequest {
            secrets: vec![secret("api-key", b"k2")],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(std::fs::read(dir.join("api-key")).unwrap(), b"k2");
    // Scrub, then rehydrate: the cycle of a snapshot.
    client.prepare_snapshot(scrub_only()).unwrap();
    assert!(!dir.join("api-key").exists());
    client
        .after_restore(AfterRestoreRequest {
            secrets: vec![secret("api-key", b"k3")],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(std::fs::read(dir.join("api-key")).unwrap(), b"k3");
}

#[test]
fn after_restore_refuses_bad_names_and_identities_before_doing_anything() {
    let agent = TestAgent::start();
    let client = agent.client();
    for bad in ["../escape", "a/b", "", ".", ".."] {
        match client.after_restore(AfterRestoreRequest {
            secrets: vec![secret("fine", b"x"), secret(bad, b"x")],
            ..Default::default()
        }) {
            Err(ClientError::Remote {
                kind: ErrorKind::InvalidRequest,
                ..
            }) => {}
            other => panic!("{bad:?}: unexpected {other:?}"),
        }
    }
    assert!(!agent.path("secrets/fine").exists());
    match client.after_restore(AfterRestoreRequest {
        identity: Some(Identity {
            hostname: "bad host".into(),
            machine_id: None,
        }),
        ..Default::default()
    }) {
        Err(ClientError::Remote {
            kind: ErrorKind::InvalidRequest,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
    match client.after_restore(AfterRestoreRequest {
        entropy: vec![0u8; 128 * 1024].into(),
        ..Default::default()
    }) {
        Err(ClientError::Remote {
            kind: ErrorKind::InvalidRequest,
            ..
        }) => {}
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn after_restore_reseeds_the_kernel_rng_and_takes_a_new_identity() {
    // A private UTS namespace for this thread (and the agent threads it starts), so that the
    // real sethostname can be exercised without renaming the machine.
    // SAFETY: unshare(CLONE_NEWUTS) affects only the calling thread.
    let own_uts = unsafe { libc::unshare(libc::CLONE_NEWUTS) } == 0;
    if !own_uts {
        eprintln!(
            "no private UTS namespace ({}): the kernel hostname is not set in this test",
            std::io::Error::last_os_error()
        );
    }
    let agent = TestAgent::start_with(|c| c.set_kernel_hostname = own_uts);
    let client = agent.client();
    let entropy: Vec<u8> = (0..64u8).map(|b| b.wrapping_mul(37)).collect();
    let report = client
        .after_restore(AfterRestoreRequest {
            entropy: entropy.into(),
            identity: Some(Identity {
                hostname: "fork-7".into(),
                machine_id: None,
            }),
            ..Default::default()
        })
        .unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert_eq!(report.entropy_added, 64);
    assert!(report.crng_reseeded);
    assert_eq!(report.hostname.as_deref(), Some("fork-7"));
    let id = report.machine_id.clone().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(&id[12..13], "4", "a v4 id: {id}");
    let etc = agent.path("etc");
    assert_eq!(
        std::fs::read_to_string(etc.join("hostname")).unwrap(),
        "fork-7\n"
    );
    assert_eq!(
        std::fs::read_to_string(etc.join("machine-id")).unwrap(),
        format!("{id}\n")
    );
    if own_uts {
        let mut buf = [0u8; 65];
        // SAFETY: buf is writable for its length.
        assert_eq!(
            unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) },
            0
        );
        let name = std::ffi::CStr::from_bytes_until_nul(&buf).unwrap();
        assert_eq!(name.to_str().unwrap(), "fork-7");
    }
    // A given machine-id is used as is; a second fork gets a different generated one.
    let given = "0123456789abcdef0123456789abcdef";
    let report = client
        .after_restore(AfterRestoreRequest {
            identity: Some(Identity {
                hostname: "fork-8".into(),
                machine_id: Some(given.into()),
            }),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.machine_id.as_deref(), Some(given));
    let report = client
        .after_restore(AfterRestoreRequest {
            identity: Some(Identity {
                hostname: "fork-9".into(),
                machine_id: None,
            }),
            ..Default::default()
        })
        .unwrap();
    assert_ne!(report.machine_id.as_deref(), Some(id.as_str()));
}

/// A loop-mounted ext4 filesystem, unmounted (after a thaw) on drop whatever happens.
struct LoopMount {
    _dir: TempDir,
    mount_point: PathBuf,
}

impl LoopMount {
    fn new() -> Result<Self, String> {
        let dir = TempDir::new("loopfs");
        let image = dir.path().join("fs.img");
        let mount_point = dir.path().join("mnt");
        std::fs::create_dir(&mount_point).map_err(|e| e.to_string())?;
        File::create(&image)
            .and_then(|f| f.set_len(32 << 20))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mount_point))?;
        Ok(Self {
            _dir: dir,
            mount_point,
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = freeze::thaw(&self.mount_point);
        if run(Command::new("umount").arg(&self.mount_point)).is_err() {
            let _ = run(Command::new("umount").arg("-l").arg(&self.mount_point));
        }
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Writes and fsyncs a file on another thread; the receiver gets a message when it is done.
fn write_in_background(path: &Path) -> mpsc::Receiver<std::io::Result<()>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_owned();
    thread::spawn(move || {
        let result = File::create(&path).and_then(|mut f| {
            f.write_all(b"written while frozen?")?;
            f.sync_all()
        });
        let _ = tx.send(result);
    });
    rx
}

#[test]
fn freeze_blocks_writes_until_after_restore_thaws() {
    let mount = match LoopMount::new() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED freeze/thaw test: cannot loop-mount ext4: {why}");
            return;
        }
    };
    let point = mount.mount_point.clone();
    let agent = TestAgent::start_with(|c| c.freeze_only = Some(vec![point.clone()]));
    let client = agent.client();

    std::fs::write(point.join("before"), b"ok").unwrap();
    let report = client
        .prepare_snapshot(PrepareRequest {
            auto_thaw_ms: None,
            ..PrepareRequest::default()
        })
        .unwrap();
    assert_eq!(report.frozen, vec![point.display().to_string()]);
    assert_eq!(agent.server.hooks().frozen(), vec![point.clone()]);

    let done = write_in_background(&point.join("during"));
    assert!(
        done.recv_timeout(Duration::from_millis(300)).is_err(),
        "a write to the frozen filesystem completed"
    );
    // Freezing twice is harmless.
    let again = client
        .prepare_snapshot(PrepareRequest {
            auto_thaw_ms: None,
            ..PrepareRequest::default()
        })
        .unwrap();
    assert_eq!(again.frozen, vec![point.display().to_string()]);

    let report = client
        .after_restore(AfterRestoreRequest {
            thaw: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(report.thawed, vec![point.display().to_string()]);
    done.recv_timeout(Duration::from_secs(10))
        .expect("the write completes after the thaw")
        .expect("and succeeds");
    assert_eq!(
        std::fs::read(point.join("during")).unwrap(),
        b"written while frozen?"
    );

    // A thaw with nothing recorded tries every candidate and ignores "not frozen".
    let report = client
        .after_restore(AfterRestoreRequest {
            thaw: true,
            ..Default::default()
        })
        .unwrap();
    assert!(report.thawed.is_empty());
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[test]
fn auto_thaw_releases_a_guest_whose_host_never_came_back() {
    let mount = match LoopMount::new() {
        Ok(m) => m,
        Err(why) => {
            eprintln!("SKIPPED auto-thaw test: cannot loop-mount ext4: {why}");
            return;
        }
    };
    let point = mount.mount_point.clone();
    let agent = TestAgent::start_with(|c| c.freeze_only = Some(vec![point.clone()]));
    let report = agent
        .client()
        .prepare_snapshot(PrepareRequest {
            auto_thaw_ms: Some(300),
            ..PrepareRequest::default()
        })
        .unwrap();
    assert_eq!(report.frozen.len(), 1);
    let done = write_in_background(&point.join("late"));
    done.recv_timeout(Duration::from_secs(10))
        .expect("the auto-thaw releases the write")
        .unwrap();
    assert!(agent.server.hooks().frozen().is_empty());
}
