//! The embedded migration runner: applies each file once, in order, in a transaction,
//! records checksums, refuses edited files, and lets concurrent starters take turns.

use order_api::db::migrate::{self, MIGRATIONS, Migration};

use crate::common::{self, TestDatabase};

/// A fresh database gets every migration once; a second run applies nothing.
#[tokio::test]
async fn migrations_apply_once_and_are_recorded_with_checksums() {
    let database = TestDatabase::create().await;
    let mut client = common::connect(&database.url).await;
    let applied = migrate::run(&mut client).await.unwrap();
    assert_eq!(applied.len(), MIGRATIONS.len());
    assert!(applied.windows(2).all(|w| w[0] < w[1]), "applied in file order: {applied:?}");
    assert!(migrate::run(&mut client).await.unwrap().is_empty());

    let recorded = client.query("SELECT name, checksum FROM schema_migrations ORDER BY name", &[]).await.unwrap();
    assert_eq!(recorded.len(), MIGRATIONS.len());
    for (row, migration) in recorded.iter().zip(MIGRATIONS) {
        assert_eq!(row.get::<_, &str>(0), migration.name);
        assert_eq!(row.get::<_, &str>(1).len(), 32, "an md5 checksum");
    }
}

/// An applied migration whose text changed stops the run with a message naming it.
#[tokio::test]
async fn an_edited_migration_is_refused_by_name() {
    let database = TestDatabase::create().await;
    let mut client = common::connect(&database.url).await;
    migrate::run(&mut client).await.unwrap();
    client
        .execute("UPDATE schema_migrations SET checksum = 'edited' WHERE name = $1", &[&MIGRATIONS[0].name])
        .await
        .unwrap();
    let error = migrate::run(&mut client).await.unwrap_err().to_string();
    assert!(error.contains(MIGRATIONS[0].name) && error.contains("edited"), "{error}");
}

/// A failing migration is rolled back whole and not recorded; the ones before it stay.
#[tokio::test]
async fn a_failing_migration_rolls_back_whole() {
    let database = TestDatabase::create().await;
    let mut client = common::connect(&database.url).await;
    let migrations = [
        Migration { name: "0001_ok.sql", sql: "CREATE TABLE first (id int)" },
        Migration { name: "0002_broken.sql", sql: "CREATE TABLE second (id int); SELECT no_such_function();" },
    ];
    let error = migrate::run_migrations(&mut client, &migrations).await.unwrap_err().to_string();
    assert!(error.contains("0002_broken.sql"), "{error}");
    let tables: Vec<String> = client
        .query("SELECT tablename::text FROM pg_tables WHERE tablename IN ('first', 'second')", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(tables, vec!["first".to_owned()]);
    let recorded: Vec<String> =
        client.query("SELECT name FROM schema_migrations", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(recorded, vec!["0001_ok.sql".to_owned()]);
}

/// Three runners started together on one fresh database: all succeed, and together they
/// applied each migration exactly once (the advisory lock makes them take turns).
#[tokio::test]
async fn concurrent_runners_apply_each_migration_once() {
    let database = TestDatabase::create().await;
    let runs = (0..3).map(|_| {
        let url = database.url.clone();
        tokio::spawn(async move {
            let mut client = common::connect(&url).await;
            migrate::run(&mut client).await.map_err(|e| e.to_string())
        })
    });
    let mut applied = 0;
    for run in futures::future::join_all(runs).await {
        applied += run.unwrap().unwrap().len();
    }
    assert_eq!(applied, MIGRATIONS.len());
}
