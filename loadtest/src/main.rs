//! giftload: giftd's benchmark driver, workload and auditor, in the TigerBeetle style.
//!
//! - [`driver`]: optionally starts giftd on a fresh data directory and stops it with SIGTERM.
//! - [`workload`]: preloads cards, then keeps `connections × pipeline` durable redeems in flight.
//! - [`auditor`]: checks every reply, then every card's final balance against the approved replies.
//! - [`pipe`]: a pipelined connection shared by all three phases.
//!
//! Only replies count: throughput is answered requests per second, latency is send-to-reply. A run
//! whose audit fails exits non-zero, so a fast but wrong server never produces a clean figure.

mod auditor;
mod driver;
mod pipe;
mod workload;

use anyhow::{anyhow, bail, Context, Result};
use auditor::{BalanceAudit, Ledger};
use clap::Parser;
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use workload::{LoadResult, Run};

/// Exit status for a usage error (EX_USAGE), as giftd uses.
const EXIT_USAGE: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "giftload",
    version,
    about = "Benchmark giftd with durable redeems, then audit every card's balance",
    long_about = "Benchmark giftd with durable redeems, then audit every card's balance.\n\n\
        Preloads --cards active cards (1,000,000.00 USD each), then keeps --connections × --pipeline \
        redeems of 1.00 from random cards in flight for --duration-secs. Every reply is checked and \
        every final balance must equal its initial value minus the approved redeems. Exits 1 when \
        the audit fails. Progress goes to stderr; the result to stdout."
)]
struct Args {
    /// giftd's protocol address; must be 127.0.0.1. Ignored with --spawn.
    #[arg(long, default_value = "127.0.0.1:7420")]
    addr: String,
    /// Load connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests each connection keeps in flight.
    #[arg(long, default_value_t = 4)]
    pipeline: usize,
    /// How long requests are sent; replies still due are awaited (up to 10 s) afterwards.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Cards issued before the run; each redeem picks one uniformly.
    #[arg(long, default_value_t = 100_000)]
    cards: usize,
    /// Start giftd (next to this executable, or $GIFTD_BIN) on a fresh temp dir, stop it after.
    #[arg(long)]
    spawn: bool,
    /// With --spawn, the mode giftd is started in (default: giftd's own, sync). Without --spawn,
    /// giftload cannot ask the server: this only labels the report and must match the server's
    /// --durability (default sync).
    #[arg(long, value_parser = ["sync", "relaxed"])]
    durability: Option<String>,
    /// Print exactly one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Open loop: offer this many redeems per second in total, spread evenly over the connections,
    /// whatever the replies do (--pipeline then caps each connection's requests in flight).
    /// Latency counts from each request's turn when giftd's slowness held it back. Without it,
    /// the loop is closed: a new request as each reply arrives.
    #[arg(long)]
    rate: Option<u64>,
    /// Workloads to run one after the other on the same cards and server, comma-separated:
    /// redeem, auth-capture (authorize then capture; a unit is the pair), split3 (split redeems
    /// over three cards), batch or batch:N (batch frames of N redeems, 8192 by default; an op is
    /// one redeem), batch-atomic or batch-atomic:N (all-or-nothing batch frames of N redeems from N
    /// different cards), batch-each or batch-each:N (the same frames, each redeem decided on its
    /// own, the batch idempotent on its own key). Each runs for --duration-secs; the audit covers
    /// them all.
    #[arg(long, value_delimiter = ',', default_value = "redeem")]
    workload: Vec<String>,
    /// Stop sending after this many units per workload (the duration still applies).
    #[arg(long)]
    max_ops: Option<u64>,
    /// Tokio worker threads for giftload. Keep it low: giftd shares the machine.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Authenticate every connection as this client of giftd's [[clients]] (needs --key-file).
    /// Its role must allow issue, the workloads' operations and lookups: an operator.
    #[arg(long, requires = "key_file")]
    client: Option<String>,
    /// The client's key: a file of 64 hex digits.
    #[arg(long, requires = "client")]
    key_file: Option<std::path::PathBuf>,
    /// Also write every reply's latency to this file, for latency over part of a run (say, while
    /// a bulk job ran): per workload a line `# <workload> start_unix_ms <ms>`, then one line per
    /// reply, `<µs from that start to the send> <latency µs>`, in no particular order. At most
    /// 10,000,000 replies per workload are written.
    #[arg(long)]
    latency_log: Option<std::path::PathBuf>,
}

impl Args {
    fn validate(&self) -> Result<()> {
        let ranges: [(&str, usize, usize, usize); 4] = [
            ("--connections", self.connections, 1, 1024),
            ("--pipeline", self.pipeline, 1, 1024),
            ("--threads", self.threads, 1, 256),
            ("--cards", self.cards, 1, workload::CARDS_MAX),
        ];
        for (name, v, lo, hi) in ranges {
            if !(lo..=hi).contains(&v) {
                bail!("{name} must be between {lo} and {hi}");
            }
        }
        if !(1..=86_400).contains(&self.duration_secs) {
            bail!("--duration-secs must be between 1 and 86400");
        }
        if let Some(r) = self.rate {
            if !(1..=RATE_MAX).contains(&r) {
                bail!("--rate must be between 1 and {RATE_MAX}");
            }
        }
        if self.workload.is_empty() {
            bail!("--workload must name at least one of redeem, auth-capture, split3");
        }
        for w in &self.workload {
            if workload::Kind::parse(w).is_none() {
                bail!("--workload {w:?}: not one of redeem, auth-capture, split3");
            }
        }
        if self.max_ops == Some(0) {
            bail!("--max-ops must be at least 1");
        }
        if !self.spawn {
            loopback(&self.addr)?;
        }
        Ok(())
    }
}

/// Far beyond what one machine serves; it only keeps the per-connection interval above zero.
const RATE_MAX: u64 = 100_000_000;

/// giftload only ever talks to this machine: a load test aimed elsewhere by mistake is an attack.
fn loopback(addr: &str) -> Result<()> {
    match addr.parse::<SocketAddr>() {
        Ok(a) if a.ip() == Ipv4Addr::LOCALHOST => Ok(()),
        _ => bail!("address {addr:?} must be 127.0.0.1:PORT"),
    }
}

/// Everything the report shows.
struct Report {
    durability: String,
    /// One per workload, in the order run.
    loads: Vec<(workload::Kind, LoadResult)>,
    audit: Option<BalanceAudit>,
    /// Why the audit failed; empty when it passed.
    failures: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("giftload: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // A multi-thread runtime with few workers: giftd needs most of a 2-core machine.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("giftload: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(report) => {
            print_report(&args, &report);
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("giftload: {e:#}");
            if args.json {
                // Scripts still get their one object, and a failed audit rather than a parse error.
                let v = json!({
                    "audit": "failed",
                    "error": format!("{e:#}"),
                    "connections": args.connections,
                    "pipeline": args.pipeline,
                    "cards": args.cards,
                });
                println!("{v}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> Result<Report> {
    if let (Some(name), Some(path)) = (&args.client, &args.key_file) {
        let _ = pipe::CREDENTIALS.set(giftd::client::Credentials::from_key_file(name, path)?);
    }
    if !args.spawn {
        let durability = args.durability.clone().unwrap_or_else(|| "sync".into());
        return bench(args, &args.addr, durability).await;
    }
    let server = driver::Server::spawn(args.durability.as_deref()).await?;
    eprintln!("giftload: giftd ready on {} ({})", server.addr, server.durability);
    let result = match loopback(&server.addr) {
        Ok(()) => bench(args, &server.addr, server.durability.clone()).await,
        Err(e) => Err(e),
    };
    // Stop giftd even when the run failed, so a failed run still checks the shutdown path.
    let stopped = server.stop().await;
    match (result, stopped) {
        (Ok(mut report), stopped) => {
            if let Err(e) = stopped {
                report.failures.push(format!("stopping giftd: {e:#}"));
            }
            Ok(report)
        }
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(stop)) => Err(anyhow!("{e:#}; stopping giftd failed too: {stop:#}")),
    }
}

/// Preload, load, audit.
async fn bench(args: &Args, addr: &str, durability: String) -> Result<Report> {
    let run = Arc::new(Run::new(args.cards)?);
    let ledger = Arc::new(Ledger::new(args.cards));
    eprintln!("giftload: run {}: issuing {} cards", run.id, args.cards);
    workload::preload(addr, run.clone()).await?;
    let mut loads = Vec::new();
    let mut failures = Vec::new();
    for kind in args.workload.iter().filter_map(|w| workload::Kind::parse(w)) {
        eprintln!(
            "giftload: {}×{} {} for {} s, {} ({} durability)",
            args.connections,
            args.pipeline,
            kind.name(),
            args.duration_secs,
            loop_label(args),
            durability
        );
        let shape = workload::Shape {
            kind,
            connections: args.connections,
            pipeline: args.pipeline,
            duration: Duration::from_secs(args.duration_secs),
            max_ops: args.max_ops,
            rate: args.rate,
            samples_max: if args.latency_log.is_some() { LATENCY_LOG_MAX } else { 0 },
        };
        let load = workload::load(addr, run.clone(), ledger.clone(), &shape).await?;
        let name = kind.name();
        failures.extend(load.failures.iter().map(|f| format!("{name}: {f}")));
        if load.unanswered > 0 {
            failures.push(format!("{name}: {} requests never answered", load.unanswered));
        }
        let errors = load.findings.error_count();
        if errors > 0 {
            failures.push(format!("{name}: {errors} requests not approved ({})", error_names(&load)));
        }
        if load.findings.anomalies > 0 {
            failures.push(format!("{name}: {} replies contradict their request", load.findings.anomalies));
            failures.extend(load.findings.examples.iter().map(|e| format!("  {e}")));
        }
        loads.push((kind, load));
    }
    if let Some(path) = &args.latency_log {
        write_latency_log(path, &loads).with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!("giftload: auditing {} balances", args.cards);
    let audit = match auditor::audit_balances(addr, run, ledger).await {
        Ok(a) => {
            if a.mismatches > 0 {
                failures.push(format!("{} of {} balances differ from initial − approved", a.mismatches, a.checked));
                failures.extend(a.examples.iter().map(|e| format!("  {e}")));
            }
            Some(a)
        }
        Err(e) => {
            failures.push(format!("balance audit: {e:#}"));
            None
        }
    };
    Ok(Report { durability, loads, audit, failures })
}

/// How requests were offered, for the report.
fn loop_label(args: &Args) -> String {
    match args.rate {
        Some(r) => format!("open loop at {r}/s"),
        None => "closed loop".into(),
    }
}

/// Replies whose latency --latency-log keeps, per workload: 160 MB of samples at most.
const LATENCY_LOG_MAX: usize = 10_000_000;

fn write_latency_log(path: &std::path::Path, loads: &[(workload::Kind, LoadResult)]) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (kind, load) in loads {
        writeln!(out, "# {} start_unix_ms {}", kind.name(), load.start_unix_ms)?;
        for (sent_us, latency_us) in &load.samples {
            writeln!(out, "{sent_us} {latency_us}")?;
        }
    }
    out.flush()
}

fn error_names(load: &LoadResult) -> String {
    let names: Vec<String> = load.findings.errors.iter().map(|(name, n)| format!("{name} {n}")).collect();
    names.join(", ")
}

/// One workload's figures.
struct Figures {
    ops_per_sec: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
    secs: f64,
}

impl Figures {
    fn of(load: &LoadResult) -> Figures {
        let secs = load.elapsed.as_secs_f64();
        let h = &load.hist;
        // An empty histogram reports zeros, which is what "no reply arrived" should read as.
        Figures {
            ops_per_sec: if secs > 0.0 { load.ops as f64 / secs } else { 0.0 },
            p50: h.value_at_quantile(0.50),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            secs,
        }
    }
}

fn print_report(args: &Args, r: &Report) {
    let audit = if r.failures.is_empty() { "ok" } else { "failed" };
    if args.json {
        let per: Vec<serde_json::Value> = r
            .loads
            .iter()
            .map(|(kind, load)| {
                let f = Figures::of(load);
                json!({
                    "workload": kind.name(),
                    "ops_per_sec": (f.ops_per_sec * 10.0).round() / 10.0,
                    "requests_per_sec": (f.ops_per_sec * kind.requests_per_op() * 10.0).round() / 10.0,
                    "p50_us": f.p50,
                    "p99_us": f.p99,
                    "p999_us": f.p999,
                    "max_us": f.max,
                    "max_at_secs": (load.slowest_at_secs * 1000.0).round() / 1000.0,
                    "ops": load.ops,
                    "errors": load.findings.error_count(),
                    "errors_by_result": load.findings.errors,
                    "duration_secs": (f.secs * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        // The first workload's figures also stand at the top level, for scripts that run one.
        let mut v = per.first().cloned().unwrap_or_else(|| json!({}));
        let top = v.as_object_mut().expect("an object");
        for (k, val) in [
            ("durability", json!(r.durability)),
            ("audit", json!(audit)),
            ("connections", json!(args.connections)),
            ("pipeline", json!(args.pipeline)),
            ("rate", json!(args.rate)),
            ("cards", json!(args.cards)),
            ("threads", json!(args.threads)),
            ("balances_checked", json!(r.audit.as_ref().map(|a| a.checked))),
            ("failures", json!(r.failures)),
            ("workloads", json!(per)),
        ] {
            top.insert(k.into(), val);
        }
        println!("{v}");
        for f in &r.failures {
            eprintln!("giftload: audit: {f}");
        }
        return;
    }
    for (kind, load) in &r.loads {
        let f = Figures::of(load);
        let errors = load.findings.error_count();
        let errors = if errors > 0 { format!("{errors} ({})", error_names(load)) } else { "0".into() };
        println!(
            "{:<13} {:>9.0} units/s ({})  p50 {} µs  p99 {} µs  p99.9 {} µs  max {} µs (at {:.3} s)  units {}  errors {errors}",
            kind.name(),
            f.ops_per_sec,
            loop_label(args),
            f.p50,
            f.p99,
            f.p999,
            f.max,
            load.slowest_at_secs,
            load.ops
        );
    }
    println!(
        "durability {}  cards {}  connections {}×{}  threads {}  audit {audit}",
        r.durability, args.cards, args.connections, args.pipeline, args.threads
    );
    for f in &r.failures {
        println!("audit: {f}");
    }
}
