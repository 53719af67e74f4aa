//! Step 2 of a batch: lock the products its orders name and read their stock, then decide
//! each order against it, in arrival order.
//!
//! Three ways to lock (`Locking`):
//! - **Wait** for every product row, in ascending id order (the order every transaction of the
//!   service locks in), up to `lock_timeout`: an order placed on its own (`ORDER_BATCH_MAX=1`)
//!   and the batches of contended orders.
//! - **Patient**: the same, but for a short while (`PlaceSettings::lock_patience`, as the
//!   transaction's `lock_timeout`): the batches every order joins first. Their locks are held
//!   mostly by each other, for a few milliseconds, and waiting for them in PostgreSQL's lock
//!   queue is the fastest way through a hot product (the next batch is ready the moment the
//!   last one commits). A lock held longer (an operator's transaction, a batch stuck behind
//!   one) ends the wait, and the batch runs again skipping:
//! - **Skip** the rows another transaction holds (`SKIP LOCKED`). An order naming a product
//!   held elsewhere is not decided here but deferred to the contended batches, where it waits
//!   for the lock; the batch's other orders never wait for it longer than the patience.

use std::collections::{HashMap, HashSet};

use postgres_types::Type;
use tokio_postgres::Row;

use super::Fate;
use crate::{db::Sql, domain::NewOrder, error::Error};

/// How step 2 takes the product locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Locking {
    Wait,
    Patient,
    Skip,
}

/// $1 product ids, ascending: those with stock left, locked, with their stock. A product whose
/// stock is zero is not locked: every order for it is refused from that reading (as it would
/// be one instant earlier), so once a product sells out, the refusals wait on no row lock and
/// hold none. If a concurrent order empties a product while this one waits for its lock,
/// PostgreSQL checks `stock > 0` again on the new version and leaves it.
pub(super) const LOCK_PRODUCTS: Sql = Sql {
    params: &[Type::INT4_ARRAY],
    text: "SELECT id, stock FROM products WHERE id = ANY($1::int4[]) AND stock > 0 ORDER BY id FOR UPDATE",
};

/// LOCK_PRODUCTS without waiting: the rows another transaction holds are left out.
pub(super) const LOCK_FREE_PRODUCTS: Sql = Sql {
    params: &[Type::INT4_ARRAY],
    text: "SELECT id, stock FROM products WHERE id = ANY($1::int4[]) AND stock > 0 ORDER BY id FOR UPDATE SKIP LOCKED",
};

/// $1 product ids: those that exist, with their stock as last committed (no lock), which
/// tells a product held elsewhere (stock left) from a sold-out one.
pub(super) const EXISTING_PRODUCTS: Sql =
    Sql { params: &[Type::INT4_ARRAY], text: "SELECT id, stock FROM products WHERE id = ANY($1::int4[])" };

/// $1 user ids: those that exist.
pub(super) const EXISTING_USERS: Sql =
    Sql { params: &[Type::INT4_ARRAY], text: "SELECT id FROM users WHERE id = ANY($1::int4[])" };

/// $1 the lock patience (`100ms`): the transaction's `lock_timeout`.
pub(super) const SET_LOCK_PATIENCE: Sql =
    Sql { params: &[Type::TEXT], text: "SELECT set_config('lock_timeout', $1, true)" };

impl Locking {
    pub(super) fn statement(self) -> &'static Sql {
        match self {
            Locking::Wait | Locking::Patient => &LOCK_PRODUCTS,
            Locking::Skip => &LOCK_FREE_PRODUCTS,
        }
    }
}

/// The ids step 2 reads: every product and user the orders name, products ascending.
pub(super) struct Names {
    pub products: Vec<i32>,
    pub users: Vec<i32>,
}

impl Names {
    pub(super) fn of<'a>(orders: impl Iterator<Item = &'a NewOrder>) -> Names {
        let (mut products, mut users) = (Vec::new(), HashSet::new());
        for order in orders {
            products.extend(order.lines.iter().map(|line| line.product_id));
            users.insert(order.user_id);
        }
        products.sort_unstable();
        products.dedup();
        Names { products, users: users.into_iter().collect() }
    }
}

/// What step 2 saw: the stock of every product the batch may take from, the products held
/// elsewhere, and the users that exist.
pub(super) struct Stock {
    /// Every existing product's stock: as locked here, or zero (a sold-out product is not
    /// locked, see LOCK_PRODUCTS).
    available: HashMap<i32, i32>,
    /// Products with stock left that another transaction holds (skipped, never waited for).
    held_elsewhere: HashSet<i32>,
    users: HashSet<i32>,
}

impl Stock {
    /// From the rows of the lock statement, EXISTING_PRODUCTS and EXISTING_USERS.
    pub(super) fn read(locked: &[Row], existing: &[Row], users: &[Row]) -> Stock {
        let mut available = HashMap::with_capacity(existing.len());
        let mut held_elsewhere = HashSet::new();
        let locked: HashMap<i32, i32> = locked.iter().map(|row| (row.get(0), row.get(1))).collect();
        for row in existing {
            let (id, committed_stock): (i32, i32) = (row.get(0), row.get(1));
            match locked.get(&id) {
                Some(&stock) => {
                    available.insert(id, stock);
                }
                // Not locked: sold out when it was read. Unless it has stock as last committed:
                // skipping, that means another transaction holds it. (Waiting, it was sold out
                // at the lock and restocked since: refused as it would have been an instant
                // earlier; `decide` looks at `held_elsewhere` only when skipping.)
                None => {
                    available.insert(id, 0);
                    if committed_stock > 0 {
                        held_elsewhere.insert(id);
                    }
                }
            }
        }
        Stock { available, held_elsewhere, users: users.iter().map(|row| row.get(0)).collect() }
    }

    /// Skipping: the products another transaction held.
    pub(super) fn held_elsewhere(&self) -> impl Iterator<Item = i32> + '_ {
        self.held_elsewhere.iter().copied()
    }

    /// Decides each open order in arrival order, taking what it places from the stock.
    pub(super) fn decide<'a>(&mut self, orders: impl Iterator<Item = (&'a NewOrder, &'a mut Fate)>, locking: Locking) {
        for (order, fate) in orders {
            if matches!(fate, Fate::Open) {
                *fate = self.decide_one(order, locking);
            }
        }
    }

    /// Whether `order` is placed, or why not, or (skipping) whether it must wait for a product
    /// held elsewhere. The checks come in a fixed order, so an order wrong in several ways
    /// always gets the same reason: the user, then each product's existence, then each line's
    /// stock.
    fn decide_one(&mut self, order: &NewOrder, locking: Locking) -> Fate {
        if !self.users.contains(&order.user_id) {
            return Fate::Refused(Error::UserNotFound { user_id: order.user_id });
        }
        if let Some(line) = order.lines.iter().find(|line| !self.available.contains_key(&line.product_id)) {
            return Fate::Refused(Error::OrderedProductNotFound { product_id: line.product_id });
        }
        if locking == Locking::Skip && order.lines.iter().any(|line| self.held_elsewhere.contains(&line.product_id)) {
            return Fate::Deferred;
        }
        for line in &order.lines {
            let available = self.available[&line.product_id];
            if available < line.quantity {
                return Fate::Refused(Error::InsufficientStock {
                    product_id: line.product_id,
                    requested: line.quantity,
                    available,
                });
            }
        }
        for line in &order.lines {
            if let Some(stock) = self.available.get_mut(&line.product_id) {
                *stock -= line.quantity;
            }
        }
        Fate::Placed
    }
}
