//! Running the `crablet` binary against a test schema, shared by the end-to-end tests.
#![allow(dead_code)] // each test binary uses its own part

use dcb_core::NewEvent;
use dcb_postgres::{PostgresEventStore, StoreConfig};
use dcb_testkit::pg::TestSchema;
use serde_json::Value;
use std::process::{Command, Output, Stdio};

pub const CRABLET: &str = env!("CARGO_BIN_EXE_crablet");

/// What a run of the binary printed.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code,
            Some(0),
            "crablet failed:\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a failure with `code` and exactly one `error: ` line on stderr containing
    /// every one of `needles`.
    pub fn fails(self, code: i32, needles: &[&str]) -> Self {
        assert_eq!(
            self.code,
            Some(code),
            "exit code; stdout: {} stderr: {}",
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {:?}", self.stderr);
        assert!(lines[0].starts_with("error: "), "{:?}", lines[0]);
        for needle in needles {
            assert!(
                lines[0].contains(needle),
                "{needle:?} not in {:?}",
                lines[0]
            );
        }
        self
    }
}

pub fn output(out: Output) -> Run {
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn command(schema: &TestSchema, args: &[&str]) -> Command {
    let mut command = Command::new(CRABLET);
    command
        .env("DATABASE_URL", &schema.url)
        .env_remove("COLUMNS")
        .arg("--schema")
        .arg(&schema.schema)
        .args(args)
        .stdin(Stdio::null());
    command
}

pub fn crablet(schema: &TestSchema, args: &[&str]) -> Run {
    output(command(schema, args).output().expect("run crablet"))
}

pub async fn store_on(schema: &TestSchema) -> PostgresEventStore {
    PostgresEventStore::connect(
        &schema.url,
        StoreConfig::default()
            .schema(schema.schema.clone())
            .auto_migrate(true)
            .pool_size(4),
    )
    .await
    .expect("store")
}

pub fn event(event_type: &str, tags: &[(&str, &str)], data: Value) -> NewEvent {
    NewEvent::builder(event_type)
        .tags(tags.iter().map(|(k, v)| dcb_core::Tag::new(*k, *v)))
        .data(&data)
        .build()
        .expect("event")
}

/// Runs the binary off the async workers, which the handler's runner needs meanwhile.
pub async fn crablet_async(schema: &TestSchema, args: &[&str]) -> Run {
    let command = command(schema, args);
    tokio::task::spawn_blocking(move || {
        let mut command = command;
        output(command.output().expect("run crablet"))
    })
    .await
    .expect("crablet task")
}
