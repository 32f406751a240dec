//! `read-file` and `write-file`, streamed in chunks.
//!
//! Writes are atomic: the body goes to a fresh temporary file (`O_EXCL`) in the target's directory,
//! which gets its owner and mode, is fsynced and renamed over the target, and the directory is
//! fsynced. A failed or abandoned upload leaves the target untouched and removes the temporary file.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;

use super::connection::{Inbound, Reply};
use crate::protocol::messages::{
    ErrorKind, FileInfo, ReadFileRequest, ServerMsg, WriteFileRequest,
};
use crate::protocol::CHUNK_LEN;
use crate::Wiped;

/// Why a file request failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FileError {
    #[error("path must be absolute: {0:?}")]
    NotAbsolute(String),
    #[error("path has no file name: {0:?}")]
    NoFileName(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a regular file")]
    NotRegular(PathBuf),
    #[error("mode {0:#o} has bits outside 0o7777")]
    BadMode(u32),
    #[error("upload of {0} cancelled by the client")]
    Cancelled(PathBuf),
}

impl FileError {
    fn kind(&self) -> ErrorKind {
        match self {
            FileError::Io { source, .. } => ErrorKind::from_io(source),
            _ => ErrorKind::InvalidRequest,
        }
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

fn absolute(path: &str) -> Result<&Path, FileError> {
    let p = Path::new(path);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(FileError::NotAbsolute(path.to_owned()))
    }
}

/// Sends a file: `FileStart`, `Data` chunks, `End`.
pub(crate) fn read(req: ReadFileRequest, reply: Reply) {
    match read_inner(&req, &reply) {
        Ok(Some(total)) => reply.finish(ServerMsg::End(total)),
        Ok(None) => {} // the client is gone
        Err(e) => reply.fail(e.kind(), e.to_string()),
    }
}

fn read_inner(req: &ReadFileRequest, reply: &Reply) -> Result<Option<u64>, FileError> {
    let path = absolute(&req.path)?;
    let mut file = File::open(path).map_err(io_at(path))?;
    let meta = file.metadata().map_err(io_at(path))?;
    if !meta.is_file() {
        return Err(FileError::NotRegular(path.to_owned()));
    }
    reply.send(ServerMsg::FileStart(FileInfo {
        size: meta.len(),
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
    }));
    // File contents may be secrets: the buffer is zeroed however the loop ends.
    let mut buf = Wiped(vec![0u8; CHUNK_LEN]);
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf.0) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_at(path)(e)),
        };
        // (Outbox::send zeroes the chunk once it is sent.)
        if !reply.send(ServerMsg::Data(buf.0[..n].to_vec())) {
            return Ok(None);
        }
        total += n as u64;
    }
    Ok(Some(total))
}

/// Receives a file body from `body` and writes it atomically.
pub(crate) fn write(req: WriteFileRequest, body: Receiver<Inbound>, reply: Reply) {
    match write_inner(&req, &body) {
        Ok(Some(bytes)) => reply.finish(ServerMsg::Written(bytes)),
        Ok(None) => {} // the connection closed mid-upload: nobody to answer
        Err(e) => reply.fail(e.kind(), e.to_string()),
    }
}

fn write_inner(req: &WriteFileRequest, body: &Receiver<Inbound>) -> Result<Option<u64>, FileError> {
    let path = absolute(&req.path)?;
    if req.mode & !0o7777 != 0 {
        return Err(FileError::BadMode(req.mode));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(FileError::NoFileName(req.path.clone()));
    };
    if req.create_dirs {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
    }
    let tmp = TempFile::create(dir, name)?;
    let mut file = &tmp.file;
    let mut total = 0u64;
    loop {
        match body.recv() {
            Ok(Inbound::Data(chunk)) => {
                // (A `Wiped` chunk: zeroed whether or not the write succeeds.)
                file.write_all(&chunk.0).map_err(io_at(&tmp.path))?;
                total += chunk.0.len() as u64;
            }
            Ok(Inbound::End) => break,
            Ok(Inbound::Cancel) => return Err(FileError::Cancelled(path.to_owned())),
            Err(_) => return Ok(None),
        }
    }
    if req.uid.is_some() || req.gid.is_some() {
        std::os::unix::fs::fchown(&tmp.file, req.uid, req.gid).map_err(io_at(&tmp.path))?;
    }
    // After chown, which clears set-id bits.
    tmp.file
        .set_permissions(Permissions::from_mode(req.mode))
        .map_err(io_at(&tmp.path))?;
    tmp.file.sync_all().map_err(io_at(&tmp.path))?;
    tmp.persist(path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(Some(total))
}

/// A temporary file that removes itself unless persisted.
struct TempFile {
    path: PathBuf,
    file: File,
    keep: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempFile {
    fn create(dir: &Path, name: &std::ffi::OsStr) -> Result<Self, FileError> {
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = std::ffi::OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(".agent-tmp.{}.{n}", std::process::id()));
            let path = dir.join(tmp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        keep: false,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_at(dir)(e)),
            }
        }
    }

    fn persist(mut self, to: &Path) -> Result<(), FileError> {
        fs::rename(&self.path, to).map_err(io_at(to))?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}
