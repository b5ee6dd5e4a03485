//! Smoke runs of `presence-loadgen` (it must keep working; no assertion on time): the ingest
//! flood against the real bridge binary, memory-only and with Postgres, the lookup load with
//! wrk, the fan-out and idle-subscriber runs, the replica runs (ingest through a leader of
//! followers, failover timing) on a private NATS, and a clear error when the bridge cannot
//! start.

mod common;

use common::*;
use serde_json::Value;

fn loadgen(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_presence-loadgen"))
        .args(args)
        .args(["--bridge", env!("CARGO_BIN_EXE_presence-bridge")])
        .output()
        .expect("presence-loadgen runs")
}

fn report(out: &std::process::Output, json: &std::path::Path) -> Value {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).expect("JSON written")).expect("JSON")
}

#[test]
fn ingest_memory_only_applies_every_stanza_and_measures_the_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ingest.json");
    let out = loadgen(&[
        "ingest",
        "--users",
        "200",
        "--stanzas",
        "3000",
        "--baseline",
        "--webhooks",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    assert_eq!(r["applied"], 3000, "{r}");
    // A second bridge ran with two webhook endpoints (its config accepted, every stanza
    // applied: the ratio is over full runs).
    assert_eq!(r["webhooks"]["endpoints"], 2, "{r}");
    assert!(
        r["webhooks"]["ratio_to_without"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(r["baseline_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["ratio_to_baseline"].as_f64().unwrap() > 0.0, "{r}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| applied changes | 3000 |"), "{table}");
    assert!(table.contains("| ratio to baseline |"), "{table}");
}

#[test]
fn ingest_with_postgres_and_a_target_rate() {
    let pg = Pg::shared("loadgen");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ingest.json");
    let url = pg.url();
    let out = loadgen(&[
        "ingest",
        "--users",
        "50",
        "--stanzas",
        "1000",
        "--rate",
        "2000",
        "--postgres",
        &url,
        "--fresh-db",
        "--webhooks",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    assert_eq!(r["applied"], 1000, "{r}");
    assert_eq!(r["postgres"], true);
    assert!(r["baseline_per_sec"].is_null());
    // The history is written as in production (the bridge was stopped with SIGTERM, which
    // flushes its writer, before the tool returned), and --fresh-db gave the second run (with
    // a webhook endpoint) an empty database: 1,000 events, not 2,000.
    assert_eq!(pg.query("SELECT count(*) FROM presence_events"), "1000");
    assert_eq!(r["webhooks"]["endpoints"], 1, "{r}");
}

#[test]
fn a_bridge_that_cannot_start_is_a_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-loadgen"))
        .args([
            "ingest",
            "--stanzas",
            "10",
            "--bridge",
            "/nonexistent/presence-bridge",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot start /nonexistent/presence-bridge"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_presence-loadgen"))
        .args(["ingest", "--users", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--users and --stanzas must be at least 1")
    );
}

#[test]
fn lookup_drives_healthz_single_and_bulk_with_many_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("lookup.json");
    let out = loadgen(&[
        "lookup",
        "--users",
        "1500",
        "--tokens",
        "40",
        "--secs",
        "1",
        "-c",
        "8",
        "--rate-limited",
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    for k in ["healthz_per_sec", "single_per_sec", "bulk_requests_per_sec"] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    // 1,000 JIDs per bulk request.
    assert_eq!(
        r["bulk_lookups_per_sec"].as_f64().unwrap(),
        r["bulk_requests_per_sec"].as_f64().unwrap() * 1000.0
    );
    assert!(
        r["rate_limited"]["rejected_answers_per_sec"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{r}"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("POST /api/v1/last-seen (1,000 JIDs)"),
        "{table}"
    );
}

#[test]
fn fanout_measures_latency_per_subscriber_class() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("fanout.json");
    let out = loadgen(&[
        "fanout",
        "--users",
        "100",
        "--subscribers",
        "6",
        "--rates",
        "200",
        "--secs",
        "2",
        "--slow",
        "1",
        "--measured",
        "3",
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    let rows = r.as_array().unwrap();
    let class = |c: &str| {
        rows.iter()
            .find(|x| x["class"] == c)
            .unwrap_or_else(|| panic!("{c}: {r}"))
    };
    assert_eq!(class("all")["count"], 3);
    assert_eq!(class("filtered")["count"], 3);
    assert_eq!(class("slow")["count"], 1);
    // The live subscribers measured stanza→frame latency for real changes.
    for c in ["all", "filtered"] {
        assert!(
            class(c)["changes_measured"].as_u64().unwrap() > 0,
            "{c}: {r}"
        );
        assert!(class(c)["latency_p99_ms"].as_f64().is_some(), "{c}: {r}");
    }
    // The bridge's own histogram moved during the step (frames were written).
    assert!(class("all")["bridge_p99_le_ms"].as_f64().is_some(), "{r}");
    // Unfiltered subscribers get every change: more than the ones filtered to 10 users.
    assert!(
        class("all")["bytes_per_sec"].as_f64().unwrap()
            > class("filtered")["bytes_per_sec"].as_f64().unwrap(),
        "{r}"
    );
}

#[test]
fn idle_measures_the_bridges_memory_per_open_session() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("idle.json");
    let out = loadgen(&[
        "idle",
        "--users",
        "20",
        "--subscribers",
        "50",
        "--settle-secs",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    assert_eq!(r["subscribers"], 50, "{r}");
    // The 50 plus the baseline session were all open when the bridge was measured.
    assert_eq!(r["open_sessions"], 51, "{r}");
    assert!(r["rss_after_kib"].as_u64().unwrap() > 0, "{r}");
    assert!(r["kib_per_subscriber"].as_f64().is_some(), "{r}");
}

#[test]
fn ingest_as_a_leader_of_followers_and_failover_runs() {
    let nats = Nats::private();
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("ingest.json");
    let out = loadgen(&[
        "ingest",
        "--users",
        "100",
        "--stanzas",
        "2000",
        "--replicas",
        "3",
        "--nats",
        &nats.url(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    assert_eq!(r["applied"], 2000, "{r}");
    assert_eq!(r["replicas"]["replicas"], 3, "{r}");
    assert!(
        r["replicas"]["ratio_to_single"].as_f64().unwrap() > 0.0,
        "{r}"
    );
    assert!(
        r["replicas"]["followers_done_secs"].as_f64().unwrap() > 0.0,
        "{r}"
    );

    let json = dir.path().join("failover.json");
    let out = loadgen(&[
        "failover",
        "--runs",
        "2",
        "--failover-secs",
        "2",
        "--nats",
        &nats.url(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let r = report(&out, &json);
    assert_eq!(r["ready_secs"].as_array().unwrap().len(), 2, "{r}");
    assert!(r["worst_secs"].as_f64().unwrap() > 0.0, "{r}");
}
