//! The route table: path templates to routes, and (route, method) to the api function.

use std::sync::LazyLock;

use hyper::{Method, Request, body::Incoming};

use super::{request::json_body, response::Reply};
use crate::{AppState, api, domain::parse_path_id, error::Error};

/// Every resource the service serves. The path template doubles as the metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Metrics,
    Products,
    Orders,
    Order,
    OrderCancel,
}

impl Route {
    const ALL: [Route; 6] =
        [Route::Health, Route::Metrics, Route::Products, Route::Orders, Route::Order, Route::OrderCancel];

    pub fn template(self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::Metrics => "/metrics",
            Route::Products => "/api/products",
            Route::Orders => "/api/orders",
            Route::Order => "/api/orders/{orderId}",
            Route::OrderCancel => "/api/orders/{orderId}/cancel",
        }
    }

    /// The `Allow` header of a 405 on this route.
    fn allow(self) -> &'static str {
        match self {
            Route::Health | Route::Metrics | Route::Products | Route::Order => "GET",
            Route::Orders => "POST",
            Route::OrderCancel => "PUT",
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

/// A request's route, with the path parameter it carries.
#[derive(Debug)]
pub struct Matched {
    pub route: Route,
    /// The raw `{orderId}` segment, parsed by the route that needs it.
    order_id: Option<String>,
}

/// Finds the route of a path: `None` for an unknown path.
pub fn find(path: &str) -> Option<Matched> {
    let matched = ROUTER.at(path).ok()?;
    Some(Matched { route: *matched.value, order_id: matched.params.get("orderId").map(str::to_owned) })
}

/// Calls the api function for the route and the request's method.
pub async fn dispatch(state: &AppState, matched: Matched, request: Request<Incoming>) -> Result<Reply, Error> {
    let order_id = || parse_path_id(matched.order_id.as_deref().unwrap_or(""), "orderId");
    match (matched.route, request.method()) {
        (Route::Health, &Method::GET) => Ok(api::health::check(state).await),
        (Route::Metrics, &Method::GET) => Ok(api::health::metrics(state)),
        (Route::Products, &Method::GET) => api::products::list(state).await,
        (Route::Orders, &Method::POST) => api::orders::create(state, json_body(request).await?).await,
        (Route::Order, &Method::GET) => api::orders::get(state, order_id()?).await,
        (Route::OrderCancel, &Method::PUT) => api::orders::cancel(state, order_id()?).await,
        (route, _) => Err(Error::MethodNotAllowed { allow: route.allow() }),
    }
}
