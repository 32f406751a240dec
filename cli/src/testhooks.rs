//! Failure injection for the end-to-end tests, compiled to nothing useful in a shipped binary:
//! the hooks act only when the snapshot crate was built with its `test-hooks` feature, which the
//! workspace's tests turn on through their dev-dependencies and `cargo build` never does.
//!
//! `MICROAGENT_TEST_CRASH_AT=POINT` kills the process with SIGKILL at the named point, exactly as
//! an external `kill -9` would; `MICROAGENT_TEST_FAIL_AT=POINT` makes the named step fail with an
//! error instead.

use crate::exit::{Code, Failure};

pub const CRASH_ENV: &str = "MICROAGENT_TEST_CRASH_AT";
pub const FAIL_ENV: &str = "MICROAGENT_TEST_FAIL_AT";

fn armed(env: &str, point: &str) -> bool {
    snapshot::faults::TEST_HOOKS && std::env::var(env).is_ok_and(|v| v == point)
}

/// Dies here by SIGKILL when the tests ask for it.
pub fn crash_point(point: &str) {
    if armed(CRASH_ENV, point) {
        // SAFETY: sending a signal to ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// Fails here with an injected error when the tests ask for it.
pub fn fail_point(point: &str) -> Result<(), Failure> {
    if armed(FAIL_ENV, point) {
        return Err(Failure::new(
            Code::Error,
            format!("injected failure at {point}"),
        ));
    }
    Ok(())
}

pub const SLOW_ENV: &str = "MICROAGENT_TEST_SLOW_AT";

/// Sleeps here when the tests ask for it (`MICROAGENT_TEST_SLOW_AT=POINT:MS`), so a test can act
/// (e.g. kill a remote) while a transfer is surely under way.
pub fn slow_point(point: &str) {
    if !snapshot::faults::TEST_HOOKS {
        return;
    }
    let Ok(v) = std::env::var(SLOW_ENV) else {
        return;
    };
    if let Some((p, ms)) = v.split_once(':') {
        if p == point {
            if let Ok(ms) = ms.parse::<u64>() {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
    }
}
