#![no_main]
//! `Manifest::parse` on hostile bytes. The first input byte says whether to put the right
//! checksum in first (odd) or take the bytes as they are (even): without that, almost every
//! mutation stops at the checksum.
//!
//! Promised of an accepted manifest: the tag, the parent and every file name are plain names
//! (one path component, joined under a snapshot directory it stays there), files are few and
//! each listed once, the files its kind needs are listed, vCPUs and memory are non-zero, the
//! kernel digest is 64 hex digits; and what we write back from it loads again unchanged.

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use snapshot::manifest::{
    is_safe_name, Kind, Manifest, DIRTY, FORMAT_VERSION, MEMORY, ROOTFS, VMSTATE,
};

#[path = "common.rs"]
mod common;
#[path = "seeds.rs"]
mod seeds;

fn seeds() -> Vec<Vec<u8>> {
    let full = common::sample(Kind::Full, &[(VMSTATE, b"s"), (MEMORY, b"m")]);
    let diff = common::sample(
        Kind::Diff,
        &[(VMSTATE, b"s"), (MEMORY, b"m"), (DIRTY, b"d")],
    );
    let disk = common::sample(Kind::Disk, &[(ROOTFS, b"r")]);
    [full, diff, disk]
        .iter()
        .map(|m| {
            let mut v = vec![1u8];
            v.extend(m.to_json());
            v
        })
        .collect()
}

fn plain(name: &str) {
    assert!(is_safe_name(name), "{name:?}");
    assert!(!name.is_empty() && name.len() <= 128, "{name:?}");
    assert!(
        !name.contains(['/', '\\', '\0']) && !name.starts_with('.'),
        "{name:?}"
    );
    let mut c = Path::new(name).components();
    assert!(
        matches!(c.next(), Some(Component::Normal(n)) if n == name),
        "{name:?}"
    );
    assert!(c.next().is_none(), "{name:?}");
    let dir = Path::new("/snapshots/t");
    assert_eq!(dir.join(name).parent(), Some(dir), "{name:?}");
}

fn check(m: &Manifest) {
    assert_eq!(m.format_version, FORMAT_VERSION);
    plain(&m.tag);
    if let Some(p) = &m.parent {
        plain(p);
    }
    assert!(m.files.len() <= 16);
    for (i, f) in m.files.iter().enumerate() {
        plain(&f.name);
        assert!(
            m.files[..i].iter().all(|g| g.name != f.name),
            "{} listed twice",
            f.name
        );
    }
    let needed: &[&str] = match m.kind {
        Kind::Disk => &[ROOTFS],
        Kind::Full => &[VMSTATE, MEMORY],
        Kind::Diff => &[VMSTATE, MEMORY, DIRTY],
    };
    for n in needed {
        assert!(m.file(n).is_some(), "{n} missing");
    }
    assert!(m.kind != Kind::Diff || m.parent.is_some());
    assert!(m.vcpus > 0 && m.mem_mib > 0);
    assert!(m.kernel.sha256.len() == 64 && m.kernel.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
}

fuzz_target!(
    init: seeds::write_if_empty(seeds),
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        let bytes = if sel & 1 == 1 {
            common::patch_checksum(rest)
        } else {
            rest.to_vec()
        };
        let Ok(m) = Manifest::parse(&bytes) else {
            return;
        };
        check(&m);
        let again = Manifest::parse(&m.to_json()).expect("a manifest we accepted, written back, loads");
        let (mut a, mut b) = (m, again);
        a.checksum.clear();
        b.checksum.clear();
        assert_eq!(a, b);
    }
);
