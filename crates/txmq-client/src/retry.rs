//! Retry policies: how many attempts and how long between them, as the server's settings
//! reply prescribes (`Settings.backoff_policy`).

use std::time::Duration;

use txmq_proto::v2 as pb;

/// How often to try and how long to wait between attempts.
///
/// Producers use it to resend after a transient failure; push consumers to delay the
/// redelivery of a message whose handler failed. The server sends it in its settings reply;
/// [`RetryPolicy::default`] is the producer policy of RocketMQ proxies (3 attempts, 10 ms
/// doubling up to 1 s).
///
/// # Example
/// ```
/// use std::time::Duration;
/// use txmq_client::{Backoff, RetryPolicy};
///
/// let ladder = RetryPolicy {
///     max_attempts: 16,
///     backoff: Backoff::Customized(vec![Duration::from_secs(1), Duration::from_secs(5)]),
/// };
/// assert_eq!(ladder.delay(1), Duration::from_secs(1));
/// assert_eq!(ladder.delay(7), Duration::from_secs(5));
/// assert_eq!(RetryPolicy::default().delay(2), Duration::from_millis(20));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The waits between attempts.
    pub backoff: Backoff,
}

/// The waits of a [`RetryPolicy`].
///
/// # Example
/// ```
/// use std::time::Duration;
/// let b = txmq_client::Backoff::Exponential {
///     initial: Duration::from_millis(100),
///     max: Duration::from_secs(1),
///     multiplier: 2.0,
/// };
/// # let _ = b;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// `initial × multiplier^(attempt − 1)`, at most `max`.
    Exponential {
        /// Wait after the first attempt.
        initial: Duration,
        /// Longest wait.
        max: Duration,
        /// Growth per attempt.
        multiplier: f32,
    },
    /// The `attempt`-th wait is `next[attempt − 1]`; the last one repeats.
    Customized(Vec<Duration>),
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff: Backoff::Exponential {
                initial: Duration::from_millis(10),
                max: Duration::from_secs(1),
                multiplier: 2.0,
            },
        }
    }
}

impl RetryPolicy {
    /// How long to wait after attempt `attempt` (counted from 1) failed.
    pub fn delay(&self, attempt: u32) -> Duration {
        let attempt = attempt.max(1);
        match &self.backoff {
            Backoff::Customized(next) => match next.len() {
                0 => Duration::ZERO,
                n => next[(attempt as usize).min(n) - 1],
            },
            Backoff::Exponential {
                initial,
                max,
                multiplier,
            } => {
                let factor = f64::from(multiplier.max(1.0)).powi((attempt - 1).min(64) as i32);
                let secs = (initial.as_secs_f64() * factor).min(max.as_secs_f64());
                Duration::try_from_secs_f64(secs).unwrap_or(*max)
            }
        }
    }

    /// The policy of a settings reply, if it has a usable one.
    pub(crate) fn from_proto(p: &pb::RetryPolicy) -> Option<Self> {
        use pb::retry_policy::Strategy;
        let backoff = match p.strategy.as_ref()? {
            Strategy::ExponentialBackoff(e) => Backoff::Exponential {
                initial: e.initial.as_ref().map_or(Duration::ZERO, to_duration),
                max: e.max.as_ref().map_or(Duration::ZERO, to_duration),
                multiplier: e.multiplier,
            },
            Strategy::CustomizedBackoff(c) => {
                Backoff::Customized(c.next.iter().map(to_duration).collect())
            }
        };
        Some(Self {
            max_attempts: u32::try_from(p.max_attempts).unwrap_or(1).max(1),
            backoff,
        })
    }
}

/// A protobuf duration; negative ones are zero.
pub(crate) fn to_duration(d: &prost_types::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

/// A duration as protobuf.
pub(crate) fn from_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: d.subsec_nanos() as i32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_backoff_doubles_up_to_its_max() {
        let p = RetryPolicy::default();
        let ms: Vec<u128> = (1..=9).map(|a| p.delay(a).as_millis()).collect();
        assert_eq!(ms, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
    }

    #[test]
    fn customized_backoff_repeats_its_last_step() {
        let p = RetryPolicy::from_proto(&pb::RetryPolicy {
            max_attempts: 4,
            strategy: Some(pb::retry_policy::Strategy::CustomizedBackoff(
                pb::CustomizedBackoff {
                    next: vec![from_duration(Duration::from_millis(200))],
                },
            )),
        })
        .unwrap();
        assert_eq!(p.max_attempts, 4);
        assert_eq!(p.delay(1), Duration::from_millis(200));
        assert_eq!(p.delay(5), Duration::from_millis(200));
    }
}
