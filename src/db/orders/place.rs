//! Placing orders: one transaction places a batch of orders (one or more, gathered by
//! `db::batch`), each placed or refused on its own, in arrival order, with or without an
//! idempotency key. With `ORDER_BATCH_MAX=1` every order is a batch of one.
//!
//! The transaction is two round trips, three when the batch holds keys:
//! 1. Keys (only if some order has one): BEGIN, claim every key, and read each as it now
//!    stands. A key already used for the same request gets its stored outcome back (a replay)
//!    instead of a second order; one used for another request is refused.
//! 2. Lock the products still to be decided that have stock left, in ascending id order (the
//!    order every transaction of the service locks in), reading their stock; in the same round
//!    trip read which of the products and users exist.
//! 3. Decide each order here, in arrival order, against the stock the earlier orders of the
//!    batch left: placed whole, or refused whole with its reason (unknown user, unknown
//!    product, not enough stock and how much there is). Then one statement writes every placed
//!    order, its lines, payment and inventory movements and takes the stock, and, sent with
//!    COMMIT, the outcome of every key is stored with it (a key's 201 body needs the order id,
//!    so with keys the write and the commit are two round trips).
//!
//! - **Keys.** A claimed key and its outcome commit together, so other transactions see a key
//!   either absent or with its final outcome. A concurrent request holding the same key makes
//!   the claim wait on the key's unique index until its transaction ends; then the key is
//!   either stored (replayed here) or free again (claimed here). Keys are claimed in (user,
//!   key) order, before any product lock, so claims cannot deadlock. A claim that waits past
//!   `lock_timeout` or the deadline is 409 IDEMPOTENCY_IN_PROGRESS. Two requests of one batch
//!   with the same key go in successive transactions, the second one seeing the first's outcome.
//! - **A replay never promises more than the first answer.** The stored outcome may be one
//!   whose commit was answered 504 because the synchronous standby never confirmed it:
//!   committed here, maybe nowhere else. So a replay writes its key again (unchanged) and
//!   answers only once that commit is confirmed; its wait for the standby covers every earlier
//!   commit of this server (WAL is one sequence).
//! - **An order's fate never depends on its neighbours.** If a write fails for a reason of one
//!   of its rows (a trigger, a constraint, a total too large for numeric(12,2)), the batch is
//!   rolled back and its orders placed again one by one, each answered for itself; so is a
//!   batch whose claim of keys timed out.
//! - **Honest outcomes.** If the batch fails as a whole (connection lost after the COMMIT was
//!   sent, the deadline), its orders all get the same answer: 503 when nothing was written, 504
//!   OUTCOME_UNKNOWN when the commit may have happened.
//!
//! Why batches: on a hot product every single-order transaction holds the product's row lock
//! through its commit's WAL flush, so they go one flush after another; a batch takes the lock
//! once, writes its orders with a few set-based statements and flushes once.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use postgres_types::{ToSql, Type};
use serde::Serialize;
use tokio_postgres::{Row, error::SqlState};

use crate::{
    db::{Failure, Pool, PooledConn, Sql, Tx, batch::Batches},
    domain::{IdempotencyKey, NewOrder, OrderStatus},
    error::Error,
    money::Money,
};

/// An order to place, as the client sent it.
#[derive(Debug, Clone)]
pub struct OrderRequest {
    pub order: NewOrder,
    /// The `Idempotency-Key` header.
    pub key: Option<IdempotencyKey>,
}

/// A created order: the body of the 201.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedOrder {
    pub order_id: i64,
    pub status: OrderStatus,
    pub total_amount: Money,
}

/// What placing an order did.
#[derive(Debug)]
pub enum Placed {
    /// The order was written now.
    Created(CreatedOrder),
    /// The key was used before for the same request: the outcome stored then, to be answered
    /// again byte for byte (a 201, or the 4xx that refused the order).
    Replayed(StoredOutcome),
}

/// An outcome stored with an idempotency key: the status and JSON body it was answered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOutcome {
    pub status: u16,
    pub body: String,
}

/// The status a created order is answered with (201), stored with its key like any other.
const CREATED: u16 = 201;

/// Claims keys: inserts each, or takes over an expired one; returns the keys now ours.
/// $1 users, $2 keys, $3 request fingerprints (same length, no (user, key) twice), $4 retention
/// in seconds. Inserted in (user, key) order, the order every claim takes them in.
const CLAIM_KEYS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::TEXT_ARRAY, Type::TEXT_ARRAY, Type::FLOAT8],
    text: "
    INSERT INTO idempotency_keys AS k (user_id, key, request_hash)
    SELECT c.user_id, c.key, md5(c.fingerprint)
    FROM unnest($1::int4[], $2::text[], $3::text[]) AS c (user_id, key, fingerprint)
    ORDER BY c.user_id, c.key
    ON CONFLICT (user_id, key) DO UPDATE
        SET request_hash = EXCLUDED.request_hash, response_status = NULL, response_body = NULL, created_at = now()
        WHERE k.created_at < now() - make_interval(secs => $4)
    RETURNING k.user_id, k.key",
};

/// Each key as it stands after the claim (a statement of its own, so that it sees what a
/// transaction the claim waited for committed): its position in $1..$3 (1-based), whether it
/// was made for the same request, and its stored outcome (NULL when it is our own claim).
/// Same parameters as CLAIM_KEYS.
const FIND_KEYS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::TEXT_ARRAY, Type::TEXT_ARRAY],
    text: "
    SELECT c.n, k.request_hash = md5(c.fingerprint), k.response_status, k.response_body
    FROM unnest($1::int4[], $2::text[], $3::text[]) WITH ORDINALITY AS c (user_id, key, fingerprint, n)
    JOIN idempotency_keys AS k ON k.user_id = c.user_id AND k.key = c.key",
};

/// $1 product ids, ascending: those with stock left, locked, with their stock. A product whose
/// stock is zero is not locked: every order for it is refused from that reading (as it would
/// be one instant earlier), so once a product sells out, the refusals wait on no row lock and
/// hold none. If a concurrent order empties a product while this one waits for its lock,
/// PostgreSQL checks `stock > 0` again on the new version and leaves it.
const LOCK_PRODUCTS: Sql = Sql {
    params: &[Type::INT4_ARRAY],
    text: "SELECT id, stock FROM products WHERE id = ANY($1::int4[]) AND stock > 0 ORDER BY id FOR UPDATE",
};

/// $1 product ids: those that exist (the ones with no stock among them too).
const EXISTING_PRODUCTS: Sql =
    Sql { params: &[Type::INT4_ARRAY], text: "SELECT id FROM products WHERE id = ANY($1::int4[])" };

/// $1 user ids: those that exist.
const EXISTING_USERS: Sql =
    Sql { params: &[Type::INT4_ARRAY], text: "SELECT id FROM users WHERE id = ANY($1::int4[])" };

/// Writes the placed orders of a batch. $1 each order's user, in arrival order; then its lines,
/// order after order: $2 the (1-based) order each line belongs to, $3 product, $4 quantity.
/// Order ids are drawn in arrival order; prices are the locked products' (this statement's
/// snapshot is taken after the locks, so it reads them as locked); the stock taken is what the
/// batch's lines add up to per product, which the service checked against the stock it read
/// under those locks, so `CHECK (stock >= 0)` holds. Returns each order's id and total, in
/// arrival order.
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
    SELECT new_orders.id, new_orders.total_amount
    FROM new_orders JOIN total USING (id)
    ORDER BY total.n",
};

/// Stores each key's outcome: $1 users, $2 keys, $3 statuses, $4 bodies. A claimed key gets
/// its order's outcome; a replayed key is written again with the outcome it holds, so that the
/// commit waits for the synchronous standby like any write's (see the module's comment).
const SAVE_OUTCOMES: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::TEXT_ARRAY, Type::INT2_ARRAY, Type::TEXT_ARRAY],
    text: "
    UPDATE idempotency_keys AS k SET response_status = s.status, response_body = s.body
    FROM unnest($1::int4[], $2::text[], $3::int2[], $4::text[]) AS s (user_id, key, status, body)
    WHERE k.user_id = s.user_id AND k.key = s.key",
};

/// Orders placed in batches of many, one transaction each (`ORDER_BATCH_MAX` > 1).
pub type PlaceBatches = Batches<OrderRequest, Placed>;

/// The most orders in one batch.
pub const MAX_BATCH: usize = 256;

/// Batches placed at the same time, each on a connection of its own.
const BATCHES_IN_FLIGHT: usize = 2;

/// Starts placing orders in batches of at most `max` (capped at `MAX_BATCH`) on `pool`;
/// idempotency keys are kept for `key_retention`.
pub fn place_in_batches(pool: Pool, max: usize, key_retention: Duration) -> PlaceBatches {
    Batches::start(max.min(MAX_BATCH), BATCHES_IN_FLIGHT, move |batch: Vec<OrderRequest>| {
        let pool = pool.clone();
        async move {
            let requests: Vec<&OrderRequest> = batch.iter().collect();
            place_all(&pool, &requests, key_retention).await
        }
    })
}

/// Places one order: in the next batch with `batches`, else at once as a batch of one.
/// `key_retention`: how long a key is kept, after which it may be claimed anew.
pub async fn place(
    pool: &Pool,
    batches: Option<&PlaceBatches>,
    request: OrderRequest,
    key_retention: Duration,
) -> Result<Placed, Error> {
    match batches {
        Some(batches) => batches.submit(request).await,
        None => place_all(pool, &[&request], key_retention).await.pop().expect("one outcome per request"),
    }
}

/// Places `requests` (one or more), each on its own: their outcomes, in the same order.
async fn place_all(pool: &Pool, requests: &[&OrderRequest], key_retention: Duration) -> Vec<Result<Placed, Error>> {
    let mut outcomes: Vec<Option<Result<Placed, Error>>> = requests.iter().map(|_| None).collect();
    let mut pending: Vec<usize> = (0..requests.len()).collect();
    while !pending.is_empty() {
        // A key is claimed once per transaction: a second request with it waits for the next
        // one, as it would wait for the first's transaction if it came on its own.
        let mut keys = HashSet::new();
        let (now, later): (Vec<usize>, Vec<usize>) = pending.into_iter().partition(|&i| {
            let request = requests[i];
            request.key.as_ref().is_none_or(|key| keys.insert((request.order.user_id, key.as_str())))
        });
        let batch: Vec<&OrderRequest> = now.iter().map(|&i| requests[i]).collect();
        for (i, outcome) in now.into_iter().zip(place_batch(pool, &batch, key_retention).await) {
            outcomes[i] = Some(outcome);
        }
        pending = later;
    }
    outcomes.into_iter().map(|outcome| outcome.expect("every request placed")).collect()
}

/// Places a batch with no key twice: together, or one by one if together failed for one
/// order's reason.
async fn place_batch(pool: &Pool, batch: &[&OrderRequest], key_retention: Duration) -> Vec<Result<Placed, Error>> {
    match place_together(pool, batch, key_retention).await {
        Together::Answered(outcomes) => outcomes,
        Together::Failed(error) => batch.iter().map(|_| Err(error.clone())).collect(),
        Together::OneByOne => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for request in batch {
                outcomes.push(match place_together(pool, &[request], key_retention).await {
                    Together::Answered(mut outcome) => outcome.pop().expect("one outcome per request"),
                    Together::Failed(error) => Err(error),
                    Together::OneByOne => Err(Error::Internal("a batch of one cannot be split".into())),
                });
            }
            outcomes
        }
    }
}

/// How placing a batch together ended.
enum Together {
    /// Each order's own outcome, in order.
    Answered(Vec<Result<Placed, Error>>),
    /// The batch failed as a whole (nothing written, or an unknown outcome): the same answer
    /// for every order.
    Failed(Error),
    /// One order's fault failed the batch: place them one by one instead (never for a batch
    /// of one, which gets the fault as its answer).
    OneByOne,
}

impl From<Failure> for Together {
    fn from(failure: Failure) -> Together {
        Together::Failed(Error::from(failure))
    }
}

/// What becomes of one order of the batch.
enum Fate {
    /// To be decided against the stock (no key, or a key claimed now).
    Open,
    Placed,
    Refused(Error),
    /// Its key holds the outcome of the same request: answered again.
    Replayed(StoredOutcome),
}

async fn place_together(pool: &Pool, batch: &[&OrderRequest], key_retention: Duration) -> Together {
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(error) => return Together::Failed(error),
    };
    let keys = Keys::of(batch);
    let mut fates: Vec<Fate> = batch.iter().map(|_| Fate::Open).collect();

    // 1. The keys.
    let mut tx = Begun::Not(conn);
    if !keys.is_empty() {
        let retention_secs = key_retention.as_secs_f64();
        let claim: [&(dyn ToSql + Sync); 4] = [&keys.users, &keys.keys, &keys.fingerprints, &retention_secs];
        let claimed = match tx.then([(&CLAIM_KEYS, &claim), (&FIND_KEYS, &claim[..3])]).await {
            Ok((begun, [claimed, found])) => {
                tx = Begun::Tx(begun);
                keys.fates(&claimed, &found, &mut fates)
            }
            // The only wait here is on a concurrent request holding a key (or the deadline).
            Err(failure) if failure.code().is_some_and(waited_too_long) => {
                return match batch {
                    [_] => Together::Answered(vec![Err(Error::IdempotencyInProgress)]),
                    _ => Together::OneByOne,
                };
            }
            Err(failure) => return failure.into(),
        };
        if let Err(error) = claimed {
            return Together::Failed(error);
        }
    }

    // 2. Lock and read, then decide, the orders still open.
    let open: Vec<&NewOrder> =
        batch.iter().zip(&fates).filter(|(_, fate)| matches!(fate, Fate::Open)).map(|(r, _)| &r.order).collect();
    if !open.is_empty() {
        let mut product_ids: Vec<i32> = open.iter().flat_map(|o| o.lines.iter().map(|l| l.product_id)).collect();
        product_ids.sort_unstable();
        product_ids.dedup();
        let user_ids: Vec<i32> = open.iter().map(|o| o.user_id).collect::<HashSet<_>>().into_iter().collect();
        let (products_param, users_param): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&product_ids], [&user_ids]);
        let read = [
            (&LOCK_PRODUCTS, &products_param[..]),
            (&EXISTING_PRODUCTS, &products_param[..]),
            (&EXISTING_USERS, &users_param[..]),
        ];
        let (begun, [locked, products, users]) = match tx.then(read).await {
            Ok(read) => read,
            Err(failure) => return failure.into(),
        };
        tx = Begun::Tx(begun);
        // Every existing product's stock: as locked, or zero (not locked, see LOCK_PRODUCTS).
        let mut stock: HashMap<i32, i32> = products.iter().map(|row| (row.get(0), 0)).collect();
        stock.extend(locked.iter().map(|row| (row.get::<_, i32>(0), row.get::<_, i32>(1))));
        let users: HashSet<i32> = users.iter().map(|row| row.get(0)).collect();
        for (request, fate) in batch.iter().zip(&mut fates) {
            if matches!(fate, Fate::Open) {
                *fate = match decide(&request.order, &users, &mut stock) {
                    Ok(()) => Fate::Placed,
                    Err(refusal) => Fate::Refused(refusal),
                };
            }
        }
    }

    // 3. Write the placed orders and store the keys' outcomes, and commit.
    let placed: Vec<&NewOrder> =
        batch.iter().zip(&fates).filter(|(_, fate)| matches!(fate, Fate::Placed)).map(|(r, _)| &r.order).collect();
    let written = Written::of(&placed);
    let write: [&(dyn ToSql + Sync); 4] = [&written.users, &written.line_order, &written.products, &written.quantities];
    let (tx, created) = match (tx, keys.is_empty(), placed.is_empty()) {
        // Every batch has an order, keyed (step 1 began) or open (step 2 began).
        (Begun::Not(_), ..) => return Together::Failed(Error::Internal("a batch that sent nothing".into())),
        (Begun::Tx(tx), true, true) => {
            return match tx.rollback().await {
                Ok(()) => Together::Answered(answers(fates, Vec::new())),
                Err(failure) => failure.into(),
            };
        }
        (Begun::Tx(tx), true, false) => match tx.commit([(&WRITE_ORDERS, &write)]).await {
            Ok([rows]) => (None, rows),
            Err(failure) => return write_failed(failure, batch),
        },
        (Begun::Tx(tx), false, true) => (Some(tx), Vec::new()),
        (Begun::Tx(tx), false, false) => match tx.then([(&WRITE_ORDERS, &write)]).await {
            Ok((tx, [rows])) => (Some(tx), rows),
            Err(failure) => return write_failed(failure, batch),
        },
    };
    if created.len() != placed.len() {
        return Together::Failed(Error::Internal(format!("{} orders written of {}", created.len(), placed.len())));
    }
    let created: Vec<CreatedOrder> = created
        .iter()
        .map(|row| CreatedOrder { order_id: row.get(0), status: OrderStatus::Processing, total_amount: row.get(1) })
        .collect();
    let answers = answers(fates, created);
    if let Some(tx) = tx {
        let saved = match keys.outcomes(batch, &answers) {
            Ok(saved) => saved,
            Err(error) => {
                let _ = tx.rollback().await;
                return Together::Failed(error);
            }
        };
        if saved.users.is_empty() && placed.is_empty() {
            // Only refusals (a key reused for another request): nothing to keep.
            return match tx.rollback().await {
                Ok(()) => Together::Answered(answers),
                Err(failure) => failure.into(),
            };
        }
        let save: [&(dyn ToSql + Sync); 4] = [&saved.users, &saved.keys, &saved.statuses, &saved.bodies];
        if let Err(failure) = tx.commit([(&SAVE_OUTCOMES, &save)]).await {
            return write_failed(failure, batch);
        }
    }
    Together::Answered(answers)
}

/// A transaction not begun yet (nothing sent), or begun by an earlier round trip.
enum Begun {
    Not(PooledConn),
    Tx(Tx),
}

impl Begun {
    /// `steps` in the transaction, beginning it if need be, in one round trip.
    async fn then<const N: usize>(
        self,
        steps: [crate::db::pipeline::Step<'_>; N],
    ) -> Result<(Tx, [Vec<Row>; N]), Failure> {
        match self {
            Begun::Not(conn) => conn.begin(steps).await,
            Begun::Tx(tx) => tx.then(steps).await,
        }
    }
}

/// Each order's answer from its fate; `created` holds the placed ones', in order.
fn answers(fates: Vec<Fate>, created: Vec<CreatedOrder>) -> Vec<Result<Placed, Error>> {
    let mut created = created.into_iter();
    fates
        .into_iter()
        .map(|fate| match fate {
            Fate::Placed => created.next().map(Placed::Created).ok_or_else(|| Error::Internal("missing order".into())),
            Fate::Replayed(stored) => Ok(Placed::Replayed(stored)),
            Fate::Refused(refusal) => Err(refusal),
            Fate::Open => Err(Error::Internal("an order left undecided".into())),
        })
        .collect()
}

/// A failed write (the transaction is rolled back): one order's fault, or the batch's.
fn write_failed(failure: Failure, batch: &[&OrderRequest]) -> Together {
    match (failure, batch) {
        (Failure::Db(error), [_]) if error.code().is_some_and(a_rows_fault) => {
            Together::Answered(vec![Err(refusal_or_failure(Failure::Db(error)))])
        }
        (Failure::Db(error), _) if error.code().is_some_and(a_rows_fault) => Together::OneByOne,
        (failure, _) => failure.into(),
    }
}

/// The keys of a batch, as the statements take them: the keyed orders' positions in the batch
/// and, for each, the user, key and request fingerprint.
struct Keys {
    positions: Vec<usize>,
    users: Vec<i32>,
    keys: Vec<String>,
    fingerprints: Vec<String>,
}

impl Keys {
    fn of(batch: &[&OrderRequest]) -> Keys {
        let mut keys = Keys { positions: Vec::new(), users: Vec::new(), keys: Vec::new(), fingerprints: Vec::new() };
        for (i, request) in batch.iter().enumerate() {
            if let Some(key) = &request.key {
                keys.positions.push(i);
                keys.users.push(request.order.user_id);
                keys.keys.push(key.as_str().to_owned());
                keys.fingerprints.push(request.order.fingerprint());
            }
        }
        keys
    }

    fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Sets the fate of each keyed order from CLAIM_KEYS' and FIND_KEYS' rows: open if its key
    /// is ours now, else replayed or refused.
    fn fates(&self, claimed: &[Row], found: &[Row], fates: &mut [Fate]) -> Result<(), Error> {
        let claimed: HashSet<(i32, &str)> = claimed.iter().map(|row| (row.get(0), row.get(1))).collect();
        let found: HashMap<i64, &Row> = found.iter().map(|row| (row.get(0), row)).collect();
        for (n, &position) in self.positions.iter().enumerate() {
            if claimed.contains(&(self.users[n], self.keys[n].as_str())) {
                continue;
            }
            let row = found
                .get(&(n as i64 + 1))
                .ok_or_else(|| Error::Internal("idempotency key neither claimed nor found".into()))?;
            let same_request: bool = row.get(1);
            let status: Option<i16> = row.get(2);
            let body: Option<String> = row.get(3);
            fates[position] = match (same_request, status, body) {
                (false, _, _) => Fate::Refused(Error::IdempotencyKeyReused),
                (true, Some(status), Some(body)) => Fate::Replayed(StoredOutcome { status: status as u16, body }),
                (true, _, _) => return Err(Error::Internal("committed idempotency key without a response".into())),
            };
        }
        Ok(())
    }

    /// The outcome to store with each key: a claimed key's order's outcome (a 201 or the 4xx
    /// that refused it), or a replayed key's own again.
    fn outcomes(&self, batch: &[&OrderRequest], answers: &[Result<Placed, Error>]) -> Result<Outcomes, Error> {
        let mut saved = Outcomes::default();
        for &position in &self.positions {
            let stored = match &answers[position] {
                Ok(Placed::Created(created)) => stored(CREATED, created)?,
                Ok(Placed::Replayed(stored)) => stored.clone(),
                Err(Error::IdempotencyKeyReused) => continue,
                Err(refusal) if refusal.status().is_client_error() => {
                    let answer = refusal.answer();
                    stored(answer.status.as_u16(), &answer.body)?
                }
                Err(error) => return Err(error.clone()),
            };
            let request = batch[position];
            saved.users.push(request.order.user_id);
            saved.keys.push(request.key.as_ref().expect("a keyed order").as_str().to_owned());
            saved.statuses.push(stored.status as i16);
            saved.bodies.push(stored.body);
        }
        Ok(saved)
    }
}

/// SAVE_OUTCOMES' parameters.
#[derive(Default)]
struct Outcomes {
    users: Vec<i32>,
    keys: Vec<String>,
    statuses: Vec<i16>,
    bodies: Vec<String>,
}

/// WRITE_ORDERS' parameters for the placed orders.
struct Written {
    users: Vec<i32>,
    line_order: Vec<i32>,
    products: Vec<i32>,
    quantities: Vec<i32>,
}

impl Written {
    fn of(placed: &[&NewOrder]) -> Written {
        let mut written = Written {
            users: placed.iter().map(|order| order.user_id).collect(),
            line_order: Vec::new(),
            products: Vec::new(),
            quantities: Vec::new(),
        };
        for (n, order) in placed.iter().enumerate() {
            for line in &order.lines {
                written.line_order.push(n as i32 + 1);
                written.products.push(line.product_id);
                written.quantities.push(line.quantity);
            }
        }
        written
    }
}

/// Whether `order` is placed, taking its stock from `stock`, or why not. The checks come in a
/// fixed order, so an order wrong in several ways always gets the same reason: the user, then
/// each product's existence, then each line's stock.
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

/// The outcome as it is stored: the status and the JSON body it is answered with. The body is
/// the same serialization of the same value that the first answer renders, so a replay is
/// byte for byte the first answer.
fn stored(status: u16, body: &impl Serialize) -> Result<StoredOutcome, Error> {
    let body = serde_json::to_string(body).map_err(|e| Error::Internal(format!("outcome not serializable: {e}")))?;
    Ok(StoredOutcome { status, body })
}

/// A lock or statement timeout (or the request's deadline) while claiming keys: a concurrent
/// request holds one of them and is still running.
fn waited_too_long(code: &SqlState) -> bool {
    *code == SqlState::LOCK_NOT_AVAILABLE || *code == SqlState::QUERY_CANCELED
}

/// A statement refused for what one of its rows holds (a data exception such as a total too
/// large, a constraint, an error raised by a trigger), rather than for the transaction as a
/// whole (a cancellation, a deadlock, the connection): one order's fault.
fn a_rows_fault(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(class, "22" | "23" | "P0")
}

/// An order total beyond `numeric(12,2)` is the request's doing; any other failure is not.
fn refusal_or_failure(error: Failure) -> Error {
    if error.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) {
        Error::invalid("the order total is larger than an order can hold")
    } else {
        Error::from(error)
    }
}
