//! `oci:DIR[:tag]`: an OCI image layout directory (`oci-layout`, `index.json`, `blobs/<alg>/<hex>`),
//! as `skopeo copy ... oci:DIR:tag` or `umoci` write it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use super::digest::{Digest, Hasher};
use super::spec::{self, Descriptor, Document, Index};
use super::{check_digest, ImageError, Progress, Resolved, Source};

pub struct LayoutSource {
    dir: PathBuf,
    tag: Option<String>,
}

/// Reads a whole small file, refusing one larger than `limit`.
pub fn read_limited(p: &Path, limit: u64) -> Result<Vec<u8>, ImageError> {
    let f = File::open(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => {
            ImageError::NotFound(format!("{} does not exist", p.display()))
        }
        _ => ImageError::Io {
            what: "cannot open",
            path: p.to_path_buf(),
            source: e,
        },
    })?;
    let mut v = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut v)
        .map_err(ImageError::io("cannot read", p))?;
    if v.len() as u64 > limit {
        return Err(ImageError::Malformed(format!(
            "{} is larger than {limit} bytes",
            p.display()
        )));
    }
    Ok(v)
}

/// Hashes a file against its descriptor, drawing progress as it goes.
pub fn verify_file(
    p: &Path,
    d: &Descriptor,
    what: &str,
    layer: (usize, usize),
    progress: &mut Progress,
) -> Result<(), ImageError> {
    let expected = d.digest()?;
    let mut f = File::open(p).map_err(ImageError::io("cannot open", p))?;
    let mut h = Hasher::new(expected.algorithm);
    let mut buf = vec![0u8; 1 << 20];
    let mut n: u64 = 0;
    loop {
        let k = f.read(&mut buf).map_err(ImageError::io("cannot read", p))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
        if n > d.size {
            break;
        }
        progress.bytes(
            "verifying",
            layer.0,
            layer.1,
            &d.digest,
            n.min(d.size),
            d.size,
        );
    }
    if n == 0 {
        progress.bytes("verifying", layer.0, layer.1, &d.digest, 0, 0);
    }
    check_digest(what, d, &h.finish(), n)
}

impl LayoutSource {
    pub fn open(dir: &Path, tag: Option<&str>) -> Result<Self, ImageError> {
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| ImageError::NotFound(format!("OCI layout {}: {e}", dir.display())))?;
        let marker = dir.join("oci-layout");
        let v: serde_json::Value =
            serde_json::from_slice(&read_limited(&marker, 4096).map_err(|_| {
                ImageError::NotFound(format!(
                    "{} is not an OCI image layout (no oci-layout file)",
                    dir.display()
                ))
            })?)
            .map_err(|e| ImageError::Malformed(format!("{}: {e}", marker.display())))?;
        match v.get("imageLayoutVersion").and_then(|v| v.as_str()) {
            Some(ver) if ver.starts_with("1.") => {}
            other => {
                return Err(ImageError::Unsupported(format!(
                    "{}: image layout version {other:?} (this build reads 1.x)",
                    marker.display()
                )))
            }
        }
        Ok(LayoutSource {
            dir,
            tag: tag.map(str::to_string),
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        // The digest was validated: its parts are plain names.
        self.dir.join("blobs").join(d.algorithm_name()).join(&d.hex)
    }

    fn read_document(&mut self, d: &Descriptor, what: &str) -> Result<Document, ImageError> {
        let bytes = self.read_blob(d, what, spec::MAX_MANIFEST)?;
        Document::parse(&bytes, what)
    }
}

impl Source for LayoutSource {
    fn name(&self) -> String {
        match &self.tag {
            Some(t) => format!("oci:{}:{t}", self.dir.display()),
            None => format!("oci:{}", self.dir.display()),
        }
    }

    fn resolve(&mut self) -> Result<Resolved, ImageError> {
        let index_path = self.dir.join("index.json");
        let bytes = read_limited(&index_path, spec::MAX_MANIFEST)?;
        let index = match Document::parse(&bytes, "index.json")? {
            Document::Index(i) => i,
            Document::Manifest(_) => {
                return Err(ImageError::Malformed(
                    "index.json is not an image index".into(),
                ))
            }
        };
        let top = pick_tagged(&index, self.tag.as_deref(), &self.dir)?.clone();
        let mut desc = top;
        // An index entry may itself be an index (a multi-platform image): take its linux/amd64.
        for _ in 0..4 {
            match self.read_document(&desc, &format!("manifest {}", desc.digest))? {
                Document::Manifest(manifest) => {
                    return Ok(Resolved {
                        digest: desc.digest()?,
                        manifest,
                    })
                }
                Document::Index(i) => desc = spec::select_amd64(&i, &self.name())?.clone(),
            }
        }
        Err(ImageError::Malformed(
            "image indexes nest too deeply".into(),
        ))
    }

    fn read_blob(&mut self, d: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        let digest = d.digest()?;
        if d.size > limit {
            return Err(ImageError::Malformed(format!(
                "{what} is {} bytes (at most {limit})",
                d.size
            )));
        }
        let p = self.blob_path(&digest);
        let bytes = read_limited(&p, limit).map_err(|e| match e {
            ImageError::NotFound(_) => {
                ImageError::NotFound(format!("{what}: blob {digest} is missing from the layout"))
            }
            other => other,
        })?;
        check_digest(
            what,
            d,
            &Digest::of_algorithm(&bytes, digest.algorithm),
            bytes.len() as u64,
        )?;
        Ok(bytes)
    }

    fn fetch_layers(
        &mut self,
        layers: &[Descriptor],
        _dir: &Path,
        progress: &mut Progress,
    ) -> Result<(), ImageError> {
        for (i, l) in layers.iter().enumerate() {
            let p = self.blob_path(&l.digest()?);
            if !p.is_file() {
                return Err(ImageError::NotFound(format!(
                    "layer {}: blob {} is missing from the layout",
                    i + 1,
                    l.digest
                )));
            }
            verify_file(
                &p,
                l,
                &format!("layer {} ({})", i + 1, l.digest),
                (i + 1, layers.len()),
                progress,
            )?;
        }
        Ok(())
    }

    fn open_layer(&mut self, _index: usize, d: &Descriptor) -> Result<Box<dyn Read>, ImageError> {
        let p = self.blob_path(&d.digest()?);
        let f = File::open(&p).map_err(ImageError::io("cannot open", &p))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
    }
}

/// The index entry `tag` names, or the only entry when no tag is given.
fn pick_tagged<'a>(
    index: &'a Index,
    tag: Option<&str>,
    dir: &Path,
) -> Result<&'a Descriptor, ImageError> {
    let tags: Vec<&str> = index
        .manifests
        .iter()
        .filter_map(|d| d.annotations.get(spec::REF_NAME).map(String::as_str))
        .collect();
    match tag {
        Some(t) => index
            .manifests
            .iter()
            .find(|d| d.annotations.get(spec::REF_NAME).is_some_and(|n| n == t))
            .ok_or_else(|| {
                ImageError::NotFound(format!(
                    "OCI layout {} has no image tagged {t:?} (tags: {})",
                    dir.display(),
                    if tags.is_empty() {
                        "none".to_string()
                    } else {
                        tags.join(", ")
                    }
                ))
            }),
        None => match index.manifests.as_slice() {
            [one] => Ok(one),
            [] => Err(ImageError::NotFound(format!(
                "OCI layout {} holds no image",
                dir.display()
            ))),
            _ => Err(ImageError::BadReference {
                reference: format!("oci:{}", dir.display()),
                reason: format!(
                    "the layout holds several images; name one with :TAG (tags: {})",
                    tags.join(", ")
                ),
            }),
        },
    }
}
