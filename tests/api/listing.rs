//! Reading products and orders: one product, pages of products and orders with keyset
//! pagination (stable while orders are inserted), and the unpaginated listing of old clients.

use serde_json::{Value, json};

use order_api::config::Config;

use crate::common::{self, TestApp, private_pg::PrivatePostgres, spawn_app, spawn_app_at};

/// `GET /api/products/{id}` answers the product; unknown ids 404, malformed ones 400.
#[tokio::test]
async fn one_product_by_id() {
    let app = spawn_app().await;
    let reply = app.get("/api/products/3").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text, r#"{"id":3,"name":"Keyboard","price":1500.00,"stock":20}"#);
    let missing = app.get("/api/products/99").await;
    missing.assert_error(404, "PRODUCT_NOT_FOUND");
    assert_eq!(missing.json["productId"], 99);
    app.get("/api/products/3000000000").await.assert_error(404, "PRODUCT_NOT_FOUND");
    for bad in ["0", "-2", "abc", "1.5"] {
        app.get(&format!("/api/products/{bad}")).await.assert_error(400, "INVALID_REQUEST");
    }
}

/// Follows `Link: <...>; rel="next"` from `first` to the end; returns every row seen and
/// the number of pages.
async fn follow_pages(app: &TestApp, first: &str) -> (Vec<Value>, usize) {
    let mut rows = Vec::new();
    let mut pages = 0;
    let mut next = Some(first.to_owned());
    while let Some(path) = next {
        let reply = app.get(&path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text);
        rows.extend(reply.json.as_array().unwrap().iter().cloned());
        pages += 1;
        next = reply.header("link").map(|link| {
            let target = link.strip_prefix('<').and_then(|l| l.split_once(">; rel=\"next\"")).expect(link).0;
            target.to_owned()
        });
        assert!(pages < 1000, "pagination does not end");
    }
    (rows, pages)
}

/// Without parameters the catalogue is one array (as before); with `limit` it comes in
/// pages linked by `Link` headers that together give the same array.
#[tokio::test]
async fn products_page_through_the_same_catalogue() {
    let app = spawn_app().await;
    let everything = app.get("/api/products").await;
    assert!(everything.header("link").is_none());
    let first = app.get("/api/products?limit=2").await;
    assert_eq!(first.header("link"), Some(r#"</api/products?limit=2&after=2>; rel="next""#));
    let (rows, pages) = follow_pages(&app, "/api/products?limit=2").await;
    assert_eq!(Value::Array(rows), everything.json);
    assert_eq!(pages, 3);
    let after = app.get("/api/products?after=3").await;
    let ids: Vec<i64> = after.json.as_array().unwrap().iter().map(|p| p["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![4, 5]);
}

/// Out-of-range or malformed paging parameters are 400, not clamped.
#[tokio::test]
async fn paging_parameters_are_validated() {
    let app = spawn_app().await;
    for query in ["limit=0", "limit=101", "limit=-1", "limit=ten", "after=-1", "after=x", "limit=", "after=1e2"] {
        app.get(&format!("/api/products?{query}")).await.assert_error(400, "INVALID_REQUEST");
        app.get(&format!("/api/orders?{query}")).await.assert_error(400, "INVALID_REQUEST");
    }
    for query in ["userId=0", "userId=abc", "userId=2147483648", "status=lost", "status=SHIPPED"] {
        app.get(&format!("/api/orders?{query}")).await.assert_error(400, "INVALID_REQUEST");
    }
}

/// The order ids of a page of `GET /api/orders`, in order.
fn ids_of(reply: &common::Reply) -> Vec<i64> {
    reply.json.as_array().unwrap().iter().map(|o| o["orderId"].as_i64().unwrap()).collect()
}

/// Orders list by id, filtered by user and by status, with the summary shape.
#[tokio::test]
async fn orders_list_filtered_by_user_and_status() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for user_id in [1, 2, 1, 2, 1] {
        let reply = app.post_order(&json!({"userId": user_id, "items": [{"productId": 2, "quantity": 1}]})).await;
        ids.push(reply.json["orderId"].as_i64().unwrap());
    }
    app.set_status(ids[2], "shipped").await;
    app.cancel(ids[4]).await;

    let all = app.get("/api/orders").await;
    assert_eq!(all.json.as_array().unwrap().len(), 5);
    let first = &all.json[0];
    assert_eq!(first["orderId"], ids[0]);
    assert_eq!(first["userId"], 1);
    assert_eq!(first["status"], "processing");
    assert!(all.text.contains(r#""totalAmount":500.00,"#));
    assert!(first["createdAt"].as_str().unwrap().ends_with('Z'));

    assert_eq!(ids_of(&app.get("/api/orders?userId=1").await), vec![ids[0], ids[2], ids[4]]);
    assert_eq!(ids_of(&app.get("/api/orders?userId=1&status=processing").await), vec![ids[0]]);
    assert_eq!(ids_of(&app.get("/api/orders?status=cancelled").await), vec![ids[4]]);
    assert_eq!(ids_of(&app.get("/api/orders?userId=2&status=shipped").await), Vec::<i64>::new());
    let page = app.get("/api/orders?userId=1&limit=2").await;
    assert_eq!(page.header("link").unwrap(), format!(r#"</api/orders?userId=1&limit=2&after={}>; rel="next""#, ids[2]));
}

/// Paging through orders while new ones are inserted concurrently: every order that existed
/// before is seen exactly once, ids only grow, and nothing is skipped or repeated.
#[tokio::test]
async fn order_pages_are_stable_under_concurrent_inserts() {
    let app = &spawn_app().await;
    app.restock(2, 1000).await;
    let mut existing = Vec::new();
    for _ in 0..30 {
        existing.push(app.order(2, 1).await);
    }
    let inserting = async {
        for _ in 0..40 {
            app.order(2, 1).await;
        }
    };
    let paging = follow_pages(app, "/api/orders?limit=7");
    let ((rows, _pages), ()) = tokio::join!(paging, inserting);

    let seen: Vec<i64> = rows.iter().map(|o| o["orderId"].as_i64().unwrap()).collect();
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "ids must strictly increase: {seen:?}");
    for id in &existing {
        assert_eq!(seen.iter().filter(|s| *s == id).count(), 1, "order {id} seen once");
    }
    app.assert_invariants().await;
}

/// Concurrent catalogue reads share queries: 200 simultaneous reads through a single pooled
/// connection all succeed with the same catalogue, in fewer statements than reads (a read
/// joins a query not yet sent instead of queueing for the connection). PostgreSQL's own
/// count of the statements it ran (`pg_stat_statements`, on a private server) shows it.
#[tokio::test]
async fn concurrent_catalogue_reads_share_one_query() {
    let pg = PrivatePostgres::start_counting_statements().await;
    pg.execute("CREATE DATABASE shop").await;
    let config = Config { database_url: pg.url("shop"), port: 0, pool_size: 1, ..Config::default() };
    order_api::prepare_database(&config, true).await.expect("migrate and seed");
    let app = spawn_app_at(config).await;
    assert_eq!(app.get("/api/products").await.status, 200);

    let before = pg.statements_run("shop").await;
    let replies = futures::future::join_all((0..200).map(|_| app.get("/api/products"))).await;
    let statements = pg.statements_run("shop").await - before;
    let failed: Vec<_> = replies.iter().filter(|r| r.status != 200).map(|r| r.text.clone()).collect();
    assert!(failed.is_empty(), "{} of 200 failed: {:?}", failed.len(), failed.first());
    assert!(replies.iter().all(|r| r.text == replies[0].text));
    assert!(statements < 200, "200 catalogue reads took {statements} statements: none shared");
    println!("200 concurrent catalogue reads in {statements} statements");
}

/// A shared read never answers from before the request, nor from the future. 20 buyers each
/// order one Mouse (stock 50) and then read the catalogue, while 10 readers read it over and
/// over. Every event gets a number from one counter, in the order the test saw it happen.
/// A read that started after k orders were acknowledged must show at most 50 - k (it may not
/// reuse a query that began before those orders committed); a read answered before n orders
/// were even sent must show at least 50 - n. When both counts agree the stock is exact.
#[tokio::test]
async fn a_shared_catalogue_read_sees_every_order_acknowledged_before_it_started() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    const BUYERS: usize = 20;
    let app = &spawn_app().await;
    let clock = &AtomicUsize::new(0);
    let tick = || clock.fetch_add(1, SeqCst);
    let mouse_stock = |catalogue: &common::Reply| -> i64 {
        let products = catalogue.json.as_array().unwrap_or_else(|| panic!("{}", catalogue.text));
        products.iter().find(|p| p["id"] == 2).and_then(|p| p["stock"].as_i64()).expect("product 2 listed")
    };
    // (started, answered, stock) of every read; (sent, acknowledged) of every order.
    let read = || async move {
        let started = tick();
        let catalogue = app.get("/api/products").await;
        let answered = tick();
        assert_eq!(catalogue.status, 200, "{}", catalogue.text);
        (started, answered, mouse_stock(&catalogue))
    };
    let buyers = futures::future::join_all((0..BUYERS).map(|_| async move {
        let sent = tick();
        app.order(2, 1).await;
        let acknowledged = tick();
        ((sent, acknowledged), read().await)
    }));
    let readers = futures::future::join_all((0..10).map(|_| async move {
        let mut reads = Vec::new();
        for _ in 0..10 {
            reads.push(read().await);
        }
        reads
    }));
    let (bought, background) = tokio::join!(buyers, readers);

    let orders: Vec<(usize, usize)> = bought.iter().map(|(order, _)| *order).collect();
    let reads: Vec<(usize, usize, i64)> =
        bought.iter().map(|(_, read)| *read).chain(background.into_iter().flatten()).collect();
    let mut constrained = 0;
    for &(started, answered, stock) in &reads {
        let acknowledged_before = orders.iter().filter(|(_, acknowledged)| *acknowledged < started).count() as i64;
        let sent_before = orders.iter().filter(|(sent, _)| *sent < answered).count() as i64;
        assert!(
            (50 - sent_before..=50 - acknowledged_before).contains(&stock),
            "a read (events {started}..{answered}) showed stock {stock}: {acknowledged_before} orders were \
             acknowledged before it started and {sent_before} sent before it was answered"
        );
        constrained += usize::from(acknowledged_before > 0);
    }
    // Each buyer's own read follows its acknowledged order; the background adds more.
    assert!(constrained >= BUYERS, "only {constrained} reads started after an acknowledged order");
    assert_eq!(mouse_stock(&app.get("/api/products").await), 50 - BUYERS as i64);
}

/// Each listing uses the index of its filter, also where PostgreSQL would plan its statement
/// without the values: a prepared statement switches to such a generic plan after five
/// executions when the estimates say it is no dearer, and for optional filters
/// (`$1 IS NULL OR user_id = $1`) that plan walks the whole table in id order. Here every
/// connection of the server is set to plan generically from the start; index use is read
/// from PostgreSQL's statistics, which the server's connections flush when idle (within
/// about 10 s).
#[tokio::test]
async fn order_listings_use_the_index_of_their_filter_even_with_generic_plans() {
    // Every connection of the server plans generically from its first statement on.
    let app = common::spawn_app_with(|config| {
        config.database_url.push_str("?options=-c%20plan_cache_mode%3Dforce_generic_plan");
    })
    .await;
    app.db
        .batch_execute(
            "INSERT INTO orders (user_id, total_amount) SELECT 2, 1 FROM generate_series(1, 100000); ANALYZE orders;",
        )
        .await
        .unwrap();
    let mine = app.order(2, 1).await;
    app.cancel(mine).await;
    let index_scans = || async {
        let rows = app
            .db
            .query(
                "SELECT indexrelname::text, idx_scan FROM pg_stat_user_indexes
                 WHERE indexrelname IN ('orders_status_id_idx', 'orders_user_id_idx')
                 ORDER BY indexrelname",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|row| row.get::<_, i64>(1)).collect::<Vec<_>>()
    };
    let before = index_scans().await;
    assert_eq!(before.len(), 2, "both indexes exist (else the check below has nothing to compare)");

    const LISTINGS: i64 = 10;
    for _ in 0..LISTINGS {
        assert_eq!(ids_of(&app.get("/api/orders?userId=1").await), vec![mine]);
        assert_eq!(ids_of(&app.get("/api/orders?status=cancelled").await), vec![mine]);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut scans = vec![0, 0];
    while scans.iter().any(|n| *n < LISTINGS) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        scans = index_scans().await.iter().zip(&before).map(|(now, then)| now - then).collect();
    }
    assert!(
        scans.iter().all(|n| *n >= LISTINGS),
        "index scans (status, user) for {LISTINGS} listings each: {scans:?}; a plan walked the table"
    );
}
