//! The typed values the service works with, parsed at the edge: once a request body has
//! become a `NewOrder`, every id and quantity in it is known to be a positive `int4`, the
//! lines are few and name distinct products, and no later code checks any of that again.
//! One file per thing parsed.

mod idempotency_key;
mod ids;
mod order;
mod page;
mod product;
mod webhook;

pub use idempotency_key::{IdempotencyKey, MAX_IDEMPOTENCY_KEY_LEN};
pub use ids::{parse_path_id, positive_int4, positive_int4_in_query};
pub use order::{MAX_ORDER_LINES, NewOrder, OrderLine, OrderStatus, parse_status_change};
pub use page::{DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT, Page};
pub use product::parse_restock;
pub use webhook::{EVENT_TYPES, NewWebhook, Scheme, WebhookChange, WebhookUrl};
