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
import sys, os, json, ssl, urllib.request, boto3
cmd, port = sys.argv[1], sys.argv[2]
ca = os.environ.get("MOTO_CA")
url = ("https://localhost:%s" if ca else "http://127.0.0.1:%s") % port
def client(svc, key=None, secret=None):
    return boto3.client(svc, endpoint_url=url, region_name="us-east-1", verify=ca or None,
        aws_access_key_id=key or os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        aws_secret_access_key=secret or os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"))
if cmd == "certs":
    # A CA and a server certificate it signed, for localhost and 127.0.0.1, into argv[3].
    import datetime, ipaddress
    from cryptography import x509
    from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    d = sys.argv[3]
    now = datetime.datetime.now(datetime.timezone.utc)
    name = lambda cn: x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    def cert(subject, key, issuer, issuer_key, exts):
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1))
             .not_valid_after(now + datetime.timedelta(days=1)))
        for e, critical in exts:
            b = b.add_extension(e, critical=critical)
        return b.sign(issuer_key, hashes.SHA256())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("microagent test CA", ca_key, "microagent test CA", ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), True)])
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert("localhost", key, "microagent test CA", ca_key, [
        (x509.SubjectAlternativeName([x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)])
    pem = serialization.Encoding.PEM
    open(d + "/ca.pem", "wb").write(ca_cert.public_bytes(pem))
    open(d + "/cert.pem", "wb").write(leaf.public_bytes(pem))
    open(d + "/key.pem", "wb").write(key.private_bytes(pem,
        serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
if cmd == "setup":
    iam = client("iam")
    iam.create_user(UserName="tester")
    iam.put_user_policy(UserName="tester", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    k = iam.create_access_key(UserName="tester")["AccessKey"]
    client("s3").create_bucket(Bucket=sys.argv[3])
    req = urllib.request.Request(url + "/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(req, context=ssl.create_default_context(cafile=ca) if ca else None).read()
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
    /// With TLS: the CA that signed the server's certificate (clients get `SSL_CERT_FILE`).
    pub ca: Option<PathBuf>,
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
        Self::start_with(test, None)
    }

    /// As [`S3::start`], serving `https://localhost:PORT` with a certificate from a CA of its
    /// own, made in `dir`: [`S3::env`] then names that CA in `SSL_CERT_FILE`.
    pub fn start_tls(test: &str, dir: &std::path::Path) -> Option<S3> {
        Self::start_with(test, Some(dir))
    }

    fn start_with(test: &str, tls: Option<&std::path::Path>) -> Option<S3> {
        if !have_moto() {
            super::require::skip(
                test,
                "s3",
                "moto_server is not installed (pip install 'moto[server]')",
            );
            return None;
        }
        let port = free_port();
        let mut cmd = Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut ca = None;
        if let Some(dir) = tls {
            std::fs::create_dir_all(dir).expect("certificate directory");
            let none = S3 {
                child: None,
                port,
                endpoint: String::new(),
                key_id: String::new(),
                secret: String::new(),
                ca: None,
            };
            let o = none.helper(&["certs", "0", &dir.display().to_string()], &[], None);
            assert!(
                o.status.success(),
                "certificates: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            cmd.arg("-c").arg(dir.join("cert.pem"));
            cmd.arg("-k").arg(dir.join("key.pem"));
            ca = Some(dir.join("ca.pem"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto_server");
        let endpoint = match ca {
            Some(_) => format!("https://localhost:{port}"),
            None => format!("http://127.0.0.1:{port}"),
        };
        let mut s3 = S3 {
            child: Some(child),
            port,
            endpoint,
            key_id: String::new(),
            secret: String::new(),
            ca,
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
        if let Some(ca) = &self.ca {
            c.env("MOTO_CA", ca);
        }
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
        let mut v: Vec<(String, String)> = vec![
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                "/nonexistent/credentials".into(),
            ),
        ];
        if let Some(ca) = &self.ca {
            v.push(("SSL_CERT_FILE".into(), ca.display().to_string()));
        }
        v
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
