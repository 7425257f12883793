//! Property tests of the one matching rule (`dcb_core::matches`) and of the fold engine's
//! routing, which must apply the same rule.

use dcb_core::{fold, matches, Cursor, Event, Query, QueryItem, StateProjector, Tag};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use std::time::SystemTime;

const TYPES: [&str; 4] = ["A", "B", "C", "D"];
const KEYS: [&str; 4] = ["k1", "k2", "k3", "k:x"];
const VALUES: [&str; 3] = ["v1", "v2", "v:3"];

fn config() -> Config {
    Config {
        cases: 512,
        rng_seed: RngSeed::Fixed(0x0dcb_c0de),
        failure_persistence: None,
        ..Config::default()
    }
}

fn event_type() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => proptest::sample::select(TYPES.to_vec()).prop_map(String::from),
        1 => "[a-zA-Z ]{1,6}",
    ]
}

fn tag() -> impl Strategy<Value = Tag> {
    (
        proptest::sample::select(KEYS.to_vec()),
        proptest::sample::select(VALUES.to_vec()),
    )
        .prop_map(|(k, v)| Tag::new(k, v))
}

/// Event tags: distinct pairs, as validation demands (a key may carry several values).
fn event_tags() -> impl Strategy<Value = Vec<Tag>> {
    proptest::collection::vec(tag(), 0..5).prop_map(|tags| {
        let mut unique: Vec<Tag> = Vec::new();
        for t in tags {
            if !unique.contains(&t) {
                unique.push(t);
            }
        }
        unique
    })
}

fn item() -> impl Strategy<Value = QueryItem> {
    (
        proptest::collection::vec(event_type(), 0..3),
        proptest::collection::vec(tag(), 0..3),
    )
        .prop_map(|(types, tags)| QueryItem::new().types(types).tags(tags))
}

/// Tags from a pool of hundreds of values, so large queries have many distinct tag sets.
fn wide_tags() -> impl Strategy<Value = Vec<Tag>> {
    proptest::collection::vec(
        (proptest::sample::select(KEYS.to_vec()), 0u32..300)
            .prop_map(|(k, v)| Tag::new(k, format!("w{v}"))),
        1..3,
    )
}

/// An item with at least one tag (never match-all).
fn wide_item() -> impl Strategy<Value = QueryItem> {
    (proptest::collection::vec(event_type(), 0..3), wide_tags())
        .prop_map(|(types, tags)| QueryItem::new().types(types).tags(tags))
}

fn query() -> impl Strategy<Value = Query> {
    proptest::collection::vec(item(), 0..4).prop_map(Query::from_items)
}

fn item_matches_by_definition(item: &QueryItem, event_type: &str, tags: &[Tag]) -> bool {
    let type_ok = item.types.is_empty() || item.types.iter().any(|t| t == event_type);
    let tags_ok = item
        .tags
        .iter()
        .all(|wanted| tags.iter().any(|t| t == wanted));
    type_ok && tags_ok
}

/// Every event `b` matches is matched by `a`.
fn covers_by_definition(a: &QueryItem, b: &QueryItem) -> bool {
    let tags = a.tags.iter().all(|t| b.tags.contains(t));
    let types =
        a.types.is_empty() || (!b.types.is_empty() && b.types.iter().all(|t| a.types.contains(t)));
    tags && types
}

fn event(n: i64, event_type: String, tags: Vec<Tag>) -> Event {
    Event {
        cursor: Cursor::new(n as u64, n),
        event_type,
        tags,
        data: serde_json::json!({ "n": n }),
        metadata: None,
        occurred_at: SystemTime::UNIX_EPOCH,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn query_all_matches_every_event(t in event_type(), tags in event_tags()) {
        prop_assert!(matches(&Query::all(), &t, &tags));
        prop_assert!(matches(&Query::from(QueryItem::new()), &t, &tags));
    }

    #[test]
    fn empty_query_matches_no_event(t in event_type(), tags in event_tags()) {
        prop_assert!(!matches(&Query::default(), &t, &tags));
    }

    #[test]
    fn item_matches_iff_type_in_types_and_tags_subset(i in item(), t in event_type(), tags in event_tags()) {
        prop_assert_eq!(matches(&Query::from(i.clone()), &t, &tags), item_matches_by_definition(&i, &t, &tags));
    }

    #[test]
    fn query_is_the_or_of_its_items(q in query(), t in event_type(), tags in event_tags()) {
        let any = q.items.iter().any(|i| item_matches_by_definition(i, &t, &tags));
        prop_assert_eq!(matches(&q, &t, &tags), any);
    }

    #[test]
    fn union_matches_iff_any_part_matches(a in query(), b in query(), c in query(), t in event_type(), tags in event_tags()) {
        let union = Query::union([&a, &b, &c]);
        let expected = matches(&a, &t, &tags) || matches(&b, &t, &tags) || matches(&c, &t, &tags);
        prop_assert_eq!(matches(&union, &t, &tags), expected);
        prop_assert!(union.items.len() <= a.items.len() + b.items.len() + c.items.len());
        for (i, x) in union.items.iter().enumerate() {
            prop_assert!(!union.items[..i].contains(x), "a union keeps identical items once");
        }
    }

    #[test]
    fn matching_is_monotone_in_extra_event_tags(q in query(), t in event_type(), tags in event_tags(), extra in event_tags()) {
        let mut more = tags.clone();
        more.extend(extra.into_iter().filter(|e| !tags.contains(e)));
        if matches(&q, &t, &tags) {
            prop_assert!(matches(&q, &t, &more), "adding tags to a matching event must keep it matching");
        }
    }

    #[test]
    fn dropping_a_required_tag_never_loses_a_match(i in item(), t in event_type(), tags in event_tags(), drop in 0usize..3) {
        let before = matches(&Query::from(i.clone()), &t, &tags);
        let mut weaker = i.clone();
        if !weaker.tags.is_empty() {
            weaker.tags.remove(drop % weaker.tags.len());
        }
        if before {
            prop_assert!(matches(&Query::from(weaker), &t, &tags));
        }
    }

    #[test]
    fn adding_an_item_never_loses_a_match(q in query(), extra in item(), t in event_type(), tags in event_tags()) {
        if matches(&q, &t, &tags) {
            prop_assert!(matches(&q.clone().or(extra), &t, &tags));
        }
    }

    #[test]
    fn order_of_items_and_tags_is_irrelevant(q in query(), t in event_type(), tags in event_tags()) {
        let mut reversed = q.clone();
        reversed.items.reverse();
        for item in &mut reversed.items {
            item.tags.reverse();
            item.types.reverse();
        }
        let mut reversed_tags = tags.clone();
        reversed_tags.reverse();
        let expected = matches(&q, &t, &tags);
        prop_assert_eq!(matches(&reversed, &t, &tags), expected);
        prop_assert_eq!(matches(&q, &t, &reversed_tags), expected);
    }

    #[test]
    fn simplified_matches_exactly_what_the_query_matches(q in query(), t in event_type(), tags in event_tags()) {
        let simple = q.simplified();
        prop_assert_eq!(matches(&simple, &t, &tags), matches(&q, &t, &tags), "{:?} -> {:?}", q, simple);
    }

    #[test]
    fn simplified_keeps_the_meaning_of_large_queries(
        items in proptest::collection::vec(wide_item(), 70..90),
        picks in proptest::collection::vec((0usize..90, any::<bool>()), 12),
        strangers in proptest::collection::vec((event_type(), wide_tags()), 4),
    ) {
        // Past 64 merged items the covered-item pass is skipped; the merge must still hold.
        let q = Query::from_items(items.clone());
        let mut distinct: Vec<Vec<Tag>> = items.iter().map(|i| { let mut t = i.tags.clone(); t.sort(); t.dedup(); t }).collect();
        distinct.sort();
        distinct.dedup();
        prop_assume!(distinct.len() > 64);
        let simple = q.simplified();
        prop_assert!(simple.items.len() > 64);
        // Events built to match a chosen item (with an extra tag, or of another type), and strangers.
        let mut events: Vec<(String, Vec<Tag>)> = picks
            .iter()
            .map(|(n, same_type)| {
                let item = &items[n % items.len()];
                let t = if *same_type { item.types.first().cloned().unwrap_or_else(|| "Z".into()) } else { "Z".into() };
                let mut tags = item.tags.clone();
                tags.push(Tag::new("extra", "1"));
                (t, tags)
            })
            .collect();
        events.extend(strangers);
        for (t, tags) in &events {
            prop_assert_eq!(matches(&simple, t, tags), matches(&q, t, tags));
        }
    }

    #[test]
    fn simplified_is_minimal_and_stable(q in query()) {
        let simple = q.simplified();
        prop_assert!(simple.items.len() <= q.items.len());
        prop_assert_eq!(simple.simplified(), simple.clone(), "simplifying twice changes nothing");
        for (i, a) in simple.items.iter().enumerate() {
            for (j, b) in simple.items.iter().enumerate() {
                if i != j {
                    prop_assert_ne!(&a.tags, &b.tags, "items with equal tags are merged");
                    prop_assert!(!covers_by_definition(b, a), "{:?} covers {:?}", b, a);
                }
            }
        }
    }

    #[test]
    fn a_query_with_a_match_all_item_matches_everything(q in query(), t in event_type(), tags in event_tags()) {
        let with_all = q.or(QueryItem::new());
        prop_assert!(with_all.is_match_all());
        prop_assert!(matches(&with_all, &t, &tags));
    }

    #[test]
    fn fold_routes_each_event_to_exactly_the_matching_projectors(
        queries in proptest::collection::vec(query(), 1..4),
        raw in proptest::collection::vec((event_type(), event_tags()), 0..30),
    ) {
        let events: Vec<Event> = raw.into_iter().enumerate().map(|(n, (t, tags))| event(n as i64, t, tags)).collect();
        let projectors: Vec<StateProjector<Vec<i64>>> = queries
            .iter()
            .map(|q| StateProjector::new(q.clone(), Vec::new(), |seen: &mut Vec<i64>, e: &Event| seen.push(e.cursor.position)))
            .collect();
        let states = fold(&projectors, events.iter()).expect("recording never fails");
        for (q, seen) in queries.iter().zip(&states) {
            let expected: Vec<i64> = events
                .iter()
                .filter(|e| matches(q, &e.event_type, &e.tags))
                .map(|e| e.cursor.position)
                .collect();
            prop_assert_eq!(seen, &expected, "projector with {:?}", q);
        }
        let counters = (
            StateProjector::counter(queries[0].clone()),
            StateProjector::exists(queries[0].clone()),
        );
        let (count, exists) = fold(&counters, events.iter()).expect("counting never fails");
        prop_assert_eq!(count as usize, states[0].len());
        prop_assert_eq!(exists, !states[0].is_empty());
    }
}
