//! What leaves the service: order events delivered to the operators' webhook endpoints. The
//! events are written by each change in its own transaction and read through `db` (the outbox:
//! `db::events`, `db::webhooks`); this is the outbound side, and the only place that calls out
//! over HTTP for them.
//!
//! - `dispatch.rs`: the loop each replica runs: route new events to deliveries, claim those
//!   due, attempt them, record the outcomes in batches.
//! - `deliver.rs`: one attempt; `sign.rs`: Standard Webhooks signatures; `schedule.rs`: when
//!   a failed delivery is tried again; `guard.rs`: which destinations are refused.

mod deliver;
mod dispatch;
pub mod guard;
pub mod schedule;
pub mod sign;

pub use deliver::{MAX_ANSWER_BYTES, SendSettings};
pub use dispatch::{DispatchSettings, Dispatcher};

/// A number in [0, 1) from the system's random generator (jitter, lease tokens need no more).
fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // The system's generator does not fail on Linux once seeded; a zero is harmless here.
    let _ = ring::rand::SystemRandom::new().fill(&mut bytes);
    u64::from_le_bytes(bytes)
}
