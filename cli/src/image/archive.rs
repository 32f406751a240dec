//! `docker-archive:FILE[:repo:tag]`: a `docker save` (or `skopeo copy ... docker-archive:`) tarball:
//! `manifest.json` naming a config and layer files inside the archive.
//!
//! The archive is indexed once (member offsets), then members are read in place. A gzip or zstd
//! compressed archive is first decompressed beside the cache. Docker archives carry no manifest
//! digest: the cache key is the digest of the OCI manifest they imply (config digest, and each
//! layer named by its uncompressed digest). Layers are checked against the config's `diff_ids`
//! as they are unpacked; the config against the digest its file name carries, when it has one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use serde::Deserialize;

use super::digest::{Digest, Hasher};
use super::reference::Reference;
use super::spec::{self, Descriptor, ImageConfig, Manifest};
use super::{ImageError, Progress, Resolved, Source};

/// A member's data: where it starts in the (uncompressed) archive and how long it is.
#[derive(Debug, Clone, Copy)]
struct Member {
    offset: u64,
    size: u64,
}

#[derive(Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

pub struct ArchiveSource {
    file: PathBuf,
    tag: Option<String>,
    /// The file members are read from (the decompressed copy for a compressed archive).
    data: PathBuf,
    /// Removed on drop: the decompressed copy.
    scratch: Option<PathBuf>,
    members: HashMap<String, Member>,
    links: HashMap<String, String>,
    layer_members: Vec<Member>,
}

impl Drop for ArchiveSource {
    fn drop(&mut self) {
        if let Some(p) = &self.scratch {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub const SCRATCH_PREFIX: &str = ".archive-";

/// `./a/../b` style names as one canonical relative path, or None if they climb out.
fn normalize(p: &Path) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Prefix(_) => return None,
        }
    }
    Some(parts.join("/"))
}

impl ArchiveSource {
    pub fn open(file: &Path, tag: Option<&str>, scratch_dir: &Path) -> Result<Self, ImageError> {
        let file = std::fs::canonicalize(file)
            .map_err(|e| ImageError::NotFound(format!("docker archive {}: {e}", file.display())))?;
        let mut f = File::open(&file).map_err(ImageError::io("cannot open", &file))?;
        let mut magic = [0u8; 4];
        let n = f
            .read(&mut magic)
            .map_err(ImageError::io("cannot read", &file))?;
        f.seek(SeekFrom::Start(0))
            .map_err(ImageError::io("cannot read", &file))?;
        let compressed =
            n >= 2 && magic[..2] == [0x1f, 0x8b] || n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd];
        let (data, scratch) = if compressed {
            static N: AtomicU32 = AtomicU32::new(0);
            let tmp = scratch_dir.join(format!(
                "{SCRATCH_PREFIX}{}-{}.tar",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let mut out = File::create(&tmp).map_err(ImageError::io("cannot create", &tmp))?;
            let mut input = BufReader::with_capacity(1 << 20, f);
            let res = if magic[0] == 0x1f {
                std::io::copy(&mut flate2::read::MultiGzDecoder::new(input), &mut out)
            } else {
                zstd::stream::read::Decoder::new(&mut input)
                    .and_then(|mut d| std::io::copy(&mut d, &mut out))
            };
            if let Err(e) = res {
                let _ = std::fs::remove_file(&tmp);
                return Err(ImageError::Malformed(format!(
                    "docker archive {} does not decompress: {e}",
                    file.display()
                )));
            }
            (tmp.clone(), Some(tmp))
        } else {
            (file.clone(), None)
        };
        let mut src = ArchiveSource {
            file,
            tag: tag.map(str::to_string),
            data,
            scratch,
            members: HashMap::new(),
            links: HashMap::new(),
            layer_members: Vec::new(),
        };
        src.index()?;
        Ok(src)
    }

    fn index(&mut self) -> Result<(), ImageError> {
        let f = File::open(&self.data).map_err(ImageError::io("cannot open", &self.data))?;
        let bad = |e: std::io::Error| {
            ImageError::Malformed(format!(
                "docker archive {} is not a tar file: {e}",
                self.file.display()
            ))
        };
        let mut ar = tar::Archive::new(f);
        for entry in ar.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let Some(name) = normalize(&entry.path().map_err(bad)?) else {
                continue;
            };
            let kind = entry.header().entry_type();
            if kind.is_file() {
                self.members.insert(
                    name,
                    Member {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                );
            } else if kind.is_symlink() || kind.is_hard_link() {
                if let Some(target) = entry.link_name().map_err(bad)? {
                    // A symlink is relative to its directory; a hard link names an archive path.
                    let base = if kind.is_symlink() {
                        Path::new(&name)
                            .parent()
                            .unwrap_or(Path::new(""))
                            .join(&target)
                    } else {
                        target.into_owned()
                    };
                    if let Some(t) = normalize(&base) {
                        self.links.insert(name, t);
                    }
                }
            }
        }
        if self.members.is_empty() {
            return Err(ImageError::Malformed(format!(
                "docker archive {} is empty",
                self.file.display()
            )));
        }
        Ok(())
    }

    fn member(&self, name: &str) -> Result<Member, ImageError> {
        let mut n = normalize(Path::new(name)).ok_or_else(|| {
            ImageError::Malformed(format!(
                "docker archive names {name:?}, which leaves the archive"
            ))
        })?;
        for _ in 0..16 {
            if let Some(m) = self.members.get(&n) {
                return Ok(*m);
            }
            match self.links.get(&n) {
                Some(t) => n = t.clone(),
                None => break,
            }
        }
        Err(ImageError::Malformed(format!(
            "docker archive {} has no file {name:?}",
            self.file.display()
        )))
    }

    fn read_member(&self, name: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        let m = self.member(name)?;
        if m.size > limit {
            return Err(ImageError::Malformed(format!(
                "{name} in the docker archive is larger than {limit} bytes"
            )));
        }
        let mut v = Vec::with_capacity(m.size as usize);
        self.open_member(m)?
            .read_to_end(&mut v)
            .map_err(ImageError::io("cannot read", &self.data))?;
        if v.len() as u64 != m.size {
            return Err(ImageError::Malformed(format!(
                "{name} is truncated in the docker archive"
            )));
        }
        Ok(v)
    }

    fn open_member(&self, m: Member) -> Result<impl Read, ImageError> {
        let mut f = File::open(&self.data).map_err(ImageError::io("cannot open", &self.data))?;
        f.seek(SeekFrom::Start(m.offset))
            .map_err(ImageError::io("cannot read", &self.data))?;
        Ok(BufReader::with_capacity(1 << 20, f.take(m.size)))
    }

    fn pick(&self, entries: Vec<ManifestEntry>) -> Result<ManifestEntry, ImageError> {
        let all_tags: Vec<String> = entries
            .iter()
            .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
            .collect();
        match &self.tag {
            Some(t) => {
                let want = Reference::parse(t).map(|r| r.to_string()).ok();
                entries
                    .into_iter()
                    .find(|e| {
                        e.repo_tags.iter().flatten().any(|rt| {
                            rt == t
                                || (want.is_some()
                                    && Reference::parse(rt).map(|r| r.to_string()).ok() == want)
                        })
                    })
                    .ok_or_else(|| {
                        ImageError::NotFound(format!(
                            "docker archive {} has no image {t} (it has: {})",
                            self.file.display(),
                            if all_tags.is_empty() {
                                "untagged images".to_string()
                            } else {
                                all_tags.join(", ")
                            }
                        ))
                    })
            }
            None => {
                let n = entries.len();
                let mut it = entries.into_iter();
                match (it.next(), n) {
                    (Some(e), 1) => Ok(e),
                    (None, _) => Err(ImageError::Malformed(format!(
                        "docker archive {} holds no image",
                        self.file.display()
                    ))),
                    _ => Err(ImageError::BadReference {
                        reference: format!("docker-archive:{}", self.file.display()),
                        reason: format!(
                            "the archive holds {n} images; name one with :REPO:TAG ({})",
                            all_tags.join(", ")
                        ),
                    }),
                }
            }
        }
    }
}

impl Source for ArchiveSource {
    fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("docker-archive:{}:{t}", self.file.display()),
            None => format!("docker-archive:{}", self.file.display()),
        }
    }

    fn resolve(&mut self) -> Result<Resolved, ImageError> {
        let bytes = self.read_member("manifest.json", spec::MAX_MANIFEST)?;
        let entries: Vec<ManifestEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed(format!("docker archive manifest.json: {e}")))?;
        let entry = self.pick(entries)?;
        if entry.layers.len() > spec::MAX_LAYERS {
            return Err(ImageError::Malformed(format!(
                "the image has {} layers (at most {})",
                entry.layers.len(),
                spec::MAX_LAYERS
            )));
        }
        let config = self.read_member(&entry.config, spec::MAX_CONFIG)?;
        // `<hex>.json` (docker < 25, skopeo) or `blobs/sha256/<hex>` (docker >= 25) carry the digest.
        let file_name = Path::new(&entry.config)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let named = Digest::parse(&format!("sha256:{}", file_name.trim_end_matches(".json"))).ok();
        let actual = {
            let mut h = Hasher::new(super::digest::Algorithm::Sha256);
            h.update(&config);
            h.finish()
        };
        if let Some(named) = named {
            if named != actual {
                return Err(ImageError::DigestMismatch {
                    what: format!("image config {}", entry.config),
                    expected: named.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        let parsed = ImageConfig::parse(&config, entry.layers.len())?;
        let mut layers = Vec::new();
        self.layer_members.clear();
        for (i, l) in entry.layers.iter().enumerate() {
            let m = self.member(l)?;
            self.layer_members.push(m);
            layers.push(Descriptor {
                media_type: spec::OCI_LAYER_TAR.to_string(),
                digest: parsed.rootfs.diff_ids[i].clone(),
                size: m.size,
                platform: None,
                annotations: Default::default(),
                urls: Vec::new(),
            });
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(spec::OCI_MANIFEST.to_string()),
            config: Descriptor {
                media_type: spec::OCI_CONFIG.to_string(),
                digest: actual.to_string(),
                size: config.len() as u64,
                platform: None,
                annotations: Default::default(),
                urls: Vec::new(),
            },
            layers,
        };
        let implied =
            serde_json::to_vec(&manifest).map_err(|e| ImageError::Malformed(e.to_string()))?;
        Ok(Resolved {
            digest: Digest::of(&implied),
            manifest,
        })
    }

    fn read_blob(&mut self, d: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        // Only the config is read whole; resolve() found and checked it.
        let bytes = self.read_member("manifest.json", spec::MAX_MANIFEST)?;
        let entries: Vec<ManifestEntry> = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::Malformed(format!("manifest.json: {e}")))?;
        let entry = self.pick(entries)?;
        let v = self.read_member(&entry.config, limit)?;
        super::check_digest(what, d, &Digest::of(&v), v.len() as u64)?;
        Ok(v)
    }

    fn fetch_layers(
        &mut self,
        _layers: &[Descriptor],
        _dir: &Path,
        _progress: &mut Progress,
    ) -> Result<(), ImageError> {
        Ok(())
    }

    fn open_layer(&mut self, index: usize, _d: &Descriptor) -> Result<Box<dyn Read>, ImageError> {
        let m = *self
            .layer_members
            .get(index)
            .ok_or_else(|| ImageError::Malformed(format!("no layer {}", index + 1)))?;
        Ok(Box::new(self.open_member(m)?))
    }
}
