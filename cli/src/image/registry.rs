//! Registry references, pulled with the `oci-client` crate (the distribution protocol, token and
//! basic auth) on a current-thread tokio runtime private to this module. Every manifest and
//! blob is hashed here again before it is used.
//!
//! Credentials: `--registry-auth USER:PASS` (or `$MICROAGENT_REGISTRY_AUTH`), else docker's
//! `config.json` (`$DOCKER_CONFIG`, else `~/.docker`; `auths` and credential helpers), else
//! anonymous. Loopback registries (and those in `$MICROAGENT_INSECURE_REGISTRIES`) are spoken
//! to over plain HTTP, as docker does.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;

use super::digest::{Digest, HashingWriter};
use super::reference::{Reference, DOCKER_HUB};
use super::spec::{self, Descriptor, Document};
use super::{check_digest, ImageError, Progress, Resolved, Source};

const ACCEPT: &[&str] = &[
    spec::OCI_INDEX,
    spec::DOCKER_LIST,
    spec::OCI_MANIFEST,
    spec::DOCKER_MANIFEST,
];

pub struct RegistrySource {
    reference: Reference,
    target: oci_client::Reference,
    client: oci_client::Client,
    auth: RegistryAuth,
    runtime: tokio::runtime::Runtime,
    layer_files: Vec<PathBuf>,
}

/// The credentials to use for `r`'s registry.
fn credentials(r: &Reference, flag: Option<&str>) -> Result<RegistryAuth, ImageError> {
    if let Some(f) = flag {
        return match f.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(RegistryAuth::Basic(u.to_string(), p.to_string())),
            _ => Err(ImageError::BadReference {
                reference: "--registry-auth".into(),
                reason: "want USER:PASS".into(),
            }),
        };
    }
    let server = if r.registry == DOCKER_HUB {
        "https://index.docker.io/v1/".to_string()
    } else {
        r.registry.clone()
    };
    Ok(match docker_credential::get_credential(&server) {
        Ok(docker_credential::DockerCredential::UsernamePassword(u, p)) => {
            RegistryAuth::Basic(u, p)
        }
        // Identity (refresh) tokens need an OAuth exchange oci-client does not do; public images
        // still pull anonymously.
        Ok(docker_credential::DockerCredential::IdentityToken(_)) | Err(_) => {
            RegistryAuth::Anonymous
        }
    })
}

impl RegistrySource {
    pub fn new(reference: Reference, auth: Option<&str>) -> Result<Self, ImageError> {
        let auth = credentials(&reference, auth)?;
        let endpoint = reference.endpoint().to_string();
        let protocol = if reference.is_insecure() {
            ClientProtocol::HttpsExcept(vec![endpoint.clone()])
        } else {
            ClientProtocol::Https
        };
        let client = oci_client::Client::new(ClientConfig {
            protocol,
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(30)),
            read_timeout: Some(Duration::from_secs(120)),
            ..Default::default()
        });
        let repo = reference.repository.clone();
        let target = match (&reference.tag, &reference.digest) {
            (Some(t), Some(d)) => {
                oci_client::Reference::with_tag_and_digest(endpoint, repo, t.clone(), d.to_string())
            }
            (None, Some(d)) => oci_client::Reference::with_digest(endpoint, repo, d.to_string()),
            (Some(t), None) => oci_client::Reference::with_tag(endpoint, repo, t.clone()),
            (None, None) => oci_client::Reference::with_tag(endpoint, repo, "latest".into()),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::Host(format!("cannot start the network runtime: {e}")))?;
        Ok(RegistrySource {
            reference,
            target,
            client,
            auth,
            runtime,
            layer_files: Vec::new(),
        })
    }

    fn fail(&self, e: OciDistributionError) -> ImageError {
        let registry = self.reference.registry.clone();
        let name = self.reference.to_string();
        match e {
            OciDistributionError::AuthenticationFailure(m) => ImageError::Auth {
                registry,
                message: format!("authentication failed: {}", m.trim()),
            },
            OciDistributionError::UnauthorizedError { .. } => ImageError::Auth {
                registry,
                message: format!(
                    "access to {name} was refused (unauthorized): give --registry-auth USER:PASS or log in with docker"
                ),
            },
            OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound(format!("image {name} was not found")),
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let text: Vec<String> = envelope.errors.iter().map(|e| e.message.clone()).collect();
                if codes.iter().any(|c| matches!(c, OciErrorCode::ManifestUnknown | OciErrorCode::NameUnknown | OciErrorCode::NotFound)) {
                    ImageError::NotFound(format!("image {name} was not found ({})", text.join("; ")))
                } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                    ImageError::Auth {
                        registry,
                        message: format!(
                            "access to {name} was refused ({}): give --registry-auth USER:PASS or log in with docker",
                            text.join("; ")
                        ),
                    }
                } else {
                    ImageError::Registry {
                        registry,
                        message: text.join("; "),
                    }
                }
            }
            OciDistributionError::ServerError { code: 404, .. } => ImageError::NotFound(format!("image {name} was not found")),
            OciDistributionError::RequestError(e) => ImageError::Unreachable {
                registry,
                message: format!("cannot reach {}: {}", self.reference.endpoint(), error_chain(&e)),
            },
            other => ImageError::Registry {
                registry,
                message: other.to_string(),
            },
        }
    }

    /// A manifest document by digest or tag, checked against `expected` (or the pinned digest).
    fn manifest(
        &self,
        target: &oci_client::Reference,
        expected: Option<&Descriptor>,
    ) -> Result<(Vec<u8>, Digest), ImageError> {
        let (bytes, _) = self
            .runtime
            .block_on(self.client.pull_manifest_raw(target, &self.auth, ACCEPT))
            .map_err(|e| self.fail(e))?;
        if bytes.len() as u64 > spec::MAX_MANIFEST {
            return Err(ImageError::Malformed(format!(
                "manifest is {} bytes (at most {})",
                bytes.len(),
                spec::MAX_MANIFEST
            )));
        }
        let what = format!("manifest of {}", self.reference);
        match (expected, target.digest()) {
            (Some(d), _) => {
                let alg = d.digest()?.algorithm;
                check_digest(
                    &what,
                    d,
                    &Digest::of_algorithm(&bytes, alg),
                    bytes.len() as u64,
                )?;
            }
            (None, Some(pinned)) => {
                let want = Digest::parse(pinned).map_err(ImageError::Malformed)?;
                let got = Digest::of_algorithm(&bytes, want.algorithm);
                if got != want {
                    return Err(ImageError::DigestMismatch {
                        what,
                        expected: want.to_string(),
                        actual: got.to_string(),
                    });
                }
            }
            (None, None) => {}
        }
        let digest = match expected {
            Some(d) => d.digest()?,
            None => match target.digest() {
                Some(p) => Digest::parse(p).map_err(ImageError::Malformed)?,
                None => Digest::of(&bytes),
            },
        };
        Ok((bytes.to_vec(), digest))
    }

    /// Streams a blob into `sink`, hashing it; at most `d.size` bytes are accepted.
    fn download(
        &self,
        d: &Descriptor,
        what: &str,
        sink: &mut dyn Write,
        mut on_bytes: impl FnMut(u64),
    ) -> Result<(), ImageError> {
        let expected = d.digest()?;
        let mut w = HashingWriter::new(sink, expected.algorithm);
        let result: Result<(), ImageError> = self.runtime.block_on(async {
            let mut stream = self
                .client
                .pull_blob_stream(&self.target, d.digest.as_str())
                .await
                .map_err(|e| self.fail(e))?;
            while let Some(chunk) = stream.next().await {
                let chunk = match chunk {
                    Ok(c) => c,
                    // oci-client's own digest check; ours below says the same more precisely.
                    Err(_) if w.count >= d.size => break,
                    Err(e) => {
                        return Err(ImageError::Registry {
                            registry: self.reference.registry.clone(),
                            message: format!(
                                "{what}: download failed after {} bytes: {e}",
                                w.count
                            ),
                        })
                    }
                };
                if w.count + chunk.len() as u64 > d.size {
                    return Err(ImageError::SizeMismatch {
                        what: what.to_string(),
                        expected: d.size,
                        actual: w.count + chunk.len() as u64,
                    });
                }
                w.write_all(&chunk).map_err(|e| ImageError::Io {
                    what: "cannot write",
                    path: PathBuf::from(what),
                    source: e,
                })?;
                on_bytes(w.count);
            }
            Ok(())
        });
        result?;
        let (_, actual, n) = w.finish();
        check_digest(what, d, &actual, n)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl Source for RegistrySource {
    fn name(&self) -> String {
        self.reference.to_string()
    }

    fn resolve(&mut self) -> Result<Resolved, ImageError> {
        self.runtime
            .block_on(
                self.client
                    .auth(&self.target, &self.auth, RegistryOperation::Pull),
            )
            .map_err(|e| self.fail(e))?;
        let (bytes, digest) = self.manifest(&self.target, None)?;
        let what = format!("manifest of {}", self.reference);
        match Document::parse(&bytes, &what)? {
            Document::Manifest(manifest) => Ok(Resolved { digest, manifest }),
            Document::Index(index) => {
                let chosen = spec::select_amd64(&index, &self.reference.to_string())?.clone();
                let target = self.target.clone_with_digest(chosen.digest.clone());
                let (bytes, digest) = self.manifest(&target, Some(&chosen))?;
                match Document::parse(
                    &bytes,
                    &format!("linux/amd64 manifest of {}", self.reference),
                )? {
                    Document::Manifest(manifest) => Ok(Resolved { digest, manifest }),
                    Document::Index(_) => Err(ImageError::Malformed(
                        "an index entry for linux/amd64 is itself an index".into(),
                    )),
                }
            }
        }
    }

    fn read_blob(&mut self, d: &Descriptor, what: &str, limit: u64) -> Result<Vec<u8>, ImageError> {
        if d.size > limit {
            return Err(ImageError::Malformed(format!(
                "{what} is {} bytes (at most {limit})",
                d.size
            )));
        }
        let mut v = Vec::with_capacity(d.size as usize);
        self.download(d, what, &mut v, |_| {})?;
        Ok(v)
    }

    fn fetch_layers(
        &mut self,
        layers: &[Descriptor],
        dir: &Path,
        progress: &mut Progress,
    ) -> Result<(), ImageError> {
        self.layer_files.clear();
        for (i, l) in layers.iter().enumerate() {
            let digest = l.digest()?;
            let p = dir.join(format!("{i}-{}", digest.hex));
            let f = File::create(&p).map_err(ImageError::io("cannot create", &p))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            progress.bytes("pulling", i + 1, layers.len(), &l.digest, 0, l.size.max(1));
            self.download(l, &format!("layer {} ({})", i + 1, l.digest), &mut w, |n| {
                progress.bytes("pulling", i + 1, layers.len(), &l.digest, n, l.size)
            })?;
            w.flush().map_err(ImageError::io("cannot write", &p))?;
            if l.size == 0 {
                progress.bytes("pulling", i + 1, layers.len(), &l.digest, 0, 0);
            }
            self.layer_files.push(p);
        }
        Ok(())
    }

    fn open_layer(&mut self, index: usize, _d: &Descriptor) -> Result<Box<dyn Read>, ImageError> {
        let p = self
            .layer_files
            .get(index)
            .ok_or_else(|| ImageError::Malformed(format!("layer {} was not fetched", index + 1)))?;
        let f = File::open(p).map_err(ImageError::io("cannot open", p))?;
        Ok(Box::new(BufReader::with_capacity(1 << 20, f)))
    }
}
