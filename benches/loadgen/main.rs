//! `presence-loadgen`: load for presence-bridge, measured from outside (docs/benchmarks.md).
//!
//! `ingest` plays the XMPP server's component listener (XEP-0114): it starts the bridge
//! (`--bridge`, by default the `presence-bridge` next to this binary) configured to connect to
//! it, checks the handshake, answers the bridge's IQs, and floods presence for `--users` users
//! — every stanza a real change (online, status changes, offline, online again) — flat out or
//! at `--rate` stanzas/s. It counts applied changes from the bridge's own
//! `presence_bridge_changes_total`. `--baseline` first reads and parses the same bytes
//! in-process with the bridge's XML stream parser (tokio-xmpp's), so every run prints the
//! ratio to the parser's limit. A summary table on stdout; `--json FILE` writes the figures.
//!
//! `lookup` starts the bridge the same way, makes `--users` users known through the component,
//! mints `--tokens` distinct tokens, and drives wrk (keep-alive, `-c` connections) at
//! `GET /healthz`, `GET /api/v1/last-seen/{jid}` (a random known user and a random token per
//! request) and `POST /api/v1/last-seen` with 1,000 JIDs per request, in the same run: the
//! ratios are the figures. `--rate-limited` keeps the bridge's default per-token rate limit
//! (the per-IP one is off: every connection comes from 127.0.0.1) and adds a run with one
//! token far past its quota (answers are 429s) next to the served path.
//!
//! `fanout` opens WebSocket subscribers — unfiltered, filtered to 10 users, and a few slow
//! ones that stop reading — then sends presence at each `--rates` value for `--secs`, for each
//! `--subscribers` count: every stanza carries its send time in its status, so each measured
//! subscriber reports stanza→frame latency; per class: percentiles, frames and bytes per
//! second, resyncs. The ramp shows the knee.
//!
//! Replicas (contract §11): `ingest --replicas N` adds a run where the bridge leads N−1
//! followers over NATS JetStream (`--nats`, a stream of the run's own, deleted after) and
//! prints the leader's rate next to the single bridge's, and how long the followers took to
//! hold every change; `fanout --replicas 2` puts every subscriber on a follower; `failover`
//! kills the leader (SIGKILL) `--runs` times and times each takeover, from the kill to the
//! new leader's component handshake and its `/readyz` saying `leader`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_xmpp::xmlstream::{StreamHeader, Timeouts, XmppStreamElement, initiate_stream};
use xmpp_parsers::component::Handshake;

#[path = "../common/receiver.rs"]
mod receiver;

const COMPONENT: &str = "bridge.loadgen";
const SECRET: &str = "loadgen-secret";
const STREAM_NS: &str = "jabber:component:accept";
const JWT_SECRET: &str = "loadgen-jwt-secret";
/// `[http]` keys that switch the rate limits off.
const NO_LIMITS: &str = "rate_limit_per_token = 0\nrate_limit_per_ip = 0\n";

#[derive(Parser)]
#[command(
    name = "presence-loadgen",
    version,
    about = "Load for presence-bridge, measured from outside"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Flood the bridge's component connection with presence and measure applied changes/s.
    Ingest(IngestArgs),
    /// REST last-seen (single and bulk, many tokens) next to /healthz, with wrk.
    Lookup(LookupArgs),
    /// WebSocket fan-out: stanza→frame latency per subscriber class while presence churns.
    Fanout(FanoutArgs),
    /// Idle WebSocket subscribers: the bridge's memory per open session.
    Idle(IdleArgs),
    /// Replicas: SIGKILL the leader repeatedly and time each takeover.
    Failover(FailoverArgs),
}

#[derive(clap::Args)]
struct FailoverArgs {
    /// The presence-bridge binary (default: the one next to this binary).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// NATS with JetStream.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// Kills (one takeover each).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// `cluster.failover_secs` of the replicas.
    #[arg(long, default_value_t = 10)]
    failover_secs: u64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct FailoverReport {
    failover_secs: u64,
    runs: usize,
    /// Seconds from SIGKILL to the new leader's component handshake.
    connect_secs: Vec<f64>,
    /// Seconds from SIGKILL to its `/readyz` saying `leader`.
    ready_secs: Vec<f64>,
    median_secs: f64,
    worst_secs: f64,
}

/// A stream of the run's own on a NATS server, and the `[cluster]` section naming it.
struct ClusterRun {
    nats: String,
    stream: String,
    failover_secs: u64,
}

impl ClusterRun {
    fn new(nats: &str, failover_secs: u64) -> Self {
        Self {
            nats: nats.to_owned(),
            stream: format!("LG{:08x}", rand::random::<u32>()),
            failover_secs,
        }
    }

    fn section(&self, node: &str) -> String {
        format!(
            "[cluster]\nnats_url = \"{}\"\nstream = \"{}\"\nnode_id = \"{node}\"\nfailover_secs = {}\n",
            self.nats, self.stream, self.failover_secs
        )
    }

    /// Deletes the run's stream, buckets and object store.
    async fn cleanup(&self) {
        let Ok(client) = async_nats::connect(&self.nats).await else {
            return;
        };
        let js = async_nats::jetstream::new(client);
        for name in [
            self.stream.clone(),
            format!("KV_{}_lease", self.stream),
            format!("KV_{}_meta", self.stream),
            format!("OBJ_{}_snapshots", self.stream),
        ] {
            let _ = js.delete_stream(&name).await;
        }
    }
}

/// Starts `n` followers (config `sections` plus their `[cluster]` section) and waits until
/// each says `follower` on `/readyz`.
async fn start_followers(
    exe: Option<&PathBuf>,
    xmpp_port: u16,
    postgres: Option<&str>,
    sections: &str,
    cluster: &ClusterRun,
    n: usize,
) -> Result<Vec<Bridge>, String> {
    let mut out = Vec::new();
    for i in 0..n {
        // Followers yield the CPU to the leader: on this 2-core machine they stand in for
        // replicas on other machines (docs/benchmarks.md).
        let b = start_bridge(
            exe,
            xmpp_port,
            postgres,
            NO_LIMITS,
            &format!("{sections}{}", cluster.section(&format!("lg-f{i}"))),
            Some(19),
        )?;
        out.push(b);
    }
    let client = reqwest::Client::new();
    for b in &out {
        wait_role(&client, b, "follower", Duration::from_secs(30)).await?;
    }
    Ok(out)
}

/// Waits until the bridge's `/readyz` says `role` (and, for a leader, a connected component).
async fn wait_role(
    client: &reqwest::Client,
    b: &Bridge,
    role: &str,
    patience: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{}/readyz", b.http))
            .send()
            .await
            && let Ok(v) = r.json::<serde_json::Value>().await
            && v["role"] == role
            && (role != "leader" || v["xmpp"] == "connected")
        {
            return Ok(());
        }
        if started.elapsed() > patience {
            return Err(format!(
                "a replica did not become {role} within {patience:?}; its log:\n{}",
                b.log()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(clap::Args)]
struct IdleArgs {
    /// The presence-bridge binary (default: the one next to this binary).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// Users online (each subscriber's snapshot has them all).
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Subscribers to open (each with its own token; the file-descriptor limit of both
    /// processes must allow them).
    #[arg(long, default_value_t = 9000)]
    subscribers: usize,
    /// Seconds to hold them idle before measuring.
    #[arg(long, default_value_t = 3)]
    settle_secs: u64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct IdleReport {
    subscribers: usize,
    users: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
    kib_per_subscriber: f64,
    open_sessions: u64,
}

#[derive(clap::Args)]
struct FanoutArgs {
    /// The presence-bridge binary (default: the one next to this binary).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// Users (all online; the load changes their status).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Subscriber counts to ramp through.
    #[arg(long, value_delimiter = ',', default_value = "100,500,1000")]
    subscribers: Vec<usize>,
    /// Change rates (stanzas/s) to ramp through.
    #[arg(long, value_delimiter = ',', default_value = "5000,20000")]
    rates: Vec<u64>,
    /// Seconds per step.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Percent of the subscribers filtered to 10 users.
    #[arg(long, default_value_t = 50)]
    filtered_percent: usize,
    /// Slow subscribers (read nothing during the step) added to each step.
    #[arg(long, default_value_t = 5)]
    slow: usize,
    /// Subscribers per class that parse every frame for latency (the others count frames
    /// and bytes only, so the tool's own CPU stays small).
    #[arg(long, default_value_t = 20)]
    measured: usize,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run the bridge as a leader with this many replicas in all; every subscriber is on
    /// the first follower.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// NATS with JetStream, for `--replicas`.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
}

#[derive(Serialize, Clone)]
struct ClassReport {
    subscribers: usize,
    rate: u64,
    class: &'static str,
    count: usize,
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    latency_max_ms: Option<f64>,
    changes_measured: usize,
    frames_per_sec: f64,
    bytes_per_sec: f64,
    resyncs: u64,
    /// The bridge's own view of the step, from `presence_bridge_stanza_to_ws_seconds` (read
    /// to frame written, all subscribers, one observation per frame): the bucket bounds
    /// (ms) its p50 and p99 fall in.
    bridge_p50_le_ms: Option<f64>,
    bridge_p99_le_ms: Option<f64>,
}

/// The cumulative buckets `(le, count)` of a histogram in the bridge's `/metrics`.
async fn histogram(
    client: &reqwest::Client,
    port: u16,
    name: &str,
) -> Result<Vec<(f64, u64)>, String> {
    let text = metrics_text(client, port).await?;
    let prefix = format!("{name}_bucket{{le=\"");
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect())
}

/// The upper bound (ms) of the bucket quantile `q` of the observations between two reads
/// of a histogram falls in.
fn bucket_quantile(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before.iter().find(|(l, _)| l == le).map_or(0, |(_, c)| *c);
            (*le, n.saturating_sub(was))
        })
        .collect();
    let total = delta.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    delta
        .iter()
        .find(|(_, c)| *c >= want)
        .map(|(le, _)| le * 1000.0)
}

#[derive(clap::Args)]
struct LookupArgs {
    /// The presence-bridge binary (default: the one next to this binary).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// Known users (each made online through the component first).
    #[arg(long, default_value_t = 10_000)]
    users: usize,
    /// Distinct tokens the requests pick from.
    #[arg(long, default_value_t = 1_000)]
    tokens: usize,
    /// wrk connections.
    #[arg(short = 'c', long, default_value_t = 64)]
    connections: u32,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    secs: u32,
    /// Keep the bridge's default rate limits, and measure one token past its quota.
    #[arg(long)]
    rate_limited: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct LookupReport {
    users: usize,
    tokens: usize,
    connections: u32,
    secs: u32,
    healthz_per_sec: f64,
    single_per_sec: f64,
    single_ratio_to_healthz: f64,
    bulk_requests_per_sec: f64,
    bulk_lookups_per_sec: f64,
    rate_limited: Option<RateLimitedReport>,
}

#[derive(Serialize)]
struct RateLimitedReport {
    served_per_sec: f64,
    rejected_answers_per_sec: f64,
    rejected_share: f64,
}

#[derive(clap::Args)]
struct IngestArgs {
    /// The presence-bridge binary (default: the one next to this binary).
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// Distinct users.
    #[arg(long, default_value_t = 20_000)]
    users: usize,
    /// Stanzas to send (each one a change).
    #[arg(long, default_value_t = 300_000)]
    stanzas: usize,
    /// Stanzas per second (0: flat out).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// First measure a bare read-and-parse loop over the same bytes, in-process.
    #[arg(long)]
    baseline: bool,
    /// Give the bridge this Postgres store (history written as in production).
    #[arg(long)]
    postgres: Option<String>,
    /// Drop and create the `--postgres` database before each run (through the server's
    /// `postgres` database), so that every run starts on an empty store.
    #[arg(long)]
    fresh_db: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Seconds without progress before the run is called stuck.
    #[arg(long, default_value_t = 30)]
    stall_secs: u64,
    /// Also run with this many webhook endpoints (every presence event, to a receiver in
    /// this process answering 204), after a run without, and print the ratio.
    #[arg(long, default_value_t = 0)]
    webhooks: usize,
    /// Also run as a leader with this many replicas in all (N−1 followers; 1: the leader
    /// alone, publishing to the stream) over `--nats`, and print the ratio to the single
    /// bridge (0: no such run).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// NATS with JetStream, for `--replicas`.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats: String,
}

/// One ingest run: applied changes, seconds, seconds spent sending, and (replicas) the
/// seconds until every follower held every change.
struct IngestRun {
    applied: u64,
    seconds: f64,
    sent_secs: f64,
    followers_done_secs: Option<f64>,
}

#[derive(Serialize)]
struct IngestReport {
    users: usize,
    stanzas: usize,
    target_rate: u64,
    postgres: bool,
    applied: u64,
    seconds: f64,
    changes_per_sec: f64,
    sent_per_sec: f64,
    baseline_per_sec: Option<f64>,
    ratio_to_baseline: Option<f64>,
    /// With `--webhooks N`: the run with N endpoints, and its ratio to the run above.
    webhooks: Option<WebhookRun>,
    /// With `--replicas N`: the run as a leader of N−1 followers.
    replicas: Option<ReplicaRun>,
}

#[derive(Serialize)]
struct ReplicaRun {
    replicas: usize,
    changes_per_sec: f64,
    ratio_to_single: f64,
    /// Seconds from the start of the load until the last follower held every change.
    followers_done_secs: f64,
}

#[derive(Serialize)]
struct WebhookRun {
    endpoints: usize,
    changes_per_sec: f64,
    ratio_to_without: f64,
    messages_received: u64,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("presence-loadgen: cannot start a runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = match cli.command {
        Cmd::Ingest(a) => rt.block_on(ingest(a)),
        Cmd::Lookup(a) => rt.block_on(lookup(a)),
        Cmd::Fanout(a) => rt.block_on(fanout(a)),
        Cmd::Idle(a) => rt.block_on(idle(a)),
        Cmd::Failover(a) => rt.block_on(failover(a)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("presence-loadgen: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// The stanzas, each a change for its user: available (online), then new statuses, an
/// unavailable every fourth round (offline), available again (online).
fn stanzas(users: usize, n: usize) -> Vec<u8> {
    let shows = [
        "",
        "<show>away</show>",
        "<show>dnd</show>",
        "<show>xa</show>",
    ];
    let mut out = Vec::with_capacity(n * 160);
    for i in 0..n {
        let (u, round) = (i % users, i / users);
        if round % 4 == 3 {
            let _ = write!(
                out,
                "<presence from='lg{u}@localhost/r' to='{COMPONENT}' type='unavailable' id='{i}'/>"
            );
        } else {
            let _ = write!(
                out,
                "<presence from='lg{u}@localhost/r' to='{COMPONENT}' id='{i}'>{}<priority>1</priority><status>round {round}</status></presence>",
                shows[round % 4]
            );
        }
    }
    out
}

/// Reads and parses `bytes` (after a server stream header) with tokio-xmpp's stream parser,
/// as the bridge's read loop does; presence stanzas per second.
async fn baseline(bytes: &[u8], n: usize) -> Result<f64, String> {
    let mut input = format!(
        "<?xml version='1.0'?><stream:stream xmlns='{STREAM_NS}' xmlns:stream='http://etherx.jabber.org/streams' from='{COMPONENT}' id='baseline'>"
    )
    .into_bytes();
    input.extend_from_slice(bytes);
    let io = tokio::io::join(BufReader::new(&input[..]), tokio::io::sink());
    let started = Instant::now();
    let pending = initiate_stream(
        io,
        STREAM_NS,
        StreamHeader {
            to: Some(COMPONENT.into()),
            ..StreamHeader::default()
        },
        Timeouts::default(),
    )
    .await
    .map_err(|e| format!("baseline: stream header: {e}"))?;
    let mut stream = pending.skip_features::<XmppStreamElement>();
    let mut seen = 0;
    while seen < n {
        match stream.next().await {
            Some(Ok(XmppStreamElement::Stanza(xmpp_parsers::stanza::Stanza::Presence(_)))) => {
                seen += 1
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("baseline: parse error after {seen}: {e}")),
            None => break,
        }
    }
    if seen < n {
        return Err(format!("baseline: the stream ended after {seen} of {n}"));
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// A port for the bridge's API, below the kernel's ephemeral range: the tool's own thousands
/// of client connections take their local ports from that range, and one could take this
/// port between the pick and the bridge's bind.
fn free_port() -> Result<u16, String> {
    let start = rand::random::<u32>() % 15_000;
    (0..15_000u32)
        .map(|n| 10_000 + ((start + n * 7) % 15_000) as u16)
        .filter(|p| *p != 15_672)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .ok_or_else(|| "no free port in 10000-24999".to_owned())
}

/// The bridge, started with a config that points it at us; stopped (SIGTERM) on drop.
struct Bridge {
    child: Child,
    http: u16,
    dir: PathBuf,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bridge {
    /// SIGKILL: no goodbye to anyone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        // Already reaped (killed): its pid may belong to someone else by now.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The bridge's resident memory (KiB), from /proc.
    fn rss_kib(&self) -> Result<u64, String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .map_err(|e| format!("the bridge's /proc status: {e}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| "no VmRSS in the bridge's /proc status".to_owned())
    }

    /// The bridge's log (stderr), for a failed run.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bridge.log")).unwrap_or_default()
    }
}

/// Starts the bridge (at niceness `nice`, if given) with a config pointing it at us.
fn start_bridge(
    bridge: Option<&PathBuf>,
    xmpp_port: u16,
    postgres: Option<&str>,
    http_keys: &str,
    sections: &str,
    nice: Option<u8>,
) -> Result<Bridge, String> {
    let exe = match bridge {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("presence-bridge"),
    };
    let dir = std::env::temp_dir().join(format!(
        "presence-loadgen-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let http = free_port()?;
    let mut toml = format!(
        "[xmpp]\nserver = \"127.0.0.1:{xmpp_port}\"\ncomponent = \"{COMPONENT}\"\npassword = \"{SECRET}\"\ndomains = [\"localhost\"]\n\
         [http]\nbind = \"127.0.0.1:{http}\"\n{http_keys}{sections}"
    );
    if let Some(url) = postgres {
        toml.push_str(&format!(
            "[store]\npostgres_url = \"{url}\"\nspool_dir = \"{}\"\n",
            dir.join("spool").display()
        ));
    }
    let conf = dir.join("bridge.toml");
    std::fs::write(&conf, toml).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("bridge.log")).map_err(|e| e.to_string())?;
    let mut cmd = match nice {
        Some(n) => {
            let mut c = Command::new("nice");
            c.args(["-n", &n.to_string()]).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let child = cmd
        .args(["run", "--config"])
        .arg(&conf)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    Ok(Bridge { child, http, dir })
}

/// The XEP-0114 accept side: the bridge's stream header, ours, its handshake (checked).
async fn accept(listener: &TcpListener) -> Result<TcpStream, String> {
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
        .await
        .map_err(|_| "the bridge did not connect within 30 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, |b| {
        find(b, b"<stream:stream").and_then(|i| find(&b[i..], b">").map(|j| i + j + 1))
    })
    .await?;
    buf.clear();
    let id = format!("lg{}", rand::random::<u64>());
    s.write_all(
        format!(
            "<?xml version='1.0'?><stream:stream xmlns:stream='http://etherx.jabber.org/streams' xmlns='{STREAM_NS}' from='{COMPONENT}' id='{id}'>"
        )
        .as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let end = read_until(&mut s, &mut buf, |b| {
        find(b, b"</handshake>").map(|i| i + 12)
    })
    .await?;
    let text = String::from_utf8_lossy(&buf[..end]).into_owned();
    let got = text
        .rsplit_once("</handshake>")
        .and_then(|(head, _)| head.rsplit_once('>'))
        .map(|(_, h)| h.trim().to_owned())
        .unwrap_or_default();
    let want: String = Handshake::from_stream_id_and_password(id, SECRET)
        .data
        .unwrap_or_default()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if !got.eq_ignore_ascii_case(&want) {
        return Err(format!("the bridge's handshake is wrong: {text}"));
    }
    s.write_all(b"<handshake/>")
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> Option<usize>,
) -> Result<usize, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = done(buf) {
            return Ok(end);
        }
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .map_err(|_| "the bridge went silent during the handshake".to_owned())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the bridge closed the connection during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// What the bridge sends: IQ gets (keepalive pings, disco) are answered with an empty result;
/// everything else (probes) is read and dropped.
async fn answer_iqs(mut r: tokio::net::tcp::OwnedReadHalf, w: tokio::sync::mpsc::Sender<Vec<u8>>) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        while let Some(i) = find(&buf, b"<iq") {
            let Some(j) = find(&buf[i..], b">") else {
                break;
            };
            let tag = String::from_utf8_lossy(&buf[i..i + j]).into_owned();
            let attr = |name: &str| {
                for q in ['\'', '"'] {
                    let key = format!(" {name}={q}");
                    if let Some(p) = tag.find(&key) {
                        let rest = &tag[p + key.len()..];
                        return rest.find(q).map(|e| rest[..e].to_owned());
                    }
                }
                None
            };
            if attr("type").as_deref() == Some("get") {
                let reply = format!(
                    "<iq type='result' id='{}' from='{}' to='{}'/>",
                    attr("id").unwrap_or_default(),
                    attr("to").unwrap_or_else(|| "localhost".into()),
                    attr("from").unwrap_or_else(|| COMPONENT.into()),
                );
                if w.send(reply.into_bytes()).await.is_err() {
                    return;
                }
            }
            buf.drain(..i + j);
        }
        // Keep only a possible partial tag.
        if buf.len() > 8192 {
            let keep = buf.len() - 1024;
            buf.drain(..keep);
        }
    }
}

/// The bridge's `/metrics` text.
async fn metrics_text(client: &reqwest::Client, port: u16) -> Result<String, String> {
    client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}

/// `presence_bridge_changes_total` from the bridge's /metrics.
async fn changes(client: &reqwest::Client, port: u16) -> Result<u64, String> {
    metric_value(client, port, "presence_bridge_changes_total").await
}

/// Floods a fresh bridge (started with `sections` in its config) and waits until every
/// stanza is a change, or no progress for `--stall-secs`.
async fn ingest_once(
    a: &IngestArgs,
    bytes: &[u8],
    sections: &str,
    cluster: Option<&ClusterRun>,
) -> Result<IngestRun, String> {
    if let (Some(url), true) = (&a.postgres, a.fresh_db) {
        recreate_database(url).await?;
    }
    let leader_sections = match cluster {
        Some(c) => format!("{sections}{}", c.section("lg-leader")),
        None => sections.to_owned(),
    };
    let Rig {
        bridge,
        mut w,
        mut rx,
        client,
        before,
        xmpp_port,
    } = rig(
        a.bridge.as_ref(),
        a.postgres.as_deref(),
        NO_LIMITS,
        &leader_sections,
    )
    .await?;
    let followers = match cluster {
        Some(c) => {
            start_followers(
                a.bridge.as_ref(),
                xmpp_port,
                a.postgres.as_deref(),
                sections,
                c,
                a.replicas - 1,
            )
            .await?
        }
        None => Vec::new(),
    };
    // Send: 64 KiB writes, paced when a rate is set; IQ answers go in between.
    let started = Instant::now();
    let sent_secs = send_all(&mut w, &mut rx, bytes, a.rate).await?;
    let applied = wait_applied(
        &client,
        bridge.http,
        before,
        a.stanzas as u64,
        Duration::from_secs(a.stall_secs),
        &mut w,
        &mut rx,
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    // Followers hold every change once their count of changes is the leader's.
    let mut followers_done_secs = None;
    if !followers.is_empty() {
        let total = changes(&client, bridge.http).await?;
        for f in &followers {
            let waiting = Instant::now();
            while changes(&client, f.http).await? < total {
                if waiting.elapsed() > Duration::from_secs(a.stall_secs) {
                    return Err(format!(
                        "a follower did not catch up; its log:\n{}",
                        f.log()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        followers_done_secs = Some(started.elapsed().as_secs_f64());
    }
    drop(w);
    drop(followers);
    drop(bridge);
    Ok(IngestRun {
        applied,
        seconds,
        sent_secs,
        followers_done_secs,
    })
}

/// Drops and creates the database of `url` (`postgres://…/NAME`), connected to `…/postgres`.
async fn recreate_database(url: &str) -> Result<(), String> {
    let (server, name) = url
        .rsplit_once('/')
        .filter(|(_, n)| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .ok_or_else(|| {
            format!("--fresh-db needs a URL ending in /NAME (letters, digits, _): {url}")
        })?;
    let (c, conn) = tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("--fresh-db: {e}"))?;
    tokio::spawn(conn);
    // Two statements: neither may run inside the implicit transaction of a multi-statement
    // query.
    for sql in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        c.batch_execute(&sql)
            .await
            .map_err(|e| format!("--fresh-db: {}", presence_bridge::store::pg::describe(&e)))?;
    }
    Ok(())
}

/// `[[webhooks]]` sections: `n` endpoints on the receiver, every presence event.
fn webhook_sections(n: usize, port: u16) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[webhooks]]\nid = \"lg{i}\"\nurl = \"http://127.0.0.1:{port}/e{i}\"\n\
                 secret = \"whsec_bG9hZGdlbi13ZWJob29rLXNlY3JldC0yNC1ieXRlcw==\"\n\
                 events = [\"presence.online\", \"presence.offline\", \"presence.update\"]\n"
            )
        })
        .collect()
}

async fn ingest(a: IngestArgs) -> Result<(), String> {
    if a.users == 0 || a.stanzas == 0 {
        return Err("--users and --stanzas must be at least 1".into());
    }
    let bytes = stanzas(a.users, a.stanzas);
    let baseline_rate = if a.baseline {
        Some(baseline(&bytes, a.stanzas).await?)
    } else {
        None
    };
    let IngestRun {
        applied,
        seconds,
        sent_secs,
        ..
    } = ingest_once(&a, &bytes, "", None).await?;
    let webhooks = if a.webhooks > 0 {
        let (port, received) = receiver::start()
            .await
            .map_err(|e| format!("webhook receiver: {e}"))?;
        let run = ingest_once(&a, &bytes, &webhook_sections(a.webhooks, port), None).await?;
        let rate = run.applied as f64 / run.seconds;
        Some(WebhookRun {
            endpoints: a.webhooks,
            changes_per_sec: rate,
            ratio_to_without: rate / (applied as f64 / seconds),
            messages_received: received.load(std::sync::atomic::Ordering::Relaxed),
        })
    } else {
        None
    };
    let rate = applied as f64 / seconds;
    let replicas = if a.replicas > 0 {
        let cluster = ClusterRun::new(&a.nats, 10);
        let run = ingest_once(&a, &bytes, "", Some(&cluster)).await;
        cluster.cleanup().await;
        let run = run?;
        let r = run.applied as f64 / run.seconds;
        Some(ReplicaRun {
            replicas: a.replicas,
            changes_per_sec: r,
            ratio_to_single: r / rate,
            followers_done_secs: run.followers_done_secs.unwrap_or(run.seconds),
        })
    } else {
        None
    };
    let report = IngestReport {
        users: a.users,
        stanzas: a.stanzas,
        target_rate: a.rate,
        postgres: a.postgres.is_some(),
        applied,
        seconds,
        changes_per_sec: rate,
        sent_per_sec: a.stanzas as f64 / sent_secs,
        baseline_per_sec: baseline_rate,
        ratio_to_baseline: baseline_rate.map(|b| rate / b),
        webhooks,
        replicas,
    };
    println!("| ingest | value |");
    println!("|---|---|");
    println!(
        "| users / stanzas | {} / {} |",
        report.users, report.stanzas
    );
    println!(
        "| store | {} |",
        if report.postgres {
            "Postgres"
        } else {
            "memory only"
        }
    );
    println!("| applied changes | {} |", report.applied);
    println!("| seconds | {:.3} |", report.seconds);
    println!("| changes/s | {:.0} |", report.changes_per_sec);
    println!("| stanzas sent/s | {:.0} |", report.sent_per_sec);
    if let (Some(b), Some(r)) = (report.baseline_per_sec, report.ratio_to_baseline) {
        println!("| baseline parse/s | {b:.0} |");
        println!("| ratio to baseline | {:.1} % |", r * 100.0);
    }
    if let Some(wh) = &report.webhooks {
        println!(
            "| changes/s with {} webhook endpoints | {:.0} |",
            wh.endpoints, wh.changes_per_sec
        );
        println!(
            "| ratio to the run without | {:.1} % |",
            wh.ratio_to_without * 100.0
        );
        println!(
            "| webhook messages received by the end of ingest | {} |",
            wh.messages_received
        );
    }
    if let Some(r) = &report.replicas {
        println!(
            "| changes/s as leader of {} followers | {:.0} |",
            r.replicas - 1,
            r.changes_per_sec
        );
        println!(
            "| ratio to the single bridge | {:.1} % |",
            r.ratio_to_single * 100.0
        );
        println!(
            "| seconds until every follower held every change | {:.3} |",
            r.followers_done_secs
        );
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if applied < a.stanzas as u64 {
        return Err(format!(
            "only {applied} of {} stanzas became changes (no progress for {} s)",
            a.stanzas, a.stall_secs
        ));
    }
    Ok(())
}

/// The bridge started and connected to us as its XMPP server: the process, our end of its
/// component stream, the IQ answers waiting to be written, and the changes it had applied
/// before the load.
struct Rig {
    bridge: Bridge,
    w: tokio::net::tcp::OwnedWriteHalf,
    rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
    client: reqwest::Client,
    before: u64,
    /// Where the bridge's component connects (us).
    xmpp_port: u16,
}

async fn rig(
    exe: Option<&PathBuf>,
    postgres: Option<&str>,
    http_keys: &str,
    sections: &str,
) -> Result<Rig, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let mut bridge = start_bridge(exe, port, postgres, http_keys, sections, None)?;
    let stream = match accept(&listener).await {
        Ok(s) => s,
        Err(e) => {
            bridge.stop();
            return Err(format!("{e}\nthe bridge's log:\n{}", bridge.log()));
        }
    };
    let (r, w) = stream.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(answer_iqs(r, tx));
    let client = reqwest::Client::new();
    // The API answers once the bridge is up.
    let up = Instant::now();
    let before = loop {
        match changes(&client, bridge.http).await {
            Ok(c) => break c,
            Err(e) if up.elapsed() > Duration::from_secs(30) => {
                return Err(format!("the bridge's /metrics did not answer: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    Ok(Rig {
        bridge,
        w,
        rx,
        client,
        before,
        xmpp_port: port,
    })
}

/// Every user online once (known to last-seen, in the map for subscribers).
async fn online(
    users: usize,
    client: &reqwest::Client,
    port: u16,
    before: u64,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<(), String> {
    send_all(w, rx, &stanzas(users, users), 0).await?;
    let known = wait_applied(
        client,
        port,
        before,
        users as u64,
        Duration::from_secs(30),
        w,
        rx,
    )
    .await?;
    if known < users as u64 {
        return Err(format!("only {known} of {users} users came online"));
    }
    Ok(())
}

/// Sends `bytes` in 64 KiB writes of whole stanzas, answering the bridge's IQs in between,
/// paced to `rate` stanzas/s when not 0. Returns the seconds it took.
async fn send_all(
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
    bytes: &[u8],
    rate: u64,
) -> Result<f64, String> {
    let started = Instant::now();
    let mut sent = 0usize;
    let mut off = 0usize;
    while off < bytes.len() {
        while let Ok(reply) = rx.try_recv() {
            w.write_all(&reply).await.map_err(|e| e.to_string())?;
        }
        let end = (off + (64 << 10)).min(bytes.len());
        let end = if end == bytes.len() {
            end
        } else {
            off + bytes[off..end]
                .windows(2)
                .rposition(|x| x == b"><")
                .map_or(end - off, |p| p + 1)
        };
        w.write_all(&bytes[off..end])
            .await
            .map_err(|e| e.to_string())?;
        sent += bytes[off..end]
            .windows(10)
            .filter(|x| x == b"<presence ")
            .count();
        off = end;
        if rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Waits until the bridge has applied `n` more changes than `before` (or none came for
/// `stall`); how many it applied.
async fn wait_applied(
    client: &reqwest::Client,
    port: u16,
    before: u64,
    n: u64,
    stall: Duration,
    w: &mut tokio::net::tcp::OwnedWriteHalf,
    rx: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<u64, String> {
    let mut last = (0, Instant::now());
    loop {
        while let Ok(reply) = rx.try_recv() {
            w.write_all(&reply).await.map_err(|e| e.to_string())?;
        }
        let now = changes(client, port).await? - before;
        if now >= n {
            return Ok(now);
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > stall {
            return Ok(now);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `Requests/sec` and the non-2xx answers of one wrk run; more than 1 % non-2xx is an error
/// unless `rejections` are what is measured.
fn wrk(
    connections: u32,
    secs: u32,
    script: &std::path::Path,
    url: &str,
    rejections: bool,
) -> Result<(f64, u64), String> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "-s",
        ])
        .arg(script)
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run wrk (scripts/install-deps.sh wrk installs it): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| format!("no Requests/sec in wrk's output: {text}"))?;
    let non2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let total = text
        .lines()
        .find_map(|l| {
            l.split_once(" requests in ")
                .map(|(n, _)| n.trim().to_owned())
        })
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    if !rejections && non2xx * 100 > total {
        return Err(format!(
            "{non2xx} of {total} answers were not 2xx: the load is not measuring what it should\n{text}"
        ));
    }
    Ok((rps, non2xx))
}

/// A Lua table of strings.
fn lua_list(items: &[String]) -> String {
    let mut s = String::from("{");
    for i in items {
        s.push_str(&format!("{i:?},"));
    }
    s.push('}');
    s
}

async fn lookup(a: LookupArgs) -> Result<(), String> {
    if a.users == 0 || a.tokens == 0 || a.connections == 0 || a.secs == 0 {
        return Err("--users, --tokens, -c and --secs must be at least 1".into());
    }
    let auth = format!("[auth]\njwt_secret = \"{JWT_SECRET}\"\n");
    // Rate-limited: the per-token limit at its default; the per-IP one off, since every wrk
    // connection comes from 127.0.0.1.
    let limits = if a.rate_limited {
        "rate_limit_per_ip = 0\n"
    } else {
        NO_LIMITS
    };
    let Rig {
        bridge,
        mut w,
        mut rx,
        client,
        before,
        ..
    } = rig(a.bridge.as_ref(), None, limits, &auth).await?;
    // Every user online once: known to last-seen.
    online(a.users, &client, bridge.http, before, &mut w, &mut rx).await?;
    let cfg = presence_bridge::config::AuthConfig::default();
    let tokens: Vec<String> = (0..a.tokens)
        .map(|i| {
            presence_bridge::api::auth::mint(
                JWT_SECRET,
                &presence_bridge::api::auth::claims(
                    &format!("lg{i}"),
                    "presence:read",
                    None,
                    3600,
                    &cfg,
                ),
            )
            .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let dir = bridge.dir.clone();
    let script = |name: &str, body: String| -> Result<PathBuf, String> {
        let p = dir.join(name);
        std::fs::write(&p, body).map_err(|e| e.to_string())?;
        Ok(p)
    };
    let users = a.users;
    let healthz = script("healthz.lua", String::new())?;
    let single = script(
        "single.lua",
        format!(
            "local tokens = {}\nrequest = function()\n  local t = tokens[math.random(#tokens)]\n  local u = math.random(0, {})\n  return wrk.format(\"GET\", \"/api/v1/last-seen/lg\" .. u .. \"@localhost\", {{[\"Authorization\"] = \"Bearer \" .. t}})\nend\n",
            lua_list(&tokens),
            users - 1
        ),
    )?;
    // A few bodies of 1,000 JIDs each, picked at random.
    let bodies: Vec<String> = (0..8)
        .map(|k| {
            let jids: Vec<String> = (0..1000)
                .map(|i| format!("\"lg{}@localhost\"", (k * 1000 + i * 7) % users))
                .collect();
            format!("{{\"jids\":[{}]}}", jids.join(","))
        })
        .collect();
    let bulk = script(
        "bulk.lua",
        format!(
            "local tokens = {}\nlocal bodies = {}\nrequest = function()\n  local t = tokens[math.random(#tokens)]\n  local b = bodies[math.random(#bodies)]\n  return wrk.format(\"POST\", \"/api/v1/last-seen\", {{[\"Authorization\"] = \"Bearer \" .. t, [\"Content-Type\"] = \"application/json\"}}, b)\nend\n",
            lua_list(&tokens),
            lua_list(&bodies)
        ),
    )?;
    let base = format!("http://127.0.0.1:{}", bridge.http);
    let (h, _) = wrk(
        a.connections,
        a.secs,
        &healthz,
        &format!("{base}/healthz"),
        false,
    )?;
    let (s1, _) = wrk(a.connections, a.secs, &single, &base, false)?;
    let (b1, _) = wrk(a.connections, a.secs, &bulk, &base, false)?;
    let rate_limited = if a.rate_limited {
        let hot = script(
            "hot.lua",
            format!(
                "wrk.headers[\"Authorization\"] = \"Bearer {}\"\n",
                tokens[0]
            ),
        )?;
        let (all, rejected) = wrk(
            a.connections,
            a.secs,
            &hot,
            &format!("{base}/api/v1/last-seen/lg0@localhost"),
            true,
        )?;
        let total = all * f64::from(a.secs);
        Some(RateLimitedReport {
            served_per_sec: s1,
            rejected_answers_per_sec: all,
            rejected_share: if total > 0.0 {
                rejected as f64 / total
            } else {
                0.0
            },
        })
    } else {
        None
    };
    drop(w);
    drop(bridge);
    let report = LookupReport {
        users: a.users,
        tokens: a.tokens,
        connections: a.connections,
        secs: a.secs,
        healthz_per_sec: h,
        single_per_sec: s1,
        single_ratio_to_healthz: s1 / h,
        bulk_requests_per_sec: b1,
        bulk_lookups_per_sec: b1 * 1000.0,
        rate_limited,
    };
    println!(
        "| lookup (wrk -t2 -c{} -d{}s) | value |",
        a.connections, a.secs
    );
    println!("|---|---|");
    println!("| users / tokens | {} / {} |", report.users, report.tokens);
    println!("| GET /healthz | {:.0} req/s |", report.healthz_per_sec);
    println!(
        "| GET /api/v1/last-seen/{{jid}} | {:.0} req/s ({:.1} % of /healthz) |",
        report.single_per_sec,
        report.single_ratio_to_healthz * 100.0
    );
    println!(
        "| POST /api/v1/last-seen (1,000 JIDs) | {:.0} req/s = {:.0} lookups/s |",
        report.bulk_requests_per_sec, report.bulk_lookups_per_sec
    );
    if let Some(r) = &report.rate_limited {
        println!(
            "| one token past its quota | {:.0} answers/s ({:.1} % of them 429) vs {:.0} served/s |",
            r.rejected_answers_per_sec,
            r.rejected_share * 100.0,
            r.served_per_sec
        );
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// What one subscriber saw.
#[derive(Default)]
struct SubStats {
    frames: u64,
    bytes: u64,
    resyncs: u64,
    latencies_us: Vec<u64>,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_open(port: u16, token: &str, filter: &str) -> Result<Ws, String> {
    let url = format!("ws://127.0.0.1:{port}/api/v1/ws?token={token}{filter}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("WebSocket: {e}"))?;
    // The snapshot first.
    let first = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .map_err(|_| "no snapshot within 30 s".to_owned())?;
    match first {
        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
            if t.contains("\"snapshot\"") =>
        {
            Ok(ws)
        }
        other => Err(format!("expected a snapshot, got {other:?}")),
    }
}

/// The send stamps (µs since `t0`) in a frame: every `"status":"t<digits>"`, each once.
fn stamps(frame: &str) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    let mut rest = frame;
    while let Some(i) = rest.find("\"status\":\"t") {
        rest = &rest[i + 11..];
        let digits: &str = &rest[..rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len())];
        if let Ok(v) = digits.parse::<u64>()
            && out.last() != Some(&v)
        {
            out.push(v);
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Reads until `stop`; `slow` reads nothing until then, and then drains what came.
async fn subscriber(
    mut ws: Ws,
    t0: Instant,
    measure: bool,
    slow: bool,
    stop: tokio_util::sync::CancellationToken,
) -> SubStats {
    use tokio_tungstenite::tungstenite::Message;
    let mut st = SubStats::default();
    if slow {
        stop.cancelled().await;
    }
    loop {
        let next = if slow {
            match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                Ok(n) => n,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                n = ws.next() => n,
                () = stop.cancelled() => break,
            }
        };
        match next {
            Some(Ok(Message::Text(t))) => {
                let now = t0.elapsed().as_micros() as u64;
                st.frames += 1;
                st.bytes += t.len() as u64;
                if t.contains("\"resync\"") {
                    st.resyncs += 1;
                }
                if measure && !slow {
                    for s in stamps(&t) {
                        st.latencies_us.push(now.saturating_sub(s));
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    let _ = ws.close(None).await;
    st
}

fn pct(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i] as f64 / 1000.0)
}

async fn fanout(a: FanoutArgs) -> Result<(), String> {
    if a.users < 10 || a.secs == 0 || a.subscribers.is_empty() || a.rates.is_empty() {
        return Err(
            "--users must be at least 10; --secs, --subscribers and --rates must not be empty or 0"
                .into(),
        );
    }
    let auth = format!("[auth]\njwt_secret = \"{JWT_SECRET}\"\n");
    let cluster = (a.replicas > 1).then(|| ClusterRun::new(&a.nats, 10));
    let leader_sections = match &cluster {
        Some(c) => format!("{auth}{}", c.section("lg-leader")),
        None => auth.clone(),
    };
    let Rig {
        bridge,
        mut w,
        mut rx,
        client,
        before,
        xmpp_port,
    } = rig(a.bridge.as_ref(), None, NO_LIMITS, &leader_sections).await?;
    online(a.users, &client, bridge.http, before, &mut w, &mut rx).await?;
    // With replicas, every subscriber is on the first follower.
    let followers = match &cluster {
        Some(c) => {
            start_followers(a.bridge.as_ref(), xmpp_port, None, &auth, c, a.replicas - 1).await?
        }
        None => Vec::new(),
    };
    let served = followers.first().map_or(bridge.http, |f| f.http);
    if let Some(f) = followers.first() {
        let total = changes(&client, bridge.http).await?;
        while changes(&client, f.http).await? < total {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let filter = format!(
        "&jids={}",
        (0..10)
            .map(|u| format!("lg{u}@localhost"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let t0 = Instant::now();
    let mut reports = Vec::new();
    let mut next_user = 0usize;
    for &n in &a.subscribers {
        for &rate in &a.rates {
            let stop = tokio_util::sync::CancellationToken::new();
            let filtered = n * a.filtered_percent.min(100) / 100;
            let mut tasks = Vec::new();
            for i in 0..n + a.slow {
                let (class, f) = if i >= n {
                    ("slow", "")
                } else if i < filtered {
                    ("filtered", filter.as_str())
                } else {
                    ("all", "")
                };
                let index_in_class = if i >= n {
                    i - n
                } else if i < filtered {
                    i
                } else {
                    i - filtered
                };
                let ws = ws_open(served, &sub_token(i)?, f).await?;
                let measure = index_in_class < a.measured;
                tasks.push((
                    class,
                    tokio::spawn(subscriber(ws, t0, measure, class == "slow", stop.clone())),
                ));
            }
            let hist_before =
                histogram(&client, served, "presence_bridge_stanza_to_ws_seconds").await?;
            // The load: every 10 ms, rate/100 status changes, stamped at send time.
            let per_tick = (rate / 100).max(1) as usize;
            let step_start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut buf = Vec::with_capacity(per_tick * 160);
            while step_start.elapsed() < Duration::from_secs(a.secs) {
                tick.tick().await;
                buf.clear();
                let stamp = t0.elapsed().as_micros();
                for _ in 0..per_tick {
                    let u = next_user % a.users;
                    next_user += 1;
                    let _ = write!(
                        buf,
                        "<presence from='lg{u}@localhost/r' to='{COMPONENT}'><priority>1</priority><status>t{stamp}</status></presence>"
                    );
                }
                while let Ok(reply) = rx.try_recv() {
                    w.write_all(&reply).await.map_err(|e| e.to_string())?;
                }
                w.write_all(&buf).await.map_err(|e| e.to_string())?;
            }
            let elapsed = step_start.elapsed().as_secs_f64();
            // Let the last frames arrive.
            tokio::time::sleep(Duration::from_secs(2)).await;
            stop.cancel();
            let hist_after =
                histogram(&client, served, "presence_bridge_stanza_to_ws_seconds").await?;
            let bridge_p50 = bucket_quantile(&hist_before, &hist_after, 0.5);
            let bridge_p99 = bucket_quantile(&hist_before, &hist_after, 0.99);
            let mut by_class: std::collections::BTreeMap<&'static str, (usize, SubStats)> =
                Default::default();
            for (class, t) in tasks {
                let st = t.await.map_err(|e| e.to_string())?;
                let e = by_class.entry(class).or_default();
                e.0 += 1;
                e.1.frames += st.frames;
                e.1.bytes += st.bytes;
                e.1.resyncs += st.resyncs;
                e.1.latencies_us.extend(st.latencies_us);
            }
            for (class, (count, mut st)) in by_class {
                st.latencies_us.sort_unstable();
                reports.push(ClassReport {
                    subscribers: n,
                    rate,
                    class,
                    count,
                    latency_p50_ms: pct(&st.latencies_us, 0.5),
                    latency_p99_ms: pct(&st.latencies_us, 0.99),
                    latency_max_ms: st.latencies_us.last().map(|v| *v as f64 / 1000.0),
                    changes_measured: st.latencies_us.len(),
                    frames_per_sec: st.frames as f64 / elapsed,
                    bytes_per_sec: st.bytes as f64 / elapsed,
                    resyncs: st.resyncs,
                    bridge_p50_le_ms: bridge_p50,
                    bridge_p99_le_ms: bridge_p99,
                });
            }
        }
    }
    drop(w);
    drop(followers);
    drop(bridge);
    if let Some(c) = &cluster {
        c.cleanup().await;
    }
    println!(
        "| subscribers | changes/s | class | count | p50 ms | p99 ms | max ms | frames/s (class) | MB/s (class) | resyncs | bridge p50/p99 ≤ ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let ms = |v: Option<f64>| v.map_or("–".to_owned(), |x| format!("{x:.1}"));
    for r in &reports {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} | {} | {}/{} |",
            r.subscribers,
            r.rate,
            r.class,
            r.count,
            ms(r.latency_p50_ms),
            ms(r.latency_p99_ms),
            ms(r.latency_max_ms),
            r.frames_per_sec,
            r.bytes_per_sec / 1e6,
            r.resyncs,
            ms(r.bridge_p50_le_ms),
            ms(r.bridge_p99_le_ms)
        );
    }
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

async fn failover(a: FailoverArgs) -> Result<(), String> {
    if a.runs == 0 || a.failover_secs < 2 {
        return Err("--runs must be at least 1 and --failover-secs at least 2".into());
    }
    let cluster = ClusterRun::new(&a.nats, a.failover_secs);
    let r = failover_runs(&a, &cluster).await;
    cluster.cleanup().await;
    let report = r?;
    println!("| failover (SIGKILL of the leader) | value |");
    println!("|---|---|");
    println!("| cluster.failover_secs | {} |", report.failover_secs);
    println!("| runs | {} |", report.runs);
    println!(
        "| median s (kill → new leader ready) | {:.2} |",
        report.median_secs
    );
    println!("| worst s | {:.2} |", report.worst_secs);
    println!(
        "| kill → component handshake, each run (s) | {} |",
        report
            .connect_secs
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

async fn failover_runs(a: &FailoverArgs, cluster: &ClusterRun) -> Result<FailoverReport, String> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let client = reqwest::Client::new();
    let start = |node: &str| {
        start_bridge(
            a.bridge.as_ref(),
            port,
            None,
            NO_LIMITS,
            &cluster.section(node),
            None,
        )
    };
    // The component of whichever replica leads; its IQs are answered until it dies.
    let serve = |s: TcpStream| {
        let (r, mut w) = s.into_split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(answer_iqs(r, tx));
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                if w.write_all(&reply).await.is_err() {
                    return;
                }
            }
        });
    };
    let patience = Duration::from_secs(a.failover_secs * 3 + 30);
    let mut leader = start("lg-a")?;
    serve(accept(&listener).await?);
    wait_role(&client, &leader, "leader", patience).await?;
    let mut follower = start("lg-b")?;
    wait_role(&client, &follower, "follower", patience).await?;
    let (mut connect_secs, mut ready_secs) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        // Let the follower settle into its lease checks (and the lease be renewed).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let killed = Instant::now();
        leader.kill();
        let s = tokio::time::timeout(patience, accept(&listener))
            .await
            .map_err(|_| format!("run {run}: no new leader connected within {patience:?}"))??;
        connect_secs.push(killed.elapsed().as_secs_f64());
        serve(s);
        wait_role(&client, &follower, "leader", patience).await?;
        ready_secs.push(killed.elapsed().as_secs_f64());
        eprintln!(
            "failover run {run}: {:.2} s to the handshake, {:.2} s to ready",
            connect_secs[run], ready_secs[run]
        );
        // The killed replica comes back as a follower; roles swap.
        let node = if run % 2 == 0 { "lg-a" } else { "lg-b" };
        let back = start(node)?;
        wait_role(&client, &back, "follower", patience).await?;
        leader = std::mem::replace(&mut follower, back);
    }
    drop(follower);
    drop(leader);
    let mut sorted = ready_secs.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FailoverReport {
        failover_secs: a.failover_secs,
        runs: a.runs,
        median_secs: sorted[sorted.len() / 2],
        worst_secs: sorted[sorted.len() - 1],
        connect_secs,
        ready_secs,
    })
}

/// A token of its own for subscriber `i` (the bridge caps connections per token subject).
fn sub_token(i: usize) -> Result<String, String> {
    presence_bridge::api::auth::mint(
        JWT_SECRET,
        &presence_bridge::api::auth::claims(
            &format!("lg-sub{i}"),
            "presence:read",
            None,
            3600,
            &presence_bridge::config::AuthConfig::default(),
        ),
    )
    .map_err(|e| e.to_string())
}

/// One metric's value from the bridge's `/metrics`.
async fn metric_value(client: &reqwest::Client, port: u16, name: &str) -> Result<u64, String> {
    let text = metrics_text(client, port).await?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|v| v as u64)
        .ok_or_else(|| format!("no {name} in /metrics"))
}

async fn idle(a: IdleArgs) -> Result<(), String> {
    if a.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    let auth = format!("[auth]\njwt_secret = \"{JWT_SECRET}\"\n");
    let Rig {
        bridge,
        mut w,
        mut rx,
        client,
        before,
        ..
    } = rig(a.bridge.as_ref(), None, NO_LIMITS, &auth).await?;
    if a.users > 0 {
        online(a.users, &client, bridge.http, before, &mut w, &mut rx).await?;
    }
    // One session first, so that what every session shares (the first snapshot's encoding,
    // the runtime's buffers) is in the baseline.
    let mut held = vec![ws_open(bridge.http, &sub_token(a.subscribers)?, "").await?];
    tokio::time::sleep(Duration::from_secs(a.settle_secs)).await;
    let rss_before = bridge.rss_kib()?;
    for i in 0..a.subscribers {
        let ws = ws_open(bridge.http, &sub_token(i)?, "")
            .await
            .map_err(|e| format!("subscriber {i}: {e}"))?;
        held.push(ws);
    }
    // Held open and idle (the component stream answered, nothing changing).
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(a.settle_secs) {
        while let Ok(reply) = rx.try_recv() {
            w.write_all(&reply).await.map_err(|e| e.to_string())?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss_after = bridge.rss_kib()?;
    let open_sessions = metric_value(&client, bridge.http, "presence_bridge_ws_sessions").await?;
    drop(held);
    let report = IdleReport {
        subscribers: a.subscribers,
        users: a.users,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        kib_per_subscriber: rss_after.saturating_sub(rss_before) as f64 / a.subscribers as f64,
        open_sessions,
    };
    drop(w);
    drop(bridge);
    println!(
        "| subscribers | users | sessions open | RSS before MiB | RSS after MiB | KiB per subscriber |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.1} | {:.1} | {:.1} |",
        report.subscribers,
        report.users,
        report.open_sessions,
        report.rss_before_kib as f64 / 1024.0,
        report.rss_after_kib as f64 / 1024.0,
        report.kib_per_subscriber
    );
    if let Some(path) = &a.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
