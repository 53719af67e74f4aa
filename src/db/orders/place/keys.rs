//! Step 1 of a keyed batch, and its part of step 3: claiming each idempotency key, reading what
//! a key already holds, and storing each key's outcome with the orders.
//!
//! A claimed key and its outcome commit together, so other transactions see a key either
//! absent or with its final outcome. A concurrent request holding the same key makes the claim
//! wait on the key's unique index until its transaction ends; then the key is either stored
//! (replayed here) or free again (claimed here). Keys are claimed in (user, key) order, before
//! any product lock, so claims cannot deadlock.

use std::collections::HashMap;

use postgres_types::{ToSql, Type};
use tokio_postgres::Row;

use super::{CreatedOrder, Fate, OrderRequest, Replay, StoredAnswer};
use crate::{db::Sql, error::Error, money::Money};

/// Claims keys: inserts each, or takes over an expired one; returns the keys now ours, each
/// with the id drawn for its order (ids drawn in arrival order; the order is written with it
/// if placed, and a refusal gives it up). $1 users, $2 keys, $3 request fingerprints (same
/// length, no (user, key) twice), $4 retention in seconds. Inserted in (user, key) order, the
/// order every claim takes them in.
pub(super) const CLAIM_KEYS: Sql = Sql {
    params: &[
        Type::INT4_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT_ARRAY,
        Type::FLOAT8,
    ],
    text: "
    WITH claimed AS (
        INSERT INTO idempotency_keys AS k (user_id, key, request_hash, order_id)
        SELECT c.user_id, c.key, md5(c.fingerprint), c.order_id
        FROM (SELECT c.*, nextval('orders_id_seq') AS order_id
              FROM (SELECT * FROM unnest($1::int4[], $2::text[], $3::text[]) WITH ORDINALITY AS c (user_id, key, fingerprint, n)
                    ORDER BY n) AS c) AS c
        ORDER BY c.user_id, c.key
        ON CONFLICT (user_id, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, response_status = NULL, response_body = NULL,
                order_id = EXCLUDED.order_id, created_at = now()
            WHERE k.created_at < now() - make_interval(secs => $4)
        RETURNING k.user_id, k.key, k.order_id
    )
    SELECT user_id, key, order_id FROM claimed",
};

/// Each key as it stands after the claim (a statement of its own, so that it sees what a
/// transaction the claim waited for committed): its position in $1..$3 (1-based), whether it
/// was made for the same request, and its outcome: the order it created (with its total), or
/// the refusal's status and body. (For our own claim: the id drawn, no order yet; `read`
/// tells it by CLAIM_KEYS' rows.) Same parameters as CLAIM_KEYS.
pub(super) const FIND_KEYS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::TEXT_ARRAY, Type::TEXT_ARRAY],
    text: "
    SELECT c.n, k.request_hash = md5(c.fingerprint), k.order_id, o.total_amount, k.response_status, k.response_body
    FROM unnest($1::int4[], $2::text[], $3::text[]) WITH ORDINALITY AS c (user_id, key, fingerprint, n)
    JOIN idempotency_keys AS k ON k.user_id = c.user_id AND k.key = c.key
    LEFT JOIN orders AS o ON o.id = k.order_id",
};

/// Stores the outcome of refused orders' keys (giving up the order id drawn), and writes
/// replayed keys again unchanged (NULL status and body), so that the commit waits for the
/// synchronous standby like any write's (a replay never promises more than the first answer:
/// see `place`). $1 users, $2 keys, $3 statuses, $4 bodies. Keys of placed orders hold their
/// order since the claim.
pub(super) const SAVE_OUTCOMES: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::TEXT_ARRAY, Type::INT2_ARRAY, Type::TEXT_ARRAY],
    text: "
    UPDATE idempotency_keys AS k
    SET response_status = coalesce(s.status, k.response_status), response_body = coalesce(s.body, k.response_body),
        order_id = CASE WHEN s.status IS NULL THEN k.order_id END
    FROM unnest($1::int4[], $2::text[], $3::int2[], $4::text[]) AS s (user_id, key, status, body)
    WHERE k.user_id = s.user_id AND k.key = s.key",
};

/// Gives back the keys claimed for orders deferred to another transaction (see `place`), so
/// that a claim never commits without its outcome. $1 users, $2 keys.
pub(super) const RELEASE_KEYS: Sql = Sql {
    params: &[Type::INT4_ARRAY, Type::TEXT_ARRAY],
    text: "
    DELETE FROM idempotency_keys AS k
    USING unnest($1::int4[], $2::text[]) AS r (user_id, key)
    WHERE k.user_id = r.user_id AND k.key = r.key",
};

/// The keys of a batch, as the statements take them: the keyed orders' positions in the batch
/// and, for each, the user, key and request fingerprint.
pub(super) struct Keys {
    positions: Vec<usize>,
    keys: Vec<String>,
    fingerprints: Vec<String>,
    users: Vec<i32>,
    retention_secs: f64,
    /// Filled by `read`: the keys claimed by this transaction (as opposed to found holding an
    /// outcome), by position in the batch, with the order id drawn for each.
    claimed: HashMap<usize, i64>,
}

impl Keys {
    pub(super) fn of(batch: &[&OrderRequest], retention_secs: f64) -> Keys {
        let mut keys = Keys {
            positions: Vec::new(),
            keys: Vec::new(),
            fingerprints: Vec::new(),
            users: Vec::new(),
            retention_secs,
            claimed: HashMap::new(),
        };
        for (i, request) in batch.iter().enumerate() {
            if let Some(key) = &request.key {
                keys.positions.push(i);
                keys.keys.push(key.as_str().to_owned());
                keys.fingerprints.push(request.order.fingerprint());
                keys.users.push(request.order.user_id);
            }
        }
        keys
    }

    pub(super) fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// CLAIM_KEYS' parameters (FIND_KEYS takes the first three).
    pub(super) fn claim_params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.users, &self.keys, &self.fingerprints, &self.retention_secs]
    }

    /// Sets the fate of each keyed order from CLAIM_KEYS' and FIND_KEYS' rows: left open if
    /// its key is ours now, else replayed or refused.
    pub(super) fn read(&mut self, claimed: &[Row], found: &[Row], fates: &mut [Fate]) -> Result<(), Error> {
        let claimed: HashMap<(i32, &str), i64> =
            claimed.iter().map(|row| ((row.get(0), row.get(1)), row.get(2))).collect();
        let found: HashMap<i64, &Row> = found.iter().map(|row| (row.get(0), row)).collect();
        for (n, &position) in self.positions.iter().enumerate() {
            if let Some(&order_id) = claimed.get(&(self.users[n], self.keys[n].as_str())) {
                self.claimed.insert(position, order_id);
                continue;
            }
            let row = found
                .get(&(n as i64 + 1))
                .ok_or_else(|| Error::Internal("idempotency key neither claimed nor found".into()))?;
            let same_request: bool = row.get(1);
            let (order_id, total_amount): (Option<i64>, Option<Money>) = (row.get(2), row.get(3));
            let (status, body): (Option<i16>, Option<String>) = (row.get(4), row.get(5));
            fates[position] = match (same_request, order_id, total_amount, status, body) {
                (false, ..) => Fate::Refused(Error::IdempotencyKeyReused),
                (true, Some(order_id), Some(total_amount), _, _) => {
                    Fate::Replayed(Replay::Created(CreatedOrder::new(order_id, total_amount)))
                }
                (true, None, _, Some(status), Some(body)) => {
                    Fate::Replayed(Replay::Answered(StoredAnswer { status: status as u16, body }))
                }
                _ => return Err(Error::Internal("committed idempotency key without an outcome".into())),
            };
        }
        Ok(())
    }

    /// The order id drawn with the key claimed for the order at `position`, if any.
    pub(super) fn order_id(&self, position: usize) -> Option<i64> {
        self.claimed.get(&position).copied()
    }

    /// What step 3 does with the keys, from each order's fate: SAVE_OUTCOMES' and
    /// RELEASE_KEYS' parameters. A placed order's key holds its order since the claim; a key
    /// reused for another request is not ours to touch.
    pub(super) fn outcomes(&self, fates: &[Fate], store_refusal: fn(&Error) -> StoredAnswer) -> Outcomes {
        let mut outcomes = Outcomes::default();
        for (n, &position) in self.positions.iter().enumerate() {
            let (user, key) = (self.users[n], self.keys[n].clone());
            match &fates[position] {
                Fate::Refused(Error::IdempotencyKeyReused) | Fate::Placed | Fate::Open => {}
                Fate::Refused(refusal) => {
                    let answer = store_refusal(refusal);
                    outcomes.save(user, key, Some(answer.status as i16), Some(answer.body));
                }
                Fate::Replayed(_) => outcomes.save(user, key, None, None),
                Fate::Deferred if self.claimed.contains_key(&position) => {
                    outcomes.release_users.push(user);
                    outcomes.release_keys.push(key);
                }
                Fate::Deferred => {}
            }
        }
        outcomes
    }
}

/// SAVE_OUTCOMES' and RELEASE_KEYS' parameters.
#[derive(Default)]
pub(super) struct Outcomes {
    pub users: Vec<i32>,
    pub keys: Vec<String>,
    pub statuses: Vec<Option<i16>>,
    pub bodies: Vec<Option<String>>,
    pub release_users: Vec<i32>,
    pub release_keys: Vec<String>,
}

impl Outcomes {
    fn save(&mut self, user: i32, key: String, status: Option<i16>, body: Option<String>) {
        self.users.push(user);
        self.keys.push(key);
        self.statuses.push(status);
        self.bodies.push(body);
    }
}
