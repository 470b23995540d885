//! Admission of the server's check-backs: at most a few run at once, one per transaction,
//! and a bounded number wait.
//!
//! After an outage the server checks back every transaction it holds open, possibly
//! thousands within seconds. Each check may take a database connection, from the same pool
//! that new transactions need; run all at once, they would starve the application. A
//! check-back that is not admitted is not lost: the server asks again later (though each one
//! sent counts towards the server's maximum). A turn covers the checker call only, at most
//! [`CHECK_TIMEOUT`]; the answer is sent after it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::lock;
use crate::transaction::TransactionResolution;

/// Most check-backs waiting or running per client; more are dropped until some finish.
pub(crate) const MAX_OPEN_CHECKS: usize = 4096;
/// Longest a checker call may take; past it the call is dropped, nothing is answered and
/// the server asks again later, so that a checker that hangs cannot hold a turn for ever.
pub(crate) const CHECK_TIMEOUT: Duration = Duration::from_secs(30);

/// The check-backs of one client.
pub(crate) struct CheckBacks {
    running: Arc<Semaphore>,
    /// Transactions with a check-back waiting or running.
    open: Mutex<HashSet<String>>,
}

/// A check-back let in; its transaction counts as open until this is dropped.
pub(crate) struct Admitted {
    owner: Arc<CheckBacks>,
    transaction_id: String,
}

impl CheckBacks {
    /// At most `concurrency` (at least one) check-backs run at once.
    pub(crate) fn new(concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            running: Arc::new(Semaphore::new(concurrency.max(1))),
            open: Mutex::new(HashSet::new()),
        })
    }

    /// Lets a check-back of `transaction_id` in, unless one of it is already waiting or
    /// running, or [`MAX_OPEN_CHECKS`] are.
    pub(crate) fn admit(self: &Arc<Self>, transaction_id: &str) -> Option<Admitted> {
        let mut open = lock(&self.open);
        if open.len() >= MAX_OPEN_CHECKS {
            tracing::warn!(
                transaction = transaction_id,
                open = open.len(),
                "too many check-backs waiting; this one is left for the server to repeat"
            );
            return None;
        }
        if !open.insert(transaction_id.to_string()) {
            tracing::debug!(
                transaction = transaction_id,
                "a check-back of this transaction is already under way"
            );
            return None;
        }
        Some(Admitted {
            owner: self.clone(),
            transaction_id: transaction_id.to_string(),
        })
    }
}

impl Admitted {
    /// Runs `check` in its turn, for at most [`CHECK_TIMEOUT`]; `None` if it took longer
    /// (it is dropped). The turn ends with the call.
    pub(crate) async fn check(
        &self,
        check: impl Future<Output = TransactionResolution>,
    ) -> Option<TransactionResolution> {
        let _turn = self.turn().await;
        tokio::time::timeout(CHECK_TIMEOUT, check).await.ok()
    }

    /// Waits for a turn to run (`None` only if the semaphore were closed, which it never
    /// is).
    async fn turn(&self) -> Option<OwnedSemaphorePermit> {
        self.owner.running.clone().acquire_owned().await.ok()
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        lock(&self.owner.open).remove(&self.transaction_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_check_back_per_transaction_and_a_few_at_a_time() {
        let checks = CheckBacks::new(2);
        let a = checks.admit("a").unwrap();
        assert!(
            checks.admit("a").is_none(),
            "a second check of one transaction"
        );
        let b = checks.admit("b").unwrap();
        let c = checks.admit("c").unwrap();
        let (ta, tb) = (a.turn().await, b.turn().await);
        let third = tokio::time::timeout(Duration::from_millis(50), c.turn()).await;
        assert!(third.is_err(), "a third ran beside two");
        drop(ta);
        let _tc = tokio::time::timeout(Duration::from_secs(5), c.turn())
            .await
            .expect("a turn once one finished");
        drop((a, tb));
        // Finished, the transaction may be checked again.
        assert!(checks.admit("a").is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_checker_that_hangs_gives_its_turn_up_after_the_timeout() {
        let checks = CheckBacks::new(1);
        let (hung, next) = (checks.admit("hung").unwrap(), checks.admit("next").unwrap());
        let started = tokio::time::Instant::now();
        let hanging = hung.check(std::future::pending());
        let waiting = next.check(async { TransactionResolution::Commit });
        let (hung_out, next_out) = tokio::join!(hanging, waiting);
        assert_eq!(hung_out, None);
        assert_eq!(next_out, Some(TransactionResolution::Commit));
        assert!(started.elapsed() >= CHECK_TIMEOUT);
    }

    #[test]
    fn past_the_limit_check_backs_are_left_for_the_server_to_repeat() {
        let checks = CheckBacks::new(1);
        let held: Vec<_> = (0..MAX_OPEN_CHECKS)
            .map(|i| checks.admit(&i.to_string()).unwrap())
            .collect();
        assert!(checks.admit("one more").is_none());
        drop(held);
        assert!(checks.admit("one more").is_some());
    }
}
