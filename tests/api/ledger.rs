//! The inventory ledger: every stock change is a movement written in the same transaction,
//! so that for every product stock = sum of its movements, and each cancellation restored
//! each line exactly once. Restocking is how operators add stock.

use futures::future::join_all;
use serde_json::json;

use crate::common::{self, spawn_app};

/// A fresh database's ledger holds the seeded stock as opening balances.
#[tokio::test]
async fn the_seed_opens_the_ledger() {
    let app = spawn_app().await;
    for (product_id, seeded) in common::SEED_STOCK {
        assert_eq!(app.movements(product_id, Some("seed")).await, i64::from(seeded));
    }
    app.assert_invariants().await;
}

/// Restocking adds stock, answers the product as it is now, and is recorded.
#[tokio::test]
async fn restocking_adds_stock_with_a_movement() {
    let app = spawn_app().await;
    let reply = app.post_json("/api/products/5/restock", &json!({"quantity": 7})).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.text, r#"{"id":5,"name":"Out of Stock Item","price":999.00,"stock":7}"#);
    assert_eq!(app.movements(5, Some("restock")).await, 7);
    app.order(5, 7).await;
    app.assert_invariants().await;
}

/// Bad restocks are refused and change nothing: bad quantities, unknown products, a stock
/// that would overflow int4.
#[tokio::test]
async fn bad_restocks_change_nothing() {
    let app = spawn_app().await;
    let before = app.snapshot().await;
    for body in [
        json!({}),
        json!({"quantity": 0}),
        json!({"quantity": -5}),
        json!({"quantity": 1.5}),
        json!({"quantity": "3"}),
        json!([1]),
    ] {
        app.post_json("/api/products/1/restock", &body).await.assert_error(400, "INVALID_REQUEST");
    }
    app.post_json("/api/products/77/restock", &json!({"quantity": 1})).await.assert_error(404, "PRODUCT_NOT_FOUND");
    app.post_json("/api/products/abc/restock", &json!({"quantity": 1})).await.assert_error(400, "INVALID_REQUEST");
    app.post_json("/api/products/1/restock", &json!({"quantity": i32::MAX})).await.assert_error(400, "INVALID_REQUEST");
    assert_eq!(app.snapshot().await, before);
    app.assert_invariants().await;
}

/// Heavy concurrent traffic (multi-line orders in both line orders, cancels, repeated and
/// concurrent cancels of the same orders, restocks) leaves a ledger that balances for every
/// product, with exactly one restoring movement per cancelled line.
#[tokio::test]
async fn the_ledger_balances_after_concurrent_orders_cancels_and_restocks() {
    let app = &spawn_app().await;
    let rounds = (0..8).map(|round| async move {
        let orders = (0..10).map(|i| async move {
            let (a, b) = if (round + i) % 2 == 0 { (2, 3) } else { (3, 2) };
            let body = json!({"userId": 1, "items": [{"productId": a, "quantity": 1 + i % 3}, {"productId": b, "quantity": 1}]});
            app.post_order(&body).await
        });
        let mut created = Vec::new();
        for reply in join_all(orders).await {
            match reply.status {
                201 => created.push(reply.json["orderId"].as_i64().unwrap()),
                _ => reply.assert_error(400, "INSUFFICIENT_STOCK"),
            }
        }
        let to_cancel: Vec<i64> = created.iter().copied().filter(|id| id % 2 == 0).collect();
        let cancels = to_cancel.iter().flat_map(|id| [*id, *id, *id]).map(|id| app.cancel(id));
        let two_more = json!({"quantity": 2});
        let restock = app.post_json("/api/products/3/restock", &two_more);
        let (cancelled, restocked) = tokio::join!(join_all(cancels), restock);
        assert!(cancelled.iter().all(|r| r.status == 200), "{:?}", cancelled.iter().map(|r| &r.text).collect::<Vec<_>>());
        assert_eq!(restocked.status, 200);
        to_cancel.len()
    });
    let cancelled_by_rounds: usize = join_all(rounds).await.iter().sum();

    assert!(cancelled_by_rounds > 0, "no order was created with an even id to cancel");
    let cancelled = app.get("/api/orders?status=cancelled&limit=100").await;
    assert_eq!(cancelled.json.as_array().unwrap().len(), cancelled_by_rounds, "{}", cancelled.text);
    app.assert_invariants().await;
}

/// The database itself refuses a second restore of one cancelled line.
#[tokio::test]
async fn the_ledger_refuses_a_second_restore_of_a_line() {
    let app = spawn_app().await;
    let order_id = app.order(2, 2).await;
    assert_eq!(app.cancel(order_id).await.status, 200);
    let error = app
        .db
        .execute(
            "INSERT INTO inventory_movements (product_id, delta, reason, order_id) VALUES (2, 2, 'cancel', $1)",
            &[&order_id],
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION));
}

/// `order-api audit` on the database: exit 0 and `"ok": true` after real traffic; after each
/// kind of damage done behind the API's back, exit 1 naming what broke.
#[tokio::test]
async fn the_audit_command_passes_sound_data_and_names_each_kind_of_damage() {
    let app = spawn_app().await;
    let kept = app.order(2, 3).await;
    let cancelled = app.order(3, 2).await;
    assert_eq!(app.cancel(cancelled).await.status, 200);
    app.restock(1, 4).await;

    let run_audit = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_order-api"))
            .arg("audit")
            .current_dir(std::env::temp_dir())
            .env("DATABASE_URL", &app.database_url)
            .env("LOG_LEVEL", "error")
            .output()
            .expect("run order-api audit");
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
        (output.status.code(), report)
    };
    let (code, report) = run_audit();
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["audit"]["orders"], 2);
    assert_eq!(
        report["audit"]["products"][1],
        json!({"product_id": 2, "stock": 47, "held_by_orders": 3, "opening": 50, "restocked": 0, "ledger": 50 - 3})
    );

    let damage = [
        ("UPDATE products SET stock = stock - 1 WHERE id = 2", "product 2: stock 46 + held by orders 3 != opening 50"),
        ("UPDATE products SET stock = stock + 1 WHERE id = 2", ""),
        (
            "UPDATE payments SET amount = amount + 1 WHERE order_id = $KEPT",
            "orders lack lines or payment or have a wrong total",
        ),
        ("UPDATE payments SET amount = amount - 1 WHERE order_id = $KEPT", ""),
        ("DELETE FROM inventory_movements WHERE reason = 'cancel'", "order lines do not match their ledger movements"),
    ];
    for (statement, expected) in damage {
        app.db.batch_execute(&statement.replace("$KEPT", &kept.to_string())).await.unwrap();
        let (code, report) = run_audit();
        if expected.is_empty() {
            // A repair: the data is sound again before the next damage.
            assert_eq!((code, &report["ok"]), (Some(0), &json!(true)), "after {statement}: {report:#}");
            continue;
        }
        assert_eq!(code, Some(1), "{statement}: {report:#}");
        assert_eq!(report["ok"], false);
        let violations = report["violations"].to_string();
        assert!(violations.contains(expected), "{statement}: {violations}");
    }
}

/// Orders placed before the ledger existed (a database that had orders when migration 0003
/// added it) took stock the opening balances already leave out and have no movements: the
/// audit does not count them against the ledger, but still checks their payment and total.
#[tokio::test]
async fn the_audit_leaves_orders_from_before_the_ledger_out_of_the_stock_checks() {
    let app = spawn_app().await;
    app.order(2, 1).await;
    app.db
        .batch_execute(
            "WITH old AS (
                 INSERT INTO orders (user_id, status, total_amount, created_at)
                 VALUES (1, 'processing', 150.00, now() - interval '1 year') RETURNING id
             ), line AS (
                 INSERT INTO order_items (order_id, product_id, quantity, price) SELECT id, 2, 3, 50.00 FROM old
             )
             INSERT INTO payments (order_id, amount, status) SELECT id, 150.00, 'completed' FROM old",
        )
        .await
        .unwrap();
    app.assert_invariants().await;

    // Its payment is still checked.
    app.db.batch_execute("UPDATE payments SET amount = 1 WHERE amount = 150.00").await.unwrap();
    let mut client = common::connect(&app.database_url).await;
    let audit = order_api::db::audit::audit(&mut client).await.unwrap();
    assert_eq!(audit.broken_orders.count, 1, "{audit:#?}");
}
