//! Snapshot errors. Each has a stable `code()` so the CLI can map it to an exit code and a JSON
//! error without parsing messages.

use std::path::PathBuf;

use crate::manifest::ManifestError;
use crate::vmstate::StateError;

/// Why a snapshot was refused for restore.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("kernel mismatch: snapshot was taken with sha256 {expected}, {path} has {actual}")]
    KernelMismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("CPU vendor mismatch: snapshot taken on {saved}, this host is {host}")]
    CpuVendor { saved: String, host: String },
    #[error("{file} is corrupt: digest {actual}, manifest says {expected}")]
    Digest {
        file: String,
        expected: String,
        actual: String,
    },
    #[error("{file} is {actual} bytes, manifest says {expected}")]
    Size {
        file: String,
        expected: u64,
        actual: u64,
    },
    #[error("{0} is missing")]
    MissingFile(String),
    /// A link or a special file where the manifest names a file: never followed or read (a
    /// jailed VMM writes its snapshots, and a link could lead a root reader to any host file).
    #[error("{0} is not a regular file")]
    NotRegular(String),
    #[error(transparent)]
    Manifest(ManifestError),
    #[error(transparent)]
    State(StateError),
}

impl Refusal {
    /// A stable machine-readable reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::KernelMismatch { .. } => "kernel-mismatch",
            Refusal::CpuVendor { .. } => "cpu-vendor-mismatch",
            Refusal::Digest { .. } => "digest-mismatch",
            Refusal::Size { .. } => "size-mismatch",
            Refusal::MissingFile(_) => "missing-file",
            Refusal::NotRegular(_) => "not-a-regular-file",
            Refusal::Manifest(ManifestError::UnknownVersion { .. }) => "unknown-format-version",
            Refusal::Manifest(_) => "corrupt-manifest",
            Refusal::State(StateError::UnknownVersion { .. }) => "unknown-format-version",
            Refusal::State(StateError::Crc { .. }) => "crc-mismatch",
            Refusal::State(_) => "corrupt-state",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot tag {0:?} is not a plain name (letters, digits, - _ . : +)")]
    InvalidTag(String),
    #[error("snapshot {0} already exists")]
    Exists(String),
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    /// A diff's parent predates page digests, so what changed since it cannot be told.
    #[error("parent {0} has no page digests (an older version took it): take a full snapshot to diff against")]
    ParentWithoutDigests(String),
    #[error("cannot read kernel {path}: {source}")]
    Kernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read rootfs {path}: {source}")]
    Rootfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot save VM state (nothing was written): {0}")]
    Save(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Encode(StateError),
    /// The capture holds delivered secrets and the caller asked for none (`--secrets strict`):
    /// nothing was kept.
    #[error("snapshot refused: the capture holds secrets: {}; nothing was kept", .0.summary())]
    SecretResidue(Box<crate::residue::SecretScan>),
    #[error("cannot scan the capture for secrets: {0}")]
    SecretScan(#[from] crate::residue::ResidueError),
    #[error("snapshot refused ({reason}): {refusal}", reason = .refusal.reason())]
    Refused {
        #[from]
        refusal: Refusal,
    },
}

impl SnapshotError {
    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            SnapshotError::InvalidTag(_) => "invalid-argument",
            SnapshotError::Exists(_) | SnapshotError::ParentWithoutDigests(_) => "conflict",
            SnapshotError::NotFound(_) => "not-found",
            SnapshotError::Kernel { .. } | SnapshotError::Rootfs { .. } => "not-found",
            SnapshotError::Save(_) => "host-unsupported",
            SnapshotError::Io { .. } | SnapshotError::Encode(_) => "io",
            SnapshotError::Refused { .. } | SnapshotError::SecretResidue(_) => "snapshot-refused",
            SnapshotError::SecretScan(_) => "io",
        }
    }
}

pub(crate) fn io(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}
