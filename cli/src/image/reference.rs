//! What `--image` names: a registry reference (`[registry/]repo[:tag|@digest]`, with Docker Hub's
//! defaults), an OCI image layout (`oci:DIR[:tag]`) or a `docker save` archive
//! (`docker-archive:FILE[:repo:tag]`).

use std::fmt;
use std::path::PathBuf;

use super::digest::Digest;
use super::ImageError;

/// Docker Hub as people write it, and where its API really lives.
pub const DOCKER_HUB: &str = "docker.io";
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";
const DEFAULT_TAG: &str = "latest";

/// A parsed registry reference, always complete: `docker.io/library/alpine:latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The registry as written (`docker.io`, `ghcr.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The repository path (`library/alpine`).
    pub repository: String,
    /// The tag; `latest` when neither tag nor digest was given.
    pub tag: Option<String>,
    /// A pinned manifest digest (wins over the tag).
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        let bad = |why: &str| ImageError::BadReference {
            reference: s.to_string(),
            reason: why.to_string(),
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > 512 {
            return Err(bad("it is longer than 512 characters"));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("it contains whitespace"));
        }
        let (name, digest) = match s.split_once('@') {
            Some((n, d)) => (n, Some(Digest::parse(d).map_err(|e| bad(&e))?)),
            None => (s, None),
        };
        // A tag is a ':' after the last '/', so `host:5000/repo` keeps its port.
        let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
            if !ok {
                return Err(bad(&format!("invalid tag {t:?}")));
            }
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), rest)
            }
            _ => (DOCKER_HUB.to_string(), name),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if !registry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        {
            return Err(bad(&format!("invalid registry {registry:?}")));
        }
        if path.is_empty() {
            return Err(bad("the repository is empty"));
        }
        for component in path.split('/') {
            if !valid_path_component(component) {
                return Err(bad(&format!(
                    "invalid repository component {component:?}: use lowercase letters, digits and single separators (. _ __ -)"
                )));
            }
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path.to_string()
        };
        if repository.len() > 255 {
            return Err(bad("the repository name is longer than 255 characters"));
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) the distribution API is reached at.
    pub fn endpoint(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.registry
        }
    }

    /// Registries reached over plain HTTP: loopback ones (as docker does) and any listed in
    /// `MICROAGENT_INSECURE_REGISTRIES` (comma-separated `host[:port]`).
    pub fn is_insecure(&self) -> bool {
        let host = host_of(&self.registry);
        if host == "localhost" || host.starts_with("127.") || host == "[::1]" || host == "::1" {
            return true;
        }
        std::env::var("MICROAGENT_INSECURE_REGISTRIES")
            .map(|v| v.split(',').any(|r| r.trim() == self.registry))
            .unwrap_or(false)
    }
}

fn host_of(registry: &str) -> &str {
    if registry.starts_with('[') {
        return registry
            .split_once(']')
            .map(|(h, _)| &registry[..=h.len()])
            .unwrap_or(registry);
    }
    registry.split(':').next().unwrap_or(registry)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`, as the distribution spec has it.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    Registry(Reference),
    /// An OCI image layout directory, optionally with the `org.opencontainers.image.ref.name` to pick.
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
    /// A `docker save` archive, optionally with the `RepoTags` entry to pick.
    Archive {
        file: PathBuf,
        tag: Option<String>,
    },
}

impl SourceSpec {
    pub fn parse(s: &str) -> Result<Self, ImageError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = split_path_and_tag(rest, false);
            if dir.is_empty() {
                return Err(ImageError::BadReference {
                    reference: s.to_string(),
                    reason: "oci: needs a directory: oci:DIR[:tag]".into(),
                });
            }
            return Ok(SourceSpec::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, tag) = split_path_and_tag(rest, true);
            if file.is_empty() {
                return Err(ImageError::BadReference {
                    reference: s.to_string(),
                    reason: "docker-archive: needs a file: docker-archive:FILE[:repo:tag]".into(),
                });
            }
            return Ok(SourceSpec::Archive {
                file: PathBuf::from(file),
                tag,
            });
        }
        if let Some((scheme, _)) = s.split_once(':') {
            if matches!(
                scheme,
                "docker" | "oci-archive" | "dir" | "containers-storage" | "docker-daemon"
            ) {
                return Err(ImageError::BadReference {
                    reference: s.to_string(),
                    reason: format!(
                        "{scheme}: is not supported; use a registry reference, oci:DIR[:tag] or docker-archive:FILE"
                    ),
                });
            }
        }
        Ok(SourceSpec::Registry(Reference::parse(s)?))
    }
}

/// `PATH[:TAG]`: the whole string if that path exists; for a docker archive (whose tag may hold
/// a ':' of its own) the shortest existing prefix before a ':', else the part before the first
/// ':'; for a layout the part before the last ':' after the last '/'.
fn split_path_and_tag(s: &str, tag_may_have_colon: bool) -> (String, Option<String>) {
    if std::path::Path::new(s).exists() {
        return (s.to_string(), None);
    }
    let last_slash = s.rfind('/').map(|i| i + 1).unwrap_or(0);
    let search = if tag_may_have_colon {
        // `file.tar:repo/name:tag`: the path ends at the first ':' whose prefix exists.
        for (i, _) in s.match_indices(':') {
            if std::path::Path::new(&s[..i]).exists() {
                return (
                    s[..i].to_string(),
                    Some(s[i + 1..].to_string()).filter(|t| !t.is_empty()),
                );
            }
        }
        return match s.split_once(':') {
            Some((p, t)) => (p.to_string(), Some(t.to_string()).filter(|t| !t.is_empty())),
            None => (s.to_string(), None),
        };
    } else {
        s[last_slash..].rfind(':')
    };
    match search {
        Some(i) => {
            let (p, t) = (&s[..last_slash + i], &s[last_slash + i + 1..]);
            (p.to_string(), Some(t.to_string()).filter(|t| !t.is_empty()))
        }
        None => (s.to_string(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> String {
        Reference::parse(s).unwrap().to_string()
    }

    #[test]
    fn docker_hub_defaults() {
        assert_eq!(p("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(p("alpine:3.20"), "docker.io/library/alpine:3.20");
        assert_eq!(
            p("docker.io/library/alpine:3.20"),
            "docker.io/library/alpine:3.20"
        );
        assert_eq!(
            p("index.docker.io/library/alpine"),
            "docker.io/library/alpine:latest"
        );
        assert_eq!(p("user/tool"), "docker.io/user/tool:latest");
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(r.endpoint(), "registry-1.docker.io");
        assert!(!r.is_insecure());
    }

    #[test]
    fn registries_ports_and_digests() {
        assert_eq!(
            p("127.0.0.1:5000/test/img:v1"),
            "127.0.0.1:5000/test/img:v1"
        );
        assert_eq!(p("localhost/img"), "localhost/img:latest");
        assert_eq!(p("ghcr.io/a/b/c"), "ghcr.io/a/b/c:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("alpine@{d}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().to_string(), d);
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{d}"));
        let r = Reference::parse(&format!("127.0.0.1:5000/x:1@{d}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert!(r.is_insecure());
        assert_eq!(r.endpoint(), "127.0.0.1:5000");
    }

    #[test]
    fn refusals() {
        for bad in [
            "",
            "Alpine",
            "alpine:",
            "alpine:-x",
            "a b",
            "alpine@sha256:abc",
            "alpine@md5:0123",
            "foo//bar",
            "foo/",
            "-foo",
            "foo---.bar",
            "foo..bar",
            "localhost:5000/",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn sources() {
        assert_eq!(
            SourceSpec::parse("oci:/no/such/dir:v2").unwrap(),
            SourceSpec::Layout {
                dir: "/no/such/dir".into(),
                tag: Some("v2".into())
            }
        );
        assert_eq!(
            SourceSpec::parse("oci:rel/dir").unwrap(),
            SourceSpec::Layout {
                dir: "rel/dir".into(),
                tag: None
            }
        );
        assert_eq!(
            SourceSpec::parse("docker-archive:/x/img.tar:repo/name:tag").unwrap(),
            SourceSpec::Archive {
                file: "/x/img.tar".into(),
                tag: Some("repo/name:tag".into())
            }
        );
        assert_eq!(
            SourceSpec::parse("docker-archive:/x/img.tar").unwrap(),
            SourceSpec::Archive {
                file: "/x/img.tar".into(),
                tag: None
            }
        );
        assert!(SourceSpec::parse("docker://alpine").is_err());
        assert!(SourceSpec::parse("oci:").is_err());
        assert!(matches!(
            SourceSpec::parse("alpine:3").unwrap(),
            SourceSpec::Registry(_)
        ));
    }
}
