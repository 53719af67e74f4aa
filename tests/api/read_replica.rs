//! `DATABASE_READ_URL` (issue 13, read scaling): the catalogue reads go to a standby, every
//! other statement (orders, their reads, restocks) to the primary; a standby that cannot serve
//! leaves the catalogue to the primary. Here the "standby" is a second database with its own
//! stock figures, so the answers show which one served.

use std::time::Duration;

use order_api::config::Config;
use serde_json::json;

use crate::common::{TestDatabase, spawn_app_with};

async fn standby_with_stock(product_id: i32, stock: i32) -> TestDatabase {
    let standby = TestDatabase::create().await;
    let config = Config { database_url: standby.url.clone(), ..Config::default() };
    order_api::prepare_database(&config, true).await.expect("migrate and seed the stand-in standby");
    let db = crate::common::connect(&standby.url).await;
    db.execute("UPDATE products SET stock = $2 WHERE id = $1", &[&product_id, &stock]).await.unwrap();
    standby
}

#[tokio::test]
async fn catalogue_reads_go_to_the_read_database_and_orders_to_the_primary() {
    let standby = standby_with_stock(1, 999).await;
    let url = standby.url.clone();
    let app = spawn_app_with(move |config| config.database_read_url = Some(url)).await;

    assert_eq!(app.get("/api/products/1").await.json["stock"], 999);
    let all = app.get("/api/products").await;
    assert_eq!(all.json.as_array().unwrap()[0]["stock"], 999, "{}", all.text);
    assert_eq!(app.get("/api/products?limit=2").await.json.as_array().unwrap()[0]["stock"], 999);

    // Orders, their reads and restocks: the primary.
    let created = app.post_order(&json!({"userId": 1, "items": [{"productId": 1, "quantity": 2}]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let order_id = created.json["orderId"].as_i64().unwrap();
    assert_eq!(app.get(&format!("/api/orders/{order_id}")).await.status, 200);
    let restocked = app.post_json("/api/products/1/restock", &json!({"quantity": 5})).await;
    assert_eq!(restocked.json["stock"], 13, "the restock answers the primary's stock: {}", restocked.text);
    assert_eq!(app.stock(1).await, 13);
    let db = crate::common::connect(&standby.url).await;
    let standby_stock: i32 = db.query_one("SELECT stock FROM products WHERE id = 1", &[]).await.unwrap().get(0);
    assert_eq!(standby_stock, 999, "nothing was written to the read database");
}

#[tokio::test]
async fn catalogue_reads_fall_back_to_the_primary_when_the_read_database_is_down() {
    let app = spawn_app_with(|config| {
        config.database_read_url = Some("postgresql://postgres@127.0.0.1:1/nowhere".into());
        config.connect_timeout = Duration::from_millis(500);
    })
    .await;
    let product = app.get("/api/products/1").await;
    assert_eq!((product.status, &product.json["stock"]), (200, &json!(10)), "{}", product.text);
    assert_eq!(app.get("/api/products").await.status, 200);
}
