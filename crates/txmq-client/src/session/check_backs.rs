//! Admission of the server's check-backs: at most a few run at once, one per transaction,
//! and a bounded number wait.
//!
//! After an outage the server checks back every transaction it holds open, possibly
//! thousands within seconds. Each check may take a database connection, from the same pool
//! that new transactions need; run all at once, they would starve the application. A
//! check-back that is not admitted is not lost: the server asks again later.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::lock;

/// Most check-backs waiting or running per client; more are dropped until some finish.
pub(crate) const MAX_OPEN_CHECKS: usize = 4096;

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
    /// Waits for a turn to run.
    pub(crate) async fn turn(&self) -> OwnedSemaphorePermit {
        // The semaphore is never closed.
        self.owner
            .running
            .clone()
            .acquire_owned()
            .await
            .expect("check-back semaphore open")
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        lock(&self.owner.open).remove(&self.transaction_id);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
