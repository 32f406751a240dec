//! OCI images as workspace root filesystems: `--image REF` and `microagent image list|pull|rm`.
//!
//! An image comes from a registry (`[registry/]repo[:tag|@digest]`, Docker Hub defaults), an OCI
//! image layout (`oci:DIR[:tag]`) or a `docker save` archive (`docker-archive:FILE`). Its
//! linux/amd64 manifest is resolved, every blob is checked against its digest, the layers are
//! unpacked in order (whiteouts, owners, modes, links, device nodes; nothing may escape the
//! root), the guest agent and a tiny init go in under `/.microagent/`, and `mkfs.ext4 -d` makes
//! the disk. The result is cached under `<state root>/images/<manifest digest hex>/`, made in a
//! temporary directory and renamed into place, so a second `create` only copies (reflinks).
//!
//! Boot an image's disk with `root=/dev/vda rootfstype=ext4 rw rootflags=noinit_itable init=/.microagent/init`
//! ([`KERNEL_ARGS`]).

pub mod archive;
pub mod cache;
pub mod digest;
pub mod ext4;
pub mod layout;
pub mod reference;
pub mod registry;
pub mod spec;
pub mod unpack;

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use serde_json::json;

use crate::exit::{Code, Failure};
use crate::output::{human_size, Out};
use cache::{Cache, Entry, Meta};
use digest::Digest;
use reference::SourceSpec;
use spec::{Descriptor, ImageConfig, Manifest};

/// Kernel command-line arguments that boot a disk made from an image. `noinit_itable`: the
/// image's inode tables are left uninitialised (mkfs knows which inodes are in use), and the
/// guest should not spend its first minutes zeroing them into every workspace's copy.
pub const KERNEL_ARGS: &str =
    "root=/dev/vda rootfstype=ext4 rw rootflags=noinit_itable init=/.microagent/init";

/// Free space added to an image's content when no `--headroom` is given (the file is sparse:
/// unused space costs nothing on the host).
pub const DEFAULT_HEADROOM_MIB: u64 = 1024;
const MAX_HEADROOM_MIB: u64 = 1 << 20;

/// Why an image could not be had. Every message names the image part at fault.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// The image, tag, file or cache entry does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A blob's bytes do not hash to the digest that names them.
    #[error("{what}: digest mismatch: expected {expected}, got {actual}; refusing the image")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    /// A blob is not the size its descriptor says.
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}; refusing the image")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    /// A layer entry would land outside the image root, or writes through a link that leads out.
    #[error("layer {layer}: entry {entry:?} refused: {reason}")]
    UnsafeEntry {
        layer: usize,
        entry: String,
        reason: String,
    },
    /// A layer does not decompress or parse as tar (truncated, corrupt).
    #[error("layer {layer} ({digest}) is truncated or corrupt: {message}")]
    BadLayer {
        layer: usize,
        digest: String,
        message: String,
    },
    /// A layer or the whole image inflates past its bound (a decompression bomb, or simply too
    /// big): `MICROAGENT_IMAGE_MAX_LAYER_MIB`, `MICROAGENT_IMAGE_MAX_MIB`.
    #[error("layer {layer} ({digest}) {what} inflates past {limit_mib} MiB (set {env} to allow more); refusing the image")]
    TooLarge {
        layer: usize,
        digest: String,
        what: &'static str,
        limit_mib: u64,
        env: &'static str,
    },
    /// There is no linux/amd64 image to use.
    #[error("{what} has no linux/amd64 image (found: {found})")]
    NoPlatform { what: String, found: String },
    /// A manifest, index or config that does not parse or is inconsistent.
    #[error("malformed image: {0}")]
    Malformed(String),
    /// A valid image feature this build does not handle.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// The registry refused access.
    #[error("registry {registry}: {message}")]
    Auth { registry: String, message: String },
    /// Talking to a registry failed.
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    /// The registry could not be reached at all (name, connection, proxy): the remote's
    /// failure, not ours (the API answers 504, not 500).
    #[error("registry {registry}: {message}")]
    Unreachable { registry: String, message: String },
    /// A host tool or file the build needs is missing.
    #[error("{0}")]
    Host(String),
    /// A host tool failed.
    #[error("{tool} failed: {message}")]
    Tool { tool: String, message: String },
    /// Local I/O.
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ImageError {
    pub fn io<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
        move |source| ImageError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// Names the image in a platform refusal that came from its config.
    fn naming(self, name: &str) -> ImageError {
        match self {
            ImageError::NoPlatform { what, found } if what == spec::CONFIG_WHAT => {
                ImageError::NoPlatform {
                    what: name.to_string(),
                    found,
                }
            }
            other => other,
        }
    }

    pub fn code(&self) -> Code {
        match self {
            ImageError::BadReference { .. }
            | ImageError::DigestMismatch { .. }
            | ImageError::SizeMismatch { .. }
            | ImageError::UnsafeEntry { .. }
            | ImageError::BadLayer { .. }
            | ImageError::TooLarge { .. }
            | ImageError::NoPlatform { .. }
            | ImageError::Malformed(_)
            | ImageError::Unsupported(_) => Code::Usage,
            ImageError::NotFound(_) => Code::NotFound,
            ImageError::Host(_) => Code::HostUnsupported,
            ImageError::Unreachable { .. } => Code::RemoteUnreachable,
            ImageError::Auth { .. }
            | ImageError::Registry { .. }
            | ImageError::Tool { .. }
            | ImageError::Io { .. } => Code::Error,
        }
    }
}

impl From<ImageError> for Failure {
    fn from(e: ImageError) -> Failure {
        Failure::new(e.code(), e.to_string())
    }
}

/// Progress on stderr for people at a terminal: bytes and layers, redrawn at most 10 times a
/// second; silent with `--json` or when stderr is not a terminal.
pub struct Progress {
    enabled: bool,
    last: Option<Instant>,
    open_line: bool,
}

impl Progress {
    pub fn new(out: Out) -> Self {
        Progress {
            enabled: !out.json && std::io::stderr().is_terminal(),
            last: None,
            open_line: false,
        }
    }

    /// `pulling layer 2/3 sha256:0123abcd4567: 12.0 MiB / 40.0 MiB`
    pub fn bytes(
        &mut self,
        verb: &str,
        layer: usize,
        layers: usize,
        digest: &str,
        done: u64,
        total: u64,
    ) {
        if !self.enabled {
            return;
        }
        let finished = done >= total;
        let now = Instant::now();
        if !finished
            && self
                .last
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        let short = digest.get(..19).unwrap_or(digest);
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r\x1b[2K{verb} layer {layer}/{layers} {short}: {} / {}",
            human_size(done),
            human_size(total)
        );
        if finished {
            let _ = writeln!(e);
            self.open_line = false;
            self.last = None;
        } else {
            self.open_line = true;
        }
        let _ = e.flush();
    }

    /// One line about a step (`unpacking 3 layers`).
    pub fn step(&mut self, msg: &str) {
        if !self.enabled {
            return;
        }
        let mut e = std::io::stderr().lock();
        if self.open_line {
            let _ = writeln!(e);
            self.open_line = false;
        }
        let _ = writeln!(e, "{msg}");
    }
}

/// A resolved image: its linux/amd64 manifest and that manifest's digest (the cache key).
pub struct Resolved {
    pub digest: Digest,
    pub manifest: Manifest,
}

/// Where an image's documents and blobs come from.
pub trait Source {
    /// The image as people name it (`docker.io/library/alpine:3.20`, `oci:/abs/dir:tag`).
    fn name(&self) -> String;
    /// Finds the linux/amd64 manifest; every document read is checked against its digest.
    fn resolve(&mut self) -> Result<Resolved, ImageError>;
    /// A small blob (the config), checked against its digest and size.
    fn read_blob(&mut self, d: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>, ImageError>;
    /// Makes every layer available and checked (a registry downloads them into `dir`).
    fn fetch_layers(
        &mut self,
        layers: &[Descriptor],
        dir: &Path,
        progress: &mut Progress,
    ) -> Result<(), ImageError>;
    /// The layer's bytes as stored (maybe compressed), already checked by `fetch_layers`.
    fn open_layer(&mut self, index: usize, d: &Descriptor) -> Result<Box<dyn Read>, ImageError>;
}

pub fn check_digest(what: &str, d: &Descriptor, actual: &Digest, n: u64) -> Result<(), ImageError> {
    // A short or long blob says more as a size than as a digest.
    if n != d.size {
        return Err(ImageError::SizeMismatch {
            what: what.to_string(),
            expected: d.size,
            actual: n,
        });
    }
    if actual.to_string() != d.digest {
        return Err(ImageError::DigestMismatch {
            what: what.to_string(),
            expected: d.digest.clone(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

/// How to pull and build.
pub struct PullOptions {
    pub headroom_mib: u64,
    /// `USER:PASS` for the registry (else docker's config, else anonymous).
    pub auth: Option<String>,
    /// Build again even when the cache has the image.
    pub force: bool,
}

impl PullOptions {
    pub fn new(headroom_mib: Option<u64>, auth: Option<String>) -> Result<Self, ImageError> {
        let headroom_mib = match headroom_mib {
            Some(h) => h,
            None => match std::env::var("MICROAGENT_IMAGE_HEADROOM_MIB") {
                Ok(v) if !v.is_empty() => v.parse().map_err(|_| ImageError::BadReference {
                    reference: v.clone(),
                    reason: "MICROAGENT_IMAGE_HEADROOM_MIB must be a whole number of MiB".into(),
                })?,
                _ => DEFAULT_HEADROOM_MIB,
            },
        };
        if headroom_mib > MAX_HEADROOM_MIB {
            return Err(ImageError::BadReference {
                reference: headroom_mib.to_string(),
                reason: format!("headroom must be at most {MAX_HEADROOM_MIB} MiB"),
            });
        }
        let auth = auth.or_else(|| {
            std::env::var("MICROAGENT_REGISTRY_AUTH")
                .ok()
                .filter(|v| !v.is_empty())
        });
        Ok(PullOptions {
            headroom_mib,
            auth,
            force: false,
        })
    }
}

fn open_source(
    spec: &SourceSpec,
    opts: &PullOptions,
    scratch: &Path,
) -> Result<Box<dyn Source>, ImageError> {
    Ok(match spec {
        SourceSpec::Registry(r) => Box::new(registry::RegistrySource::new(
            r.clone(),
            opts.auth.as_deref(),
        )?),
        SourceSpec::Layout { dir, tag } => {
            Box::new(layout::LayoutSource::open(dir, tag.as_deref())?)
        }
        SourceSpec::Archive { file, tag } => {
            Box::new(archive::ArchiveSource::open(file, tag.as_deref(), scratch)?)
        }
    })
}

/// A cache entry ready to copy, and whether this call had to build it.
pub struct Pulled {
    pub entry: Entry,
    pub name: String,
    pub built: bool,
}

/// Resolves `spec`, and unless the cache already has that manifest, fetches, unpacks and builds.
pub fn pull(
    root: &Path,
    spec_str: &str,
    opts: &PullOptions,
    out: Out,
) -> Result<Pulled, ImageError> {
    let spec = SourceSpec::parse(spec_str)?;
    let cache = Cache::open(root)?;
    let mut progress = Progress::new(out);
    let mut source = open_source(&spec, opts, cache.dir())?;
    let name = source.name();
    let resolved = source.resolve().map_err(|e| e.naming(&name))?;
    let guest = ext4::GuestFiles::locate(cache.dir())?;
    if !opts.force {
        if let Some(entry) = cache.get(&resolved.digest) {
            if entry.meta.agent_sha256 == guest.agent_sha256 {
                let entry = cache.add_reference(&resolved.digest, &name)?;
                return Ok(Pulled {
                    entry,
                    name,
                    built: false,
                });
            }
            progress.step("the guest agent changed since this image was built: building it again");
        }
    }
    let manifest = &resolved.manifest;
    for (i, l) in manifest.layers.iter().enumerate() {
        spec::check_layer_media_type(l, i)?;
        l.digest()?;
    }
    let config_bytes = source.read_blob(&manifest.config, "image config", spec::MAX_CONFIG)?;
    let config =
        ImageConfig::parse(&config_bytes, manifest.layers.len()).map_err(|e| e.naming(&name))?;

    let build = cache.begin()?;
    let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
    progress.step(&format!(
        "{name}: {} layers, {} ({})",
        manifest.layers.len(),
        human_size(total),
        resolved.digest
    ));
    source.fetch_layers(&manifest.layers, &build.blobs_dir(), &mut progress)?;

    let rootfs = build.rootfs_dir();
    let mut unpacker = unpack::Unpacker::new(&rootfs, unpack::privileged())?;
    for (i, layer) in manifest.layers.iter().enumerate() {
        progress.step(&format!(
            "unpacking layer {}/{}",
            i + 1,
            manifest.layers.len()
        ));
        let reader = source.open_layer(i, layer)?;
        let diff_id = Digest::parse(&config.rootfs.diff_ids[i]).map_err(ImageError::Malformed)?;
        unpacker.apply_layer(i + 1, &layer.digest, reader, &diff_id)?;
    }
    let mut tree = unpacker.finish()?;
    build.drop_blobs();

    let runtime = config.config.clone().unwrap_or_default();
    ext4::install_guest(&rootfs, &guest, &runtime, &mut tree)?;
    progress.step(&format!(
        "building ext4 ({} of content)",
        human_size(tree.content_bytes())
    ));
    let image_path = build.image_path();
    let built = ext4::build(&rootfs, &image_path, opts.headroom_mib, &tree)?;
    let meta = Meta {
        format: cache::FORMAT,
        digest: resolved.digest.to_string(),
        references: vec![name.clone()],
        config_digest: manifest.config.digest.clone(),
        platform: "linux/amd64".into(),
        layers: manifest.layers.len(),
        compressed_bytes: total,
        content_bytes: tree.content_bytes(),
        image_bytes: built.size,
        headroom_mib: opts.headroom_mib,
        agent_sha256: guest.agent_sha256.clone(),
        created: cache::now_rfc3339(),
        runtime,
    };
    let entry = build.commit(&resolved.digest, meta)?;
    let entry = cache.add_reference(&resolved.digest, &entry.meta.references[0])?;
    Ok(Pulled {
        entry,
        name,
        built: true,
    })
}

/// What `create --image` gets: the cached disk to copy and the provenance for the config.
pub struct ForCreate {
    /// The cached ext4 image (copy it: it is shared).
    pub rootfs: PathBuf,
    /// `NAME@DIGEST`, recorded as the workspace's image.
    pub image: String,
}

/// The cached disk for `spec`: a registry tag already in the cache is used without asking the
/// registry (as `docker run` does); anything else is resolved, and pulled unless cached.
pub fn for_create(
    root: &Path,
    spec_str: &str,
    auth: Option<String>,
    out: Out,
) -> Result<ForCreate, Failure> {
    let opts = PullOptions::new(None, auth)?;
    if let SourceSpec::Registry(r) = SourceSpec::parse(spec_str)? {
        let cache = Cache::open(root)?;
        let hit = match &r.digest {
            Some(d) => cache.get(d),
            None => cache.find_reference(&r.to_string()),
        };
        if let Some(entry) = hit {
            return Ok(ForCreate {
                rootfs: entry.image_path(),
                image: format!("{}@{}", r, entry.meta.digest),
            });
        }
    }
    let p = pull(root, spec_str, &opts, out)?;
    Ok(ForCreate {
        rootfs: p.entry.image_path(),
        image: format!("{}@{}", p.name, p.entry.meta.digest),
    })
}

#[derive(Subcommand)]
pub enum ImageCommand {
    /// List cached images.
    List,
    /// Pull an image and build its root filesystem (again, with --force).
    Pull {
        /// `[registry/]repo[:tag|@digest]`, `oci:DIR[:tag]` or `docker-archive:FILE[:repo:tag]`.
        reference: String,
        /// Free space in MiB added to the content (default 1024, or $MICROAGENT_IMAGE_HEADROOM_MIB).
        #[arg(long, value_name = "MIB")]
        headroom: Option<u64>,
        /// Registry credentials (else $MICROAGENT_REGISTRY_AUTH, else docker's config.json).
        #[arg(long, value_name = "USER:PASS")]
        registry_auth: Option<String>,
        /// Build again even if the cache has this image.
        #[arg(long)]
        force: bool,
    },
    /// Remove a cached image (by reference, or digest or a prefix of at least 12 hex digits).
    Rm { image: String },
}

pub fn run(root: &Path, cmd: ImageCommand, out: Out) -> Result<(), Failure> {
    match cmd {
        ImageCommand::List => list(root, out),
        ImageCommand::Pull {
            reference,
            headroom,
            registry_auth,
            force,
        } => {
            let mut opts = PullOptions::new(headroom, registry_auth)?;
            opts.force = force;
            let p = pull(root, &reference, &opts, out)?;
            let m = &p.entry.meta;
            out.emit(
                format!(
                    "{} {}: {} ({} layers, {} ext4 at {})",
                    if p.built { "pulled" } else { "up to date" },
                    p.name,
                    m.digest,
                    m.layers,
                    human_size(m.image_bytes),
                    p.entry.image_path().display()
                ),
                json!({"image": m, "rootfs": p.entry.image_path(), "built": p.built}),
            );
            Ok(())
        }
        ImageCommand::Rm { image } => {
            let cache = Cache::open(root)?;
            let m = cache.remove(&image)?;
            out.emit(
                format!("removed {} ({})", m.digest, m.references.join(", ")),
                json!({"removed": m}),
            );
            Ok(())
        }
    }
}

fn list(root: &Path, out: Out) -> Result<(), Failure> {
    let cache = Cache::open(root)?;
    let entries = cache.list();
    let mut human = format!(
        "{:<50} {:<19} {:>10} {:>6}  {}",
        "REFERENCE", "DIGEST", "SIZE", "LAYERS", "CREATED"
    );
    for e in &entries {
        let refs = if e.meta.references.is_empty() {
            vec!["<none>".to_string()]
        } else {
            e.meta.references.clone()
        };
        for r in refs {
            human.push_str(&format!(
                "\n{:<50} {:<19} {:>10} {:>6}  {}",
                r,
                format!("sha256:{}", &e.meta.digest[7..19.min(e.meta.digest.len())]),
                human_size(e.meta.content_bytes),
                e.meta.layers,
                e.meta.created
            ));
        }
    }
    let js: Vec<_> = entries
        .iter()
        .map(|e| json!({"meta": e.meta, "rootfs": e.image_path()}))
        .collect();
    out.emit(human, json!({"images": js}));
    Ok(())
}
