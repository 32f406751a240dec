//! One remote's object store: an `object_store` S3 client (signing, retries, credentials from
//! the environment) on a current-thread tokio runtime private to this module, plus the AWS
//! shared credentials file, which `object_store` does not read. Every failure is classified
//! into a [`StoreError`] whose variant decides the exit code.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};

use super::config::Remote;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("remote {remote} ({endpoint}) is unreachable: {detail}")]
    Unreachable {
        remote: String,
        endpoint: String,
        detail: String,
    },
    #[error("remote {remote} refused access (check the credentials): {detail}")]
    Access { remote: String, detail: String },
    #[error("remote {remote}: bucket {bucket} does not exist")]
    NoBucket { remote: String, bucket: String },
    #[error("remote {remote} has no object {key}")]
    Missing { remote: String, key: String },
    #[error("remote {remote}: object {key} is {size} bytes, more than the {max} allowed")]
    TooLarge {
        remote: String,
        key: String,
        size: u64,
        max: u64,
    },
    #[error("remote {remote}: {detail}")]
    Other { remote: String, detail: String },
}

pub struct Store {
    remote: Remote,
    endpoint: String,
    s3: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
}

/// Requests in flight at once during a transfer.
pub const PARALLEL: usize = 4;

/// A [`Store`] whose client is built but whose runtime is not (see [`Store::prepare`]).
pub struct PreparedStore {
    remote: Remote,
    endpoint: String,
    s3: Arc<AmazonS3>,
}

impl PreparedStore {
    /// Starts the I/O runtime: on the calling thread alone, or, for callers that use the store
    /// from several threads at once (a page server's sessions and readahead), on `threads`
    /// workers: `block_on` then works from any thread.
    pub fn start(self, threads: Option<usize>) -> Result<Store, StoreError> {
        let other = |detail: String| StoreError::Other {
            remote: self.remote.name.clone(),
            detail,
        };
        let runtime = match threads {
            None => tokio::runtime::Builder::new_current_thread(),
            Some(n) => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n.max(1));
                b
            }
        }
        .enable_all()
        .build()
        .map_err(|e| other(format!("cannot start the I/O runtime: {e}")))?;
        Ok(Store {
            remote: self.remote,
            endpoint: self.endpoint,
            s3: self.s3,
            runtime,
        })
    }
}

impl Store {
    pub fn open(remote: &Remote) -> Result<Store, StoreError> {
        Self::prepare(remote)?.start(None)
    }

    /// The client without its I/O runtime: credentials read (the environment, the shared
    /// credentials file), the endpoint resolved, and no thread started, so a process may build
    /// it before it forks into its sandbox, where those files are out of sight.
    pub fn prepare(remote: &Remote) -> Result<PreparedStore, StoreError> {
        let other = |detail: String| StoreError::Other {
            remote: remote.name.clone(),
            detail,
        };
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&remote.bucket)
            // A dead endpoint must fail in seconds, not after object_store's default 3 minutes
            // of retries: the user (or a scheduler) then decides where else to go.
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 2,
                retry_timeout: Duration::from_secs(10),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(3))
                    .with_timeout(Duration::from_secs(60))
                    .with_allow_http(true),
            );
        let region = remote
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".to_string());
        b = b.with_region(region.clone());
        let endpoint = match &remote.endpoint {
            Some(e) => {
                b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
                e.clone()
            }
            None => format!("https://s3.{region}.amazonaws.com"),
        };
        if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
            if let Some(c) = shared_credentials() {
                b = b
                    .with_access_key_id(c.key_id)
                    .with_secret_access_key(c.secret);
                if let Some(t) = c.token {
                    b = b.with_token(t);
                }
            }
        }
        // Credentials from the environment were read by from_env; a session token there too.
        if let Ok(t) = std::env::var("AWS_SESSION_TOKEN") {
            b = b.with_config(AmazonS3ConfigKey::Token, t);
        }
        let s3 = b.build().map_err(|e| other(e.to_string()))?;
        Ok(PreparedStore {
            remote: remote.clone(),
            endpoint,
            s3: Arc::new(s3),
        })
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// The object key of `rel` under the remote's prefix.
    pub fn key(&self, rel: &str) -> ObjPath {
        if self.remote.prefix.is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.remote.prefix))
        }
    }

    pub fn classify(&self, e: object_store::Error, key: &ObjPath) -> StoreError {
        classify(&self.remote, &self.endpoint, e, key)
    }

    /// Whether the remote holds an object (one HEAD). HEAD, not a listing: it costs the same
    /// for a remote of ten chunks or ten million, and needs no signed query string.
    pub async fn exists(&self, key: &ObjPath) -> Result<bool, StoreError> {
        match self.s3.head(key).await {
            Ok(_) => Ok(true),
            Err(e) => match self.classify(e, key) {
                StoreError::Missing { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Fetches a whole object of at most `max` bytes: the size is checked before the body is read.
    pub async fn get_bounded(&self, key: &ObjPath, max: u64) -> Result<Vec<u8>, StoreError> {
        get_bounded(self.s3.as_ref(), &self.remote, &self.endpoint, key, max).await
    }

    pub async fn put(&self, key: &ObjPath, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.s3
            .put(key, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.classify(e, key))
    }
}

pub async fn get_bounded(
    s3: &AmazonS3,
    remote: &Remote,
    endpoint: &str,
    key: &ObjPath,
    max: u64,
) -> Result<Vec<u8>, StoreError> {
    let r = s3
        .get_opts(key, GetOptions::default())
        .await
        .map_err(|e| classify(remote, endpoint, e, key))?;
    if r.meta.size > max {
        return Err(StoreError::TooLarge {
            remote: remote.name.clone(),
            key: key.to_string(),
            size: r.meta.size,
            max,
        });
    }
    let bytes = r
        .bytes()
        .await
        .map_err(|e| classify(remote, endpoint, e, key))?;
    // The header may lie; the body we got is what counts.
    if bytes.len() as u64 > max {
        return Err(StoreError::TooLarge {
            remote: remote.name.clone(),
            key: key.to_string(),
            size: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes.to_vec())
}

/// The whole chain of an error as one line.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s.replace(['\n', '\r'], " ")
}

fn is_connection_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            return !matches!(h.kind(), object_store::client::HttpErrorKind::Decode);
        }
        cur = c.source();
    }
    false
}

pub fn classify(
    remote: &Remote,
    endpoint: &str,
    e: object_store::Error,
    key: &ObjPath,
) -> StoreError {
    let text = chain_text(&e);
    let name = remote.name.clone();
    // S3 names its errors in the XML body, which object_store keeps in the message.
    if text.contains("NoSuchBucket") {
        return StoreError::NoBucket {
            remote: name,
            bucket: remote.bucket.clone(),
        };
    }
    let denied = [
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
    ]
    .iter()
    .any(|w| text.contains(w));
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StoreError::Access {
            remote: name,
            detail: short(&text),
        },
        _ if denied => StoreError::Access {
            remote: name,
            detail: short(&text),
        },
        object_store::Error::NotFound { .. } => StoreError::Missing {
            remote: name,
            key: key.to_string(),
        },
        ref other if is_connection_failure(other) => StoreError::Unreachable {
            remote: name,
            endpoint: endpoint.to_string(),
            detail: short(&text),
        },
        _ => StoreError::Other {
            remote: name,
            detail: short(&text),
        },
    }
}

/// Keeps an error line readable: S3 bodies can be long XML.
fn short(s: &str) -> String {
    const MAX: usize = 300;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

struct SharedCredentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// The profile (`$AWS_PROFILE`, else `default`) of the shared credentials file
/// (`$AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`), as the AWS CLI reads it.
fn shared_credentials() -> Option<SharedCredentials> {
    let path = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".aws/credentials"))
        })?;
    let text = std::fs::read_to_string(path).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_string());
    parse_credentials(&text, &profile)
}

fn parse_credentials(text: &str, profile: &str) -> Option<SharedCredentials> {
    let mut in_profile = false;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => key_id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    Some(SharedCredentials {
        key_id: key_id?,
        secret: secret?,
        token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_file_profiles() {
        let text = "[default]\naws_access_key_id = A\naws_secret_access_key=B\n\n[other]\n# c\naws_access_key_id=C\naws_secret_access_key = D\naws_session_token = T\n";
        let d = parse_credentials(text, "default").unwrap();
        assert_eq!((d.key_id.as_str(), d.secret.as_str()), ("A", "B"));
        assert!(d.token.is_none());
        let o = parse_credentials(text, "other").unwrap();
        assert_eq!((o.key_id.as_str(), o.token.as_deref()), ("C", Some("T")));
        assert!(parse_credentials(text, "none").is_none());
    }

    #[test]
    fn long_errors_are_cut() {
        assert_eq!(short("abc"), "abc");
        assert!(short(&"x".repeat(1000)).len() < 310);
    }
}
