//! Fault injection for tests: makes [`send_in_transaction`](super::send_in_transaction)
//! stop at a chosen point as if the process died there (the half message is left open).
//! Scoped to one task, so parallel tests do not see each other's faults.

use std::future::Future;

/// Where [`send_in_transaction`](super::send_in_transaction) stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// Right after the half message was sent, before the database transaction begins.
    AfterHalf,
    /// After the business writes, before the database commit: the database transaction is
    /// dropped (rolled back) and the half message left open.
    BeforeDbCommit,
    /// After the database commit, before the message commit: the half message is left open.
    AfterDbCommit,
}

tokio::task_local! {
    static CRASH: Crash;
}

/// Runs `f` with `crash` injected into the sends it makes.
pub async fn inject<F: Future>(crash: Crash, f: F) -> F::Output {
    CRASH.scope(crash, f).await
}

/// Whether the current task crashes at `point`.
pub(crate) fn at(point: Crash) -> bool {
    CRASH.try_with(|c| *c == point).unwrap_or(false)
}
