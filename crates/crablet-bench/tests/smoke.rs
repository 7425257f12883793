//! Every scenario of the load generator runs briefly against a test schema and reports one
//! well-formed JSON result without errors, so a broken baseline or scenario fails CI rather than
//! the next benchmark campaign.
use std::process::Command;

fn run(url: &str, schema: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let output = Command::new(env!("CARGO_BIN_EXE_crablet-bench"))
        .args(args)
        .args(["--schema", schema, "--json", "--warmup", "0"])
        .env("DATABASE_URL", url)
        .output()
        .expect("run crablet-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "crablet-bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("a JSON result line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_reports_without_errors() {
    let schema = dcb_testkit::pg::TestSchema::new().await;
    let (url, name) = (schema.url.clone(), schema.schema.clone());
    let short = ["--duration", "0.3"];
    let cases: Vec<Vec<&str>> = vec![
        vec!["raw-insert", "--fresh", "--preload", "300"],
        vec![
            "raw-insert",
            "--raw-indexes",
            "--raw-locks",
            "--clients",
            "2",
        ],
        vec!["append", "--events-per-append", "3"],
        vec!["append-if", "--clients", "2"],
        vec!["raw-decision"],
        vec!["append-if-hot", "--clients", "3", "--hot-backoff-ms", "1"],
        vec!["batch", "--batch-size", "60"],
        vec!["append-if-after", "--clients", "2"],
        vec!["commands", "--batch-size", "20"],
        vec!["raw-commands", "--batch-size", "20", "--raw-indexes"],
        vec![
            "raw-batch",
            "--batch-size",
            "60",
            "--raw-indexes",
            "--raw-locks",
        ],
        vec!["query"],
        vec!["raw-query"],
        vec!["project"],
        vec!["raw-project"],
        vec!["stream"],
        vec!["raw-stream"],
        vec!["compare", "append", "--rounds", "1"],
    ];
    for case in cases {
        let mut args = case.clone();
        args.extend(short);
        let results = tokio::task::spawn_blocking({
            let (url, name) = (url.clone(), name.clone());
            move || run(&url, &name, &args)
        })
        .await
        .expect("join");
        assert!(!results.is_empty(), "{case:?} printed no result");
        for result in &results {
            if result["scenario"] == "ratio" || result["scenario"] == "compare" {
                let ratio = result["ratio"]
                    .as_f64()
                    .or(result["median_ratio"].as_f64())
                    .unwrap_or(0.0);
                assert!(ratio > 0.0, "{case:?}: {result}");
                assert_eq!(
                    result["errors"].as_u64().unwrap_or(0),
                    0,
                    "{case:?}: {result}"
                );
                continue;
            }
            assert_eq!(result["errors"], 0, "{case:?}: {result}");
            assert!(
                result["events"].as_u64().unwrap_or(0) > 0,
                "{case:?} did nothing: {result}"
            );
        }
    }
    schema.drop_now().await.expect("drop the bench schema");
}
