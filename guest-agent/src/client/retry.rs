//! Bounded retry with exponential backoff, for reconnecting after a restore or fork.

use std::thread;
use std::time::Duration;

use super::ClientError;

/// How often and how patiently to retry a transient failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all (at least one is made).
    pub attempts: u32,
    /// Wait after the first failure; doubled after each further one.
    pub initial_delay: Duration,
    /// Longest wait between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// About 10 s in all: enough for a restored guest to resume and its agent to listen again.
    fn default() -> Self {
        Self {
            attempts: 30,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// Runs `attempt` until it succeeds, fails permanently, or the attempts run out.
    pub fn retry<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let attempts = self.attempts.max(1);
        let mut delay = self.initial_delay;
        let mut n = 1;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) if n >= attempts => {
                    return Err(ClientError::GaveUp {
                        attempts,
                        last: Box::new(e),
                    })
                }
                Err(_) => {
                    thread::sleep(delay);
                    delay = (delay * 2).min(self.max_delay);
                    n += 1;
                }
            }
        }
    }
}
