//! Applies image layers, in order, to a staging directory that `mkfs.ext4 -d` then copies.
//!
//! Each layer is a tar stream (plain, gzip or zstd, told by its first bytes) whose uncompressed
//! digest must equal the config's `diff_id`. Entries keep their mode (setuid included), owner,
//! mtime and xattrs; symlinks, hard links, device nodes and fifos are made as such. OCI
//! whiteouts apply: `.wh.NAME` deletes NAME from lower layers and `.wh..wh..opq` empties its
//! directory of lower-layer content.
//!
//! Nothing may land outside the staging root: an entry name with `..` is refused (a leading
//! `/` means the image root, as docker reads it), and the directories above an entry are resolved one component at a time with
//! `lstat`, following symlinks *inside* the image (an absolute target means the image root, as
//! the guest will see it); a symlink whose target climbs above the root is refused when an entry
//! is written through it. The entry's own final component is never followed: whatever is there
//! is replaced. A hard link's target is resolved the same way and must already exist.
//!
//! As root, owners and device nodes go straight onto the staging files. Otherwise they are
//! recorded as [`Fixup`]s and put into the ext4 image afterwards with debugfs.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::digest::{Digest, HashingReader};
use super::ImageError;

/// Whether this process can chown and mknod (and so need no debugfs fix-ups).
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// What the staging tree could not hold, for debugfs to set in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fixup {
    pub uid: u32,
    pub gid: u32,
    /// The full `st_mode` (file type and permission bits).
    pub mode: u32,
    /// A device node: `('c' | 'b', major, minor)`.
    pub device: Option<(char, u32, u32)>,
}

/// The unpacked tree: where it is, what it holds, what is left for debugfs.
pub struct Tree {
    pub root: PathBuf,
    /// Image path (`/etc/passwd`) to fix-up, for unprivileged builds.
    pub fixups: BTreeMap<String, Fixup>,
    /// The root directory's owner (`mkfs.ext4 -E root_owner`) and mode.
    pub root_owner: (u32, u32),
    pub root_mode: u32,
    /// Bytes of regular files (each inode once), symlink targets and directories.
    pub bytes: u64,
    /// The same in whole 4 KiB blocks, as ext4 stores them.
    pub block_bytes: u64,
    pub inodes: u64,
}

impl Tree {
    pub fn content_bytes(&self) -> u64 {
        self.bytes
    }

    /// Recounts after files were added.
    pub fn measure(&mut self) -> Result<(), ImageError> {
        (self.bytes, self.block_bytes, self.inodes) = measure(&self.root)?;
        Ok(())
    }
}

/// (apparent bytes, bytes in 4 KiB blocks, inodes) of a tree, each hard-linked inode once.
fn measure(root: &Path) -> Result<(u64, u64, u64), ImageError> {
    let mut seen = HashSet::new();
    let (mut bytes, mut blocks, mut inodes) = (0u64, 0u64, 1u64);
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut names = 0u64;
        for e in fs::read_dir(&dir).map_err(ImageError::io("cannot read", &dir))? {
            let e = e.map_err(ImageError::io("cannot read", &dir))?;
            names += e.file_name().len() as u64 + 12;
            let m = e
                .metadata()
                .map_err(ImageError::io("cannot stat", &e.path()))?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.file_type().is_symlink() {
                // Targets under 60 bytes live in the inode.
                bytes += m.len();
                if m.len() >= 60 {
                    blocks += 4096;
                }
            } else {
                bytes += m.len();
                blocks += m.len().div_ceil(4096) * 4096;
            }
        }
        let dir_bytes = (names + 24).div_ceil(4096).max(1) * 4096;
        bytes += dir_bytes;
        blocks += dir_bytes;
    }
    Ok((bytes, blocks, inodes))
}

/// The desired attributes of one entry.
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Bounds on what layers may inflate to: each layer's tar stream, and all of them together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub layer_bytes: u64,
    pub image_bytes: u64,
}

pub const MAX_LAYER_ENV: &str = "MICROAGENT_IMAGE_MAX_LAYER_MIB";
pub const MAX_IMAGE_ENV: &str = "MICROAGENT_IMAGE_MAX_MIB";

impl Limits {
    /// 16 GiB a layer, 32 GiB an image, unless the environment says otherwise.
    pub fn from_env() -> Result<Self, ImageError> {
        let mib = |env: &str, default: u64| -> Result<u64, ImageError> {
            match std::env::var(env) {
                Ok(v) if !v.is_empty() => v
                    .parse::<u64>()
                    .ok()
                    .filter(|&m| m > 0 && m < (1 << 40))
                    .ok_or_else(|| ImageError::BadReference {
                        reference: v.clone(),
                        reason: format!("{env} must be a positive whole number of MiB"),
                    }),
                _ => Ok(default),
            }
        };
        Ok(Limits {
            layer_bytes: mib(MAX_LAYER_ENV, 16 << 10)? << 20,
            image_bytes: mib(MAX_IMAGE_ENV, 32 << 10)? << 20,
        })
    }
}

/// Counts what passes through and fails once more than `left` bytes would.
struct Bounded<R> {
    inner: R,
    left: u64,
    hit: std::rc::Rc<std::cell::Cell<bool>>,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One more byte tells a stream that ends exactly at the bound from a longer one.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.hit.set(true);
                    Err(std::io::Error::other("size bound reached"))
                }
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

pub struct Unpacker {
    limits: Limits,
    /// Uncompressed bytes of the layers applied so far.
    inflated: u64,
    root: PathBuf,
    privileged: bool,
    fixups: BTreeMap<PathBuf, Fixup>,
    dir_times: HashMap<PathBuf, i64>,
    /// Paths this layer wrote, which its own whiteouts must not remove.
    this_layer: HashSet<PathBuf>,
    root_owner: (u32, u32),
    root_mode: u32,
}

/// Where a parent directory resolved to, inside the root.
struct Resolved {
    host: PathBuf,
    rel: PathBuf,
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

fn cstring(p: &Path) -> Result<CString, ImageError> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| ImageError::Malformed(format!("path {} holds a NUL byte", p.display())))
}

fn last_os_error(what: &'static str, p: &Path) -> ImageError {
    ImageError::Io {
        what,
        path: p.to_path_buf(),
        source: std::io::Error::last_os_error(),
    }
}

/// Removes whatever is at `p` (a directory with all it holds), never following a symlink.
fn remove_any(p: &Path) -> Result<(), ImageError> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(ImageError::io("cannot remove", p)),
        Ok(_) => fs::remove_file(p).map_err(ImageError::io("cannot remove", p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::Io {
            what: "cannot stat",
            path: p.to_path_buf(),
            source: e,
        }),
    }
}

impl Unpacker {
    pub fn new(root: &Path, privileged: bool) -> Result<Self, ImageError> {
        Self::with_limits(root, privileged, Limits::from_env()?)
    }

    pub fn with_limits(root: &Path, privileged: bool, limits: Limits) -> Result<Self, ImageError> {
        fs::create_dir_all(root).map_err(ImageError::io("cannot create", root))?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io("cannot chmod", root))?;
        Ok(Unpacker {
            limits,
            inflated: 0,
            root: root.to_path_buf(),
            privileged,
            fixups: BTreeMap::new(),
            dir_times: HashMap::new(),
            this_layer: HashSet::new(),
            root_owner: (0, 0),
            root_mode: 0o755,
        })
    }

    /// Applies one layer. `layer` counts from 1; `digest` names it in messages.
    pub fn apply_layer(
        &mut self,
        layer: usize,
        digest: &str,
        blob: Box<dyn Read>,
        diff_id: &Digest,
    ) -> Result<(), ImageError> {
        let corrupt = |e: std::io::Error| ImageError::BadLayer {
            layer,
            digest: digest.to_string(),
            message: e.to_string(),
        };
        let mut buffered = BufReader::with_capacity(1 << 20, blob);
        let head = buffered.fill_buf().map_err(corrupt)?.to_vec();
        let decoded: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
            Box::new(flate2::read::MultiGzDecoder::new(buffered))
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Box::new(zstd::stream::read::Decoder::with_buffer(buffered).map_err(corrupt)?)
        } else if head.starts_with(b"BZh") || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z']) {
            return Err(ImageError::Unsupported(format!(
                "layer {layer} ({digest}) is bzip2 or xz compressed; OCI layers are tar, tar+gzip or tar+zstd"
            )));
        } else {
            Box::new(buffered)
        };
        // The tighter of this layer's bound and what is left of the image's.
        let image_left = self.limits.image_bytes.saturating_sub(self.inflated);
        let (left, what, limit, env) = if self.limits.layer_bytes <= image_left {
            (
                self.limits.layer_bytes,
                "alone",
                self.limits.layer_bytes,
                MAX_LAYER_ENV,
            )
        } else {
            (
                image_left,
                "with the layers before it",
                self.limits.image_bytes,
                MAX_IMAGE_ENV,
            )
        };
        let hit = std::rc::Rc::new(std::cell::Cell::new(false));
        let bounded = Bounded {
            inner: decoded,
            left,
            hit: hit.clone(),
        };
        let too_large = || ImageError::TooLarge {
            layer,
            digest: digest.to_string(),
            what,
            limit_mib: limit >> 20,
            env,
        };
        let mut archive = tar::Archive::new(HashingReader::new(bounded, diff_id.algorithm));
        self.this_layer.clear();
        let applied = (|| {
            let entries = archive.entries().map_err(corrupt)?;
            for entry in entries {
                let mut entry = entry.map_err(corrupt)?;
                self.entry(layer, digest, &mut entry)?;
            }
            Ok(())
        })();
        // A bound reached shows up as whatever error the reader above it made of it.
        if hit.get() {
            return Err(too_large());
        }
        applied?;
        // Read to the end, so trailing bytes are hashed and a truncated stream is noticed.
        let drained = archive.into_inner().drain();
        if hit.get() {
            return Err(too_large());
        }
        let (actual, n) = drained.map_err(corrupt)?;
        self.inflated = self.inflated.saturating_add(n);
        if &actual != diff_id {
            return Err(ImageError::DigestMismatch {
                what: format!("layer {layer} ({digest}) uncompressed content"),
                expected: diff_id.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(())
    }

    /// An entry name as clean components below the root; `..` is refused.
    fn clean(layer: usize, raw: &[u8], what: &str) -> Result<Vec<OsString>, ImageError> {
        let refuse = |reason: &str| ImageError::UnsafeEntry {
            layer,
            entry: String::from_utf8_lossy(raw).into_owned(),
            reason: format!("{what} {reason}"),
        };
        let mut out = Vec::new();
        for c in Path::new(os(raw)).components() {
            match c {
                Component::Normal(s) => {
                    if s.len() > 255 {
                        return Err(refuse("has a name longer than 255 bytes"));
                    }
                    out.push(s.to_os_string())
                }
                // `/etc/x` means the image's /etc/x (umoci writes the root as `/`).
                Component::CurDir | Component::RootDir => {}
                Component::Prefix(_) => return Err(refuse("has a path prefix")),
                Component::ParentDir => {
                    return Err(refuse("climbs out of the image root with '..'"))
                }
            }
        }
        Ok(out)
    }

    /// Resolves directory components below the root, following symlinks inside the image.
    /// Missing directories are made when `create`; otherwise `Ok(None)`.
    fn resolve_dir(
        &mut self,
        layer: usize,
        entry: &[u8],
        comps: &[OsString],
        create: bool,
    ) -> Result<Option<Resolved>, ImageError> {
        let mut stack: Vec<OsString> = Vec::new();
        let mut queue: VecDeque<OsString> = comps.iter().cloned().collect();
        let mut hops = 0;
        let mut via: Option<(PathBuf, PathBuf)> = None;
        let refuse = |reason: String| ImageError::UnsafeEntry {
            layer,
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason,
        };
        while let Some(c) = queue.pop_front() {
            if c == "." {
                continue;
            }
            if c == ".." {
                if stack.pop().is_none() {
                    let (link, target) = via.clone().unwrap_or_default();
                    return Err(refuse(format!(
                        "it is written through symlink /{} -> {}, which leads outside the image root",
                        link.display(),
                        target.display()
                    )));
                }
                continue;
            }
            let rel: PathBuf = stack.iter().chain(std::iter::once(&c)).collect();
            let host = self.root.join(&rel);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    hops += 1;
                    if hops > 40 {
                        return Err(refuse("too many levels of symbolic links".into()));
                    }
                    let target =
                        fs::read_link(&host).map_err(ImageError::io("cannot read link", &host))?;
                    via = Some((rel.clone(), target.clone()));
                    if target.is_absolute() {
                        stack.clear();
                    }
                    let mut parts: Vec<OsString> = Vec::new();
                    for tc in target.components() {
                        match tc {
                            Component::Normal(s) => parts.push(s.to_os_string()),
                            Component::ParentDir => parts.push("..".into()),
                            _ => {}
                        }
                    }
                    for p in parts.into_iter().rev() {
                        queue.push_front(p);
                    }
                }
                Ok(m) if m.is_dir() => stack.push(c),
                Ok(_) => {
                    return Err(refuse(format!(
                        "its parent /{} is not a directory",
                        rel.display()
                    )));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(None);
                    }
                    fs::create_dir(&host).map_err(ImageError::io("cannot create", &host))?;
                    self.set_attrs(
                        &host,
                        &rel,
                        libc::S_IFDIR,
                        &Attrs {
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                            mtime: 0,
                            xattrs: Vec::new(),
                        },
                        None,
                    )?;
                    stack.push(c);
                }
                Err(e) => {
                    return Err(ImageError::Io {
                        what: "cannot stat",
                        path: host,
                        source: e,
                    })
                }
            }
        }
        let rel: PathBuf = stack.iter().collect();
        Ok(Some(Resolved {
            host: self.root.join(&rel),
            rel,
        }))
    }

    fn entry<R: Read>(
        &mut self,
        layer: usize,
        digest: &str,
        e: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        use tar::EntryType as T;
        let kind = e.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let raw = e.path_bytes().into_owned();
        let comps = Self::clean(layer, &raw, "its path")?;
        let corrupt = |e: std::io::Error| ImageError::BadLayer {
            layer,
            digest: digest.to_string(),
            message: e.to_string(),
        };
        let h = e.header();
        let mut attrs = Attrs {
            mode: h.mode().map_err(corrupt)? & 0o7777,
            uid: h.uid().map_err(corrupt)? as u32,
            gid: h.gid().map_err(corrupt)? as u32,
            mtime: h.mtime().unwrap_or(0) as i64,
            xattrs: Vec::new(),
        };
        let device = match kind {
            T::Char | T::Block => Some((
                if kind == T::Char { 'c' } else { 'b' },
                h.device_major().map_err(corrupt)?.unwrap_or(0),
                h.device_minor().map_err(corrupt)?.unwrap_or(0),
            )),
            _ => None,
        };
        if let Some(pax) = e.pax_extensions().map_err(corrupt)? {
            for ext in pax {
                let ext = ext.map_err(corrupt)?;
                let v = ext.value_bytes();
                let num = || {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.split('.').next()?.parse::<i64>().ok())
                };
                match ext.key_bytes() {
                    b"uid" => attrs.uid = num().unwrap_or(attrs.uid as i64) as u32,
                    b"gid" => attrs.gid = num().unwrap_or(attrs.gid as i64) as u32,
                    b"mtime" => attrs.mtime = num().unwrap_or(attrs.mtime),
                    k if k.starts_with(b"SCHILY.xattr.") => {
                        attrs
                            .xattrs
                            .push((k[b"SCHILY.xattr.".len()..].to_vec(), v.to_vec()));
                    }
                    _ => {}
                }
            }
        }

        let Some((name, parent)) = comps.split_last() else {
            // The root directory itself.
            if kind == T::Directory {
                self.root_owner = (attrs.uid, attrs.gid);
                self.root_mode = attrs.mode;
                fs::set_permissions(&self.root, fs::Permissions::from_mode(attrs.mode | 0o700))
                    .map_err(ImageError::io("cannot chmod", &self.root))?;
            }
            return Ok(());
        };
        let name_bytes = name.as_bytes();

        // Whiteouts.
        if let Some(hidden) = name_bytes.strip_prefix(b".wh.") {
            let Some(dir) = self.resolve_dir(layer, &raw, parent, false)? else {
                return Ok(());
            };
            if hidden == b".wh..opq" {
                self.clear_lower(&dir.host, &dir.rel)?;
            } else if hidden.starts_with(b".wh.") {
                // aufs bookkeeping (`.wh..wh.plnk`, ...): not content.
            } else if hidden.is_empty()
                || hidden == b"."
                || hidden == b".."
                || hidden.contains(&b'/')
            {
                return Err(ImageError::UnsafeEntry {
                    layer,
                    entry: String::from_utf8_lossy(&raw).into_owned(),
                    reason: "it is a whiteout for an invalid name".into(),
                });
            } else {
                let rel = dir.rel.join(os(hidden));
                if !self.this_layer.contains(&rel) {
                    remove_any(&dir.host.join(os(hidden)))?;
                    self.forget(&rel);
                }
            }
            return Ok(());
        }

        let dir = self
            .resolve_dir(layer, &raw, parent, true)?
            .expect("resolve_dir with create always resolves");
        let dest = dir.host.join(name);
        let rel = dir.rel.join(name);
        let existing = fs::symlink_metadata(&dest).ok();
        self.this_layer.insert(rel.clone());

        match kind {
            T::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    remove_any(&dest)?;
                    fs::create_dir(&dest).map_err(ImageError::io("cannot create", &dest))?;
                }
                self.set_attrs(&dest, &rel, libc::S_IFDIR, &attrs, None)?;
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                remove_any(&dest)?;
                let mut f = File::options()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(ImageError::io("cannot create", &dest))?;
                copy_data(e, &mut f, &dest, corrupt)?;
                drop(f);
                self.set_attrs(&dest, &rel, libc::S_IFREG, &attrs, None)?;
            }
            T::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(std::io::Error::other("symlink without a target")))?
                    .into_owned();
                remove_any(&dest)?;
                std::os::unix::fs::symlink(os(&target), &dest)
                    .map_err(ImageError::io("cannot create symlink", &dest))?;
                self.set_attrs(&dest, &rel, libc::S_IFLNK, &attrs, None)?;
            }
            T::Link => {
                let target_raw = e
                    .link_name_bytes()
                    .ok_or_else(|| corrupt(std::io::Error::other("hard link without a target")))?
                    .into_owned();
                let tcomps = Self::clean(layer, &target_raw, "its hard link target")?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(ImageError::UnsafeEntry {
                        layer,
                        entry: String::from_utf8_lossy(&raw).into_owned(),
                        reason: "it is a hard link to the image root".into(),
                    });
                };
                let missing = || ImageError::BadLayer {
                    layer,
                    digest: digest.to_string(),
                    message: format!(
                        "hard link {} points at {}, which does not exist",
                        String::from_utf8_lossy(&raw),
                        String::from_utf8_lossy(&target_raw)
                    ),
                };
                let tdir = self
                    .resolve_dir(layer, &raw, tparent, false)?
                    .ok_or_else(missing)?;
                let target = tdir.host.join(tname);
                let tm = fs::symlink_metadata(&target).map_err(|_| missing())?;
                if tm.is_dir() {
                    return Err(ImageError::UnsafeEntry {
                        layer,
                        entry: String::from_utf8_lossy(&raw).into_owned(),
                        reason: "it is a hard link to a directory".into(),
                    });
                }
                if target != dest {
                    remove_any(&dest)?;
                    // linkat without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                    fs::hard_link(&target, &dest)
                        .map_err(ImageError::io("cannot create hard link", &dest))?;
                }
                if let Some(f) = self.fixups.get(&tdir.rel.join(tname)).cloned() {
                    self.fixups.insert(rel, f);
                }
            }
            T::Char | T::Block | T::Fifo => {
                remove_any(&dest)?;
                let fmt = match kind {
                    T::Char => libc::S_IFCHR,
                    T::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let (maj, min) = device.map(|(_, a, b)| (a, b)).unwrap_or((0, 0));
                if self.privileged || kind == T::Fifo {
                    let c = cstring(&dest)?;
                    // SAFETY: mknod on a NUL-terminated path inside the staging tree.
                    if unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, libc::makedev(maj, min)) } != 0
                    {
                        return Err(last_os_error("cannot create node", &dest));
                    }
                } else {
                    // A placeholder that debugfs turns into the node.
                    File::options()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&dest)
                        .map_err(ImageError::io("cannot create", &dest))?;
                }
                self.set_attrs(&dest, &rel, fmt, &attrs, device)?;
            }
            other => {
                return Err(ImageError::Unsupported(format!(
                    "layer {layer}: entry {} has tar type {:?}",
                    String::from_utf8_lossy(&raw),
                    other
                )))
            }
        }
        Ok(())
    }

    /// Puts owner, mode, xattrs and mtime on a staged file (or records them for debugfs).
    fn set_attrs(
        &mut self,
        host: &Path,
        rel: &Path,
        fmt: u32,
        a: &Attrs,
        device: Option<(char, u32, u32)>,
    ) -> Result<(), ImageError> {
        let c = cstring(host)?;
        let is_link = fmt == libc::S_IFLNK;
        if self.privileged {
            // SAFETY: lchown on a NUL-terminated path; it does not follow symlinks.
            if unsafe { libc::lchown(c.as_ptr(), a.uid, a.gid) } != 0 {
                return Err(last_os_error("cannot chown", host));
            }
            if !is_link {
                // After chown, which clears setuid bits.
                fs::set_permissions(host, fs::Permissions::from_mode(a.mode))
                    .map_err(ImageError::io("cannot chmod", host))?;
            }
        } else {
            if !is_link {
                let keep = if fmt == libc::S_IFDIR { 0o700 } else { 0o600 };
                fs::set_permissions(host, fs::Permissions::from_mode(a.mode | keep))
                    .map_err(ImageError::io("cannot chmod", host))?;
            }
            self.fixups.insert(
                rel.to_path_buf(),
                Fixup {
                    uid: a.uid,
                    gid: a.gid,
                    mode: fmt | a.mode,
                    device,
                },
            );
        }
        for (k, v) in &a.xattrs {
            if let Ok(k) = CString::new(k.clone()) {
                // SAFETY: lsetxattr with NUL-terminated name and path and a valid value buffer.
                // Best effort: an unprivileged build cannot set security.* attributes.
                unsafe { libc::lsetxattr(c.as_ptr(), k.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
            }
        }
        if fmt == libc::S_IFDIR {
            self.dir_times.insert(rel.to_path_buf(), a.mtime);
        } else {
            set_mtime(&c, a.mtime);
        }
        Ok(())
    }

    /// Drops bookkeeping for a removed path and all below it.
    fn forget(&mut self, rel: &Path) {
        self.fixups.retain(|k, _| !k.starts_with(rel));
        self.dir_times.retain(|k, _| !k.starts_with(rel));
    }

    /// An opaque directory: removes everything in it that this layer did not write.
    fn clear_lower(&mut self, host: &Path, rel: &Path) -> Result<(), ImageError> {
        let entries: Vec<_> = fs::read_dir(host)
            .map_err(ImageError::io("cannot read", host))?
            .collect::<Result<_, _>>()
            .map_err(ImageError::io("cannot read", host))?;
        for e in entries {
            let crel = rel.join(e.file_name());
            let chost = e.path();
            if self.this_layer.contains(&crel) {
                if fs::symlink_metadata(&chost).is_ok_and(|m| m.is_dir()) {
                    self.clear_lower(&chost, &crel)?;
                }
            } else {
                remove_any(&chost)?;
                self.forget(&crel);
            }
        }
        Ok(())
    }

    /// Sets directory times (last, since filling a directory changes its mtime) and measures.
    pub fn finish(self) -> Result<Tree, ImageError> {
        for (rel, t) in &self.dir_times {
            if let Ok(c) = cstring(&self.root.join(rel)) {
                set_mtime(&c, *t);
            }
        }
        let mut fixups = BTreeMap::new();
        for (rel, f) in self.fixups {
            // Only what still exists (a later layer may have removed it).
            if fs::symlink_metadata(self.root.join(&rel)).is_ok() {
                fixups.insert(format!("/{}", rel.display()), f);
            }
        }
        let (bytes, block_bytes, inodes) = measure(&self.root)?;
        Ok(Tree {
            root: self.root,
            fixups,
            root_owner: self.root_owner,
            root_mode: self.root_mode,
            bytes,
            block_bytes,
            inodes,
        })
    }
}

fn set_mtime(c: &CString, secs: i64) {
    let ts = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [ts, ts];
    // SAFETY: utimensat on a NUL-terminated path with two valid timespecs; no symlink follow.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
}

/// Copies an entry's data: read errors mean a corrupt layer, write errors are the host's.
fn copy_data(
    r: &mut impl Read,
    w: &mut File,
    dest: &Path,
    corrupt: impl Fn(std::io::Error) -> ImageError,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(e)),
        };
        w.write_all(&buf[..n])
            .map_err(ImageError::io("cannot write", dest))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar stream built by hand, so hostile names (which the tar crate's builder refuses) fit.
    pub struct Tar(Vec<u8>);

    impl Tar {
        pub fn new() -> Self {
            Tar(Vec::new())
        }

        pub fn add(
            &mut self,
            name: &str,
            kind: tar::EntryType,
            mode: u32,
            link: &str,
            data: &[u8],
        ) -> &mut Self {
            let mut h = tar::Header::new_gnu();
            {
                let old = h.as_old_mut();
                old.name[..name.len()].copy_from_slice(name.as_bytes());
                old.linkname[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            let pad = (512 - data.len() % 512) % 512;
            self.0.extend(std::iter::repeat_n(0u8, pad));
            self
        }

        pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            self.add(name, tar::EntryType::Regular, 0o644, "", data)
        }

        pub fn dir(&mut self, name: &str) -> &mut Self {
            self.add(name, tar::EntryType::Directory, 0o755, "", b"")
        }

        pub fn finish(&mut self) -> Vec<u8> {
            let mut v = self.0.clone();
            v.extend(std::iter::repeat_n(0u8, 1024));
            v
        }
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("ma-unpack-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn apply(u: &mut Unpacker, n: usize, bytes: Vec<u8>) -> Result<(), ImageError> {
        let d = Digest::of(&bytes);
        u.apply_layer(n, "sha256:test", Box::new(std::io::Cursor::new(bytes)), &d)
    }

    #[test]
    fn layers_whiteouts_and_links() {
        let s = Scratch::new("layers");
        let root = s.0.join("rootfs");
        let mut u = Unpacker::new(&root, privileged()).unwrap();
        let l1 = Tar::new()
            .dir("etc")
            .file("etc/keep", b"keep")
            .file("etc/gone", b"gone")
            .dir("opq")
            .file("opq/old", b"old")
            .add("bin/tool", tar::EntryType::Regular, 0o4755, "", b"#!tool")
            .add("bin/hard", tar::EntryType::Link, 0o755, "bin/tool", b"")
            .add("bin/soft", tar::EntryType::Symlink, 0o777, "tool", b"")
            .add("usrbin", tar::EntryType::Symlink, 0o777, "/bin", b"")
            .finish();
        apply(&mut u, 1, l1).unwrap();
        let l2 = Tar::new()
            .file("etc/.wh.gone", b"")
            .file("opq/new", b"new")
            .file("opq/.wh..wh..opq", b"")
            .file("usrbin/through", b"inside")
            .finish();
        apply(&mut u, 2, l2).unwrap();
        let tree = u.finish().unwrap();
        assert_eq!(fs::read(root.join("etc/keep")).unwrap(), b"keep");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opq/old").exists());
        assert_eq!(fs::read(root.join("opq/new")).unwrap(), b"new");
        // Written through an absolute symlink: lands inside the image.
        assert_eq!(fs::read(root.join("bin/through")).unwrap(), b"inside");
        let m = fs::metadata(root.join("bin/tool")).unwrap();
        assert_eq!(m.ino(), fs::metadata(root.join("bin/hard")).unwrap().ino());
        assert_eq!(
            fs::read_link(root.join("bin/soft")).unwrap(),
            Path::new("tool")
        );
        if privileged() {
            assert_eq!(m.mode() & 0o7777, 0o4755);
        } else {
            assert_eq!(tree.fixups["/bin/tool"].mode, libc::S_IFREG | 0o4755);
        }
    }

    fn gzip(b: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(b).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn decompression_bombs_hit_the_layer_and_image_bounds() {
        let s = Scratch::new("bombs");
        let mib = 1u64 << 20;
        let limits = Limits {
            layer_bytes: 8 * mib,
            image_bytes: 10 * mib,
        };
        // 24 MiB of zeros in a few KiB of gzip.
        let bomb_tar = Tar::new().file("zeros", &vec![0u8; 24 << 20]).finish();
        let bomb = gzip(&bomb_tar);
        assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());
        let mut u = Unpacker::with_limits(&s.0.join("a"), privileged(), limits).unwrap();
        let d = Digest::of(&bomb_tar);
        let e = u
            .apply_layer(1, "sha256:bomb", Box::new(std::io::Cursor::new(bomb)), &d)
            .unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    layer: 1,
                    limit_mib: 8,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(MAX_LAYER_ENV), "{e}");
        // Two layers each under the layer bound, together over the image bound.
        let six = Tar::new().file("six", &vec![7u8; 6 << 20]).finish();
        let mut u = Unpacker::with_limits(&s.0.join("b"), privileged(), limits).unwrap();
        let d = Digest::of(&six);
        u.apply_layer(
            1,
            "sha256:six",
            Box::new(std::io::Cursor::new(gzip(&six))),
            &d,
        )
        .unwrap();
        let e = u
            .apply_layer(
                2,
                "sha256:six",
                Box::new(std::io::Cursor::new(gzip(&six))),
                &d,
            )
            .unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::TooLarge {
                    layer: 2,
                    limit_mib: 10,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(MAX_IMAGE_ENV), "{e}");
        // A layer of exactly the bound is fine.
        let exact = Limits {
            layer_bytes: six.len() as u64,
            image_bytes: 1 << 40,
        };
        let mut u = Unpacker::with_limits(&s.0.join("c"), privileged(), exact).unwrap();
        apply(&mut u, 1, six).unwrap();
    }

    #[test]
    fn escapes_are_refused() {
        let s = Scratch::new("escapes");
        let root = s.0.join("rootfs");
        for (layer, want) in [
            (
                Tar::new().file("../../etc/passwd", b"x").finish(),
                "climbs out",
            ),
            (
                Tar::new()
                    .add("esc", tar::EntryType::Symlink, 0o777, "../../../../..", b"")
                    .file("esc/pwned", b"x")
                    .finish(),
                "leads outside the image root",
            ),
            (
                Tar::new()
                    .add("h", tar::EntryType::Link, 0o644, "../outside", b"")
                    .finish(),
                "climbs out",
            ),
            (
                Tar::new().file("f", b"").file("f/x", b"").finish(),
                "not a directory",
            ),
        ] {
            let _ = fs::remove_dir_all(&root);
            let mut u = Unpacker::new(&root, privileged()).unwrap();
            let e = apply(&mut u, 1, layer).unwrap_err();
            assert!(matches!(e, ImageError::UnsafeEntry { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        // An absolute name is the image's own: it lands inside.
        let _ = fs::remove_dir_all(&root);
        let mut u = Unpacker::new(&root, privileged()).unwrap();
        apply(
            &mut u,
            1,
            Tar::new().dir("/").file("/etc/abs", b"x").finish(),
        )
        .unwrap();
        assert_eq!(fs::read(root.join("etc/abs")).unwrap(), b"x");
        assert!(!s.0.join("pwned").exists());
    }

    #[test]
    fn corrupt_layers() {
        let s = Scratch::new("corrupt");
        let root = s.0.join("rootfs");
        let tar = Tar::new().file("a", &[7u8; 5000]).finish();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let diff_id = Digest::of(&tar);
        let mut u = Unpacker::new(&root, privileged()).unwrap();
        let e = u
            .apply_layer(
                1,
                "sha256:t",
                Box::new(std::io::Cursor::new(gz[..gz.len() / 2].to_vec())),
                &diff_id,
            )
            .unwrap_err();
        assert!(matches!(e, ImageError::BadLayer { .. }), "{e}");
        // Whole but not what the config promised.
        let e = u
            .apply_layer(
                1,
                "sha256:t",
                Box::new(std::io::Cursor::new(gz.clone())),
                &Digest::of(b"other"),
            )
            .unwrap_err();
        assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e}");
        u.apply_layer(1, "sha256:t", Box::new(std::io::Cursor::new(gz)), &diff_id)
            .unwrap();
    }
}
