//! Human or JSON output, and errors as one line on stderr (a JSON object with `--json`).

use serde_json::json;

use crate::exit::{Code, Failure};

#[derive(Clone, Copy)]
pub struct Out {
    pub json: bool,
}

impl Out {
    /// Prints `human` for people or `value` as one JSON document for scripts.
    pub fn emit(&self, human: impl std::fmt::Display, value: serde_json::Value) {
        if self.json {
            println!("{value}");
        } else {
            println!("{human}");
        }
    }

    /// With `--json`, one JSON line now: a part of a longer job as it completes, ahead of the
    /// final document (which stays the last line). People see progress instead.
    pub fn item(&self, value: serde_json::Value) {
        if self.json {
            println!("{value}");
        }
    }

    pub fn error(&self, f: &Failure) {
        if self.json {
            eprintln!(
                "{}",
                json!({"error": {"code": code_name(f.code), "message": f.message}})
            );
        } else {
            eprintln!("microagent: {}", f.message);
        }
    }

    /// Progress on stderr: for people at a terminal, or as JSON lines for a supervising
    /// program (`MICROAGENT_PROGRESS=json`, which `microagent serve` sets for its children).
    pub fn progress(&self, what: &str, done: u64, total: u64) {
        self.progress_in(what, done, total, Unit::Bytes)
    }

    /// Progress counted in items (forks started, ...), not bytes.
    pub fn progress_items(&self, what: &str, done: u64, total: u64) {
        self.progress_in(what, done, total, Unit::Items)
    }

    fn progress_in(&self, what: &str, done: u64, total: u64, unit: Unit) {
        use std::io::IsTerminal;
        if total == 0 {
            return;
        }
        if progress_json() {
            eprintln!(
                "{}",
                json!({"progress": {"what": what, "done": done, "total": total, "unit": unit.name()}})
            );
            return;
        }
        if self.json || !std::io::stderr().is_terminal() {
            return;
        }
        let pct = done.saturating_mul(100) / total;
        match unit {
            Unit::Bytes => eprint!("\r{what}: {} / {} MiB ({pct}%)", done >> 20, total >> 20),
            Unit::Items => eprint!("\r{what}: {done} / {total} ({pct}%)"),
        }
        if done >= total {
            eprintln!();
        }
    }
}

#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    Items,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Items => "items",
        }
    }
}

/// The environment variable that turns progress into JSON lines on stderr.
pub const PROGRESS_ENV: &str = "MICROAGENT_PROGRESS";

fn progress_json() -> bool {
    std::env::var(PROGRESS_ENV).is_ok_and(|v| v == "json")
}

/// The stable `code` of a JSON error.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "ok",
        Code::Error => "error",
        Code::Usage => "usage",
        Code::NotFound => "not-found",
        Code::Conflict => "conflict",
        Code::SnapshotRefused => "snapshot-refused",
        Code::HostUnsupported => "host-unsupported",
        Code::GuestFailed => "guest-failed",
        Code::RemoteUnreachable => "remote-unreachable",
        Code::RemoteAccess => "remote-access",
    }
}

/// Maps a stable error code string (from the snapshot crate or the VMM process) to an exit code.
pub fn code_from_name(s: &str) -> Code {
    match s {
        "not-found" => Code::NotFound,
        "conflict" => Code::Conflict,
        "snapshot-refused" => Code::SnapshotRefused,
        "invalid-argument" | "usage" => Code::Usage,
        "host-unsupported" => Code::HostUnsupported,
        "guest-failed" => Code::GuestFailed,
        "remote-unreachable" => Code::RemoteUnreachable,
        "remote-access" => Code::RemoteAccess,
        _ => Code::Error,
    }
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(512 << 20), "512.0 MiB");
    }

    #[test]
    fn codes_round_trip() {
        for c in [
            Code::NotFound,
            Code::Conflict,
            Code::SnapshotRefused,
            Code::HostUnsupported,
            Code::GuestFailed,
            Code::Usage,
            Code::RemoteUnreachable,
            Code::RemoteAccess,
        ] {
            assert_eq!(code_from_name(code_name(c)), c);
        }
    }
}
