//! The remotes this host knows, in `<state>/remotes.json` (written atomically). A remote holds
//! no secrets: credentials come from the environment or the AWS shared credentials file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::exit::{Code, Failure};

pub const FILE: &str = "remotes.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    pub name: String,
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (may be empty).
    pub prefix: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
}

impl Remote {
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    remotes: Vec<Remote>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0:?} is not an s3://BUCKET[/PREFIX] URL")]
    Url(String),
    #[error("invalid remote name {0:?}: use 1-63 letters, digits, '-' or '_'")]
    Name(String),
    #[error("invalid endpoint {0:?}: give an http:// or https:// URL")]
    Endpoint(String),
}

/// Splits `s3://BUCKET/PREFIX`; bucket names follow S3's rules loosely (no `/`, not empty).
pub fn parse_url(url: &str) -> Result<(String, String), ConfigError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| ConfigError::Url(url.to_string()))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let ok_bucket = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let prefix = prefix.trim_matches('/');
    let ok_prefix = prefix
        .split('/')
        .all(|seg| prefix.is_empty() || (!seg.is_empty() && seg != "." && seg != ".."));
    if !ok_bucket || !ok_prefix {
        return Err(ConfigError::Url(url.to_string()));
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

pub fn check_name(name: &str) -> Result<(), ConfigError> {
    crate::home::check_name(name).map_err(|_| ConfigError::Name(name.to_string()))
}

fn path(root: &Path) -> PathBuf {
    root.join(FILE)
}

pub fn load(root: &Path) -> Result<Vec<Remote>, Failure> {
    let p = path(root);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice::<File>(&b)
            .map(|f| f.remotes)
            .map_err(|e| Failure::new(Code::Error, format!("{} is corrupt: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Failure::new(
            Code::Error,
            format!("cannot read {}: {e}", p.display()),
        )),
    }
}

pub fn save(root: &Path, remotes: &[Remote]) -> Result<(), Failure> {
    std::fs::create_dir_all(root).map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot create {}: {e}", root.display()),
        )
    })?;
    let mut bytes = serde_json::to_vec_pretty(&File {
        remotes: remotes.to_vec(),
    })
    .unwrap_or_default();
    bytes.push(b'\n');
    snapshot::atomic_file::write(&path(root), &bytes)
        .map_err(|e| Failure::new(Code::Error, format!("cannot write {FILE}: {e}")))
}

pub fn find(root: &Path, name: &str) -> Result<Remote, Failure> {
    load(root)?
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| {
            Failure::new(
                Code::NotFound,
                format!("no remote {name}: add it with `microagent remote add {name} s3://BUCKET/PREFIX`"),
            )
        })
}

/// A lock on the remotes file, so two `remote add` never lose one another's entry.
pub fn lock(root: &Path) -> Result<crate::workspace::Lock, Failure> {
    std::fs::create_dir_all(root).map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot create {}: {e}", root.display()),
        )
    })?;
    crate::workspace::Lock::take(&root.join(".remotes.lock"), "remotes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("s3://bucket/a/b/").unwrap(),
            ("bucket".into(), "a/b".into())
        );
        assert_eq!(
            parse_url("s3://bucket").unwrap(),
            ("bucket".into(), "".into())
        );
        for bad in [
            "http://x/y",
            "s3://",
            "s3://B/x",
            "s3://bucket/a/../b",
            "s3://bucket/a//b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
