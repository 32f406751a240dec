//! Crash points for fault-injection tests: with `MICROAGENT_CAPTURE_CRASH_AT=N` in the
//! environment, the N-th checkpoint a capture passes kills the process with SIGKILL, exactly as an
//! external `kill -9` would at that point. Without the variable a checkpoint costs one atomic add.
//!
//! Only in test builds: the `test-hooks` feature (which the workspace's tests turn on through
//! their dev-dependencies) compiles the crash points in; the shipped binary has none, and
//! [`TEST_HOOKS`] tells other crates whether their own test-only hooks may run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub const ENV: &str = "MICROAGENT_CAPTURE_CRASH_AT";

/// Whether this build carries test-only hooks (fault injection, test requests).
pub const TEST_HOOKS: bool = cfg!(feature = "test-hooks");

static PASSED: AtomicU64 = AtomicU64::new(0);

fn target() -> Option<u64> {
    static T: OnceLock<Option<u64>> = OnceLock::new();
    *T.get_or_init(|| std::env::var(ENV).ok().and_then(|v| v.parse().ok()))
}

/// Marks one step of a capture.
pub fn checkpoint() {
    if !TEST_HOOKS {
        return;
    }
    let n = PASSED.fetch_add(1, Ordering::SeqCst) + 1;
    if target() == Some(n) {
        // SAFETY: sending a signal to ourselves.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

/// How many checkpoints this process has passed.
pub fn passed() -> u64 {
    PASSED.load(Ordering::SeqCst)
}
