//! The secrets directory: scrubbing before capture and writing back after restore.
//!
//! Scrubbing overwrites each regular file's contents in place with zeros of the same length, fsyncs
//! and unlinks it. On a tmpfs the file's pages are the only copy, so overwriting them is what keeps
//! the bytes out of the memory snapshot (an unlink alone would free the pages with the secret still
//! in them).

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::messages::{ScrubbedFile, Secret};

/// Directories nested deeper than this are not followed.
const MAX_DEPTH: usize = 8;
static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Why a secrets operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SecretsError {
    #[error("invalid secret name {0:?}: must be a plain file name")]
    BadName(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> SecretsError + '_ {
    move |source| SecretsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Checks that `name` is a single path component a secret may be stored under.
pub(crate) fn validate_name(name: &str) -> Result<(), SecretsError> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with(".agent-tmp")
        && !name.contains(['/', '\0']);
    if ok {
        Ok(())
    } else {
        Err(SecretsError::BadName(name.to_owned()))
    }
}

/// Zeroes and removes everything under `dir` (which itself stays). A missing `dir` is empty.
pub(crate) fn scrub(dir: &Path) -> Result<Vec<ScrubbedFile>, SecretsError> {
    let mut scrubbed = Vec::new();
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(scrubbed),
        Err(e) => return Err(io_at(dir)(e)),
        Ok(_) => {}
    }
    scrub_dir(dir, Path::new(""), 0, &mut scrubbed)?;
    Ok(scrubbed)
}

fn scrub_dir(
    dir: &Path,
    rel: &Path,
    depth: usize,
    scrubbed: &mut Vec<ScrubbedFile>,
) -> Result<(), SecretsError> {
    let entries = fs::read_dir(dir).map_err(io_at(dir))?;
    for entry in entries {
        let entry = entry.map_err(io_at(dir))?;
        let path = entry.path();
        let rel_path = rel.join(entry.file_name());
        let file_type = entry.file_type().map_err(io_at(&path))?;
        if file_type.is_dir() {
            if depth < MAX_DEPTH {
                scrub_dir(&path, &rel_path, depth + 1, scrubbed)?;
                fs::remove_dir(&path).map_err(io_at(&path))?;
            }
            continue;
        }
        if file_type.is_file() {
            let bytes = zero_fill(&path)?;
            scrubbed.push(ScrubbedFile {
                name: rel_path.to_string_lossy().into_owned(),
                bytes,
            });
        }
        // Symlinks and special files hold no secret bytes of their own: just unlink them.
        fs::remove_file(&path).map_err(io_at(&path))?;
    }
    Ok(())
}

/// Overwrites a file's contents with zeros of the same length and fsyncs it; returns the length.
fn zero_fill(path: &Path) -> Result<u64, SecretsError> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_at(path))?;
    let len = file.metadata().map_err(io_at(path))?.len();
    let mut offset = 0u64;
    while offset < len {
        let n = usize::try_from(len - offset).map_or(ZEROS.len(), |left| left.min(ZEROS.len()));
        file.write_all_at(&ZEROS[..n], offset)
            .map_err(io_at(path))?;
        offset += n as u64;
    }
    file.sync_all().map_err(io_at(path))?;
    Ok(len)
}

/// Writes `secrets` into `dir` (created 0700 if missing), each file 0600, atomically: a temporary
/// file created with `O_EXCL`, fsynced, renamed over the name.
pub(crate) fn write_all(dir: &Path, secrets: &[Secret]) -> Result<Vec<String>, SecretsError> {
    for secret in secrets {
        validate_name(&secret.name)?;
    }
    if secrets.is_empty() {
        return Ok(Vec::new());
    }
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        fs::set_permissions(dir, Permissions::from_mode(0o700)).map_err(io_at(dir))?;
    }
    let mut written = Vec::with_capacity(secrets.len());
    for secret in secrets {
        let target = dir.join(&secret.name);
        let tmp = dir.join(format!(".agent-tmp.{}.{}", std::process::id(), secret.name));
        let _ = fs::remove_file(&tmp); // a leftover of a crash
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.set_permissions(Permissions::from_mode(0o600))?;
            file.write_all(secret.data.as_bytes())?;
            file.sync_all()?;
            fs::rename(&tmp, &target)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(io_at(&target)(e));
        }
        written.push(secret.name.clone());
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(written)
}
