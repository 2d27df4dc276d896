//! giftd: load config, recover, serve, and on SIGTERM drain and sync before exiting 0.

use clap::Parser;
use giftd::card_number::{load_or_create_secret, parse_secret_hex, Keyer, PinKeyer, PIN_SECRET_FILE, SECRET_FILE};
use giftd::config::{Config, ProgramConfig};
use giftd::engine::{Engine, Programs};
use giftd::metrics::Metrics;
use giftd::server::{self, Shared};
use giftd::store::Store;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// A batch allocates and frees thousands of small records (keys, replies, effects) per frame, across
/// threads: under glibc's allocator a 8,192-redeem batch spent 13 % of giftd's CPU in malloc and
/// free (chunk consolidation above all); mimalloc took about 18 % off its CPU per item.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for a bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
/// Exit status when recovered data fails its checks (EX_DATAERR).
const EXIT_DATA: u8 = 65;
/// The bulk thread's nice value where `SCHED_IDLE` is refused: with the CPU contended, it gets
/// about a tenth of a normal thread's share, so job chunks take what payments leave.
const BULK_NICE: i32 = 10;
/// Job chunks waiting for the bulk thread; the connections that sent more wait to hand theirs over
/// (and read nothing more meanwhile).
const BULK_QUEUE_MAX: usize = 16;

#[derive(Parser, Debug)]
#[command(name = "giftd", version, about = "Gift-card authorization daemon")]
struct Args {
    /// Data directory (RocksDB and the card-number secret). Default ./data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Protocol listen address. Default 127.0.0.1:7420; port 0 picks a free port.
    #[arg(long)]
    listen: Option<String>,
    /// Metrics (/metrics, /healthz) listen address. Default 127.0.0.1:9420.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// TOML configuration file (see giftd.example.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Durability mode: sync (default) or relaxed (opt-in, for comparisons only).
    #[arg(long)]
    durability: Option<String>,
    /// Log lines on stderr: text (default), or json (one object per line, the event's fields at
    /// the top level) for a log collector.
    #[arg(long, env = "GIFTD_LOG_FORMAT", value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

fn main() -> ExitCode {
    // A panic anywhere takes the whole process down: a half-dead runtime is worse than a restart.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let args = Args::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        logs.json().flatten_event(true).init();
    } else {
        // Colour codes only for a person at a terminal: log files and collectors get plain text.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }

    let mut cfg = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("giftd: bad configuration: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(l) = args.listen {
        cfg.listen = l;
    }
    if let Some(m) = args.metrics_listen {
        cfg.metrics_listen = m;
    }
    if let Some(d) = args.durability {
        cfg.durability.mode = d;
    }
    if let Err(errs) = cfg.validate() {
        eprintln!("giftd: bad configuration: {}", errs.join("; "));
        return ExitCode::from(EXIT_CONFIG);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(cfg)) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %e, "giftd stopped");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let secret = match &cfg.secret_hex {
        Some(h) => parse_secret_hex(h).expect("validated"),
        None => load_or_create_secret(&cfg.data_dir, SECRET_FILE)?,
    };
    let pin_secret = match &cfg.pin_secret_hex {
        Some(h) => parse_secret_hex(h).expect("validated"),
        None => load_or_create_secret(&cfg.data_dir, PIN_SECRET_FILE)?,
    };
    let metrics = Arc::new(Metrics::new());
    // Served from before recovery until after the drain: /healthz says the process is up, /readyz
    // whether it has recovered and accepts requests.
    let metrics_listener = tokio::net::TcpListener::bind(&cfg.metrics_listen).await?;
    let maddr = metrics_listener.local_addr()?;
    let sources = server::http::Sources::default();
    let http_stop = CancellationToken::new();
    let http = tokio::spawn(server::http::serve(metrics_listener, metrics.clone(), sources.clone(), http_stop.clone()));
    let durability = cfg.durability();
    let started = Instant::now();
    let (store, recovered) = Store::open(&cfg.data_dir, durability, cfg.store_tuning(), metrics.clone())?;
    let store = Arc::new(store);
    let engine = Engine::new(Programs::new(cfg.programs()), store.clone());
    engine.set_alert_rules(cfg.alerts.rules());
    // Programs an admin set over the wire replace the config file's: they are newer.
    let mut stored_programs = Vec::new();
    for (name, text) in &recovered.programs {
        let parsed = ProgramConfig::parse(text).map_err(|e| vec![e]).and_then(|c| {
            let problems = c.problems(name);
            if problems.is_empty() {
                Ok(c)
            } else {
                Err(problems)
            }
        });
        match parsed {
            Ok(c) => {
                if cfg.programs.get(name).is_some_and(|f| f.to_program(name) != c.to_program(name)) {
                    tracing::warn!(program = %name, "program was updated over the wire; the stored settings replace the config file's");
                }
                stored_programs.push(c.to_program(name));
            }
            Err(problems) => {
                tracing::error!(program = %name, problems = %problems.join("; "), "stored program settings are invalid");
                return Ok(ExitCode::from(EXIT_DATA));
            }
        }
    }
    engine.restore_programs(stored_programs);
    let totals = recovered.totals;
    let restored = engine.restore(recovered.cards, recovered.hold_id_next);
    for name in &restored.unknown_programs {
        tracing::warn!(program = %name, "cards reference a program missing from the configuration; default rules apply");
    }
    // Conservation: what entered minus what left must equal what the cards hold, per currency.
    let currencies =
        totals.keys().chain(restored.balance_minor_by_currency.keys()).collect::<std::collections::BTreeSet<_>>();
    for c in currencies {
        let (credit, debit) = totals.get(c).copied().unwrap_or((0, 0));
        let held = restored.balance_minor_by_currency.get(c).copied().unwrap_or(0);
        if credit - debit != held {
            tracing::error!(currency = %c, credit, debit, balances = held, "conservation check failed after recovery");
            return Ok(ExitCode::from(EXIT_DATA));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    metrics.cards_recovered.set(restored.cards as i64);
    metrics.recovery_seconds.set(secs);
    tracing::info!(
        cards = restored.cards,
        open_holds = restored.holds,
        replayed_history_entries = recovered.replayed,
        seconds = secs,
        "recovered; totals check passed"
    );

    let listener = tokio::net::TcpListener::bind(&cfg.listen).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        engine,
        store: store.clone(),
        keyer: Keyer::new(&secret),
        pin_keyer: PinKeyer::new(&pin_secret),
        metrics: metrics.clone(),
        limits: cfg.limits.clone(),
        access: giftd::server::access::Access::new(&cfg.clients, cfg.limits.requests_per_second_per_connection)?,
        bulk: giftd::server::background::Background::start(
            "giftd-bulk",
            BULK_NICE,
            BULK_QUEUE_MAX,
            giftd::server::background::Pace::new(
                cfg.limits.bulk_beside_payments_cards_per_sec,
                metrics.bulk_paced_seconds.clone(),
            ),
        )?,
    });
    let _ = sources.set(shared.clone());
    if shared.access.required() {
        tracing::info!(clients = cfg.clients.len(), "clients must authenticate");
    } else {
        tracing::warn!("no [[clients]] configured: authentication is off and every connection may do everything");
    }
    let shutdown = CancellationToken::new();
    tracing::info!(listen = %addr, metrics = %maddr, durability = %durability.label(), "giftd ready");
    // The handlers are in place before the ready line: a SIGTERM sent as soon as giftd says it is
    // ready must drain it, not kill it with the default action.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Ready before the line says so: whoever reads the line may ask /readyz at once.
    metrics.ready.set(1);
    // One machine-readable line on stdout, for scripts and tests that start giftd on port 0.
    println!("giftd ready listen={addr} metrics={maddr} durability={}", durability.label());

    let signals = {
        let (shutdown, metrics) = (shutdown.clone(), metrics.clone());
        let delay = std::time::Duration::from_millis(cfg.limits.shutdown_delay_ms);
        async move {
            // SIGTERM is graceful: not ready at once, still serving for the delay (so a load
            // balancer stops sending work first), then the drain. SIGINT skips the delay.
            let graceful = tokio::select! {
                _ = term.recv() => true,
                _ = int.recv() => false,
            };
            metrics.ready.set(0);
            if graceful && !delay.is_zero() {
                tracing::info!(delay_ms = delay.as_millis() as u64, "SIGTERM: not ready; serving until the delay ends");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = int.recv() => {}
                }
            }
            tracing::info!("{}: draining", if graceful { "SIGTERM" } else { "SIGINT" });
            shutdown.cancel();
        }
    };
    tokio::spawn(signals);
    let drained = server::serve(listener, shared.clone(), shutdown.clone()).await;
    tokio::task::spawn_blocking(move || store.close()).await?;
    http_stop.cancel();
    let _ = http.await;
    tracing::info!(drained, "stopped; WAL synced");
    Ok(ExitCode::SUCCESS)
}
