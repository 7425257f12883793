//! Differential test: for random events and random queries, the SQL of the PostgreSQL store
//! selects exactly what dcb-core's matcher selects, in cursor order, under every read option;
//! and append_if conflicts exactly when the matcher finds a matching event after the cursor.
mod support;

use dcb_core::{
    matches, AppendCondition, Cursor, Event, EventReader, EventStore, NewEvent, Query, QueryItem,
    ReadOptions, Tag,
};
use dcb_postgres::StoreConfig;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const TYPES: [&str; 4] = ["A", "B", "C", "D"];
const KEYS: [&str; 3] = ["k1", "k2", "k3"];
const VALUES: [&str; 3] = ["1", "2", "x:y"];

/// Distinct pairs; a key may carry several values.
fn random_tags(rng: &mut StdRng, max: usize) -> Vec<Tag> {
    let mut tags: Vec<Tag> = Vec::new();
    for _ in 0..rng.gen_range(0..=max) {
        let tag = Tag::new(
            *KEYS.choose(rng).expect("key"),
            *VALUES.choose(rng).expect("value"),
        );
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    tags
}

fn random_event(rng: &mut StdRng, i: usize) -> NewEvent {
    NewEvent::new(
        *TYPES.choose(rng).expect("type"),
        random_tags(rng, 3),
        serde_json::json!({ "i": i }),
    )
}

fn random_query(rng: &mut StdRng) -> Query {
    let items = rng.gen_range(1..=3);
    Query::from_items((0..items).map(|_| {
        let n_types = rng.gen_range(0..=2);
        let mut types = TYPES.to_vec();
        types.shuffle(rng);
        QueryItem::new()
            .types(types.into_iter().take(n_types))
            .tags(random_tags(rng, 2))
    }))
}

fn expected<'a>(all: &'a [Event], query: &Query) -> Vec<&'a Event> {
    all.iter()
        .filter(|e| matches(query, &e.event_type, &e.tags))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_reads_and_conditions_agree_with_the_core_matcher() {
    let ts = support::test_store(StoreConfig::default()).await;
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    // Several transactions, so cursors differ in both components.
    let mut i = 0;
    for _ in 0..30 {
        let batch: Vec<NewEvent> = (0..rng.gen_range(1..=12))
            .map(|_| {
                i += 1;
                random_event(&mut rng, i)
            })
            .collect();
        ts.append(batch).await.expect("append");
    }
    let mut all = ts
        .query(&Query::all(), ReadOptions::default())
        .await
        .expect("read all");
    assert_eq!(all.len(), i);
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));

    for round in 0..150 {
        let query = random_query(&mut rng);
        let want = expected(&all, &query);
        let got = ts
            .query(&query, ReadOptions::default())
            .await
            .expect("query");
        assert_eq!(
            got.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            want.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            "round {round}: {query:?}"
        );

        // Bounds, limit and direction.
        let pivot = all[rng.gen_range(0..all.len())].cursor;
        let limit = rng.gen_range(1..=5);
        let after: Vec<Cursor> = want
            .iter()
            .map(|e| e.cursor)
            .filter(|c| *c > pivot)
            .take(limit)
            .collect();
        let got_after = ts
            .query(&query, ReadOptions::default().after(pivot).limit(limit))
            .await
            .expect("after");
        assert_eq!(
            got_after.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            after,
            "round {round} after"
        );
        let before: Vec<Cursor> = want
            .iter()
            .rev()
            .map(|e| e.cursor)
            .filter(|c| *c < pivot)
            .take(limit)
            .collect();
        let got_before = ts
            .query(
                &query,
                ReadOptions::default()
                    .before(pivot)
                    .limit(limit)
                    .backwards(),
            )
            .await
            .expect("before");
        assert_eq!(
            got_before.iter().map(|e| e.cursor).collect::<Vec<_>>(),
            before,
            "round {round} before"
        );

        // The condition check: a probe event that matches no random query (type "Probe", no
        // tags) unless the query has a match-all item.
        let probe_after = if rng.gen_bool(0.3) { None } else { Some(pivot) };
        let should_conflict = want
            .iter()
            .any(|e| probe_after.is_none_or(|a| e.cursor > a));
        let condition = AppendCondition::new(query.clone()).with_after(probe_after);
        let probe = NewEvent::new("Probe", vec![], serde_json::json!({}));
        let result = if query.is_match_all() {
            continue;
        } else {
            ts.append_if(vec![probe], condition).await
        };
        assert_eq!(
            result.is_err(),
            should_conflict,
            "round {round}: {query:?} after {probe_after:?}: {result:?}"
        );
        match result {
            Err(err) => assert!(err.is_conflict(), "{err}"),
            // The probe is part of the log now; later rounds must expect it.
            Ok(_) => {
                all = ts
                    .query(&Query::all(), ReadOptions::default())
                    .await
                    .expect("reread")
            }
        }
    }
}
