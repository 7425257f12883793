//! End-to-end tests of the `crablet` binary against PostgreSQL, each in its own schema.
mod support;

use async_trait::async_trait;
use dcb_core::{Cursor, Event, EventStore, Query};
use dcb_postgres::{tokio_postgres, EventHandler, FailurePolicy, HandlerError, HandlerOptions};
use dcb_testkit::pg::TestSchema;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::{command, crablet, crablet_async, event, output, store_on, CRABLET};

fn temp_file(schema: &TestSchema, name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}-{name}", schema.schema))
}

fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

fn count_events(schema: &TestSchema) -> usize {
    jsonl(
        &crablet(schema, &["events", "--format", "jsonl"])
            .ok()
            .stdout,
    )
    .len()
}

#[tokio::test]
async fn migrate_twice_concurrently_then_status() {
    let schema = TestSchema::new().await;
    let children: Vec<_> = (0..2)
        .map(|_| {
            command(&schema, &["migrate"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for child in children {
        let run = output(child.wait_with_output().expect("wait")).ok();
        assert!(
            run.stdout
                .contains(&format!("is at version {}", dcb_postgres::SCHEMA_VERSION)),
            "{}",
            run.stdout
        );
    }
    // And once more, when there is nothing left to do.
    crablet(&schema, &["migrate"]).ok();
    let status = crablet(&schema, &["status", "--json"]).ok();
    let status: Value = serde_json::from_str(&status.stdout).expect("json");
    assert_eq!(status["schema_version"], dcb_postgres::SCHEMA_VERSION);
    assert_eq!(status["events"], 0);
    assert_eq!(status["head"], Value::Null);
}

/// Fails on every `Poison` event; parks it after one attempt.
struct PoisonSensitive;

#[async_trait]
impl EventHandler for PoisonSensitive {
    fn name(&self) -> &str {
        "poison-sensitive"
    }

    fn query(&self) -> Query {
        Query::types(["Deposited", "Poison"])
    }

    async fn handle(
        &self,
        _tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError> {
        if events.iter().any(|e| e.event_type == "Poison") {
            return Err("cannot digest poison".into());
        }
        Ok(())
    }
}

/// Fails on `Poison` until cured; records what it digested in its own table, in the batch's
/// transaction.
struct Curable {
    cured: Arc<AtomicBool>,
    table: String,
}

#[async_trait]
impl EventHandler for Curable {
    fn name(&self) -> &str {
        "curable"
    }

    fn query(&self) -> Query {
        Query::types(["Poison"])
    }

    async fn handle(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        events: &[Event],
    ) -> Result<(), HandlerError> {
        if !self.cured.load(Ordering::SeqCst) {
            return Err("cannot digest poison yet".into());
        }
        for event in events {
            tx.execute(
                &format!("INSERT INTO {} (cursor) VALUES ($1)", self.table),
                &[&event.cursor.to_string()],
            )
            .await?;
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_asks_the_running_handler_and_reports_the_outcome() {
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    let table = format!("\"{}\".digested", schema.schema);
    schema
        .connect()
        .await
        .expect("connect")
        .batch_execute(&format!("CREATE TABLE {table} (cursor text PRIMARY KEY)"))
        .await
        .expect("table");
    let poison = store
        .append(vec![event("Poison", &[("account", "a1")], json!({}))])
        .await
        .expect("append");
    let cured = Arc::new(AtomicBool::new(false));
    let options = HandlerOptions::default()
        .poll_interval(Duration::from_millis(50))
        .retry_initial(Duration::from_millis(5))
        .retry_max(Duration::from_millis(20))
        .failure_policy(FailurePolicy::Park { max_attempts: 1 });
    let handler = || Curable {
        cured: Arc::clone(&cured),
        table: table.clone(),
    };
    let running = store.run_handler(handler(), options).expect("run");
    store
        .wait_until_processed("curable", poison, Duration::from_secs(20))
        .await
        .expect("parked");
    let p = poison.to_string();

    // Still broken: the running instance retries it, fails, and the command says so.
    crablet_async(
        &schema,
        &["handlers", "replay", "curable", &p, "--timeout", "20"],
    )
    .await
    .fails(
        1,
        &[
            "failed again (attempt 2)",
            "cannot digest poison yet",
            "stays parked",
        ],
    );
    let parked = store.parked_events("curable").await.expect("parked");
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].attempts, 2);
    assert_eq!(
        parked[0].replay_requested_at, None,
        "an attempt clears the request"
    );

    // Nobody runs the handler: the request waits for the next instance.
    running.stop().await;
    let requested = crablet_async(&schema, &["handlers", "replay", "curable", &p])
        .await
        .ok()
        .stdout;
    assert!(
        requested.contains("no instance of it is running"),
        "{requested}"
    );
    let listed: Value = serde_json::from_str(
        &crablet_async(&schema, &["handlers", "parked", "curable", "--json"])
            .await
            .ok()
            .stdout,
    )
    .expect("json");
    assert!(listed[0]["replay_requested_at"].is_string(), "{listed}");

    // Fixed and restarted: it replays the requested event on its own, once.
    cured.store(true, Ordering::SeqCst);
    let running = store.run_handler(handler(), options).expect("run");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !store
        .parked_events("curable")
        .await
        .expect("parked")
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the requested replay did not happen"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let digested = schema
        .connect()
        .await
        .expect("connect")
        .query(&format!("SELECT cursor FROM {table}"), &[])
        .await
        .expect("rows");
    let digested: Vec<String> = digested.iter().map(|r| r.get(0)).collect();
    assert_eq!(digested, std::slice::from_ref(&p));

    // Nothing parked there any more.
    crablet_async(&schema, &["handlers", "replay", "curable", &p])
        .await
        .fails(1, &["no parked event at", &p]);
    crablet_async(&schema, &["handlers", "replay", "ghost", &p])
        .await
        .fails(1, &["no handler named \"ghost\""]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_handlers_show_lag_lease_and_parked_events() {
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    let first = store
        .append(vec![event(
            "Deposited",
            &[("account", "a1")],
            json!({"amount": 1}),
        )])
        .await
        .expect("append");
    let poison = store
        .append(vec![event("Poison", &[("account", "a1")], json!({}))])
        .await
        .expect("append");
    let head = store
        .append(vec![event(
            "Deposited",
            &[("account", "a2")],
            json!({"amount": 2}),
        )])
        .await
        .expect("append");
    // The oldest event "lagging" has not processed is at least 50 ms old when status runs.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A handler that is 2 events behind and that nobody runs.
    store
        .reset_handler("lagging", Some(first))
        .await
        .expect("checkpoint");
    // A running handler that parks the poison event.
    let options = HandlerOptions::default()
        .poll_interval(Duration::from_millis(50))
        .retry_initial(Duration::from_millis(5))
        .retry_max(Duration::from_millis(20))
        .failure_policy(FailurePolicy::Park { max_attempts: 1 });
    let running = store.run_handler(PoisonSensitive, options).expect("run");
    store
        .wait_until_processed("poison-sensitive", head, Duration::from_secs(20))
        .await
        .expect("processed");

    let text = crablet(&schema, &["status"]).ok().stdout;
    assert!(
        text.contains(&format!("schema     {} (version", schema.schema)),
        "{text}"
    );
    assert!(text.contains("events     3"), "{text}");
    assert!(text.contains(&format!("head       {head}")), "{text}");
    assert!(text.contains("events_pkey"), "{text}");
    let lagging = text
        .lines()
        .find(|l| l.trim_start().starts_with("lagging "))
        .unwrap_or_else(|| panic!("no lagging row in {text}"));
    let cells: Vec<&str> = lagging.split_whitespace().collect();
    assert_eq!(cells[1], first.to_string(), "{lagging}");
    assert_eq!(cells[2], "2", "lag in events: {lagging}");
    assert_eq!(cells[4], "free", "{lagging}");
    let sensitive = text
        .lines()
        .find(|l| l.trim_start().starts_with("poison-sensitive "))
        .unwrap_or_else(|| panic!("no poison-sensitive row in {text}"));
    let cells: Vec<&str> = sensitive.split_whitespace().collect();
    assert_eq!(cells[2], "0", "caught up: {sensitive}");
    assert_eq!(cells[4], "held", "{sensitive}");
    assert_eq!(cells[6], "1", "parked: {sensitive}");

    let status: Value =
        serde_json::from_str(&crablet(&schema, &["status", "--json"]).ok().stdout).expect("json");
    assert_eq!(status["events"], 3);
    assert_eq!(status["head"], head.to_string());
    assert!(status["total_bytes"].as_u64().expect("bytes") > 0);
    assert!(status["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .any(|t| t["name"] == "events" && t["total_bytes"].as_u64() > Some(0)));
    let handlers = status["handlers"].as_array().expect("handlers");
    let lagging = handlers
        .iter()
        .find(|h| h["name"] == "lagging")
        .expect("lagging");
    assert_eq!(lagging["checkpoint"], first.to_string());
    assert_eq!(lagging["lag_events"], 2);
    assert!(
        lagging["lag_seconds"].as_f64().expect("seconds") >= 0.04,
        "its oldest unprocessed event is at least 50 ms old: {lagging}"
    );
    assert_eq!(lagging["lease_held"], false);
    assert_eq!(lagging["parked"], 0);
    let sensitive = handlers
        .iter()
        .find(|h| h["name"] == "poison-sensitive")
        .expect("poison-sensitive");
    assert_eq!(sensitive["lag_events"], 0);
    assert_eq!(sensitive["lag_seconds"], 0.0);
    assert_eq!(sensitive["lease_held"], true);
    assert_eq!(sensitive["parked"], 1);

    // The same through `handlers list --json`.
    let list: Value = serde_json::from_str(
        &crablet(&schema, &["handlers", "list", "--json"])
            .ok()
            .stdout,
    )
    .expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(2));

    // Parked events: listed, then dropped.
    let parked = crablet(&schema, &["handlers", "parked", "poison-sensitive"])
        .ok()
        .stdout;
    assert!(parked.contains(&poison.to_string()), "{parked}");
    assert!(parked.contains("cannot digest poison"), "{parked}");
    let parked: Value = serde_json::from_str(
        &crablet(
            &schema,
            &["handlers", "parked", "poison-sensitive", "--json"],
        )
        .ok()
        .stdout,
    )
    .expect("json");
    assert_eq!(parked[0]["cursor"], poison.to_string());
    assert_eq!(parked[0]["type"], "Poison");
    let dropped = crablet(
        &schema,
        &[
            "handlers",
            "drop-parked",
            "poison-sensitive",
            &poison.to_string(),
        ],
    )
    .ok()
    .stdout;
    assert!(
        dropped.contains(&format!("dropped parked event {poison}")),
        "{dropped}"
    );
    crablet(
        &schema,
        &[
            "handlers",
            "drop-parked",
            "poison-sensitive",
            &poison.to_string(),
        ],
    )
    .fails(1, &["no parked event at", &poison.to_string()]);
    running.stop().await;

    // Reset: to the beginning, then to a cursor; unknown names are refused.
    let reset = crablet(&schema, &["handlers", "reset", "lagging"])
        .ok()
        .stdout;
    assert!(
        reset.contains(&format!("from {first} to the beginning")),
        "{reset}"
    );
    assert_eq!(
        store
            .handler_checkpoint("lagging")
            .await
            .expect("checkpoint"),
        None
    );
    crablet(
        &schema,
        &["handlers", "reset", "lagging", "--to", &head.to_string()],
    )
    .ok();
    assert_eq!(
        store
            .handler_checkpoint("lagging")
            .await
            .expect("checkpoint"),
        Some(head)
    );
    crablet(&schema, &["handlers", "reset", "ghost"])
        .fails(1, &["no handler named \"ghost\"", "--create"]);
    crablet(&schema, &["handlers", "parked", "ghost"]).fails(1, &["no handler named \"ghost\""]);
    crablet(&schema, &["handlers", "reset", "ghost", "--to", "1/x"])
        .fails(2, &["malformed cursor \"1/x\""]);
    crablet(
        &schema,
        &["handlers", "reset", "ghost", "--create", "--to", "1/1"],
    )
    .ok();
    assert_eq!(
        store.handler_checkpoint("ghost").await.expect("checkpoint"),
        Some(Cursor::new(1, 1))
    );
}

#[tokio::test]
async fn events_filter_limit_backwards_and_formats() {
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    let mut cursors = Vec::new();
    for (i, (t, course, student)) in [
        ("CourseDefined", "c1", "-"),
        ("StudentEnrolled", "c1", "s1"),
        ("StudentEnrolled", "c2", "s1"),
        ("StudentLeft", "c1", "s1"),
        ("StudentEnrolled", "c1", "s2"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut tags = vec![("course_id", course)];
        if student != "-" {
            tags.push(("student_id", student));
        }
        let data = json!({"i": i, "padding": "p".repeat(200)});
        cursors.push(
            store
                .append(vec![event(t, &tags, data)])
                .await
                .expect("append"),
        );
    }
    let indexes = |args: &[&str]| -> Vec<u64> {
        let mut all = vec!["events", "--format", "jsonl"];
        all.extend_from_slice(args);
        jsonl(&crablet(&schema, &all).ok().stdout)
            .iter()
            .map(|line| line["data"]["i"].as_u64().expect("i"))
            .collect()
    };
    assert_eq!(indexes(&[]), [0, 1, 2, 3, 4]);
    assert_eq!(
        indexes(&["--type", "StudentLeft", "--type", "CourseDefined"]),
        [0, 3],
        "types are OR-ed"
    );
    assert_eq!(
        indexes(&["--tag", "course_id=c1", "--tag", "student_id=s1"]),
        [1, 3],
        "tags are AND-ed"
    );
    assert_eq!(
        indexes(&["--type", "StudentEnrolled", "--tag", "course_id=c1"]),
        [1, 4]
    );
    assert_eq!(indexes(&["--limit", "2"]), [0, 1]);
    assert_eq!(indexes(&["--backwards", "--limit", "2"]), [4, 3]);
    assert_eq!(indexes(&["--after", &cursors[2].to_string()]), [3, 4]);
    assert_eq!(
        indexes(&["--backwards", "--before", &cursors[3].to_string()]),
        [2, 1, 0]
    );
    assert!(indexes(&["--type", "Nothing"]).is_empty());

    // A JSON line carries everything.
    let line = &jsonl(
        &crablet(&schema, &["events", "--format", "jsonl", "--limit", "1"])
            .ok()
            .stdout,
    )[0];
    assert_eq!(line["type"], "CourseDefined");
    assert_eq!(line["tags"], json!(["course_id:c1"]));
    assert_eq!(line["cursor"], cursors[0].to_string());
    assert_eq!(line["metadata"], Value::Null);
    assert!(line["occurred_at"].as_str().expect("time").ends_with('Z'));

    // The table fits the width it is given, and --no-truncate shows everything.
    let table = output(
        command(&schema, &["events"])
            .env("COLUMNS", "90")
            .output()
            .expect("run"),
    );
    let table = table.ok().stdout;
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 6, "a header and 5 rows: {table}");
    assert!(lines[0].starts_with("CURSOR"), "{table}");
    assert!(lines[1].starts_with(&cursors[0].to_string()), "{table}");
    for line in &lines {
        assert!(line.chars().count() <= 90, "too wide: {line:?}");
    }
    assert!(lines[1].ends_with('…'), "{table}");
    let wide = crablet(&schema, &["events", "--no-truncate", "--limit", "1"])
        .ok()
        .stdout;
    assert!(wide.contains(&"p".repeat(200)), "{wide}");
}

#[tokio::test]
async fn follow_prints_new_events_as_they_are_appended() {
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    store
        .append(vec![event("Before", &[("k", "v")], json!({}))])
        .await
        .expect("append");
    let mut child = command(&schema, &["events", "--follow", "--format", "jsonl"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stdout = child.stdout.take().expect("stdout");
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let first: Value = serde_json::from_str(
        &received
            .recv_timeout(Duration::from_secs(15))
            .expect("stored event"),
    )
    .expect("json");
    assert_eq!(first["type"], "Before");
    let started = Instant::now();
    let cursor = store
        .append(vec![event("After", &[("k", "v")], json!({"live": true}))])
        .await
        .expect("append");
    let second: Value = serde_json::from_str(
        &received
            .recv_timeout(Duration::from_secs(15))
            .expect("live event"),
    )
    .expect("json");
    assert_eq!(second["type"], "After");
    assert_eq!(second["cursor"], cursor.to_string());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    child.kill().expect("kill");
    child.wait().expect("wait");
    reader.join().expect("reader");

    // With --limit, following ends by itself.
    let run = crablet(
        &schema,
        &["events", "--follow", "--limit", "2", "--format", "jsonl"],
    )
    .ok();
    assert_eq!(jsonl(&run.stdout).len(), 2);
}

/// A line without the fields the store assigns anew.
fn without_store_fields(line: &str) -> &str {
    line.split_once(",\"occurred_at\":")
        .map(|(kept, _)| kept)
        .unwrap_or_else(|| panic!("no occurred_at in {line}"))
}

#[tokio::test]
async fn export_import_export_round_trip() {
    let source = TestSchema::new().await;
    let store = store_on(&source).await;
    store
        .append(vec![
            event("Plain", &[], json!({})),
            event(
                "Tagged",
                &[("url", "http://x/y:z"), ("name", "Zoë ✓"), ("name", "two")],
                json!({"nested": {"list": [1, 2.5, -3e-7, null, true, "s\"q\\u"], "big": 12345678901234567u64}}),
            ),
        ])
        .await
        .expect("append");
    let mut with_metadata = event("WithMetadata", &[("k", "v")], json!([1, {"b": 2, "a": 1}]));
    with_metadata.metadata = Some(json!({"user": "alice", "n": 1.5}));
    store.append(vec![with_metadata]).await.expect("append");
    for i in 0..7 {
        store
            .append(vec![event(
                "Numbered",
                &[("i", &i.to_string())],
                json!({"i": i}),
            )])
            .await
            .expect("append");
    }
    let first = temp_file(&source, "first.jsonl");
    let second = temp_file(&source, "second.jsonl");
    let done = crablet(
        &source,
        &["export", "--output", first.to_str().expect("path")],
    )
    .ok();
    assert!(
        done.stderr.contains("exported 10 events"),
        "{}",
        done.stderr
    );

    let target = TestSchema::new().await;
    crablet(&target, &["migrate"]).ok();
    let imported = crablet(
        &target,
        &["import", first.to_str().expect("path"), "--batch-size", "3"],
    )
    .ok()
    .stdout;
    assert!(
        imported.contains("imported 10 events in 4 batches"),
        "{imported}"
    );
    crablet(&target, &["export", "-o", second.to_str().expect("path")]).ok();

    let a = std::fs::read_to_string(&first).expect("first");
    let b = std::fs::read_to_string(&second).expect("second");
    assert_eq!(a.lines().count(), 10);
    assert_eq!(
        a.lines().map(without_store_fields).collect::<Vec<_>>(),
        b.lines().map(without_store_fields).collect::<Vec<_>>()
    );
    assert_ne!(a, b, "cursors and times are new");
    // Export to stdout is the same as to a file.
    assert_eq!(crablet(&target, &["export"]).ok().stdout, b);

    // Keeping the recorded times: only the cursors differ, in batches and alone.
    for batch_size in ["3", "1"] {
        let kept = TestSchema::new().await;
        crablet(&kept, &["migrate"]).ok();
        let path = first.to_str().expect("path");
        let args = [
            "import",
            path,
            "--keep-occurred-at",
            "--batch-size",
            batch_size,
        ];
        crablet(&kept, &args).ok();
        let third = crablet(&kept, &["export"]).ok().stdout;
        let without_cursor = |line: &str| {
            let mut value: Value = serde_json::from_str(line).expect("line");
            value.as_object_mut().expect("object").remove("cursor");
            value
        };
        assert_eq!(
            a.lines().map(without_cursor).collect::<Vec<_>>(),
            third.lines().map(without_cursor).collect::<Vec<_>>(),
            "batch size {batch_size}"
        );
    }
    // A line without a time to keep is refused, nothing of its batch written.
    let bare = temp_file(&source, "bare.jsonl");
    std::fs::write(&bare, "{\"type\":\"A\",\"data\":{}}\n").expect("write");
    crablet(
        &target,
        &["import", bare.to_str().expect("path"), "--keep-occurred-at"],
    )
    .fails(1, &["line 1", "no \"occurred_at\" to keep"]);
    let _ = std::fs::remove_file(bare);
    let _ = std::fs::remove_file(first);
    let _ = std::fs::remove_file(second);
}

fn numbered_lines(range: std::ops::Range<u32>, boom_at: Option<u32>) -> String {
    range
        .map(|i| {
            let event_type = if Some(i) == boom_at {
                "Boom"
            } else {
                "Numbered"
            };
            format!("{{\"type\":\"{event_type}\",\"tags\":[\"i:{i}\"],\"data\":{{\"i\":{i}}}}}\n")
        })
        .collect()
}

#[tokio::test]
async fn an_interrupted_import_rerun_does_not_duplicate() {
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    let file = temp_file(&schema, "import.jsonl");
    std::fs::write(&file, numbered_lines(0..20, Some(11)).as_bytes()).expect("write");
    let path = file.to_str().expect("path");
    // The database fails the batch holding line 12 (event 11): the import stops there.
    let admin = dcb_testkit::pg::connect(&schema.url).await.expect("admin");
    let s = &schema.schema;
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION \"{s}\".boom() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.type = 'Boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$; \
             CREATE TRIGGER boom BEFORE INSERT ON \"{s}\".events FOR EACH ROW EXECUTE FUNCTION \"{s}\".boom();"
        ))
        .await
        .expect("trigger");
    crablet(&schema, &["import", path, "--batch-size", "5"]).fails(
        1,
        &[
            "lines 11 to 15",
            "boom",
            "10 event(s) of 2 earlier batch(es)",
        ],
    );
    assert_eq!(count_events(&schema), 10);
    admin
        .batch_execute(&format!("DROP TRIGGER boom ON \"{s}\".events"))
        .await
        .expect("drop trigger");

    // The rerun skips the two imported batches and imports the rest, once.
    let rerun = crablet(&schema, &["import", path, "--batch-size", "5"])
        .ok()
        .stdout;
    assert!(rerun.contains("imported 10 events in 2 batches"), "{rerun}");
    assert!(rerun.contains("skipped 2 batches (10 events)"), "{rerun}");
    // Again, with other batch sizes: nothing new.
    for size in ["3", "7", "500"] {
        let again = crablet(&schema, &["import", path, "--batch-size", size])
            .ok()
            .stdout;
        assert!(again.contains("imported 0 events"), "{size}: {again}");
    }
    let mut seen: Vec<u64> = jsonl(&crablet(&schema, &["export"]).ok().stdout)
        .iter()
        .map(|l| l["data"]["i"].as_u64().expect("i"))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..20).collect::<Vec<u64>>(), "every line once");
    // Each batch is one recorded command.
    let commands = store
        .commands(&dcb_core::CommandFilter::default().command_type("CrabletImportBatch"))
        .await
        .expect("commands");
    assert_eq!(commands.len(), 4);
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn a_corrupt_line_writes_nothing_from_its_batch() {
    let schema = TestSchema::new().await;
    crablet(&schema, &["migrate"]).ok();
    let file = temp_file(&schema, "corrupt.jsonl");
    let path = file.to_str().expect("path");
    let good = numbered_lines(0..10, None);
    let mut lines: Vec<&str> = good.lines().collect();

    // Line 7 is cut short: lines 1-4 (the first batch) are imported, 5-8 are not.
    lines[6] = "{\"type\":\"Numbered\",\"data\":";
    std::fs::write(&file, lines.join("\n")).expect("write");
    crablet(&schema, &["import", path, "--batch-size", "4"]).fails(
        1,
        &[
            "line 7:",
            "invalid JSON",
            "lines 5 to 7",
            "4 event(s) of 1 earlier batch(es)",
        ],
    );
    assert_eq!(count_events(&schema), 4);

    // Lines the store would refuse are named before anything of their batch is written.
    let cases = [
        ("{\"type\":\"\",\"data\":{}}", "event_type"),
        (
            "{\"type\":\"A\",\"tags\":[\"novalue\"],\"data\":{}}",
            "tags[0]",
        ),
        (
            "{\"type\":\"A\",\"tags\":[\"k:\"],\"data\":{}}",
            "tags[0].value",
        ),
        (
            "{\"type\":\"A\",\"tags\":[\"k:1\",\"k:1\"],\"data\":{}}",
            "tags[1]",
        ),
        ("{\"type\":\"A\"}", "missing field `data`"),
        (
            "{\"type\":\"A\",\"data\":{},\"extra\":1}",
            "unknown field `extra`",
        ),
        ("[1,2]", "not an event line"),
    ];
    for (i, (bad, needle)) in cases.iter().enumerate() {
        let file = temp_file(&schema, &format!("bad{i}.jsonl"));
        std::fs::write(&file, format!("{}\n{bad}\n{}", lines[0], lines[1])).expect("write");
        crablet(&schema, &["import", file.to_str().expect("path")]).fails(
            1,
            &["line 2:", needle, "nothing from this batch (lines 1 to 2)"],
        );
        let _ = std::fs::remove_file(file);
    }
    assert_eq!(count_events(&schema), 4, "nothing more was written");
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn bad_input_gets_one_line_and_an_exit_code() {
    let schema = TestSchema::new().await;
    crablet(&schema, &["migrate"]).ok();
    // An unreachable database.
    output(
        Command::new(CRABLET)
            .args([
                "--database-url",
                "postgres://postgres@127.0.0.1:1/postgres",
                "status",
            ])
            .output()
            .expect("run"),
    )
    .fails(
        1,
        &["cannot connect to the database at postgres://postgres@127.0.0.1:1/postgres"],
    );
    // Its password is not printed.
    output(
        Command::new(CRABLET)
            .args([
                "--database-url",
                "postgres://u:secret@127.0.0.1:1/postgres",
                "status",
            ])
            .output()
            .expect("run"),
    )
    .fails(1, &["postgres://u:***@127.0.0.1:1"]);
    // No database at all.
    output(
        Command::new(CRABLET)
            .env_remove("DATABASE_URL")
            .arg("status")
            .output()
            .expect("run"),
    )
    .fails(2, &["--database-url", "DATABASE_URL"]);
    // A schema that was never migrated.
    let missing = format!("{}_missing", schema.schema);
    for args in [
        vec!["status"],
        vec!["events"],
        vec!["handlers", "list"],
        vec!["import", "/dev/null"],
    ] {
        let run = Command::new(CRABLET)
            .env("DATABASE_URL", &schema.url)
            .args(["--schema", missing.as_str()])
            .args(&args)
            .output()
            .expect("run");
        output(run).fails(1, &["no crablet schema", &missing, "crablet --schema"]);
    }
    // Malformed cursors and tags.
    crablet(&schema, &["events", "--after", "12"])
        .fails(2, &["--after", "malformed cursor \"12\""]);
    crablet(&schema, &["events", "--after", "1/2/3"]).fails(2, &["malformed cursor"]);
    crablet(&schema, &["events", "--after", "+1/2"]).fails(2, &["malformed cursor"]);
    crablet(&schema, &["handlers", "drop-parked", "h", "x"]).fails(2, &["malformed cursor \"x\""]);
    crablet(&schema, &["events", "--tag", "course_id"])
        .fails(2, &["malformed tag \"course_id\"", "KEY=VALUE"]);
    crablet(&schema, &["events", "--tag", "=v"]).fails(2, &["malformed tag"]);
    crablet(&schema, &["events", "--limit", "0"]).fails(2, &["--limit"]);
    // A file that is not there.
    crablet(&schema, &["import", "/nonexistent/file.jsonl"])
        .fails(1, &["opening /nonexistent/file.jsonl"]);
    // Help documents how times are kept.
    let help = crablet(&schema, &["import", "--help"]).ok().stdout;
    assert!(help.contains("--keep-occurred-at"), "{help}");
}

#[tokio::test]
async fn partition_enable_list_create_ahead_and_detach() {
    let schema = TestSchema::new().await;
    let store = store_on(&schema).await;
    for i in 0..30 {
        store
            .append(vec![event(
                "Old",
                &[("n", &i.to_string())],
                json!({ "i": i }),
            )])
            .await
            .expect("append");
    }
    let before = crablet(&schema, &["events", "--format", "jsonl"])
        .ok()
        .stdout;
    crablet(&schema, &["partition", "list"])
        .ok()
        .stdout
        .contains("not partitioned")
        .then_some(())
        .expect("unpartitioned at first");
    let enabled = crablet(
        &schema,
        &["partition", "enable", "--range", "20", "--ahead", "1"],
    )
    .ok();
    assert!(enabled.stdout.contains("events_p0"), "{}", enabled.stdout);
    // Same events, same cursors, after the conversion.
    assert_eq!(
        crablet(&schema, &["events", "--format", "jsonl"])
            .ok()
            .stdout,
        before
    );
    let created = crablet(&schema, &["partition", "create-ahead", "--extra", "100"]).ok();
    assert!(
        created.stdout.contains("created events_p"),
        "{}",
        created.stdout
    );
    let list: Value = serde_json::from_str(
        &crablet(&schema, &["partition", "list", "--json"])
            .ok()
            .stdout,
    )
    .expect("json");
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names[0], "events_p0");
    assert!(names.len() >= 6, "{names:?}");
    // The first partition holds the newest position: refused; after more appends, detached.
    crablet(&schema, &["partition", "detach", "events_p0"]).fails(1, &["only older partitions"]);
    for i in 0..40 {
        store
            .append(vec![event(
                "New",
                &[("n", &i.to_string())],
                json!({ "i": i }),
            )])
            .await
            .expect("append");
    }
    let detached = crablet(&schema, &["partition", "detach", "events_p0"]).ok();
    assert!(detached.stdout.contains("dump it"), "{}", detached.stdout);
    // events_p0 was [MINVALUE, 60) (30 events and one range of headroom): positions 60..=70
    // remain.
    assert_eq!(count_events(&schema), 11);
    crablet(&schema, &["partition", "detach", "events_p0"]).fails(1, &["no partition"]);
}

/// Waits until `client` (on a standby) shows the event at `position` in `table` (which the
/// standby may not have replayed yet either).
async fn wait_until_shown(client: &tokio_postgres::Client, table: &str, position: i64) {
    for _ in 0..500 {
        let shown = client
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE position = $1)"),
                &[&position],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0));
        if shown {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the standby did not show position {position} within 5 s");
}

fn types_of(jsonl_text: &str) -> Vec<String> {
    jsonl(jsonl_text)
        .iter()
        .map(|e| e["type"].as_str().expect("type").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_export_read_on_a_standby_with_read_from_standby() {
    let schema = TestSchema::new().await;
    crablet(&schema, &["--read-from", "standby", "events"])
        .fails(2, &["--read-from standby needs at least one --standby URL"]);
    crablet(&schema, &["--read-from", "sideways", "events"]).fails(2, &["sideways"]);
    let Some(pair) = dcb_testkit::pg::replicated_pair().await else {
        eprintln!("notice: standby CLI test skipped: no local PostgreSQL server binaries");
        return;
    };
    let standby = pair.new_standby().await;
    let schema = TestSchema::create_in(pair.primary.url())
        .await
        .expect("schema on the primary");
    let table = format!("\"{}\".events", schema.schema);
    let store = store_on(&schema).await;
    let opened = store
        .append(vec![event("Opened", &[("account", "a1")], json!({}))])
        .await
        .expect("append");
    let control = dcb_testkit::pg::connect(standby.url())
        .await
        .expect("standby connection");
    wait_until_shown(&control, &table, opened.position).await;
    // With replay paused, a new event shows on the primary only.
    control
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    store
        .append(vec![event("Closed", &[("account", "a1")], json!({}))])
        .await
        .expect("append");
    let on_standby = ["--standby", standby.url(), "--read-from", "standby"];
    let events = crablet_async(
        &schema,
        &[&on_standby[..], &["events", "--format", "jsonl"]].concat(),
    )
    .await
    .ok();
    assert_eq!(types_of(&events.stdout), ["Opened"], "{}", events.stderr);
    let exported = crablet_async(&schema, &[&on_standby[..], &["export"]].concat())
        .await
        .ok();
    assert_eq!(types_of(&exported.stdout), ["Opened"]);
    // The default, and --read-from primary, read on the primary even with --standby given.
    for read_from in [&[][..], &["--read-from", "primary"][..]] {
        let args = [
            &["--standby", standby.url()][..],
            read_from,
            &["events", "--format", "jsonl"],
        ]
        .concat();
        let events = crablet_async(&schema, &args).await.ok();
        assert_eq!(types_of(&events.stdout), ["Opened", "Closed"]);
    }
    control
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
}
