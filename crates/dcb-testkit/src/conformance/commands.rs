//! Command sessions: atomic commit of events and the command record, idempotency, listing.

use super::support::*;
use super::Factory;
use dcb_core::{
    AppendCondition, CommandFilter, CommandRecord, CommitOutcome, EventReaderExt, NewCommand,
    NewEvent, Query, StateProjector, ValidationKind,
};
use serde_json::json;
use std::time::{Duration, SystemTime};

/// A commit that validation must reject: command, events, condition, expected kind, description.
type InvalidCommit<'a> = (
    NewCommand,
    Vec<NewEvent>,
    Option<AppendCondition>,
    ValidationKind,
    &'a str,
);

fn command(command_type: &str, id: Option<&str>) -> NewCommand {
    NewCommand {
        command_type: command_type.into(),
        data: json!({ "course_id": "c1", "note": "with \"quotes\" and \\" }),
        metadata: Some(json!({ "user": "alice" })),
        id: id.map(Into::into),
    }
}

fn committed(outcome: CommitOutcome, context: &str) -> CommandRecord {
    match outcome {
        CommitOutcome::Committed(record) => record,
        CommitOutcome::Duplicate(record) => {
            panic!("{context}: expected Committed, got Duplicate({record:?})")
        }
    }
}

/// A commit writes its events and the command record in one transaction; `commands()` lists it
/// and filters by type.
pub async fn command_commit_records_command(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let course = q(&["CourseDefined"], &[("course_id", "c1")]);
    let decision = session
        .project(StateProjector::exists(course.clone()))
        .await
        .unwrap_or_else(|err| panic!("project in a session failed: {err}"));
    assert!(!decision.states, "c1 is not defined yet");
    let cmd = command("DefineCourse", Some("cmd-1"));
    let events = vec![
        ev("CourseDefined", &[("course_id", "c1")]),
        ev("CourseOpened", &[("course_id", "c1")]),
    ];
    let outcome = session
        .commit(&cmd, events, Some(decision.condition))
        .await
        .unwrap_or_else(|err| panic!("commit failed: {err}"));
    let record = committed(outcome, "first commit");
    drop(session);

    let all = all_events(&*store).await;
    assert_eq!(all.len(), 2, "both events written");
    assert_eq!(
        record.last_event,
        Some(all[1].cursor),
        "the record names the last event's cursor"
    );
    assert!(
        all.iter()
            .all(|e| e.cursor.transaction_id == record.transaction_id),
        "events and command share one transaction id ({}): {:?}",
        record.transaction_id,
        all.iter().map(|e| e.cursor).collect::<Vec<_>>()
    );
    assert_eq!(
        record.id.as_deref(),
        Some("cmd-1"),
        "the record keeps the id"
    );
    assert_eq!(
        record.command_type, cmd.command_type,
        "the record keeps the type"
    );
    assert_eq!(
        record.data, cmd.data,
        "the record keeps the data byte for byte"
    );
    assert_eq!(
        record.metadata, cmd.metadata,
        "the record keeps the metadata"
    );

    let listed = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert_eq!(
        listed,
        vec![record.clone()],
        "commands() lists the recorded command"
    );

    // A second command of another type, then filter by type.
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let other = committed(
        session
            .commit(
                &command("RenameCourse", None),
                vec![ev("CourseRenamed", &[("course_id", "c1")])],
                None,
            )
            .await
            .unwrap_or_else(|err| panic!("second commit failed: {err}")),
        "second commit",
    );
    assert_eq!(
        other.id, None,
        "a command without id is recorded without id"
    );
    drop(session);
    let session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let found = session
        .find_command("cmd-1")
        .await
        .unwrap_or_else(|err| panic!("find_command failed: {err}"));
    assert_eq!(
        found,
        Some(record.clone()),
        "find_command returns the record by id"
    );
    let missing = session
        .find_command("cmd-404")
        .await
        .unwrap_or_else(|err| panic!("find_command failed: {err}"));
    assert_eq!(missing, None, "find_command of an unknown id is None");
    drop(session);

    let by_type = |t: &str| CommandFilter::default().command_type(t);
    let define = store
        .commands(&by_type("DefineCourse"))
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert_eq!(define, vec![record.clone()], "filter by DefineCourse");
    let rename = store
        .commands(&by_type("RenameCourse"))
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert_eq!(rename, vec![other.clone()], "filter by RenameCourse");
    let none = store
        .commands(&by_type("Nope"))
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert!(none.is_empty(), "no command of type Nope: {none:?}");
    let both = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert_eq!(both, vec![record, other], "commands() lists oldest first");
}

/// A command without events is recorded with `last_event: None` and writes no event.
pub async fn command_without_events(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(&*store, vec![ev("Existing", &[])], "seed").await;
    let before = all_events(&*store).await;
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let record = committed(
        session
            .commit(
                &command("Ping", Some("ping-1")),
                vec![],
                Some(AppendCondition::new(Query::types(["Nope"]))),
            )
            .await
            .unwrap_or_else(|err| panic!("commit without events failed: {err}")),
        "commit without events",
    );
    drop(session);
    assert_eq!(record.last_event, None, "no event, no last_event");
    assert_unchanged(&*store, &before, "commit without events").await;
    let listed = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert_eq!(listed, vec![record], "the command is recorded");
}

/// A second commit with the same id writes nothing and returns the original record, also when
/// its condition would now conflict (the retry of a commit whose answer was lost).
pub async fn command_duplicate_id(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let course = q(&["CourseDefined"], &[("course_id", "c1")]);
    let events = || vec![ev("CourseDefined", &[("course_id", "c1")])];
    let cmd = command("DefineCourse", Some("same-id"));
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let decision = session
        .project(StateProjector::exists(course.clone()))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    let condition = decision.condition;
    let original = committed(
        session
            .commit(&cmd, events(), Some(condition.clone()))
            .await
            .unwrap_or_else(|err| panic!("commit failed: {err}")),
        "first commit",
    );
    drop(session);
    let before = all_events(&*store).await;
    assert_eq!(before.len(), 1, "one event written");

    // Identical retry, whose condition would conflict with its own first attempt.
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let retry = session
        .commit(&cmd, events(), Some(condition))
        .await
        .unwrap_or_else(|err| panic!("a retry with the same id must not fail: {err}"));
    assert_eq!(
        retry,
        CommitOutcome::Duplicate(original.clone()),
        "identical retry returns Duplicate(original)"
    );
    drop(session);
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    // Same id, different content and no condition.
    let other = NewCommand {
        command_type: "SomethingElse".into(),
        data: json!({ "x": 1 }),
        metadata: None,
        id: Some("same-id".into()),
    };
    let again = session
        .commit(&other, vec![ev("Other", &[])], None)
        .await
        .unwrap_or_else(|err| panic!("a different command with a used id must not fail: {err}"));
    assert_eq!(
        again,
        CommitOutcome::Duplicate(original.clone()),
        "same id returns Duplicate(original)"
    );
    drop(session);
    assert_unchanged(&*store, &before, "duplicate commits").await;
    let listed = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert_eq!(
        listed,
        vec![original],
        "only the original command is recorded"
    );
}

/// A commit whose condition conflicts writes neither events nor the command.
pub async fn command_condition_conflict_writes_nothing(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let course = q(&["CourseDefined"], &[("course_id", "c1")]);
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let decision = session
        .project(StateProjector::exists(course.clone()))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    // Someone else defines c1 meanwhile.
    append(
        &*store,
        vec![ev("CourseDefined", &[("course_id", "c1")])],
        "concurrent definition",
    )
    .await;
    let before = all_events(&*store).await;
    let result = session
        .commit(
            &command("DefineCourse", Some("loser")),
            vec![ev("CourseDefined", &[("course_id", "c1")])],
            Some(decision.condition),
        )
        .await;
    match result {
        Err(err) => assert!(
            err.is_conflict(),
            "the commit must fail with Error::Conflict, got {err:?}"
        ),
        Ok(outcome) => panic!("the commit must conflict, got {outcome:?}"),
    }
    drop(session);
    assert_unchanged(&*store, &before, "conflicting commit").await;
    let listed = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert!(
        listed.is_empty(),
        "a conflicting commit records no command: {listed:?}"
    );
    let session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    let found = session
        .find_command("loser")
        .await
        .unwrap_or_else(|err| panic!("find_command failed: {err}"));
    assert_eq!(found, None, "the failed command's id is free");
    drop(session);
    let mut session = store
        .command_session()
        .await
        .unwrap_or_else(|err| panic!("command_session failed: {err}"));
    // The id can be used by a later, successful attempt.
    let decision = session
        .project(StateProjector::exists(course))
        .await
        .unwrap_or_else(|err| panic!("project failed: {err}"));
    assert!(decision.states, "c1 is defined now");
    committed(
        session
            .commit(
                &command("DefineCourse", Some("loser")),
                vec![ev("CourseRejected", &[("course_id", "c1")])],
                Some(decision.condition),
            )
            .await
            .unwrap_or_else(|err| panic!("retry after re-deciding failed: {err}")),
        "retry after re-deciding",
    );
}

/// Invalid commands and invalid events in a commit are rejected and write nothing.
pub async fn command_invalid_input_writes_nothing(factory: Factory<'_>) {
    let store = factory.new_store().await;
    append(&*store, vec![ev("Existing", &[])], "seed").await;
    let before = all_events(&*store).await;
    let mut nul_data = command("C", None);
    nul_data.data = json!({ "x": "\u{0}" });
    let mut nul_meta = command("C", None);
    nul_meta.metadata = Some(json!(["\u{0}"]));
    let cases: Vec<InvalidCommit<'_>> = vec![
        (
            command("", None),
            vec![ev("E", &[])],
            None,
            ValidationKind::EmptyEventType,
            "empty command type",
        ),
        (
            nul_data,
            vec![ev("E", &[])],
            None,
            ValidationKind::NulCharacter,
            "NUL in command data",
        ),
        (
            nul_meta,
            vec![ev("E", &[])],
            None,
            ValidationKind::NulCharacter,
            "NUL in command metadata",
        ),
        (
            command("C", Some("c-bad")),
            vec![ev("E", &[]), ev("E", &[("k", "")])],
            None,
            ValidationKind::EmptyTagValue,
            "invalid event in a commit",
        ),
        (
            command("C", None),
            vec![ev("E", &[])],
            Some(AppendCondition::new(Query::default())),
            ValidationKind::EmptyQuery,
            "empty condition query in a commit",
        ),
    ];
    for (cmd, events, condition, kind, what) in cases {
        let mut session = store
            .command_session()
            .await
            .unwrap_or_else(|err| panic!("command_session failed: {err}"));
        expect_validation(session.commit(&cmd, events, condition).await, kind, what);
    }
    assert_unchanged(&*store, &before, "invalid commits").await;
    let listed = store
        .commands(&CommandFilter::default())
        .await
        .unwrap_or_else(|err| panic!("commands failed: {err}"));
    assert!(
        listed.is_empty(),
        "invalid commits record no command: {listed:?}"
    );
}

/// `commands()` honours limit and the time window.
pub async fn command_list_filters(factory: Factory<'_>) {
    let store = factory.new_store().await;
    let start = SystemTime::now() - Duration::from_secs(60);
    let mut records = Vec::new();
    for i in 0..5 {
        let mut session = store
            .command_session()
            .await
            .unwrap_or_else(|err| panic!("command_session failed: {err}"));
        let cmd = command(
            if i % 2 == 0 { "Even" } else { "Odd" },
            Some(&format!("c{i}")),
        );
        records.push(committed(
            session
                .commit(&cmd, vec![evn(i, "E", &[])], None)
                .await
                .unwrap_or_else(|err| panic!("commit {i} failed: {err}")),
            "listing fixture",
        ));
    }
    let list = |filter: CommandFilter| {
        let store = store.clone();
        async move {
            store
                .commands(&filter)
                .await
                .unwrap_or_else(|err| panic!("commands failed: {err}"))
        }
    };
    assert_eq!(
        list(CommandFilter::default()).await,
        records,
        "all five, oldest first"
    );
    assert_eq!(
        list(CommandFilter::default().limit(2)).await,
        records[..2].to_vec(),
        "limit 2 gives the two oldest"
    );
    let even = list(CommandFilter::default().command_type("Even").limit(2)).await;
    assert_eq!(
        even,
        vec![records[0].clone(), records[2].clone()],
        "type filter and limit"
    );
    let far = SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(
        list(CommandFilter::default().between(start, far)).await,
        records,
        "a window around all of them"
    );
    let later = far + Duration::from_secs(1);
    assert!(
        list(CommandFilter::default().between(far, later))
            .await
            .is_empty(),
        "a window in the future is empty"
    );
    let earlier = start - Duration::from_secs(60);
    assert!(
        list(CommandFilter::default().between(earlier, start))
            .await
            .is_empty(),
        "a window in the past is empty"
    );
    assert!(
        records
            .windows(2)
            .all(|w| w[0].transaction_id < w[1].transaction_id),
        "sequential commands have increasing transaction ids"
    );
}
