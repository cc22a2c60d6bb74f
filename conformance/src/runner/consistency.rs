//! Eventual consistency as the upstream harness waits for it (`AwaitConvergence`): repeat an attempt until it
//! passes a number of times in a row, pausing only after failures, within an overall time budget.

use std::future::Future;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Consistency {
    /// `RequiredConsecutiveSuccesses`.
    pub required: u32,
    /// `MaxTimeToConsistency`.
    pub timeout: Duration,
    /// `DefaultPollInterval`, after a failed attempt.
    pub poll: Duration,
}

impl Consistency {
    pub const UPSTREAM: Consistency = Consistency {
        required: 3,
        timeout: Duration::from_secs(30),
        poll: Duration::from_millis(100),
    };

    pub fn with_required(self, required: u32) -> Consistency {
        Consistency { required, ..self }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passed: bool,
    pub attempts: u32,
    /// Why the last failed attempt failed (kept after later successes: it says what was flaky).
    pub last_error: Option<String>,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn failure(&self, required: u32) -> String {
        let why = self.last_error.as_deref().unwrap_or("no attempt ran");
        format!(
            "{why} (after {} attempts in {:.1}s; {required} consecutive successes required)",
            self.attempts,
            self.elapsed.as_secs_f64()
        )
    }
}

pub async fn await_consistent<F, Fut>(c: Consistency, mut attempt: F) -> Outcome
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut attempts = 0u32;
    let mut streak = 0u32;
    let mut last_error = None;
    loop {
        if start.elapsed() >= c.timeout {
            return Outcome {
                passed: false,
                attempts,
                last_error,
                elapsed: start.elapsed(),
            };
        }
        attempts += 1;
        match attempt(attempts).await {
            Ok(()) => {
                streak += 1;
                if streak >= c.required {
                    return Outcome {
                        passed: true,
                        attempts,
                        last_error,
                        elapsed: start.elapsed(),
                    };
                }
            }
            Err(e) => {
                streak = 0;
                last_error = Some(e);
                let remaining = c.timeout.saturating_sub(start.elapsed());
                tokio::time::sleep(c.poll.min(remaining)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Consistency = Consistency {
        required: 3,
        timeout: Duration::from_millis(300),
        poll: Duration::from_millis(5),
    };

    #[tokio::test]
    async fn needs_consecutive_successes() {
        // fail, ok, fail, ok, ok, ok
        let script = [false, true, false, true, true, true];
        let outcome = await_consistent(FAST, |n| {
            let ok = script[(n as usize - 1).min(script.len() - 1)];
            async move { if ok { Ok(()) } else { Err(format!("attempt {n}")) } }
        })
        .await;
        assert!(outcome.passed);
        assert_eq!(outcome.attempts, 6);
        assert_eq!(outcome.last_error.as_deref(), Some("attempt 3"));
    }

    #[tokio::test]
    async fn gives_up_after_the_budget() {
        let outcome = await_consistent(FAST, |_| async { Err::<(), _>("never".to_string()) }).await;
        assert!(!outcome.passed);
        assert!(outcome.attempts > 3);
        assert!(outcome.elapsed >= FAST.timeout);
        assert!(outcome.failure(3).starts_with("never (after"), "{}", outcome.failure(3));
    }
}
