//! One file per resource: each function takes parsed input, calls `db`, and renders the
//! response. No SQL here, no socket handling.

pub mod health;
pub mod orders;
pub mod products;
