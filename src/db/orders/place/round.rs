//! One transaction that places a batch of orders, as three calls: `read` (claim the keys, lock
//! and read the products and users), `Stock::decide`, and `write` (write the placed orders,
//! store the keys' outcomes, commit). Two round trips, one more for a batch with keys whose
//! product locks must wait (see `read`).

use postgres_types::ToSql;
use tokio_postgres::{Row, error::SqlState};

use super::{
    CreatedOrder, Fate, OrderRequest, Placed, Settings, Settled,
    keys::{CLAIM_KEYS, FIND_KEYS, Keys, RELEASE_KEYS, SAVE_OUTCOMES},
    stock::{EXISTING_PRODUCTS, EXISTING_USERS, Locking, Names, SET_LOCK_PATIENCE, Stock},
    write::{WRITE_ORDERS, Written},
};
use crate::{
    db::{Failure, Pool, PooledConn, Tx, events, pipeline::Step},
    error::Error,
};

/// How one transaction placing a batch ended.
pub(super) enum RoundEnd {
    /// Each order's own outcome, in batch order.
    Answered(Vec<Result<Settled, Error>>),
    /// The transaction failed as a whole (nothing written, or an unknown outcome): the same
    /// answer for every order.
    Failed(Error),
    /// One order's fault failed the transaction (a row the write refused, a key held by a
    /// request still running): place each order in a transaction of its own instead. Never
    /// for a batch of one, which gets the fault as its answer.
    OneByOne,
}

impl From<Failure> for RoundEnd {
    fn from(failure: Failure) -> RoundEnd {
        RoundEnd::Failed(Error::from(failure))
    }
}

impl From<Error> for RoundEnd {
    fn from(error: Error) -> RoundEnd {
        RoundEnd::Failed(error)
    }
}

/// Places `batch` in one transaction; patient, and again skipping if a lock outlasts the
/// patience.
pub(super) async fn place_round(
    pool: &Pool,
    settings: &Settings,
    batch: &[&OrderRequest],
    locking: Locking,
) -> RoundEnd {
    match place_once(pool, settings, batch, locking).await {
        Outcome::Ended(end) => end,
        Outcome::OutOfPatience => match place_once(pool, settings, batch, Locking::Skip).await {
            Outcome::Ended(end) => end,
            Outcome::OutOfPatience => RoundEnd::Failed(Error::Internal("a skipping round ran out of patience".into())),
        },
    }
}

/// How one attempt at a transaction ended.
enum Outcome {
    Ended(RoundEnd),
    /// Patient, a lock (a product's, a key's, or one the write waited for) was not granted
    /// within the patience: nothing was written, and the transaction is rolled back.
    OutOfPatience,
}

impl<T: Into<RoundEnd>> From<T> for Outcome {
    fn from(end: T) -> Outcome {
        Outcome::Ended(end.into())
    }
}

async fn place_once(pool: &Pool, settings: &Settings, batch: &[&OrderRequest], locking: Locking) -> Outcome {
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(error) => return error.into(),
    };
    let mut keys = Keys::of(batch, settings.place.key_retention.as_secs_f64());
    let mut fates: Vec<Fate> = batch.iter().map(|_| Fate::Open).collect();
    let (tx, mut stock) = match read(conn, batch, &mut keys, &mut fates, locking, &settings.patience).await {
        Ok(read) => read,
        Err(outcome) => return outcome,
    };
    if let Some(stock) = &mut stock {
        if locking == Locking::Skip {
            settings.held.saw(stock.held_elsewhere());
        }
        stock.decide(batch.iter().map(|request| &request.order).zip(fates.iter_mut()), locking);
    }
    write(tx, batch, &keys, fates, settings, locking).await
}

/// Step 1 and 2: BEGIN, claim the keys and read what they hold, lock the products and read the
/// stock and the users. One round trip, except for a batch with keys that waits for its
/// locks: it claims first and locks in a second round trip, only the products of the orders
/// its keys left open, so that a lock timeout is told apart from a key held by a request
/// still running (409), and replays take no product lock. `None` stock: no order left open.
/// (Patient, the whole transaction runs with the patience as its `lock_timeout`, and any lock
/// wait that outlasts it, a key's, a product's or one in the write, makes the batch run again
/// skipping, where the other waits get the whole `lock_timeout`.)
async fn read(
    conn: PooledConn,
    batch: &[&OrderRequest],
    keys: &mut Keys,
    fates: &mut [Fate],
    locking: Locking,
    patience: &str,
) -> Result<(Tx, Option<Stock>), Outcome> {
    let claim = keys.claim_params();
    let claims: Vec<Step> =
        if keys.is_empty() { Vec::new() } else { vec![(&CLAIM_KEYS, &claim[..]), (&FIND_KEYS, &claim[..3])] };
    if !keys.is_empty() && locking == Locking::Wait {
        let (tx, rows) = conn.begin(&claims).await.map_err(|failure| claim_failed(failure, batch))?;
        keys.read(&rows[0], &rows[1], fates)?;
        let open = batch.iter().zip(fates.iter()).filter(|(_, fate)| matches!(fate, Fate::Open));
        let names = Names::of(open.map(|(request, _)| &request.order));
        if names.users.is_empty() {
            return Ok((tx, None));
        }
        let (products, users): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) =
            ([&names.products], [&names.users]);
        let (tx, rows) = tx.then(&stock_steps(&products, &users, locking)).await?;
        return Ok((tx, Some(stock_of(&rows)?)));
    }
    // One round trip: [patience,] [claims,] step 2.
    let names = Names::of(batch.iter().map(|request| &request.order));
    let (products, users): ([&(dyn ToSql + Sync); 1], [&(dyn ToSql + Sync); 1]) = ([&names.products], [&names.users]);
    let patience: [&(dyn ToSql + Sync); 1] = [&patience];
    let patient = locking == Locking::Patient;
    let mut steps: Vec<Step> = Vec::with_capacity(6);
    if patient {
        steps.push((&SET_LOCK_PATIENCE, &patience));
    }
    let first_claim = steps.len();
    steps.extend(claims);
    let first_stock = steps.len();
    steps.extend(stock_steps(&products, &users, locking));
    let (tx, rows) = match conn.begin(&steps).await {
        Ok(begun) => begun,
        Err(failure) if patient && out_of_patience(&failure) => return Err(Outcome::OutOfPatience),
        // Otherwise no lock waits but the claims', so a timeout here is a claim's (if any).
        Err(failure) if keys.is_empty() => return Err(failure.into()),
        Err(failure) => return Err(claim_failed(failure, batch).into()),
    };
    if !keys.is_empty() {
        let Some([claimed, found]) = rows.get(first_claim..first_claim + 2) else {
            return Err(Error::Internal("the claims answered the wrong number of statements".into()).into());
        };
        keys.read(claimed, found, fates)?;
    }
    Ok((tx, Some(stock_of(rows.get(first_stock..).unwrap_or_default())?)))
}

/// Step 2's statements, given the product ids (ascending) and the user ids.
fn stock_steps<'a>(
    products: &'a [&'a (dyn ToSql + Sync); 1],
    users: &'a [&'a (dyn ToSql + Sync); 1],
    locking: Locking,
) -> [Step<'a>; 3] {
    [(locking.statement(), products), (&EXISTING_PRODUCTS, products), (&EXISTING_USERS, users)]
}

/// The stock from step 2's three answers.
fn stock_of(rows: &[Vec<Row>]) -> Result<Stock, RoundEnd> {
    match rows {
        [locked, existing, users] => Ok(Stock::read(locked, existing, users)),
        _ => Err(RoundEnd::Failed(Error::Internal("step 2 answered the wrong number of statements".into()))),
    }
}

/// A claim that waited past `lock_timeout` or the deadline: a concurrent request holds one of
/// the keys and is still running. 409 for a batch of one; a larger batch is placed one order
/// per transaction, so that only the order whose key is held gets the 409.
fn claim_failed(failure: Failure, batch: &[&OrderRequest]) -> RoundEnd {
    match (failure.code().is_some_and(waited_too_long), batch) {
        (true, [_]) => RoundEnd::Answered(vec![Err(Error::IdempotencyInProgress)]),
        (true, _) => RoundEnd::OneByOne,
        (false, _) => failure.into(),
    }
}

/// Step 3: write the placed orders, store the keys' outcomes, give back the keys of deferred
/// orders, and commit, in one round trip; or roll back when there is nothing to keep (only
/// refusals and deferred orders).
async fn write(
    tx: Tx,
    batch: &[&OrderRequest],
    keys: &Keys,
    fates: Vec<Fate>,
    settings: &Settings,
    locking: Locking,
) -> Outcome {
    let placed = batch.iter().enumerate().zip(&fates).filter(|(_, fate)| matches!(fate, Fate::Placed));
    let written = Written::of(placed.map(|((position, request), _)| (&request.order, keys.order_id(position))));
    let outcomes = keys.outcomes(&fates, settings.place.store_refusal);
    let write = written.params();
    let save: [&(dyn ToSql + Sync); 4] = [&outcomes.users, &outcomes.keys, &outcomes.statuses, &outcomes.bodies];
    let release: [&(dyn ToSql + Sync); 2] = [&outcomes.release_users, &outcomes.release_keys];
    let mut steps: Vec<Step> = Vec::with_capacity(4);
    if written.len() > 0 {
        steps.push((&WRITE_ORDERS, &write));
    }
    if !outcomes.users.is_empty() {
        steps.push((&SAVE_OUTCOMES, &save));
    }
    // Keys of deferred orders are given back by a DELETE only beside something to commit;
    // else the rollback gives them back. (A batch that found every product held by the other
    // lane's batch defers all its orders: with keys, most batches of `make bench`'s keyed
    // scenario did, and each committed a DELETE of the keys it had just claimed.)
    if !outcomes.release_users.is_empty() && !steps.is_empty() {
        steps.push((&RELEASE_KEYS, &release));
    }
    if steps.is_empty() {
        return match tx.rollback().await {
            Ok(()) => RoundEnd::Answered(answers(fates, batch, &[])).into(),
            Err(failure) => failure.into(),
        };
    }
    let created = match tx.commit(&steps).await {
        Ok(mut rows) if written.len() > 0 => rows.swap_remove(0),
        Ok(_) => Vec::new(),
        // Refused, the statement rolled the transaction back: nothing was written.
        Err(failure) if locking == Locking::Patient && out_of_patience(&failure) => return Outcome::OutOfPatience,
        Err(failure) => return write_failed(failure, batch).into(),
    };
    if created.len() != written.len() {
        return RoundEnd::Failed(Error::Internal(format!("{} orders written of {}", created.len(), written.len())))
            .into();
    }
    if !created.is_empty() {
        settings.announcer.committed();
    }
    events::count_written("order.created", created.len() as u64);
    events::count_written("product.sold_out", created.first().map_or(0, |row| row.get::<_, i64>(2) as u64));
    RoundEnd::Answered(answers(fates, batch, &created)).into()
}

/// A lock wait ended by the patience (`lock_timeout`); not a cancelled statement, which is the
/// deadline's or `statement_timeout`'s.
fn out_of_patience(failure: &Failure) -> bool {
    matches!(failure, Failure::Db(_)) && failure.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

/// Each order's answer from its fate; `created` holds WRITE_ORDERS' rows for the placed ones,
/// in order.
fn answers(fates: Vec<Fate>, batch: &[&OrderRequest], created: &[Row]) -> Vec<Result<Settled, Error>> {
    let mut created = created.iter();
    fates
        .into_iter()
        .zip(batch)
        .map(|(fate, request)| match fate {
            Fate::Placed => created
                .next()
                .map(|row| Settled::Placed(Placed::Created(CreatedOrder::new(row.get(0), row.get(1)))))
                .ok_or_else(|| Error::Internal("a placed order was not written".into())),
            Fate::Replayed(replay) => Ok(Settled::Placed(Placed::Replayed(replay))),
            Fate::Deferred => Ok(Settled::Deferred((*request).clone())),
            Fate::Refused(refusal) => Err(refusal),
            Fate::Open => Err(Error::Internal("an order left undecided".into())),
        })
        .collect()
}

/// A failed write (the transaction is rolled back): one order's fault, or the batch's.
fn write_failed(failure: Failure, batch: &[&OrderRequest]) -> RoundEnd {
    match (failure, batch) {
        (Failure::Db(error), [_]) if error.code().is_some_and(a_rows_fault) => {
            RoundEnd::Answered(vec![Err(refusal_or_failure(Failure::Db(error)))])
        }
        (Failure::Db(error), _) if error.code().is_some_and(a_rows_fault) => RoundEnd::OneByOne,
        (failure, _) => failure.into(),
    }
}

/// A lock or statement timeout (or the request's deadline) while claiming keys.
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
