//! Orders: placing (`place/`, in batches gathered by `db::batch`), reading and listing
//! (`read.rs`), cancelling and moving along the lifecycle (`lifecycle.rs`), each one
//! transaction.
//!
//! Every write follows one locking order, so that no two transactions can deadlock:
//! idempotency keys first (in (user, key) order), then the order row (when there is one), then
//! product rows in ascending id.
//!
//! Cancelling and moving an order along its lifecycle are one round trip each, a pipeline
//! (`PooledConn::transaction`): BEGIN, the locking statements, the writing statement and
//! COMMIT, sent back to back. PostgreSQL runs a connection's statements one after the other,
//! so the writing statement starts only when the locking ones have taken every lock, and (at
//! READ COMMITTED) reads the rows as they are now that they are locked. Placing orders takes
//! two round trips (`place/`): the orders are decided here, between locking and writing.
//!
//! A write that must not happen (not enough stock, order already cancelled) is not an error
//! inside the transaction: the writing statement checks the same conditions and writes
//! nothing, or the orders are decided here before anything is written, and the Rust code says
//! precisely why from what the locking part saw.

mod lifecycle;
mod place;
mod read;

pub use lifecycle::{cancel, set_status};
pub use place::{CreatedOrder, MAX_BATCH, OrderRequest, PlaceSettings, Placed, Placing, Replay, StoredAnswer};
pub use read::{
    OrderDetails, OrderFilter, OrderItem, OrderLookup, OrderSummary, OrderUser, ReadBatches, list, read_in_batches,
};

use crate::{domain::OrderStatus, error::Error};

/// An order status read from the database.
fn status_of(text: &str) -> Result<OrderStatus, Error> {
    OrderStatus::parse(text).ok_or_else(|| Error::Internal(format!("unknown order status {text:?} in the database")))
}
