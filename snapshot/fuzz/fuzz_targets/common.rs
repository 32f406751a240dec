//! What several snapshot targets share: sample manifests as capture writes them, and the
//! manifest checksum (xxh3 over the file's own bytes with the value blanked, as
//! `manifest::raw_checksum` computes it), so mutated manifests get past it and reach validation.

#![allow(dead_code)]

use snapshot::digest::FileDigest;
use snapshot::hostcpu::HostCpu;
use snapshot::manifest::{self, FileEntry, KernelRef, Kind, Manifest, FORMAT_VERSION};

pub fn sample(kind: Kind, files: &[(&str, &[u8])]) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        tag: "t1".into(),
        kind,
        parent: (kind == Kind::Diff).then(|| "base".into()),
        created: manifest::rfc3339(1_781_166_764),
        created_unix: 1_781_166_764,
        created_ns: 1_781_166_764_000_000_000,
        workspace: Some("w".into()),
        image: None,
        vcpus: 2,
        mem_mib: 512,
        kernel: KernelRef {
            path: "/k".into(),
            sha256: "a".repeat(64),
        },
        cmdline: "console=ttyS0".into(),
        // This host's: an archive from another vendor is refused before the checks behind.
        host_cpu: HostCpu::current(),
        cpuid: vec![],
        files: files
            .iter()
            .map(|(name, data)| FileEntry {
                name: (*name).into(),
                size: data.len() as u64,
                digest: digest(data),
            })
            .collect(),
        note: None,
        secret_scan: None,
        checksum: String::new(),
    }
}

pub fn digest(data: &[u8]) -> String {
    let mut d = FileDigest::new();
    d.update(data);
    d.finish()
}

const CHECKSUM_KEY: &[u8] = b"\"checksum\": \"";

/// `bytes` with the value of its last `"checksum": "..."` replaced by the right one.
pub fn patch_checksum(bytes: &[u8]) -> Vec<u8> {
    let Some(start) = bytes
        .windows(CHECKSUM_KEY.len())
        .rposition(|w| w == CHECKSUM_KEY)
        .map(|p| p + CHECKSUM_KEY.len())
    else {
        return bytes.to_vec();
    };
    let Some(len) = bytes[start..].iter().position(|b| *b == b'"') else {
        return bytes.to_vec();
    };
    let mut d = FileDigest::new();
    d.update(&bytes[..start]);
    d.update(&bytes[start + len..]);
    let mut out = bytes[..start].to_vec();
    out.extend_from_slice(d.finish().as_bytes());
    out.extend_from_slice(&bytes[start + len..]);
    out
}
