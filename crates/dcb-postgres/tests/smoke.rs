use dcb_core::*;
use dcb_postgres::{PostgresEventStore, StoreConfig};

fn url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

#[tokio::test]
async fn smoke() {
    let schema = format!("smoke_{}", std::process::id());
    let store = PostgresEventStore::connect(&url(), StoreConfig::default().schema(&schema).auto_migrate(true))
        .await
        .expect("connect");
    let e = NewEvent::builder("CourseDefined").tag("course_id", "c1").tag("x", "a:b\\\"'").data(&serde_json::json!({"n": 1})).build().unwrap();
    let c1 = store.append(vec![e.clone(), e.clone()]).await.expect("append");
    println!("appended {c1}");
    let q = Query::from(QueryItem::new().types(["CourseDefined"]).tag("course_id", "c1"));
    let got = store.query(&q, ReadOptions::default()).await.expect("query");
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].cursor, c1);
    assert_eq!(got[0].tags, e.tags);
    let p = store.project(StateProjector::counter(q.clone())).await.unwrap();
    assert_eq!(p.states, 2);
    store.append_if(vec![e.clone()], p.condition.clone()).await.expect("append_if ok");
    let err = store.append_if(vec![e.clone()], p.condition.clone()).await.unwrap_err();
    assert!(err.is_conflict(), "{err}");
    use futures_util::StreamExt;
    let s: Vec<_> = store.query_stream(&q, ReadOptions::default()).collect().await;
    assert_eq!(s.len(), 3);
    let mut session = store.command_session().await.unwrap();
    let cmd = NewCommand { command_type: "Define".into(), data: serde_json::json!({}), metadata: None, id: Some("k1".into()) };
    let out = session.commit(&cmd, vec![e.clone()], None).await.unwrap();
    println!("{out:?}");
    let out2 = session.commit(&cmd, vec![e.clone()], None).await.unwrap();
    assert!(matches!(out2, CommitOutcome::Duplicate(_)), "{out2:?}");
    println!("{:?}", store.commands(&CommandFilter::default()).await.unwrap());
    let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.unwrap();
}
