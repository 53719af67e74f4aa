//! A transaction that needs more than one round trip, as a value.
//!
//! `PooledConn::begin` gives a `Tx`; each method consumes it and, on success, hands it back,
//! so the type says at every point whether a transaction is open: `then` runs more statements
//! in it, `commit` and `rollback` end it. A statement that fails ends it too (rolled back
//! before the error is returned), so a caller never holds an aborted transaction. A `Tx`
//! dropped without an end (a panic, a cancelled request) closes its connection instead of
//! returning it to the pool, which makes PostgreSQL roll the transaction back.
//!
//! Each round trip takes any number of steps and answers each one's rows, in order: the
//! statements a round trip needs depend on what the batch holds (keys or none, orders to write
//! or none), and one with nothing to do is left out rather than sent empty.

use tokio_postgres::Row;

use super::{
    PooledConn,
    failure::Failure,
    pipeline::{Close, Open, Step},
};

/// An open transaction on a connection of the pool.
pub struct Tx {
    /// Marked for discarding while the transaction is open (see `pipeline`); `commit` and
    /// `rollback` clear the mark once the transaction has ended.
    conn: PooledConn,
}

impl PooledConn {
    /// BEGIN and `steps` in one round trip, leaving the transaction open.
    pub async fn begin(self, steps: &[Step<'_>]) -> Result<(Tx, Vec<Vec<Row>>), Failure> {
        Tx { conn: self }.run(Open::Begin, steps).await
    }
}

impl Tx {
    /// More `steps` in the transaction, in one round trip.
    pub async fn then(self, steps: &[Step<'_>]) -> Result<(Tx, Vec<Vec<Row>>), Failure> {
        self.run(Open::Continue, steps).await
    }

    /// The last `steps` of the transaction and COMMIT, in one round trip.
    pub async fn commit(mut self, steps: &[Step<'_>]) -> Result<Vec<Vec<Row>>, Failure> {
        self.conn.pipeline_steps(Open::Continue, steps, Close::Commit).await
    }

    /// Ends the transaction without keeping anything of it.
    pub async fn rollback(mut self) -> Result<(), Failure> {
        self.conn.pipeline_steps(Open::Continue, &[], Close::Rollback).await.map(drop)
    }

    async fn run(mut self, open: Open, steps: &[Step<'_>]) -> Result<(Tx, Vec<Vec<Row>>), Failure> {
        match self.conn.pipeline_steps(open, steps, Close::KeepOpen).await {
            Ok(rows) => Ok((self, rows)),
            // Nothing sent, or no answer at all (a ROLLBACK would not get one either): the
            // connection is closed on drop, which ends the transaction on the server.
            Err(error @ (Failure::NoAnswer { .. } | Failure::OutOfTime)) => Err(error),
            Err(error) => {
                // The transaction is aborted: end it here so the connection can be reused.
                // If even that fails, the connection stays marked and is closed on drop.
                let _ = self.rollback().await;
                Err(error)
            }
        }
    }
}
