//! An agent started with SIGINT and SIGQUIT ignored (as a background job of a non-interactive
//! shell is, e.g. `microagent-agent &` in an init script) still runs commands that can be
//! interrupted. Its own test binary: it changes process-wide signal dispositions.

mod common;

use common::{cmd, TestAgent};

/// The `SigIgn` mask of `/proc/self/status` as printed by `grep`.
fn ignored_mask(status: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(status);
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .unwrap_or_else(|| panic!("no SigIgn line in {text:?}"))
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn commands_start_with_sigint_and_sigquit_at_their_defaults() {
    let bit = |sig: i32| 1u64 << (sig - 1);
    for sig in [libc::SIGINT, libc::SIGQUIT] {
        // SAFETY: setting a disposition to SIG_IGN; this binary holds only this test.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    // What a command started without the agent's reset inherits (the broken state).
    let before = std::process::Command::new("grep")
        .args(["SigIgn", "/proc/self/status"])
        .output()
        .unwrap();
    let mask = ignored_mask(&before.stdout);
    assert_eq!(mask & bit(libc::SIGINT), bit(libc::SIGINT), "{mask:x}");

    let agent = TestAgent::start();
    let client = agent.client();
    let out = client
        .exec_output(cmd(&["grep", "SigIgn", "/proc/self/status"]))
        .unwrap();
    let mask = ignored_mask(&out.stdout);
    assert_eq!(
        mask & (bit(libc::SIGINT) | bit(libc::SIGQUIT)),
        0,
        "{mask:x}"
    );

    // So a shell's trap works and a Signal reaches it.
    common::sigint_reaches_a_trapping_shell(&client);
}
