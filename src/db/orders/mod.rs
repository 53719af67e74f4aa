//! Orders: placing (`place.rs`), reading and listing (`read.rs`), cancelling and moving
//! along the lifecycle (`lifecycle.rs`), each one transaction.
//!
//! Every write follows one locking order, so that no two transactions can deadlock:
//! the order row first (when there is one), then product rows in ascending id.
//!
//! Each transaction costs one round trip, but for an order with an idempotency key (see
//! `place.rs`). Creating an order is a single statement, which PostgreSQL runs as a
//! transaction of its own: it commits whole or not at all. Cancelling and moving an order
//! along its lifecycle are pipelines (`PooledConn::transaction`): BEGIN, the
//! locking statements, the writing statement and COMMIT, sent back to back. PostgreSQL runs a
//! connection's statements one after the other, so the writing statement starts only when the
//! locking ones have taken every lock, and (at READ COMMITTED) reads the rows as they are now
//! that they are locked.
//!
//! A write that must not happen (not enough stock, order already cancelled) is not an error
//! inside the transaction: the writing statement checks the same conditions and writes
//! nothing, and the Rust code then says precisely why from what the locking part saw.

pub mod batch;
mod lifecycle;
mod place;
mod read;

pub use batch::Batcher;
pub use lifecycle::{cancel, set_status};
pub use place::{CreatedOrder, Placed, StoredOutcome, place};
pub use read::{OrderDetails, OrderFilter, OrderItem, OrderSummary, OrderUser, get, list};

use crate::{domain::OrderStatus, error::Error};

/// An order status read from the database.
fn status_of(text: &str) -> Result<OrderStatus, Error> {
    OrderStatus::parse(text).ok_or_else(|| Error::Internal(format!("unknown order status {text:?} in the database")))
}
