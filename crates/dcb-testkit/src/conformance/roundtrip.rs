//! Byte-exact round trips of types, tags, data and metadata.

use super::support::*;
use super::Factory;
use dcb_core::{CommandFilter, NewCommand, NewEvent, Query, ReadOptions, Tag};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Tag values (and keys) that break naive encodings.
const AWKWARD: &[&str] = &[
    "plain",
    "with \"double\" quotes",
    "it's single",
    "back\\slash",
    "double \\\\ backslash",
    "\\\"escaped quote\\\"",
    "trailing backslash\\",
    "colon:inside",
    "::leading and trailing::",
    "k2:v",
    "comma,separated,values",
    "{curly,braces}",
    "[square]",
    "(parens)",
    " leading space",
    "trailing space ",
    "  ",
    "tab\tand\nnewline\r",
    "NULL",
    "null",
    "%_like_wildcards%",
    "semi;colon",
    "equals=sign&amp",
    "日本語のタグ",
    "emoji 🦀👨‍👩‍👧‍👦🏳️‍🌈",
    "שלום עולם RTL",
    "مرحبا",
    "e\u{301} combining",
    "\u{e9} precomposed",
    "zero\u{200b}width",
    "\u{feff}bom",
    "$$dollar quote$$",
    "'); DROP TABLE events; --",
];

/// Tag keys and values with quotes, backslashes, colons (in values), commas, spaces and unicode
/// come back byte for byte, in append order, and are found by exact-match queries.
pub async fn roundtrip_tags_byte_exact(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let mut sent = Vec::new();
    for (i, value) in AWKWARD.iter().enumerate() {
        let key = value.replace(':', "_");
        let event = NewEvent::new(
            "Awkward",
            vec![
                Tag::new("value", *value),
                Tag::new(key.clone(), "as key"),
                Tag::new("i", i.to_string()),
            ],
            json!({ "n": i }),
        );
        sent.push(event);
    }
    append(&*store, sent.clone(), "appending awkward tags").await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), sent.len(), "every awkward event stored");
    for (stored, sent) in all.iter().zip(&sent) {
        assert_eq!(
            stored.tags, sent.tags,
            "tags must round-trip byte for byte and in order"
        );
        for (a, b) in stored.tags.iter().zip(&sent.tags) {
            assert_eq!(
                a.value.as_bytes(),
                b.value.as_bytes(),
                "tag value bytes for {:?}",
                b.value
            );
            assert_eq!(
                a.key.as_bytes(),
                b.key.as_bytes(),
                "tag key bytes for {:?}",
                b.key
            );
        }
        assert_eq!(
            stored.tag("value"),
            sent.tags.first().map(|t| t.value.as_str()),
            "Event::tag lookup"
        );
    }
    for (i, value) in AWKWARD.iter().enumerate() {
        let got = read(
            &*store,
            &Query::tags([Tag::new("value", *value)]),
            ReadOptions::default(),
            value,
        )
        .await;
        assert_eq!(
            ns(&got),
            [i as i64],
            "querying value={value:?} must find exactly event {i}"
        );
        let key = value.replace(':', "_");
        let got = read(
            &*store,
            &q(&["Awkward"], &[(key.as_str(), "as key")]),
            ReadOptions::default(),
            value,
        )
        .await;
        assert_eq!(
            ns(&got),
            [i as i64],
            "querying key {key:?} must find exactly event {i}"
        );
    }
}

/// Query tags and the event numbers they must select.
type TagCase<'a> = (&'a [(&'a str, &'a str)], &'a [i64]);

/// Tag encodings must not be ambiguous: a colon in a value, a value that looks like another tag,
/// and prefixes do not produce false matches.
pub async fn roundtrip_tag_encoding_is_unambiguous(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(
        &*store,
        vec![
            evn(0, "E", &[("a", "b:c")]),
            evn(1, "E", &[("a", "b")]),
            evn(2, "E", &[("k1", "k2:v")]),
            evn(3, "E", &[("k", "v,w")]),
            evn(4, "E", &[("k", "v"), ("w", "x")]),
            evn(5, "E", &[("k", "\"v\"")]),
            evn(6, "E", &[("k", "v\\")]),
        ],
        "ambiguity fixture",
    )
    .await;
    let cases: &[TagCase<'_>] = &[
        (&[("a", "b")], &[1]),
        (&[("a", "b:c")], &[0]),
        (&[("k2", "v")], &[]),
        (&[("k1", "k2")], &[]),
        (&[("k1", "k2:v")], &[2]),
        (&[("k", "v")], &[4]),
        (&[("k", "v,w")], &[3]),
        (&[("k", "\"v\"")], &[5]),
        (&[("k", "v\\")], &[6]),
        (&[("k", "v"), ("w", "x")], &[4]),
        (&[("k", "v,w"), ("w", "x")], &[]),
    ];
    for (pairs, expected) in cases {
        let got = read(&*store, &q(&[], pairs), ReadOptions::default(), "ambiguity").await;
        assert_eq!(
            ns(&got),
            *expected,
            "tags {pairs:?} must match exactly events {expected:?}"
        );
    }
}

/// JSON payloads round-trip: strings with quotes, backslashes, escapes and unicode, nesting,
/// empty containers, exact large integers, floats, null, booleans and non-object payloads.
pub async fn roundtrip_data_json(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let rich = json!({
        "quotes": "say \"hi\"",
        "backslashes": "C:\\path\\to\\file \\\\ \\n (not a newline)",
        "escapes": "line\nbreak\ttab\r\u{1}\u{1f}\u{7f}",
        "unicode": "日本語 🦀 👨‍👩‍👧‍👦 שלום مرحبا e\u{301} \u{e9} \u{2028}\u{2029} \u{feff}",
        "colons,commas": "a:b,c:d",
        "": "empty key",
        " spaced key ": " spaced value ",
        "nested": { "a": { "b": { "c": [1, [2, [3, { "d": null }]]] } } },
        "empty_array": [],
        "empty_object": {},
        "array_of_empties": [[], {}, "", 0, false, null],
        "big_u64": 9_007_199_254_740_993_u64,
        "big_i64": -9_007_199_254_740_993_i64,
        "u64_max": u64::MAX,
        "i64_min": i64::MIN,
        "zero": 0,
        "float": 0.1,
        "negative_float": -2.5,
        "pi": std::f64::consts::PI,
        "tiny": 1e-7,
        "large_float": 1.5e300,
        "float_one": 1.0,
        "null": null,
        "true": true,
        "false": false,
        "numbers_as_strings": ["9007199254740993", "1e400", "NaN"],
        "large_string": "x".repeat(64 * 1024),
    });
    let payloads = vec![
        rich.clone(),
        json!(null),
        json!([]),
        json!({}),
        json!("just a string with \"quotes\" and \\"),
        json!(9_007_199_254_740_993_u64),
        json!(-1.25),
        json!(true),
        json!([1, "two", { "three": [3.0] }]),
    ];
    let sent: Vec<NewEvent> = payloads
        .iter()
        .map(|p| NewEvent::new("Data", vec![], p.clone()))
        .collect();
    append(&*store, sent, "appending payloads").await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), payloads.len(), "every payload stored");
    for (stored, sent) in all.iter().zip(&payloads) {
        assert_eq!(&stored.data, sent, "payload must round-trip exactly");
    }
    let data = &all[0].data;
    assert_eq!(
        data["big_u64"].as_u64(),
        Some(9_007_199_254_740_993),
        "2^53+1 must stay an exact u64"
    );
    assert_eq!(
        data["big_i64"].as_i64(),
        Some(-9_007_199_254_740_993),
        "-(2^53+1) must stay an exact i64"
    );
    assert_eq!(
        data["u64_max"].as_u64(),
        Some(u64::MAX),
        "u64::MAX must stay exact"
    );
    assert_eq!(
        data["i64_min"].as_i64(),
        Some(i64::MIN),
        "i64::MIN must stay exact"
    );
    assert_eq!(data["float"].as_f64(), Some(0.1), "0.1 must round-trip");
    assert_eq!(
        data["pi"].as_f64(),
        Some(std::f64::consts::PI),
        "pi must round-trip"
    );
    assert_eq!(
        data["large_string"].as_str().map(str::len),
        Some(64 * 1024),
        "64 KiB string"
    );
    assert_eq!(
        serde_json::to_string(&data["unicode"]).ok(),
        serde_json::to_string(&rich["unicode"]).ok(),
        "unicode must serialize identically"
    );
    assert_eq!(all[1].data, Value::Null, "a null payload stays JSON null");
}

/// Metadata round-trips, and `None` stays distinct from `Some(null)`.
pub async fn roundtrip_metadata(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let metadata = [
        None,
        Some(
            json!({ "correlation_id": "c-1", "user": "ünïcødé \"q\" \\", "n": 9_007_199_254_740_993_u64 }),
        ),
        Some(json!(null)),
        Some(json!([])),
        Some(json!({})),
        Some(json!("text")),
    ];
    let sent: Vec<NewEvent> = metadata
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut event = evn(i as i64, "Meta", &[]);
            event.metadata = m.clone();
            event
        })
        .collect();
    append(&*store, sent, "appending metadata").await;
    let all = all_events(&*store).await;
    assert_eq!(all.len(), metadata.len(), "every event stored");
    for (stored, sent) in all.iter().zip(&metadata) {
        assert_eq!(
            &stored.metadata, sent,
            "metadata must round-trip exactly (None vs Some(null) included)"
        );
    }
    // The other read paths return the same.
    let backwards = read(
        &*store,
        &Query::types(["Meta"]),
        ReadOptions::default().backwards(),
        "backwards",
    )
    .await;
    let mut reversed = all.clone();
    reversed.reverse();
    assert_eq!(
        backwards, reversed,
        "backwards reads return the same events"
    );
}

/// Numbers at the edges of what JSON, `f64` and PostgreSQL's `numeric` represent.
fn edge_numbers() -> Vec<Value> {
    let floats = [
        5e-324,
        -5e-324,
        2.225_073_858_507_201e-308,
        f64::MIN_POSITIVE,
        1.234_567_890_123_456_8e-300,
        1.5e-10,
        1e-7,
        0.1,
        -0.0,
        0.0,
        1.0,
        -1.0,
        1e15,
        9_007_199_254_740_992.0,
        1e16,
        -1e16,
        123_456_789_012_345_680.0,
        9_223_372_036_854_775_808.0,
        -9_223_372_036_854_775_808.0,
        18_446_744_073_709_551_616.0,
        1e19,
        -1e19,
        1e20,
        1e300,
        1.5e300,
        f64::MAX,
        f64::MIN,
    ];
    let mut numbers: Vec<Value> = floats.iter().map(|&f| json!(f)).collect();
    numbers.extend([
        json!(i64::MIN),
        json!(i64::MIN + 1),
        json!(-1),
        json!(0),
        json!(1),
        json!(9_007_199_254_740_993_u64),
        json!(i64::MAX),
        json!(i64::MAX as u64 + 1),
        json!(u64::MAX),
    ]);
    numbers
}

/// Seeded random numbers: finite floats of every exponent (random bits), integral floats
/// around the integer range, and integers of every size.
fn random_numbers(seed: u64) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut numbers = Vec::new();
    while numbers.len() < 1000 {
        let f = f64::from_bits(rng.gen());
        if f.is_finite() {
            numbers.push(json!(f));
        }
    }
    for _ in 0..200 {
        let f: f64 = rng.gen_range(1e15..1e21);
        let sign = if rng.gen() { 1.0 } else { -1.0 };
        numbers.push(json!(sign * f.trunc()));
        numbers.push(json!(rng.gen::<i64>()));
        numbers.push(json!(rng.gen::<u64>()));
    }
    numbers
}

/// Every number a `serde_json::Value` holds reads back equal (`==`, so an integer stays an
/// integer and a float a float, with the same value): extreme and subnormal floats, integral
/// floats beyond 2^53, `i64`/`u64` bounds and 1,600 seeded random numbers, in data, metadata,
/// top-level scalar payloads and command data, through `query` and `query_stream`.
///
/// The one difference allowed is the sign of zero: `-0.0` may come back as `0.0` (PostgreSQL's
/// numeric has no negative zero); they are equal as values.
pub async fn roundtrip_numbers(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let mut numbers = edge_numbers();
    numbers.extend(random_numbers(0x5eed));
    let array = Value::Array(numbers.clone());
    let object: Value = Value::Object(
        numbers
            .iter()
            .enumerate()
            .map(|(i, n)| (format!("n{i}"), n.clone()))
            .collect(),
    );
    let mut sent = vec![NewEvent::new("Numbers", vec![], array.clone())];
    sent[0].metadata = Some(object.clone());
    // Top-level scalars take another path through jsonb.
    for n in edge_numbers() {
        let mut event = NewEvent::new("Number", vec![], n.clone());
        event.metadata = Some(n);
        sent.push(event);
    }
    append(&*store, sent.clone(), "appending numbers").await;
    let check = |events: &[dcb_core::Event], how: &str| {
        assert_eq!(events.len(), sent.len(), "{how}: every event read");
        for (i, (stored, sent)) in events.iter().zip(&sent).enumerate() {
            let pairs = [("data", &stored.data, &sent.data)];
            let meta = [(
                "metadata",
                stored.metadata.as_ref().unwrap_or(&Value::Null),
                sent.metadata.as_ref().unwrap_or(&Value::Null),
            )];
            for (what, got, want) in pairs.into_iter().chain(meta) {
                if got == want {
                    continue;
                }
                // Name the first differing number instead of printing thousands.
                let differing = match (got, want) {
                    (Value::Array(g), Value::Array(w)) => g
                        .iter()
                        .zip(w)
                        .find(|(g, w)| g != w)
                        .map(|(g, w)| format!("{w} came back as {g}")),
                    (Value::Object(g), Value::Object(w)) => w
                        .iter()
                        .find(|(k, v)| g.get(*k) != Some(*v))
                        .map(|(k, v)| format!("{k}: {v} came back as {:?}", g.get(k))),
                    _ => Some(format!("{want} came back as {got}")),
                };
                panic!(
                    "{how}: event {i}'s {what} must read back equal: {}",
                    differing.unwrap_or_else(|| "lengths differ".into())
                );
            }
        }
    };
    check(&all_events(&*store).await, "query");
    check(
        &read_stream(&*store, &Query::all(), "numbers").await,
        "query_stream",
    );

    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let command = NewCommand {
        command_type: "RecordNumbers".into(),
        data: array.clone(),
        metadata: Some(object.clone()),
        id: None,
    };
    session
        .commit(&command, vec![], None)
        .await
        .unwrap_or_else(|err| panic!("committing a command with numbers failed: {err}"));
    drop(session);
    let recorded = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("listing commands failed: {err}"));
    assert_eq!(recorded.len(), 1, "one command recorded");
    assert!(
        recorded[0].data == array && recorded[0].metadata.as_ref() == Some(&object),
        "command data and metadata with numbers must read back equal"
    );
}

/// Large payloads keep working: 3 MB of data, 1 MB of metadata, a 1 MB string, 100 tags and
/// unicode everywhere, through `query`, a tag query and `query_stream`.
pub async fn roundtrip_large_payloads(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let items: Vec<Value> = (0..10_000)
        .map(|i| {
            json!({
                "id": i,
                "name": format!("élément {i} 日本語 🦀 \"quoted\" \\ {}", "x".repeat(120)),
                "price": i as f64 / 7.0,
                "tags": ["a", "b", { "nested": [i, -i, null, true] }],
            })
        })
        .collect();
    let data = json!({ "items": items, "blob": "ü".repeat(512 * 1024) });
    let metadata = json!({ "trace": "🦀".repeat(256 * 1024), "user": "ünïcødé" });
    let size = |v: &Value| serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0);
    assert!(size(&data) > 3_000_000, "the data is over 3 MB");
    assert!(size(&metadata) > 1_000_000, "the metadata is over 1 MB");
    let many_tags: Vec<Tag> = (0..100)
        .map(|i| Tag::new(format!("key{i}"), format!("värde-{i}-{}", "ß".repeat(i))))
        .collect();
    let mut big = NewEvent::new("Big", many_tags.clone(), data);
    big.metadata = Some(metadata);
    let small = NewEvent::new("Small", vec![Tag::new("key0", "other")], json!({}));
    append(
        &*store,
        vec![big.clone(), small],
        "appending a large payload",
    )
    .await;

    let all = all_events(&*store).await;
    assert_eq!(all.len(), 2, "both events stored");
    assert!(
        all[0].data == big.data && all[0].metadata == big.metadata,
        "large data and metadata must read back equal"
    );
    assert_eq!(all[0].tags, many_tags, "100 tags in order");
    let by_tag = read(
        &*store,
        &Query::tags([many_tags[99].clone(), many_tags[1].clone()]),
        ReadOptions::default(),
        "large payload by tag",
    )
    .await;
    assert_eq!(by_tag.len(), 1, "the tag query finds the large event");
    assert!(by_tag[0] == all[0], "the tag query returns it whole");
    let streamed = read_stream(&*store, &Query::types(["Big"]), "large payload").await;
    assert_eq!(streamed.len(), 1, "query_stream returns the large event");
    assert!(streamed[0] == all[0], "query_stream returns it whole");
}

/// A kept `occurred_at` (imports) is stored as given on every append path, beside events that
/// take the store's clock, and reads return it.
pub async fn roundtrip_kept_occurred_at(factory: Factory<'_>) {
    use dcb_core::{AppendCommand, AppendCondition};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let store = factory.new_store().await;
    // Microseconds: the precision PostgreSQL keeps.
    let kept = |n: u64| UNIX_EPOCH + Duration::from_micros(1_500_000_000_000_000 + n * 1_000_001);
    let at = |n: i64, when: Option<SystemTime>| {
        let mut event = evn(n, "Kept", &[("k", "v")]);
        event.occurred_at = when;
        event
    };
    let started = SystemTime::now() - Duration::from_secs(5);
    append(&*store, vec![at(0, Some(kept(0)))], "one kept").await;
    append(
        &*store,
        vec![at(1, Some(kept(1))), at(2, None), at(3, Some(kept(3)))],
        "kept and clocked together",
    )
    .await;
    store
        .append_if(
            vec![at(4, Some(kept(4)))],
            AppendCondition::new(q(&["Other"], &[])),
        )
        .await
        .expect("a conditional append keeps the time too");
    store
        .append_batch(vec![
            AppendCommand::new(vec![at(5, Some(kept(5)))]),
            AppendCommand::new(vec![at(6, None), at(7, Some(kept(7)))])
                .only_if(AppendCondition::new(q(&["Other"], &[]))),
        ])
        .await
        .expect("a multi-command append keeps the time too");
    let finished = SystemTime::now() + Duration::from_secs(5);
    let all = all_events(&*store).await;
    assert_eq!(ns(&all), (0..8).collect::<Vec<_>>());
    for (n, event) in all.iter().enumerate() {
        if n == 2 || n == 6 {
            assert!(
                (started..finished).contains(&event.occurred_at),
                "event {n} takes the store's clock: {:?}",
                event.occurred_at
            );
        } else {
            assert_eq!(
                event.occurred_at,
                kept(n as u64),
                "event {n} keeps its time"
            );
        }
    }
}
