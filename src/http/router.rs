//! The route table: path templates to routes, and (route, method) to the api function.

use std::sync::LazyLock;

use hyper::{Method, Request, body::Incoming};

use super::{
    request::{json_body, query_param},
    response::Reply,
};
use crate::{
    AppState,
    api::{self, Listing, orders::OrderQuery},
    domain::{IdempotencyKey, parse_path_id},
    error::Error,
};

/// Every resource the service serves. The path template doubles as the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    OpenApi,
    Products,
    Product,
    ProductRestock,
    Orders,
    Order,
    OrderCancel,
    OrderStatus,
}

impl Route {
    pub const ALL: [Route; 10] = [
        Route::Health,
        Route::Metrics,
        Route::OpenApi,
        Route::Products,
        Route::Product,
        Route::ProductRestock,
        Route::Orders,
        Route::Order,
        Route::OrderCancel,
        Route::OrderStatus,
    ];

    pub fn template(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Products => "/api/products",
            Route::Product => "/api/products/{productId}",
            Route::ProductRestock => "/api/products/{productId}/restock",
            Route::Orders => "/api/orders",
            Route::Order => "/api/orders/{orderId}",
            Route::OrderCancel => "/api/orders/{orderId}/cancel",
            Route::OrderStatus => "/api/orders/{orderId}/status",
        }
    }

    /// The methods this route answers: the `Allow` header of a 405.
    pub fn allow(self) -> &'static str {
        match self {
            Route::Health | Route::Metrics | Route::OpenApi | Route::Products | Route::Product | Route::Order => "GET",
            Route::ProductRestock => "POST",
            Route::Orders => "GET, POST",
            Route::OrderCancel | Route::OrderStatus => "PUT",
        }
    }
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
    let id = ["orderId", "productId"]
        .into_iter()
        .find_map(|name| matched.params.get(name).map(|value| (name, value.to_owned())));
    Some(Matched { route: *matched.value, id })
}

/// Calls the api function for the route and the request's method.
pub async fn dispatch(state: &AppState, matched: Matched, request: Request<Incoming>) -> Result<Reply, Error> {
    let id = || match &matched.id {
        Some((name, value)) => parse_path_id(value, name),
        None => Err(Error::Internal("route without an id".into())),
    };
    let query = request.uri().query().map(str::to_owned);
    let param = |name: &str| query_param(query.as_deref(), name).transpose();
    let listing = || -> Result<Listing, Error> { Ok(Listing { limit: param("limit")?, after: param("after")? }) };

    match (matched.route, request.method()) {
        (Route::Health, &Method::GET) => Ok(api::health::check(state).await),
        (Route::Metrics, &Method::GET) => Ok(api::health::metrics(state)),
        (Route::OpenApi, &Method::GET) => Ok(api::openapi::document()),
        (Route::Products, &Method::GET) => api::products::list(state, listing()?).await,
        (Route::Product, &Method::GET) => api::products::get(state, id()?).await,
        (Route::ProductRestock, &Method::POST) => {
            let product_id = id()?;
            api::products::restock(state, product_id, json_body(request).await?).await
        }
        (Route::Orders, &Method::GET) => {
            let query = OrderQuery { user_id: param("userId")?, status: param("status")?, listing: listing()? };
            api::orders::list(state, query).await
        }
        (Route::Orders, &Method::POST) => {
            let key = match request.headers().get("idempotency-key") {
                Some(value) => Some(IdempotencyKey::parse(value.as_bytes())?),
                None => None,
            };
            api::orders::create(state, key, json_body(request).await?).await
        }
        (Route::Order, &Method::GET) => api::orders::get(state, id()?).await,
        (Route::OrderCancel, &Method::PUT) => api::orders::cancel(state, id()?).await,
        (Route::OrderStatus, &Method::PUT) => {
            let order_id = id()?;
            api::orders::set_status(state, order_id, json_body(request).await?).await
        }
        (route, _) => Err(Error::MethodNotAllowed { allow: route.allow() }),
    }
}
