use rand::Rng;
use std::time::Duration;

/// Whether and how often the executor re-runs a command whose commit failed because its
/// [`AppendCondition`](dcb_core::AppendCondition) no longer held.
///
/// Each retry opens a fresh session, so the handler decides again on the current state. Between
/// attempts the executor waits a jittered, exponentially growing delay: after failed attempt
/// `n` it sleeps a random duration in `[b/2, b]` with `b = min(max_backoff, initial_backoff *
/// 2^(n-1))`. When the last attempt conflicts, the executor returns
/// [`CommandError::Conflict`](crate::CommandError::Conflict) with the number of attempts made.
///
/// [`CommandExecutor::new`](crate::CommandExecutor::new) makes a single attempt
/// ([`RetryPolicy::never`]). The default, [`RetryPolicy::contended`], is the policy for
/// boundaries that many clients decide on at once.
///
/// ```
/// use dcb_command::RetryPolicy;
/// use std::time::Duration;
///
/// let policy = RetryPolicy::attempts(4)
///     .initial_backoff(Duration::from_millis(5))
///     .max_backoff(Duration::from_millis(100));
/// assert_eq!(policy.max_attempts(), 4);
/// assert_eq!(policy.backoff(1), Duration::from_millis(5));
/// assert_eq!(policy.backoff(3), Duration::from_millis(20));
/// assert_eq!(RetryPolicy::default(), RetryPolicy::contended());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::contended()
    }
}

impl RetryPolicy {
    /// One attempt: a conflict is returned to the caller at once.
    pub const fn never() -> Self {
        Self {
            max_attempts: 1,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }

    /// For a contended boundary: up to 10 attempts, waiting 1–2 ms before the first retry and
    /// doubling up to 64 ms. Racers that conflicted spread out instead of colliding again at
    /// once, so a boundary that 16 clients decide on keeps most of a single client's rate
    /// (docs/performance.md, `append-if-hot`).
    pub const fn contended() -> Self {
        Self {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(64),
        }
    }

    /// Up to `max_attempts` attempts in total (the first one included; values below 1 count as
    /// 1), waiting 10 ms before the first retry and at most 1 s between attempts unless changed.
    pub const fn attempts(max_attempts: u32) -> Self {
        let mut policy = Self::never();
        policy.max_attempts = if max_attempts == 0 { 1 } else { max_attempts };
        policy
    }

    /// Sets the upper bound of the wait before the first retry.
    pub const fn initial_backoff(mut self, backoff: Duration) -> Self {
        self.initial_backoff = backoff;
        self
    }

    /// Sets the upper bound of any wait between attempts.
    pub const fn max_backoff(mut self, backoff: Duration) -> Self {
        self.max_backoff = backoff;
        self
    }

    /// The most attempts an execution makes.
    pub const fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The upper bound of the wait after failed attempt `attempt` (1-based); the actual wait is
    /// drawn from `[bound/2, bound]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.initial_backoff
            .saturating_mul(1_u32 << doublings)
            .min(self.max_backoff)
    }

    /// The jittered wait after failed attempt `attempt`.
    /// The wait after failed attempt `attempt` (counted from 1): a random duration in
    /// `[b/2, b]` with `b = backoff(attempt)`. For callers running their own decide-and-append
    /// loop on a store, as the executor does.
    pub fn jittered_backoff(&self, attempt: u32) -> Duration {
        let bound = self.backoff(attempt);
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::thread_rng().gen_range(nanos / 2..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let policy = RetryPolicy::attempts(10)
            .initial_backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(50));
        let bounds: Vec<u128> = (1..=5).map(|n| policy.backoff(n).as_millis()).collect();
        assert_eq!(bounds, vec![10, 20, 40, 50, 50]);
        assert_eq!(policy.backoff(u32::MAX), Duration::from_millis(50));
        for n in 1..=5 {
            let wait = policy.jittered_backoff(n);
            assert!(
                wait <= policy.backoff(n) && wait >= policy.backoff(n) / 2,
                "{wait:?}"
            );
        }
    }

    #[test]
    fn the_default_spreads_out_racers() {
        let policy = RetryPolicy::default();
        assert_eq!(policy, RetryPolicy::contended());
        assert_eq!(policy.max_attempts(), 10);
        assert_eq!(policy.backoff(1), Duration::from_millis(2));
        assert_eq!(policy.backoff(7), Duration::from_millis(64));
        assert_eq!(policy.backoff(10), Duration::from_millis(64));
    }

    #[test]
    fn at_least_one_attempt() {
        assert_eq!(RetryPolicy::attempts(0).max_attempts(), 1);
        assert_eq!(RetryPolicy::never().max_attempts(), 1);
        assert_eq!(
            RetryPolicy::never()
                .initial_backoff(Duration::ZERO)
                .jittered_backoff(3),
            Duration::ZERO
        );
    }
}
