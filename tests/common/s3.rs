//! A real S3-compatible server for the remote tests: moto 5.x (`moto_server`, from PyPI; `.ci/run`
//! installs it), started on a free 127.0.0.1 port and killed on drop.
//!
//! Why moto: it speaks the real S3 REST API (SigV4, ListObjectsV2, multipart, ranged GET, the S3
//! error codes such as NoSuchBucket and SignatureDoesNotMatch), it checks credentials once its
//! IAM enforcement is switched on, it is one `pip install` with no docker or daemon, and each test
//! gets its own in-memory server that dies with it.
//!
//! Setup (through boto3, which moto brings): an IAM user with an allow-all policy and an access
//! key, the bucket, then `/moto-api/reset-auth` so every later request must be signed by that key.
#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BUCKET: &str = "snaps";

/// boto3 helper: `setup PORT` prints `KEY_ID SECRET`; `put|get|exists|delete` act on the bucket
/// with the credentials in the environment.
const HELPER: &str = r#"
import sys, os, json, urllib.request, boto3
cmd, port = sys.argv[1], sys.argv[2]
url = "http://127.0.0.1:%s" % port
def client(svc, key=None, secret=None):
    return boto3.client(svc, endpoint_url=url, region_name="us-east-1",
        aws_access_key_id=key or os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=secret or os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
if cmd == "setup":
    iam = client("iam")
    iam.create_user(UserName="tester")
    iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    k = iam.create_access_key(UserName="tester")["AccessKey"]
    client("s3").create_bucket(Bucket=sys.argv[3])
    req = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req).read()
    print(k["AccessKeyId"], k["SecretAccessKey"])
elif cmd == "put":
    client("s3").put_object(Bucket=sys.argv[3], Key=sys.argv[4], Body=sys.stdin.buffer.read())
elif cmd == "get":
    sys.stdout.buffer.write(client("s3").get_object(Bucket=sys.argv[3], Key=sys.argv[4])["Body"].read())
elif cmd == "exists":
    # HEAD, not a listing: moto 5.2 miscomputes the SigV4 signature of signed ListObjectsV2
    # queries once auth is on.
    try:
        client("s3").head_object(Bucket=sys.argv[3], Key=sys.argv[4])
        print("yes")
    except client("s3").exceptions.ClientError:
        print("no")
elif cmd == "delete":
    client("s3").delete_object(Bucket=sys.argv[3], Key=sys.argv[4])
"#;

pub struct S3 {
    child: Option<Child>,
    pub port: u16,
    pub endpoint: String,
    pub key_id: String,
    pub secret: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn have_moto() -> bool {
    Command::new("moto_server")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl S3 {
    /// Starts a server, or prints why `test` is skipped (a failure when `s3` is required).
    pub fn start(test: &str) -> Option<S3> {
        if !have_moto() {
            super::require::skip(
                test,
                "s3",
                "moto_server is not installed (pip install 'moto[server]')",
            );
            return None;
        }
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        let mut s3 = S3 {
            child: Some(child),
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            key_id: String::new(),
            secret: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let o = s3.helper(&["setup", &port.to_string(), BUCKET], &[], None);
        assert!(
            o.status.success(),
            "moto setup failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut w = text.split_whitespace();
        s3.key_id = w.next().expect("key id").to_string();
        s3.secret = w.next().expect("secret").to_string();
        Some(s3)
    }

    fn helper(&self, args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
        let mut c = Command::new("python3");
        c.arg("-c").arg(HELPER).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = c.spawn().expect("python3");
        if let Some(b) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b)
                .expect("write stdin");
        }
        child.wait_with_output().expect("python3")
    }

    fn admin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let port = self.port.to_string();
        let mut a = vec![args[0], port.as_str(), BUCKET];
        a.extend_from_slice(&args[1..]);
        let o = self.helper(
            &a,
            &[
                ("AWS_ACCESS_KEY_ID", &self.key_id),
                ("AWS_SECRET_ACCESS_KEY", &self.secret),
            ],
            stdin,
        );
        assert!(
            o.status.success(),
            "s3 {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// Writes an object directly (e.g. to tamper with a chunk).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.admin(&["put", key], Some(bytes));
    }

    pub fn get(&self, key: &str) -> Vec<u8> {
        self.admin(&["get", key], None).stdout
    }

    pub fn exists(&self, key: &str) -> bool {
        String::from_utf8_lossy(&self.admin(&["exists", key], None).stdout).trim() == "yes"
    }

    /// The environment a client needs: the tester's key, and no stray AWS settings of the host.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                "/nonexistent/credentials".into(),
            ),
        ]
    }

    /// Kills the server now (a remote that dies mid-transfer).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A credentials file for `AWS_SHARED_CREDENTIALS_FILE`.
pub fn credentials_file(dir: &std::path::Path, key_id: &str, secret: &str) -> PathBuf {
    let p = dir.join("aws-credentials");
    std::fs::write(
        &p,
        format!("[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"),
    )
    .expect("write credentials");
    p
}
