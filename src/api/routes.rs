//! The route table: path templates to routes, and (route, method) to the handler, with what
//! the handler needs parsed from the request (path id, query, headers, body).

use std::{net::IpAddr, sync::LazyLock};

use hyper::{Method, Request, body::Incoming, header::AUTHORIZATION};

use super::{
    AppState, Listing,
    access::Credentials,
    events::{self, FeedParams},
    health,
    input::{json_body, query_param},
    openapi, orders, products,
    reply::Reply,
    webhooks,
};
use crate::{
    domain::{IdempotencyKey, parse_path_id},
    error::Error,
};

/// Every resource the service serves. The path template doubles as the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    HealthLive,
    HealthReady,
    Metrics,
    OpenApi,
    Products,
    Product,
    ProductRestock,
    Orders,
    Order,
    OrderCancel,
    OrderStatus,
    OrderEvents,
    Events,
    Webhooks,
    Webhook,
    WebhookRotateSecret,
    WebhookDeliveries,
    WebhookReplay,
}

impl Route {
    pub const ALL: [Route; 19] = [
        Route::Health,
        Route::HealthLive,
        Route::HealthReady,
        Route::Metrics,
        Route::OpenApi,
        Route::Products,
        Route::Product,
        Route::ProductRestock,
        Route::Orders,
        Route::Order,
        Route::OrderCancel,
        Route::OrderStatus,
        Route::OrderEvents,
        Route::Events,
        Route::Webhooks,
        Route::Webhook,
        Route::WebhookRotateSecret,
        Route::WebhookDeliveries,
        Route::WebhookReplay,
    ];

    pub fn template(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::HealthLive => "/health/live",
            Route::HealthReady => "/health/ready",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Products => "/api/products",
            Route::Product => "/api/products/{productId}",
            Route::ProductRestock => "/api/products/{productId}/restock",
            Route::Orders => "/api/orders",
            Route::Order => "/api/orders/{orderId}",
            Route::OrderCancel => "/api/orders/{orderId}/cancel",
            Route::OrderStatus => "/api/orders/{orderId}/status",
            Route::OrderEvents => "/api/orders/{orderId}/events",
            Route::Events => "/api/events",
            Route::Webhooks => "/api/webhooks",
            Route::Webhook => "/api/webhooks/{webhookId}",
            Route::WebhookRotateSecret => "/api/webhooks/{webhookId}/rotate-secret",
            Route::WebhookDeliveries => "/api/webhooks/{webhookId}/deliveries",
            Route::WebhookReplay => "/api/webhooks/{webhookId}/replay",
        }
    }

    /// The methods this route answers: the `Allow` header of a 405. `HEAD` is answered
    /// wherever `GET` is, as HTTP expects (the same headers, no body).
    pub fn allow(self) -> &'static str {
        match self {
            Route::Health
            | Route::HealthLive
            | Route::HealthReady
            | Route::Metrics
            | Route::OpenApi
            | Route::Products
            | Route::Product
            | Route::Order
            | Route::OrderEvents
            | Route::Events
            | Route::WebhookDeliveries => "GET, HEAD",
            Route::Webhooks => "GET, HEAD, POST",
            Route::Webhook => "GET, HEAD, PATCH, DELETE",
            Route::WebhookRotateSecret | Route::WebhookReplay => "POST",
            Route::ProductRestock => "POST",
            Route::Orders => "GET, HEAD, POST",
            Route::OrderCancel | Route::OrderStatus => "PUT",
        }
    }
}

/// Whether `route` answers `method` (its `Allow`); HEAD as GET.
fn route_answers(route: Route, method: &Method) -> bool {
    route.allow().split(", ").any(|allowed| allowed == method.as_str())
}

static ROUTER: LazyLock<matchit::Router<Route>> = LazyLock::new(|| {
    let mut router = matchit::Router::new();
    for route in Route::ALL {
        router.insert(route.template(), route).expect("route templates do not conflict");
    }
    router
});

/// A request's route, with the id its path carries.
#[derive(Debug)]
pub struct Matched {
    pub route: Route,
    /// The raw `{orderId}` or `{productId}` segment, parsed by the route that needs it.
    id: Option<(&'static str, String)>,
}

/// Finds the route of a path: `None` for an unknown path.
pub fn find(path: &str) -> Option<Matched> {
    let matched = ROUTER.at(path).ok()?;
    let id = ["orderId", "productId", "webhookId"]
        .into_iter()
        .find_map(|name| matched.params.get(name).map(|value| (name, value.to_owned())));
    Some(Matched { route: *matched.value, id })
}

/// How much longer than `REQUEST_TIMEOUT_MS` a request may take: a long-poll of the event feed
/// waits as long as it asked (`wait`), and then has the usual time.
pub fn time_allowance(matched: &Matched, query: Option<&str>) -> std::time::Duration {
    match matched.route {
        Route::Events => events::wait_allowance(query_param(query, "wait").and_then(Result::ok).as_deref()),
        _ => std::time::Duration::ZERO,
    }
}

/// Calls the handler for the route and the request's method.
/// `address` is the client's, as the connection shows it.
pub async fn dispatch(
    state: &AppState,
    matched: Matched,
    request: Request<Incoming>,
    address: IpAddr,
) -> Result<Reply, Error> {
    let id = || match &matched.id {
        Some((name, value)) => parse_path_id(value, name),
        None => Err(Error::Internal("route without an id".into())),
    };
    let query = request.uri().query().map(str::to_owned);
    let param = |name: &str| query_param(query.as_deref(), name).transpose();
    let listing = || -> Result<Listing, Error> { Ok(Listing { limit: param("limit")?, after: param("after")? }) };
    let authorization = request.headers().get(AUTHORIZATION).map(|value| value.as_bytes().to_vec());
    let credentials = Credentials { auth: &state.auth, authorization: authorization.as_deref(), address };
    // hyper sends no body in the answer to a HEAD, and keeps the headers of the GET.
    let method = match request.method() {
        &Method::HEAD => Method::GET,
        method => method.clone(),
    };

    // The webhook endpoints are all an operator's: the credentials first, then the handler.
    let webhook_route = matches!(
        matched.route,
        Route::Webhooks | Route::Webhook | Route::WebhookRotateSecret | Route::WebhookDeliveries | Route::WebhookReplay
    );
    if webhook_route && route_answers(matched.route, &method) {
        credentials.operator().await?;
        return match (matched.route, method) {
            (Route::Webhooks, Method::GET) => webhooks::list(state).await,
            (Route::Webhooks, Method::POST) => webhooks::create(state, json_body(request).await?).await,
            (Route::Webhook, Method::GET) => webhooks::get(state, id()?).await,
            (Route::Webhook, Method::PATCH) => {
                let webhook_id = id()?;
                webhooks::change(state, webhook_id, json_body(request).await?).await
            }
            (Route::Webhook, Method::DELETE) => webhooks::delete(state, id()?).await,
            (Route::WebhookRotateSecret, _) => webhooks::rotate_secret(state, id()?).await,
            (Route::WebhookDeliveries, _) => {
                webhooks::deliveries(state, id()?, param("limit")?, param("before")?).await
            }
            (_, _) => {
                let webhook_id = id()?;
                webhooks::replay(state, webhook_id, json_body(request).await?).await
            }
        };
    }

    match (matched.route, method) {
        (Route::Health, Method::GET) => Ok(health::check(state).await),
        (Route::HealthLive, Method::GET) => Ok(health::live()),
        (Route::HealthReady, Method::GET) => Ok(health::ready(state).await),
        (Route::Metrics, Method::GET) => Ok(health::metrics(state)),
        (Route::OpenApi, Method::GET) => Ok(openapi::document()),
        (Route::Products, Method::GET) => products::list(state, listing()?).await,
        (Route::Product, Method::GET) => products::get(state, id()?).await,
        (Route::ProductRestock, Method::POST) => {
            let product_id = id()?;
            credentials.operator().await?;
            products::restock(state, product_id, json_body(request).await?).await
        }
        (Route::Orders, Method::GET) => {
            let query = orders::OrderQuery { user_id: param("userId")?, status: param("status")?, listing: listing()? };
            orders::list(state, credentials, query).await
        }
        (Route::Orders, Method::POST) => {
            let key = match request.headers().get("idempotency-key") {
                Some(value) => Some(IdempotencyKey::parse(value.as_bytes())?),
                None => None,
            };
            orders::create(state, credentials, key, json_body(request).await?).await
        }
        (Route::Order, Method::GET) => orders::get(state, credentials, id()?).await,
        (Route::OrderCancel, Method::PUT) => orders::cancel(state, credentials, id()?).await,
        (Route::OrderEvents, Method::GET) => events::of_order(state, credentials, id()?).await,
        (Route::Events, Method::GET) => {
            let params = FeedParams {
                after: param("after")?,
                limit: param("limit")?,
                types: param("types")?,
                wait: param("wait")?,
            };
            events::feed(state, credentials, params).await
        }
        (Route::OrderStatus, Method::PUT) => {
            let order_id = id()?;
            orders::set_status(state, credentials, order_id, json_body(request).await?).await
        }
        (route, _) => Err(Error::MethodNotAllowed { allow: route.allow() }),
    }
}
