#![no_main]
//! `archive::read_manifest` and `archive::import` on hostile archives, into a scratch directory
//! (under /dev/shm when there is one: import fsyncs every file).
//!
//! The first input byte picks what the rest is: 0 the `.tar.zst` file as it is; 1 a tar stream,
//! compressed here; 2 a tar stream whose first entry is read as a manifest and rewritten with the
//! sizes and digests of the entries that follow and a right checksum, so mutations get past the
//! digests to the checks behind them. Bit 2 imports under a tag of our own.
//!
//! Promised: nothing is written outside the snapshots directory, no symlink or special file is
//! ever created, a failed import leaves nothing behind, and a successful one leaves exactly one
//! snapshot, under the expected tag, holding the files its manifest lists and the manifest the
//! archive began with.
//!
//! Work per input stays bounded because the input is at most `-max_len` bytes and only those
//! bytes are compressed (mode 1) or decompressed (mode 0, a zstd frame cannot expand past its
//! window without data to expand); entries over 1 MiB are not rewritten in mode 2.

use std::io::Read;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use snapshot::archive;
use snapshot::manifest::{Kind, Manifest, MANIFEST, MEMORY, ROOTFS, VMSTATE};
use snapshot::stamp::STAMPS;

#[path = "common.rs"]
mod common;
#[path = "seeds.rs"]
mod seeds;

fn scratch() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("snapshot-fuzz-{}", std::process::id()))
}

fn tar_of(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn seeds() -> Vec<Vec<u8>> {
    let state = snapshot::vmstate::encode(&(1u32, vec![2u8; 8])).unwrap();
    let memory = vec![0u8; 8192];
    let full = common::sample(Kind::Full, &[(VMSTATE, &state), (MEMORY, &memory)]);
    let disk = common::sample(Kind::Disk, &[(ROOTFS, b"ext4")]);
    let mut out = Vec::new();
    for (m, files) in [
        (
            full,
            vec![(VMSTATE, state.clone()), (MEMORY, memory.clone())],
        ),
        (disk, vec![(ROOTFS, b"ext4".to_vec())]),
    ] {
        let mut entries = vec![(MANIFEST, m.to_json())];
        entries.extend(files);
        let tar = tar_of(&entries);
        out.push([vec![0u8], zstd::encode_all(&tar[..], 1).unwrap()].concat());
        out.push([vec![1u8], tar.clone()].concat());
        // Digests wrong on purpose: mode 2 puts them right.
        let mut bad = m.clone();
        for f in &mut bad.files {
            f.digest = "x".into();
        }
        entries[0].1 = serde_json::to_vec_pretty(&bad).unwrap();
        out.push([vec![2u8], tar_of(&entries)].concat());
    }
    // The same, imported under a tag of our own.
    let renamed: Vec<_> = out
        .iter()
        .map(|s| [&[s[0] | 4], &s[1..]].concat())
        .collect();
    out.extend(renamed);
    out
}

/// The tar stream with its manifest made to agree with the entries behind it.
fn repair(tar_bytes: &[u8]) -> Option<Vec<u8>> {
    let mut ar = tar::Archive::new(tar_bytes);
    let mut entries = Vec::new();
    for e in ar.entries().ok()? {
        let mut e = e.ok()?;
        if entries.len() >= 24 || e.size() > 1 << 20 {
            return None;
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).ok()?;
        let name = e.path_bytes().into_owned();
        entries.push((e.header().clone(), name, data));
    }
    let (first, rest) = entries.split_first()?;
    let mut m: Manifest = serde_json::from_slice(&first.2).ok()?;
    for f in &mut m.files {
        if let Some((_, _, data)) = rest.iter().find(|e| e.1 == f.name.as_bytes()) {
            f.size = data.len() as u64;
            f.digest = common::digest(data);
        }
    }
    let manifest = m.to_json();
    let mut b = tar::Builder::new(Vec::new());
    for (i, (h, _, data)) in entries.iter().enumerate() {
        let data = if i == 0 { &manifest } else { data };
        let mut h = h.clone();
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, &data[..]).ok()?;
    }
    b.into_inner().ok()
}

/// Every path under `dir`, with no symlink, device or fifo among them.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let t = std::fs::symlink_metadata(&p).unwrap().file_type();
        assert!(
            t.is_file() || t.is_dir(),
            "{} is neither file nor directory",
            p.display()
        );
        out.push(p.clone());
        if t.is_dir() {
            walk(&p, out);
        }
    }
}

fuzz_target!(
    init: seeds::write_if_empty(seeds),
    |data: &[u8]| {
        let Some((&sel, rest)) = data.split_first() else {
            return;
        };
        let file = match sel & 3 {
            0 => rest.to_vec(),
            1 => zstd::encode_all(rest, 1).unwrap(),
            _ => match repair(rest) {
                Some(tar) => zstd::encode_all(&tar[..], 1).unwrap(),
                None => return,
            },
        };
        let root = scratch();
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let path = root.join("in.tar.zst");
        std::fs::write(&path, &file).unwrap();
        let snaps = root.join("snapshots");
        let tag = (sel & 4 != 0).then_some("renamed");

        let head = archive::read_manifest(&path);
        let result = archive::import(&path, &snaps, tag);

        let mut top: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        top.sort();
        assert_eq!(top, ["in.tar.zst", "snapshots"], "written beside the snapshots");
        let mut all = Vec::new();
        walk(&snaps, &mut all);
        match result {
            Err(_) => assert!(all.is_empty(), "a failed import left {all:?}"),
            Ok(snap) => {
                let head = head.expect("imported an archive whose manifest does not read");
                let want = tag.unwrap_or(&head.tag);
                assert_eq!(snap.dir, snaps.join(want));
                assert_eq!(snap.manifest.tag, want);
                let (mut a, mut b) = (head.clone(), snap.manifest.clone());
                a.checksum.clear();
                b.checksum.clear();
                a.tag.clear();
                b.tag.clear();
                assert_eq!(a, b);
                for p in all.iter().filter(|p| **p != snap.dir) {
                    let rel = p.strip_prefix(&snap.dir).expect("outside the snapshot");
                    let name = rel.to_str().unwrap();
                    assert!(
                        name == MANIFEST || name == STAMPS || head.file(name).is_some(),
                        "unlisted {name}"
                    );
                    if let Some(f) = head.file(name) {
                        assert_eq!(std::fs::metadata(p).unwrap().len(), f.size);
                    }
                }
                for f in &head.files {
                    assert!(snap.dir.join(&f.name).is_file(), "{} missing", f.name);
                }
            }
        }
        // Left behind only by a crashing input, for a look at what it wrote.
        let _ = std::fs::remove_dir_all(&root);
    }
);
