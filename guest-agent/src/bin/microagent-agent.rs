//! `microagent-agent`: the guest agent. In the guest it listens on vsock port 1024; with
//! `--unix PATH` it serves the same protocol on a Unix socket (tests, benchmarks).
//!
//! Build it static for the guest (see the crate documentation):
//! `RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p guest-agent --target x86_64-unknown-linux-gnu`

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

use guest_agent::protocol::{AGENT_VSOCK_PORT, PROTOCOL_VERSION};
use guest_agent::transport::vsock::{VsockListener, VMADDR_CID_ANY};
use guest_agent::{Server, ServerConfig};

const USAGE: &str = "\
usage: microagent-agent [--vsock-port PORT | --unix PATH] [--secrets-dir DIR] [--quiet]
       microagent-agent --version
       microagent-agent --send-line PORT TEXT   (connect to the host, CID 2, send one line)
       microagent-agent --reset-connections     (after a restore or fork: abort TCP connections
                                                 to peers outside the guest, keep the guest's own)
       microagent-agent --set-mac IFNAME MAC    (a fork takes its own MAC address)

Serves the microagent guest protocol: on vsock port 1024 (any CID) by default, or on a Unix socket.
  --vsock-port PORT   vsock port to listen on (default 1024)
  --unix PATH         listen on a Unix socket instead (replaces a stale socket file)
  --secrets-dir DIR   where secrets live (default /run/secrets)
  --quiet             do not log connection errors to stderr";

/// Default PATH for processes started by an agent that was given none (an init with an empty
/// environment).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

struct Args {
    listen: Listen,
    config: ServerConfig,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut listen = Listen::Vsock(AGENT_VSOCK_PORT);
    let mut config = ServerConfig::default();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.to_str() {
            Some("--vsock-port") => {
                let v = value("--vsock-port")?;
                let port = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad port {v:?}"))?;
                listen = Listen::Vsock(port);
            }
            Some("--unix") => {
                listen = Listen::Unix(value("--unix")?.into());
                // Serving on a host (tests, benchmarks): leave the host's page cache alone.
                config.vm_sysctl_dir = None;
            }
            Some("--secrets-dir") => config.secrets_dir = value("--secrets-dir")?.into(),
            Some("--quiet") => config.log_errors = false,
            Some("--send-line") => {
                // A connectivity probe for the host side's guest-initiated vsock path.
                let v = value("--send-line")?;
                let port: u32 = v
                    .to_str()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad port {v:?}"))?;
                let text = value("--send-line")?;
                send_line(port, &text.to_string_lossy())?;
                return Ok(None);
            }
            Some("--reset-connections") => {
                // Run by the host through exec right after a restore or fork (a one-shot, so
                // the protocol stays version 1 and an older agent just refuses the flag).
                let r = guest_agent::netreset::reset_external_tcp().map_err(|e| e.to_string())?;
                println!(
                    "reset {} connection(s), kept {} inside the guest ({} already gone)",
                    r.reset, r.kept_local, r.gone
                );
                return Ok(None);
            }
            Some("--set-mac") => {
                let ifname = value("--set-mac")?;
                let mac = value("--set-mac")?;
                let ifname = ifname.to_str().ok_or("bad interface name")?.to_string();
                let mac = guest_agent::hwaddr::parse_mac(&mac.to_string_lossy())?;
                guest_agent::hwaddr::set_mac(&ifname, mac)
                    .map_err(|e| format!("setting the MAC address of {ifname}: {e}"))?;
                return Ok(None);
            }
            Some("--version") => {
                println!(
                    "microagent-agent {} (protocol {PROTOCOL_VERSION})",
                    env!("CARGO_PKG_VERSION")
                );
                return Ok(None);
            }
            Some("--help" | "-h") => {
                println!("{USAGE}");
                return Ok(None);
            }
            _ => return Err(format!("unknown argument {arg:?}\n{USAGE}")),
        }
    }
    Ok(Some(Args { listen, config }))
}

fn send_line(port: u32, text: &str) -> Result<(), String> {
    use std::io::{Read, Write};
    const HOST_CID: u32 = 2;
    let mut s = guest_agent::transport::VsockStream::connect(HOST_CID, port)
        .map_err(|e| format!("connect to host port {port}: {e}"))?;
    s.write_all(format!("{text}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = [0u8; 256];
    let n = s.read(&mut reply).map_err(|e| format!("receive: {e}"))?;
    print!("{}", String::from_utf8_lossy(&reply[..n]));
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("microagent-agent: {e}");
            return ExitCode::from(2);
        }
    };
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", DEFAULT_PATH);
    }
    let server = Server::new(args.config);
    let result = match args.listen {
        Listen::Vsock(port) => VsockListener::bind(VMADDR_CID_ANY, port)
            .map_err(|e| format!("cannot listen on vsock port {port}: {e}"))
            .and_then(|l| {
                eprintln!("microagent-agent: listening on vsock port {port}");
                server.serve(l).map_err(|e| e.to_string())
            }),
        Listen::Unix(path) => {
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))
                .and_then(|l| {
                    eprintln!("microagent-agent: listening on {}", path.display());
                    server.serve(l).map_err(|e| e.to_string())
                })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("microagent-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
