//! `manifest.json`: what a snapshot is and every file it holds, written last during capture.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::hostcpu::HostCpu;

/// Bump on any incompatible change of the snapshot directory format.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const VMSTATE: &str = "vmstate.bin";
pub const MEMORY: &str = "memory.bin";
pub const ROOTFS: &str = "rootfs.ext4";
/// In a diff snapshot: which pages `memory.bin` holds (one bit per 4 KiB page, little-endian
/// u64 words, the regions back to back).
pub const DIRTY: &str = "dirty.bin";
/// Longest parent chain a diff may have.
pub const MAX_CHAIN: usize = 64;
/// A manifest is a few KiB; anything near this is not one of ours.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
const MAX_FILES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Memory, state and rootfs.
    Full,
    /// Only the pages dirtied since `parent`.
    Diff,
    /// Only the rootfs of a halted workspace: restoring it boots afresh from that disk.
    Disk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRef {
    pub path: String,
    pub sha256: String,
}

/// One CPUID leaf as the guest saw it (the boundary's type: the VM reports it).
pub use snapshot_boundary::CpuidLeaf;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tag: String,
    pub kind: Kind,
    #[serde(default)]
    pub parent: Option<String>,
    /// RFC 3339, UTC.
    pub created: String,
    /// Seconds since the Unix epoch, for retention.
    pub created_unix: u64,
    /// Nanoseconds since the epoch: orders snapshots taken within one second.
    #[serde(default)]
    pub created_ns: u64,
    #[serde(default)]
    pub workspace: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub kernel: KernelRef,
    pub cmdline: String,
    pub host_cpu: HostCpu,
    pub cpuid: Vec<CpuidLeaf>,
    pub files: Vec<FileEntry>,
    #[serde(default)]
    pub note: Option<String>,
    /// What the host's scan for delivered secrets found in this snapshot's files (names and page
    /// counts, never values). Absent when no scan was asked for, and in older manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_scan: Option<crate::residue::SecretScan>,
    /// Digest of this manifest with this field empty: any edit or flipped byte is detected.
    #[serde(default)]
    pub checksum: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("no manifest.json: not a complete snapshot")]
    Missing,
    #[error("cannot read manifest.json: {0}")]
    Read(#[source] std::io::Error),
    #[error("manifest.json is {0} bytes, larger than any manifest")]
    TooLarge(u64),
    #[error("manifest.json is not valid: {0}")]
    Parse(String),
    #[error(
        "snapshot format version {found} is not supported (this build reads version {supported})"
    )]
    UnknownVersion { found: u32, supported: u32 },
    #[error("manifest.json is not valid: {0}")]
    Invalid(String),
}

/// Names that may appear in a manifest: plain file names, no separators, no dot-dot.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '+'))
}

impl Manifest {
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The JSON form, with `checksum` filled in.
    pub fn to_json(&self) -> Vec<u8> {
        let mut m = self.clone();
        m.checksum = m.compute_checksum();
        m.json_bytes()
    }

    fn json_bytes(&self) -> Vec<u8> {
        // Serializing plain data to JSON cannot fail.
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    fn compute_checksum(&self) -> String {
        let mut m = self.clone();
        m.checksum = String::new();
        let mut d = crate::digest::FileDigest::new();
        d.update(&m.json_bytes());
        d.finish()
    }
}

const CHECKSUM_KEY: &[u8] = b"\"checksum\": \"";

/// The digest of the manifest file's own bytes with the checksum value blanked, exactly as it
/// was computed when written: every byte outside that value is covered.
fn raw_checksum(bytes: &[u8]) -> String {
    let Some(start) = bytes
        .windows(CHECKSUM_KEY.len())
        .rposition(|w| w == CHECKSUM_KEY)
        .map(|p| p + CHECKSUM_KEY.len())
    else {
        return String::from("absent");
    };
    let Some(len) = bytes[start..].iter().position(|b| *b == b'"') else {
        return String::from("absent");
    };
    let mut d = crate::digest::FileDigest::new();
    d.update(&bytes[..start]);
    d.update(&bytes[start + len..]);
    d.finish()
}

impl Manifest {
    pub fn load(dir: &Path) -> Result<Self, ManifestError> {
        use std::io::Read;
        let path = dir.join(MANIFEST);
        // A jailed VMM writes its snapshots: never through a link, never a FIFO (which would
        // hold `snapshot list` forever), never more than a manifest's bound.
        let file = match crate::untrusted::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ManifestError::Missing)
            }
            Err(e) => return Err(ManifestError::Read(e)),
        };
        let meta = file.metadata().map_err(ManifestError::Read)?;
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(meta.len()));
        }
        let mut bytes = Vec::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(ManifestError::Read)?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge(bytes.len() as u64));
        }
        Self::parse(&bytes)
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        // Look at the version first, so a future format is refused as such, not as garbage.
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: u32,
        }
        let v: VersionOnly =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if v.format_version != FORMAT_VERSION {
            return Err(ManifestError::UnknownVersion {
                found: v.format_version,
                supported: FORMAT_VERSION,
            });
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if m.checksum != raw_checksum(bytes) {
            return Err(ManifestError::Invalid(
                "checksum mismatch: the manifest was altered".into(),
            ));
        }
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        let bad = |s: String| Err(ManifestError::Invalid(s));
        if !is_safe_name(&self.tag) {
            return bad(format!("tag {:?} is not a plain name", self.tag));
        }
        if self.files.len() > MAX_FILES {
            return bad(format!("{} files listed", self.files.len()));
        }
        for (i, f) in self.files.iter().enumerate() {
            if !is_safe_name(&f.name) {
                return bad(format!("file name {:?} is not a plain name", f.name));
            }
            // `file()` finds the first entry of a name and export archives every entry: a name
            // listed twice would be checked against one entry and archived twice.
            if self.files[..i].iter().any(|g| g.name == f.name) {
                return bad(format!("file {:?} is listed twice", f.name));
            }
        }
        let needed: &[&str] = match self.kind {
            Kind::Disk => &[ROOTFS],
            Kind::Full | Kind::Diff => &[VMSTATE, MEMORY],
        };
        for needed in needed {
            if self.file(needed).is_none() {
                return bad(format!("{needed} is not listed"));
            }
        }
        if self.kind == Kind::Diff && (self.parent.is_none() || self.file(DIRTY).is_none()) {
            return bad("a diff snapshot needs a parent and dirty.bin".into());
        }
        if let Some(p) = &self.parent {
            if !is_safe_name(p) {
                return bad(format!("parent {p:?} is not a plain name"));
            }
        }
        if self.vcpus == 0 || self.mem_mib == 0 {
            return bad("zero vCPUs or memory".into());
        }
        if self.kernel.sha256.len() != 64
            || !self.kernel.sha256.chars().all(|c| c.is_ascii_hexdigit())
        {
            return bad("kernel sha256 is not 64 hex digits".into());
        }
        Ok(())
    }
}

/// RFC 3339 UTC time for seconds since the epoch (civil-from-days, Howard Hinnant's algorithm).
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            format_version: FORMAT_VERSION,
            tag: "t1".into(),
            kind: Kind::Full,
            parent: None,
            created: rfc3339(1_781_166_764),
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
            host_cpu: HostCpu {
                vendor: "GenuineIntel".into(),
                model: "x".into(),
            },
            cpuid: vec![],
            files: vec![
                FileEntry {
                    name: VMSTATE.into(),
                    size: 1,
                    digest: "d".into(),
                },
                FileEntry {
                    name: MEMORY.into(),
                    size: 1,
                    digest: "d".into(),
                },
            ],
            note: None,
            secret_scan: None,
            checksum: String::new(),
        }
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_781_166_764), "2026-06-11T08:32:44Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn any_edit_is_detected() {
        let json = sample().to_json();
        for i in 0..json.len() {
            let mut bad = json.clone();
            bad[i] ^= 0x01;
            assert!(
                Manifest::parse(&bad).is_err(),
                "flip at {i}: {:?}",
                String::from_utf8_lossy(&bad)
            );
        }
    }

    #[test]
    fn round_trip_and_unknown_version() {
        let m = sample();
        let mut parsed = Manifest::parse(&m.to_json()).unwrap();
        parsed.checksum.clear();
        assert_eq!(parsed, m);
        let mut v = m.clone();
        v.format_version = 7;
        match Manifest::parse(&v.to_json()) {
            Err(ManifestError::UnknownVersion {
                found: 7,
                supported,
            }) => {
                assert_eq!(supported, FORMAT_VERSION)
            }
            other => panic!("{other:?}"),
        }
    }

    /// A manifest.json that is a link (to a valid manifest) or a FIFO is refused, at once.
    #[test]
    fn load_reads_only_a_regular_file() {
        let dir = std::env::temp_dir().join(format!("manifest-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (real, linked, fifo) = (dir.join("real"), dir.join("linked"), dir.join("fifo"));
        for d in [&real, &linked, &fifo] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(real.join(MANIFEST), sample().to_json()).unwrap();
        assert!(Manifest::load(&real).is_ok());
        std::os::unix::fs::symlink(real.join(MANIFEST), linked.join(MANIFEST)).unwrap();
        assert!(matches!(
            Manifest::load(&linked),
            Err(ManifestError::Read(_))
        ));
        let c = std::ffi::CString::new(fifo.join(MANIFEST).into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: mkfifo with a valid path string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(matches!(Manifest::load(&fifo), Err(ManifestError::Read(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn secret_scan_is_optional_and_round_trips() {
        // A manifest without the field (every one written before it existed) has no such key,
        // and still loads.
        let old = sample().to_json();
        assert!(!String::from_utf8_lossy(&old).contains("secret_scan"));
        assert_eq!(Manifest::parse(&old).unwrap().secret_scan, None);
        let mut m = sample();
        m.secret_scan = Some(crate::residue::SecretScan {
            scanned: vec!["TOKEN".into()],
            found: vec![crate::residue::Residue {
                name: "TOKEN".into(),
                pages: 2,
                files: vec![crate::residue::FilePages {
                    file: MEMORY.into(),
                    pages: 2,
                }],
            }],
            skipped: vec![],
            bytes_scanned: 4096,
            millis: 1,
        });
        let mut parsed = Manifest::parse(&m.to_json()).unwrap();
        parsed.checksum.clear();
        assert_eq!(parsed, m);
    }

    /// Found by the `manifest` fuzz target (minimized): a diff listing memory.bin twice, with
    /// a valid checksum, was accepted.
    #[test]
    fn a_file_listed_twice_is_refused() {
        let blank = br#"{"format_version": 1, "tag": "t1", "kind": "diff", "parent": "base",
"created": "2026-06-1", "created_unix": 17810000000, "vcpus": 2, "mem_mib": 512,
"kernel": {"path": "/k", "sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
"cmdline": "console=tt", "host_cpu": {"vendor": "GenuineIntel", "model": "x"}, "cpuid": [],
"files": [{"name": "vmstate.bin", "size": 1, "digest": "d"},
  {"name": "memory.bin", "size": 1, "digest": "d"},
  {"name": "dirty.bin", "size": 1, "digest": "d"},
  {"name": "memory.bin", "size": 1, "digest": "e"}],
"checksum": ""}"#;
        let text = String::from_utf8(blank.to_vec()).unwrap();
        let json = text.replace(
            "\"checksum\": \"\"",
            &format!("\"checksum\": \"{}\"", raw_checksum(blank)),
        );
        match Manifest::parse(json.as_bytes()) {
            Err(ManifestError::Invalid(why)) => assert!(why.contains("twice"), "{why}"),
            other => panic!("{other:?}"),
        }
        let mut m = sample();
        m.files.push(m.files[0].clone());
        assert!(Manifest::parse(&m.to_json()).is_err());
    }

    #[test]
    fn hostile_names_are_refused() {
        for name in ["../etc/passwd", "a/b", "..", ".hidden", "", "x\u{0}y"] {
            let mut m = sample();
            m.files[0].name = name.into();
            assert!(Manifest::parse(&m.to_json()).is_err(), "{name:?}");
            let mut m = sample();
            m.tag = name.into();
            assert!(Manifest::parse(&m.to_json()).is_err(), "tag {name:?}");
        }
        let mut m = sample();
        m.files.retain(|f| f.name != MEMORY);
        assert!(Manifest::parse(&m.to_json()).is_err());
        assert!(Manifest::parse(b"{\"format_version\": 1").is_err());
        assert!(Manifest::parse(b"\xff\xfe").is_err());
    }
}
