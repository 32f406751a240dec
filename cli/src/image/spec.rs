//! The JSON documents of the OCI image spec (and Docker's schema 2 twins): descriptors, image
//! manifests, indexes and image configs; only the fields microagent reads.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::ImageError;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

/// Manifests and configs are small; anything bigger is refused before it is parsed.
pub const MAX_MANIFEST: u64 = 4 << 20;
pub const MAX_CONFIG: u64 = 16 << 20;
pub const MAX_LAYERS: usize = 1000;

/// Who a platform refusal from an image config names, until the caller names the image.
pub const CONFIG_WHAT: &str = "the image config";

/// The annotation an OCI layout uses to name its images.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
}

impl Descriptor {
    pub fn digest(&self) -> Result<Digest, ImageError> {
        Digest::parse(&self.digest).map_err(ImageError::Malformed)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

/// A manifest document of any kind, told apart by its `mediaType` or, when absent, its shape.
pub enum Document {
    Manifest(Manifest),
    Index(Index),
}

impl Document {
    pub fn parse(bytes: &[u8], what: &str) -> Result<Document, ImageError> {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::Malformed(format!("{what} is not valid JSON: {e}")))?;
        let media = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
        let schema = v.get("schemaVersion").and_then(|s| s.as_u64()).unwrap_or(0);
        if schema == 1 || media == DOCKER_SCHEMA1 || media == DOCKER_SCHEMA1_SIGNED {
            return Err(ImageError::Unsupported(format!(
                "{what} uses Docker image manifest schema 1, which is deprecated; push the image again with a current tool"
            )));
        }
        if schema != 2 {
            return Err(ImageError::Malformed(format!(
                "{what} has schemaVersion {schema}, expected 2"
            )));
        }
        let is_index = match media {
            OCI_INDEX | DOCKER_LIST => true,
            OCI_MANIFEST | DOCKER_MANIFEST => false,
            "" => v.get("manifests").is_some(),
            other => {
                return Err(ImageError::Unsupported(format!(
                    "{what} has unsupported media type {other}"
                )));
            }
        };
        let bad = |e: serde_json::Error| ImageError::Malformed(format!("{what}: {e}"));
        if is_index {
            Ok(Document::Index(serde_json::from_value(v).map_err(bad)?))
        } else {
            let m: Manifest = serde_json::from_value(v).map_err(bad)?;
            if m.layers.len() > MAX_LAYERS {
                return Err(ImageError::Malformed(format!(
                    "{what} has {} layers (at most {MAX_LAYERS})",
                    m.layers.len()
                )));
            }
            Ok(Document::Manifest(m))
        }
    }
}

/// The linux/amd64 entry of an index; an index without one is refused, naming what it has.
pub fn select_amd64<'a>(index: &'a Index, what: &str) -> Result<&'a Descriptor, ImageError> {
    let is_manifest = |d: &Descriptor| {
        d.media_type.is_empty()
            || d.media_type == OCI_MANIFEST
            || d.media_type == DOCKER_MANIFEST
            || d.media_type == OCI_INDEX
            || d.media_type == DOCKER_LIST
    };
    let found = index.manifests.iter().filter(|d| is_manifest(d)).find(|d| {
        d.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    });
    match found {
        Some(d) => Ok(d),
        None => {
            let mut have: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(|p| p.to_string())
                .collect();
            have.dedup();
            Err(ImageError::NoPlatform {
                what: what.to_string(),
                found: if have.is_empty() {
                    "no platforms".to_string()
                } else {
                    have.join(", ")
                },
            })
        }
    }
}

/// What an image config says; `config` is the runtime part (entrypoint, env, ...).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<RuntimeConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct RuntimeConfig {
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8], layers: usize) -> Result<ImageConfig, ImageError> {
        let c: ImageConfig = serde_json::from_slice(bytes)
            .map_err(|e| ImageError::Malformed(format!("image config: {e}")))?;
        if c.os != "linux" || c.architecture != "amd64" {
            return Err(ImageError::NoPlatform {
                what: CONFIG_WHAT.into(),
                found: format!("{}/{}", c.os, c.architecture),
            });
        }
        if c.rootfs.kind != "layers" {
            return Err(ImageError::Malformed(format!(
                "image config: rootfs type {:?}, expected \"layers\"",
                c.rootfs.kind
            )));
        }
        if c.rootfs.diff_ids.len() != layers {
            return Err(ImageError::Malformed(format!(
                "image config lists {} layer digests but the manifest has {layers} layers",
                c.rootfs.diff_ids.len()
            )));
        }
        for d in &c.rootfs.diff_ids {
            Digest::parse(d).map_err(|e| ImageError::Malformed(format!("image config: {e}")))?;
        }
        Ok(c)
    }
}

/// Layer media types this unpacker reads (compression is detected from the bytes).
pub fn check_layer_media_type(d: &Descriptor, index: usize) -> Result<(), ImageError> {
    let m = d.media_type.as_str();
    let ok = m.is_empty()
        || m.starts_with(OCI_LAYER_TAR)
        || m == "application/vnd.oci.image.layer.nondistributable.v1.tar"
        || m == "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        || m == "application/vnd.docker.image.rootfs.diff.tar.gzip"
        || m == "application/vnd.docker.image.rootfs.diff.tar"
        || m == "application/vnd.docker.image.rootfs.diff.tar.zstd";
    if !ok || m.contains("encrypted") || m.ends_with("+bzip2") {
        return Err(ImageError::Unsupported(format!(
            "layer {} has unsupported media type {m}",
            index + 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(os: &str, arch: &str) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "1".repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: os.into(),
                variant: None,
            }),
            annotations: BTreeMap::new(),
            urls: vec![],
        }
    }

    #[test]
    fn platform_selection() {
        let mut idx = Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.into()),
            manifests: vec![desc("linux", "arm64"), desc("unknown", "unknown")],
        };
        let e = select_amd64(&idx, "index").unwrap_err().to_string();
        assert!(
            e.contains("no linux/amd64") && e.contains("linux/arm64"),
            "{e}"
        );
        idx.manifests.push(desc("linux", "amd64"));
        assert_eq!(
            select_amd64(&idx, "index")
                .unwrap()
                .platform
                .as_ref()
                .unwrap()
                .architecture,
            "amd64"
        );
    }

    #[test]
    fn documents() {
        let idx = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            Document::parse(idx, "x").unwrap(),
            Document::Index(_)
        ));
        let m = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"digest":"sha256:{0}","size":2}},"layers":[]}}"#,
            "a".repeat(64)
        );
        assert!(matches!(
            Document::parse(m.as_bytes(), "x").unwrap(),
            Document::Manifest(_)
        ));
        let e = Document::parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, "x")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("schema 1"), "{e}");
        assert!(Document::parse(b"nope", "x").is_err());
    }

    #[test]
    fn configs() {
        let c =
            br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let e = ImageConfig::parse(c, 0).unwrap_err().to_string();
        assert!(e.contains("linux/arm64"), "{e}");
        let c =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        assert!(ImageConfig::parse(c, 1).is_err());
        assert!(ImageConfig::parse(c, 0).is_ok());
    }
}
