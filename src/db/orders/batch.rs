//! Commit batching (`ORDER_BATCH_MAX` > 1; issue 14): orders without an Idempotency-Key that
//! arrive while batches are being placed wait for the next one, which takes them all (up to the
//! maximum) and places them in one transaction with one commit.
//!
//! A batch is two round trips:
//! 1. BEGIN, lock the batch's products that have stock left in ascending id order (the order
//!    every transaction of the service locks in) and read their stock, and read which of its
//!    products and users exist.
//! 2. Decide each order here, in arrival order, against the stock the earlier orders of the
//!    batch left: placed whole, or refused whole with the reason a single order would get
//!    (unknown user, unknown product, not enough stock and how much there is). Then one
//!    statement writes every placed order, its lines, payment and inventory movements and
//!    takes the stock, and COMMIT, sent together.
//!
//! - **An order's fate never depends on its neighbours.** If the writing statement fails for
//!   a reason of one of its rows (a trigger, a constraint, a total too large for
//!   numeric(12,2)), the batch is rolled back and every order of it is placed again on its
//!   own, one after the other, each answered for itself.
//! - **No added wait.** A lone order goes at once, as a batch of one; orders are batched only
//!   when they arrive faster than batches commit. At most `BATCHES_IN_FLIGHT` batches run at a
//!   time, so an order waits for at most that many batches ahead of it.
//! - **Honest outcomes.** If the batch fails as a whole (connection lost after the COMMIT was
//!   sent, the deadline), its placed orders all get the same answer: 503 when nothing was
//!   written, 504 OUTCOME_UNKNOWN when the commit may have happened. An order whose request is
//!   already past its deadline is not sent (503). The batch runs under the earliest deadline
//!   of its orders.
//!
//! Why it helps: on a hot product every single order holds the product's row lock through
//! its commit's WAL flush, so they go one flush after another; a batch takes the lock once,
//! writes its orders with a few set-based inserts and flushes once.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use postgres_types::{ToSql, Type};
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    time::Instant,
};
use tokio_postgres::error::SqlState;

use super::place::{CreatedOrder, Placed, place};
use crate::{
    db::{Failure, Pool, Sql},
    deadline,
    domain::{NewOrder, OrderStatus},
    error::Error,
};

/// The most orders in one batch.
pub const MAX_BATCH: usize = 256;

/// Batches placed at the same time (each on a connection of its own).
const BATCHES_IN_FLIGHT: usize = 2;

/// $1 the batch's product ids, ascending: those with stock left, locked, with their stock.
/// A product whose stock is zero is not locked: every order for it is refused from that
/// reading (as it would be one instant earlier), so once a product sells out, the refusals
/// wait on no row lock and hold none. If a concurrent order empties a product while this one
/// waits for its lock, PostgreSQL checks `stock > 0` again on the new version and leaves it.
const LOCK_PRODUCTS: Sql = Sql {
    params: &[Type::INT4_ARRAY],
    text: "SELECT id, stock FROM products WHERE id = ANY($1::int4[]) AND stock > 0 ORDER BY id FOR UPDATE",
};

/// $1 the batch's product ids: those that exist (the ones with no stock among them too).
const EXISTING_PRODUCTS: Sql =
    Sql { params: &[Type::INT4_ARRAY], text: "SELECT id FROM products WHERE id = ANY($1::int4[])" };

/// $1 the batch's user ids: those that exist.
const EXISTING_USERS: Sql =
    Sql { params: &[Type::INT4_ARRAY], text: "SELECT id FROM users WHERE id = ANY($1::int4[])" };

/// Writes the placed orders of a batch. $1 each order's user, in arrival order; then its lines,
/// order after order: $2 the (1-based) order each line belongs to, $3 product, $4 quantity.
/// Order ids are drawn in arrival order; prices are the locked products' (unchanged since they
/// were locked); the stock taken is what the batch's lines add up to per product, which the
/// service checked against the stock it read under those locks, so `CHECK (stock >= 0)` holds.
/// Returns each order's position, id and total, in arrival order.
const WRITE_ORDERS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::INT4_ARRAY, Type::INT4_ARRAY, Type::INT4_ARRAY],
    text: "
    WITH placed AS (
        SELECT o.n, o.user_id, nextval('orders_id_seq') AS id
        FROM (SELECT * FROM unnest($1::int4[]) WITH ORDINALITY AS o (user_id, n) ORDER BY n) AS o
    ),
    line AS (
        SELECT l.position, l.n, l.product_id, l.quantity, products.price
        FROM unnest($2::int4[], $3::int4[], $4::int4[]) WITH ORDINALITY AS l (n, product_id, quantity, position)
        JOIN products ON products.id = l.product_id
    ),
    total AS (
        SELECT placed.n, placed.id, placed.user_id, sum(line.price * line.quantity) AS amount
        FROM placed JOIN line USING (n)
        GROUP BY placed.n, placed.id, placed.user_id
    ),
    new_orders AS (
        INSERT INTO orders (id, user_id, status, total_amount)
        SELECT id, user_id, 'processing', amount FROM total ORDER BY n
        RETURNING id, total_amount
    ),
    new_lines AS (
        INSERT INTO order_items (order_id, product_id, quantity, price)
        SELECT placed.id, line.product_id, line.quantity, line.price
        FROM line JOIN placed USING (n)
        ORDER BY line.position
    ),
    payment AS (
        INSERT INTO payments (order_id, amount, status)
        SELECT id, amount, 'completed' FROM total
    ),
    taken AS (
        UPDATE products
        SET stock = products.stock - t.quantity
        FROM (SELECT product_id, sum(quantity)::int4 AS quantity FROM line GROUP BY product_id) AS t
        WHERE products.id = t.product_id
    ),
    ledger AS (
        INSERT INTO inventory_movements (product_id, delta, reason, order_id)
        SELECT line.product_id, -line.quantity, 'order', placed.id
        FROM line JOIN placed USING (n)
    )
    SELECT total.n, new_orders.id, new_orders.total_amount
    FROM new_orders JOIN total USING (id)
    ORDER BY total.n",
};

/// The queue of orders waiting for a batch; cheap to share.
#[derive(Clone)]
pub struct Batcher {
    queue: mpsc::UnboundedSender<Waiting>,
}

struct Waiting {
    order: NewOrder,
    deadline: Option<Instant>,
    answer: oneshot::Sender<Result<CreatedOrder, Error>>,
}

impl Batcher {
    /// Starts placing batches of at most `max` orders (capped at `MAX_BATCH`) on `pool`.
    pub fn start(pool: Pool, max: usize) -> Batcher {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(batch_loop(pool, max.clamp(1, MAX_BATCH), waiting));
        Batcher { queue }
    }

    /// Places `order` in the next batch; its own outcome.
    pub async fn place(&self, order: NewOrder) -> Result<CreatedOrder, Error> {
        let (answer, answered) = oneshot::channel();
        let waiting = Waiting { order, deadline: deadline::current(), answer };
        self.queue.send(waiting).map_err(|_| Error::Unavailable("the service is shutting down"))?;
        answered.await.unwrap_or_else(|_| Err(Error::Internal("the order's batch ended without an answer".into())))
    }
}

async fn batch_loop(pool: Pool, max: usize, mut waiting: mpsc::UnboundedReceiver<Waiting>) {
    let slots = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = waiting.recv().await {
        // A slot first: while every slot is busy, arriving orders queue for this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < max {
            match waiting.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            place_batch(&pool, batch).await;
            drop(slot);
        });
    }
}

async fn place_batch(pool: &Pool, batch: Vec<Waiting>) {
    let now = Instant::now();
    let (live, late): (Vec<Waiting>, Vec<Waiting>) =
        batch.into_iter().partition(|waiting| waiting.deadline.is_none_or(|deadline| deadline > now));
    for waiting in late {
        let _ =
            waiting.answer.send(Err(Error::Unavailable("the request ran out of time waiting for its batch; retry")));
    }
    if live.is_empty() {
        return;
    }
    let orders: Vec<&NewOrder> = live.iter().map(|waiting| &waiting.order).collect();
    let run = async {
        match place_together(pool, &orders).await {
            Together::Answered(outcomes) => outcomes,
            Together::Failed(error) => orders.iter().map(|_| Err(error.clone())).collect(),
            Together::OneByOne => {
                let mut outcomes = Vec::with_capacity(orders.len());
                for order in &orders {
                    let placed = place(pool, None, order, None, Duration::ZERO).await;
                    outcomes.push(placed.and_then(|placed| match placed {
                        Placed::Created(created) => Ok(created),
                        Placed::Replayed(_) => Err(Error::Internal("an order without a key was replayed".into())),
                    }));
                }
                outcomes
            }
        }
    };
    let outcomes = match live.iter().filter_map(|waiting| waiting.deadline).min() {
        Some(earliest) => deadline::scope(earliest, run).await,
        None => run.await,
    };
    for (waiting, outcome) in live.into_iter().zip(outcomes) {
        let _ = waiting.answer.send(outcome);
    }
}

/// How placing a batch together ended.
enum Together {
    /// Each order's own outcome, in order.
    Answered(Vec<Result<CreatedOrder, Error>>),
    /// The batch failed as a whole (nothing written, or an unknown outcome): the same answer
    /// for every order.
    Failed(Error),
    /// A row of the writing statement failed: place the orders one by one instead.
    OneByOne,
}

async fn place_together(pool: &Pool, orders: &[&NewOrder]) -> Together {
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(error) => return Together::Failed(error),
    };
    let mut product_ids: Vec<i32> = orders.iter().flat_map(|order| order.lines.iter().map(|l| l.product_id)).collect();
    product_ids.sort_unstable();
    product_ids.dedup();
    let user_ids: Vec<i32> = orders.iter().map(|order| order.user_id).collect::<HashSet<_>>().into_iter().collect();
    let locked = conn
        .begin([
            (&LOCK_PRODUCTS, &[&product_ids]),
            (&EXISTING_PRODUCTS, &[&product_ids]),
            (&EXISTING_USERS, &[&user_ids]),
        ])
        .await;
    let (tx, [locked, products, users]) = match locked {
        Ok(locked) => locked,
        Err(failure) => return Together::Failed(Error::from(failure)),
    };
    // Every existing product's stock: as locked, or zero (not locked, see LOCK_PRODUCTS).
    let mut stock: HashMap<i32, i32> = products.iter().map(|row| (row.get(0), 0)).collect();
    stock.extend(locked.iter().map(|row| (row.get::<_, i32>(0), row.get::<_, i32>(1))));
    let users: HashSet<i32> = users.iter().map(|row| row.get(0)).collect();

    // Each order in arrival order, against what the earlier ones left.
    let mut decided: Vec<Result<(), Error>> = Vec::with_capacity(orders.len());
    for order in orders {
        decided.push(decide(order, &users, &mut stock));
    }
    let placed: Vec<&NewOrder> =
        orders.iter().zip(&decided).filter(|(_, decision)| decision.is_ok()).map(|(order, _)| *order).collect();
    if placed.is_empty() {
        return match tx.rollback().await {
            Ok(()) => Together::Answered(
                decided.into_iter().map(|d| d.and_then(|()| Err(Error::Internal("no order placed".into())))).collect(),
            ),
            Err(failure) => Together::Failed(Error::from(failure)),
        };
    }
    let user_of: Vec<i32> = placed.iter().map(|order| order.user_id).collect();
    let (mut line_order, mut line_product, mut line_quantity) = (Vec::new(), Vec::new(), Vec::new());
    for (n, order) in placed.iter().enumerate() {
        for line in &order.lines {
            line_order.push(n as i32 + 1);
            line_product.push(line.product_id);
            line_quantity.push(line.quantity);
        }
    }
    let params: [&(dyn ToSql + Sync); 4] = [&user_of, &line_order, &line_product, &line_quantity];
    let rows = match tx.commit([(&WRITE_ORDERS, &params)]).await {
        Ok([rows]) => rows,
        Err(Failure::Db(error)) if error.code().is_some_and(a_rows_fault) => return Together::OneByOne,
        Err(failure) => return Together::Failed(Error::from(failure)),
    };
    if rows.len() != placed.len() {
        return Together::Failed(Error::Internal(format!("{} orders written of {}", rows.len(), placed.len())));
    }
    let mut created = rows.iter().map(|row| CreatedOrder {
        order_id: row.get(1),
        status: OrderStatus::Processing,
        total_amount: row.get(2),
    });
    Together::Answered(
        decided
            .into_iter()
            .map(|decision| {
                decision.and_then(|()| created.next().ok_or_else(|| Error::Internal("missing order".into())))
            })
            .collect(),
    )
}

/// Whether `order` is placed, taking its stock from `stock`, or why not: the checks and the
/// reasons of a single order (`place::outcome`), in the same order.
fn decide(order: &NewOrder, users: &HashSet<i32>, stock: &mut HashMap<i32, i32>) -> Result<(), Error> {
    if !users.contains(&order.user_id) {
        return Err(Error::UserNotFound { user_id: order.user_id });
    }
    if let Some(line) = order.lines.iter().find(|line| !stock.contains_key(&line.product_id)) {
        return Err(Error::OrderedProductNotFound { product_id: line.product_id });
    }
    for line in &order.lines {
        let available = stock[&line.product_id];
        if available < line.quantity {
            return Err(Error::InsufficientStock { product_id: line.product_id, requested: line.quantity, available });
        }
    }
    for line in &order.lines {
        *stock.get_mut(&line.product_id).expect("checked above") -= line.quantity;
    }
    Ok(())
}

/// A statement refused for what one of its rows holds (a data exception such as a total too
/// large, a constraint, an error raised by a trigger), rather than for the transaction as a
/// whole (a cancellation, a deadlock, the connection): one order's fault.
fn a_rows_fault(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(class, "22" | "23" | "P0")
}
