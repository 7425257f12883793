//! Tags are a set of key/value pairs: one key may carry several values (the DCB
//! specification's shopping cart and username examples), in reads, conditions and under
//! concurrency.

use super::support::*;
use super::Factory;
use dcb_core::{
    AppendCondition, Error, EventReaderExt, NewEvent, Query, QueryItem, ReadOptions,
    StateProjector, Tag,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

/// An event tagged `product:p1` and `product:p2` is returned with both values, in the order
/// given; an item with one of them finds it, an item with both finds it, an item with a value
/// it lacks does not.
pub async fn query_multi_valued_tag_keys(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let cart = |n: i64, products: &[&str]| {
        let mut pairs: Vec<(&str, &str)> = products.iter().map(|p| ("product", *p)).collect();
        pairs.push(("cart", "c1"));
        evn(n, "ProductsOrdered", &pairs)
    };
    store
        .append(vec![
            cart(1, &["p2", "p1"]),
            cart(2, &["p1"]),
            cart(3, &["p3", "p2"]),
        ])
        .await
        .unwrap_or_else(|err| panic!("carts with several products must be accepted: {err}"));
    let read = |products: &'static [&'static str]| {
        let store = store.clone();
        async move {
            let pairs: Vec<(&str, &str)> = products.iter().map(|p| ("product", *p)).collect();
            let events = store
                .query(&q(&["ProductsOrdered"], &pairs), ReadOptions::default())
                .await
                .unwrap_or_else(|err| panic!("query {products:?}: {err}"));
            ns(&events)
        }
    };
    assert_eq!(
        read(&["p1"]).await,
        [1, 2],
        "one value of a multi-valued key"
    );
    assert_eq!(read(&["p2"]).await, [1, 3], "the other value");
    assert_eq!(read(&["p1", "p2"]).await, [1], "both values are ANDed");
    assert_eq!(read(&["p2", "p1"]).await, [1], "in any order");
    assert_eq!(
        read(&["p1", "p3"]).await,
        Vec::<i64>::new(),
        "a value it lacks"
    );
    let all = all_events(&*store).await;
    assert_eq!(
        all[0].tags,
        tags(&[("product", "p2"), ("product", "p1"), ("cart", "c1")]),
        "tags come back as appended"
    );
    assert_eq!(
        all[0].tag_values("product").collect::<Vec<_>>(),
        ["p2", "p1"]
    );
    // A changed username is tagged with the old and the new name: both are taken.
    let changed = ev(
        "UsernameChanged",
        &[("username", "u1"), ("username", "u1changed")],
    );
    let cursor = store.append(vec![changed]).await.expect("username change");
    for name in ["u1", "u1changed"] {
        let found = store
            .query(&q(&[], &[("username", name)]), ReadOptions::default())
            .await
            .expect("username query");
        assert_eq!(found.len(), 1, "{name}");
        assert_eq!(found[0].cursor, cursor);
    }
}

/// Conditions on one value of a multi-valued key conflict with an event carrying it, and not
/// with one carrying only other values.
pub async fn condition_multi_valued_tag_keys(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let ordered = |products: &[&str]| {
        let pairs: Vec<(&str, &str)> = products.iter().map(|p| ("product", *p)).collect();
        ev("ProductsOrdered", &pairs)
    };
    let start = store.append(vec![ev("Opened", &[])]).await.expect("start");
    store
        .append(vec![ordered(&["p1", "p2"])])
        .await
        .expect("cart");
    let after = |products: &[&str]| {
        let pairs: Vec<(&str, &str)> = products.iter().map(|p| ("product", *p)).collect();
        AppendCondition::new(q(&["ProductsOrdered"], &pairs)).with_after(Some(start))
    };
    for (condition, conflicts) in [
        (&["p2"][..], true),
        (&["p1", "p2"][..], true),
        (&["p3"][..], false),
        (&["p2", "p3"][..], false),
    ] {
        let result = store
            .append_if(vec![ordered(&["p9"])], after(condition))
            .await;
        match (&result, conflicts) {
            (Err(Error::Conflict(_)), true) | (Ok(_), false) => {}
            _ => panic!(
                "condition on {condition:?}: expected conflict = {conflicts}, got {result:?}"
            ),
        }
    }
}

/// 12 clients × 8 rounds order carts of two out of four products, each holding 3 units: a
/// client decides on the orders of both its products in one read and appends one event tagged
/// with both. Whatever the interleaving, no product is sold more than its stock, and a product
/// sells out.
pub async fn concurrent_multi_valued_carts_never_oversell(factory: Factory<'_>) {
    const CLIENTS: usize = 12;
    const ROUNDS: usize = 8;
    const STOCK: i64 = 3;
    const PRODUCTS: [&str; 4] = ["p1", "p2", "p3", "p4"];
    let store = factory.new_store().await;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let mut handles = Vec::new();
    for client in 0..CLIENTS {
        let store = store.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(0x00ca_0000 + client as u64);
            let mut sold = 0;
            for round in 0..ROUNDS {
                let a = rng.gen_range(0..PRODUCTS.len());
                let b = (a + rng.gen_range(1..PRODUCTS.len())) % PRODUCTS.len();
                let (a, b) = (PRODUCTS[a], PRODUCTS[b]);
                let orders = |p: &str| {
                    Query::from(
                        QueryItem::new()
                            .types(["ProductsOrdered"])
                            .tag("product", p),
                    )
                };
                barrier.wait().await;
                let decision = store
                    .project((
                        StateProjector::counter(orders(a)),
                        StateProjector::counter(orders(b)),
                    ))
                    .await
                    .unwrap_or_else(|err| panic!("client {client} round {round}: {err}"));
                let (sold_a, sold_b) = decision.states;
                if sold_a as i64 >= STOCK || sold_b as i64 >= STOCK {
                    continue;
                }
                let event = NewEvent::new(
                    "ProductsOrdered",
                    vec![Tag::new("product", a), Tag::new("product", b)],
                    json!({ "client": client, "round": round }),
                );
                match store.append_if(vec![event], decision.condition).await {
                    Ok(_) => sold += 1,
                    Err(Error::Conflict(_)) => {}
                    Err(err) => panic!("client {client} round {round}: {err}"),
                }
            }
            sold
        }));
    }
    let sold: usize = join_tasks(handles, Duration::from_secs(300), "cart clients")
        .await
        .into_iter()
        .sum();
    let mut per_product: BTreeMap<String, i64> = BTreeMap::new();
    for event in all_events(&*store).await {
        for product in event.tag_values("product") {
            *per_product.entry(product.to_string()).or_default() += 1;
        }
    }
    for (product, count) in &per_product {
        assert!(
            *count <= STOCK,
            "{product} sold {count} times, stock {STOCK}: {per_product:?}"
        );
    }
    assert!(sold > 0, "some carts must be sold");
    assert!(
        per_product.values().any(|c| *c == STOCK),
        "with {CLIENTS} × {ROUNDS} attempts some product sells out: {per_product:?}"
    );
}
