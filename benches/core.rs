//! Criterion benchmarks of the pure core: matching, the fold engine, query and condition building.
//!
//! `cargo bench --bench core`
use crablet::{
    fold, matches, validate_condition, AppendCondition, Cursor, Event, Projectors, Query,
    QueryItem, StateProjector, Tag,
};
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::time::{Duration, SystemTime};

mod common;
use common::{course_item, course_model};

fn event(n: u64, event_type: &str, course: &str) -> Event {
    Event {
        cursor: Cursor::new(1000 + n / 10, n as i64),
        event_type: event_type.to_string(),
        tags: vec![
            Tag::new("course_id", course),
            Tag::new("student_id", format!("s{n}")),
        ],
        data: serde_json::json!({ "course_id": course, "student_id": format!("s{n}"), "seq": n }),
        metadata: None,
        occurred_at: SystemTime::UNIX_EPOCH,
    }
}

/// 10,000 events of one course, as a decision read returns them: one CourseDefined, then
/// enrolments with every tenth a StudentLeft.
fn course_log(course: &str, n: u64) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let t = match i {
                0 => "CourseDefined",
                i if i % 10 == 9 => "StudentLeft",
                _ => "StudentEnrolled",
            };
            event(i, t, course)
        })
        .collect()
}

fn bench_matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("matching");
    let tags = vec![
        Tag::new("course_id", "c42"),
        Tag::new("student_id", "s1234"),
        Tag::new("semester", "2025-1"),
        Tag::new("faculty", "science"),
    ];
    let hit = course_item("StudentEnrolled", "c42");
    let three_miss = Query::from_items([
        QueryItem::new()
            .types(["CourseDefined"])
            .tag("course_id", "c42"),
        QueryItem::new()
            .types(["StudentEnrolled", "StudentLeft"])
            .tag("course_id", "c7")
            .tag("student_id", "s1234"),
        QueryItem::new().tag("student_id", "s9"),
    ]);
    group.bench_function("one_item_hit", |b| {
        b.iter(|| {
            matches(
                black_box(&hit),
                black_box("StudentEnrolled"),
                black_box(&tags),
            )
        })
    });
    group.bench_function("three_items_miss", |b| {
        b.iter(|| {
            matches(
                black_box(&three_miss),
                black_box("StudentEnrolled"),
                black_box(&tags),
            )
        })
    });
    group.bench_function("match_all", |b| {
        let all = Query::all();
        b.iter(|| matches(black_box(&all), black_box("Anything"), black_box(&tags)))
    });
    group.finish();
}

fn bench_fold(c: &mut Criterion) {
    let mut group = c.benchmark_group("fold");
    let events = course_log("c1", 10_000);
    let model = course_model("c1");
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("10k_events_3_projectors", |b| {
        b.iter(|| {
            let states = fold(&model, black_box(&events)).expect("fold");
            black_box(states)
        })
    });
    // A payload-reading projector: sums a JSON field, like a balance would.
    let sum = StateProjector::new(course_item("StudentEnrolled", "c1"), 0_i64, |sum, e| {
        *sum += e.data["seq"].as_i64().unwrap_or(0)
    });
    group.bench_function("10k_events_json_field_sum", |b| {
        b.iter(|| black_box(fold(&sum, black_box(&events)).expect("fold")))
    });
    group.finish();
}

fn bench_building(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    group.bench_function("model_and_combined_query_3_projectors", |b| {
        b.iter(|| {
            let model = course_model(black_box("c1"));
            black_box(model.query().expect("valid query"))
        })
    });
    let model = course_model("c1");
    group.bench_function("combined_query_3_projectors", |b| {
        b.iter(|| black_box(model.query().expect("valid query")))
    });
    let query = model.query().expect("valid query");
    group.bench_function("append_condition_validated", |b| {
        b.iter_batched(
            || query.clone(),
            |q| {
                let condition = AppendCondition::new(q).with_after(Some(Cursor::new(77, 1234)));
                validate_condition(&condition).expect("valid condition");
                black_box(condition)
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group! {
    name = core;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = bench_matching, bench_fold, bench_building
}
criterion_main!(core);
