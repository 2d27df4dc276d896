//! giftctl: one request to giftd from the command line. Exit status 0 when giftd answered (approved
//! or declined), 2 on a usage error, 1 when giftd could not be reached.

use clap::{Parser, Subcommand};
use giftd::bulk;
use giftd::card_number::{CardNumber, Pin};
use giftd::client::{Client, Credentials};
use giftd::engine::{SplitOrder, SPLIT_CARDS_MAX};
use giftd::model::{
    format_amount, parse_amount, CardView, Currency, LockReason, Money, Outcome, ResultCode, Status, TxnKind, TxnView,
};
use giftd::wire::{IdemRef, Reply, Request, HISTORY_PAGE_MAX};
use serde_json::{json, Map, Value};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "giftctl", version, about = "Talk to giftd")]
struct Cli {
    /// giftd's protocol address.
    #[arg(long, default_value = "127.0.0.1:7420", global = true)]
    addr: String,
    /// Print one JSON object instead of a sentence.
    #[arg(long, global = true)]
    json: bool,
    /// Authenticate as this configured client (needed when giftd has [[clients]]).
    #[arg(long, env = "GIFTCTL_CLIENT", global = true, requires = "key_file")]
    client: Option<String>,
    /// The client's key: a file of 64 hex digits.
    #[arg(long, env = "GIFTCTL_KEY_FILE", global = true, requires = "client")]
    key_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug)]
struct Who {
    /// Merchant (or operator) id; with --key it identifies the request for idempotency.
    #[arg(long, default_value = "giftctl")]
    merchant: String,
}

/// A card and the request's key: what a mutation with no other field names.
#[derive(clap::Args, Debug)]
struct CardKeyed {
    #[arg(long)]
    number: String,
    #[arg(long)]
    key: String,
    #[command(flatten)]
    who: Who,
}

/// A card, an amount and the request's key: what every single-card money operation names.
#[derive(clap::Args, Debug)]
struct Spend {
    #[arg(long)]
    number: String,
    #[arg(long)]
    amount: String,
    /// The amount's currency (asked of giftd, from the card, when absent).
    #[arg(long)]
    currency: Option<String>,
    #[arg(long)]
    key: String,
    #[command(flatten)]
    who: Who,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a card, with a given number or (--generate) a new random one, shown once.
    Issue {
        #[arg(long, required_unless_present = "generate", conflicts_with = "generate")]
        number: Option<String>,
        /// Let giftd choose a random number (Luhn-checked, in the program's format); the reply
        /// shows it this once, and never again.
        #[arg(long)]
        generate: bool,
        /// A virtual (e-)card rather than plastic.
        #[arg(long = "virtual")]
        virtual_card: bool,
        /// Where an e-card is delivered.
        #[arg(long)]
        email: Option<String>,
        /// A compensation case: issuing again for the same case returns the first card.
        #[arg(long)]
        case: Option<String>,
        #[arg(long)]
        currency: String,
        #[arg(long)]
        amount: String,
        #[arg(long, default_value = "default")]
        program: String,
        /// RFC 3339 time, or "never".
        #[arg(long, default_value = "never")]
        expires: String,
        /// Issue the card already active.
        #[arg(long)]
        active: bool,
        /// Idempotency key (generated when absent).
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// Activate an inactive card, optionally loading an initial value.
    Activate {
        #[arg(long)]
        number: String,
        #[arg(long)]
        amount: Option<String>,
        /// The amount's currency (asked of giftd when absent).
        #[arg(long)]
        currency: Option<String>,
        #[arg(long)]
        key: String,
        #[command(flatten)]
        who: Who,
    },
    /// Balance inquiry.
    Balance {
        #[arg(long)]
        number: String,
    },
    /// Debit a card now.
    Redeem {
        #[command(flatten)]
        spend: Spend,
        #[arg(long)]
        invoice: Option<String>,
        /// Approve what is available when the amount is more.
        #[arg(long)]
        partial: bool,
        /// The card's PIN, where its program asks for one.
        #[arg(long, env = "GIFTCTL_PIN", hide_env_values = true)]
        pin: Option<String>,
    },
    /// Add value to an active card.
    Reload {
        #[command(flatten)]
        spend: Spend,
    },
    /// Suspend a card: fraud, lost, stolen, customer_request or system.
    Lock {
        #[arg(long)]
        number: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// Lift a suspension.
    Unlock {
        #[arg(long)]
        number: String,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// The card's record and its latest transactions.
    Lookup {
        #[arg(long)]
        number: String,
    },
    /// Reserve an amount on a card (a hold) until it is captured, voided or expires.
    Authorize {
        #[command(flatten)]
        spend: Spend,
        /// How long the hold lasts (default: the program's, 7 days unless configured).
        #[arg(long)]
        ttl_secs: Option<u32>,
        /// Hold what is available when the amount is more.
        #[arg(long)]
        partial: bool,
        /// The card's PIN, where its program asks for one.
        #[arg(long, env = "GIFTCTL_PIN", hide_env_values = true)]
        pin: Option<String>,
    },
    /// Take all or part of a hold; the rest is released.
    Capture {
        #[arg(long)]
        hold: u64,
        #[arg(long)]
        amount: String,
        /// The hold's currency; a different one is declined (currency_mismatch), never converted.
        #[arg(long, default_value = "USD")]
        currency: String,
        #[arg(long)]
        key: String,
        #[command(flatten)]
        who: Who,
    },
    /// Release a hold.
    Void {
        #[arg(long)]
        hold: u64,
        #[arg(long)]
        key: String,
        #[command(flatten)]
        who: Who,
    },
    /// Credit an amount back to a card, for the spend whose key is --original.
    Refund {
        #[command(flatten)]
        spend: Spend,
        /// The idempotency key (same --merchant) of the redeem or capture refunded. Without it
        /// the refund is unreferenced, which a program must allow.
        #[arg(long)]
        original: Option<String>,
    },
    /// Undo an earlier mutation (redeem, capture, reload, activate, authorize) by its key.
    Reverse {
        /// The idempotency key (same --merchant) of the mutation to undo.
        #[arg(long)]
        original: String,
        #[arg(long)]
        key: String,
        #[command(flatten)]
        who: Who,
    },
    /// Take an amount from several cards at once, all or nothing.
    SplitRedeem {
        /// Card numbers, comma-separated (at most 8).
        #[arg(long, value_delimiter = ',')]
        numbers: Vec<String>,
        #[arg(long)]
        amount: String,
        /// The amount's currency (the first card's when absent).
        #[arg(long)]
        currency: Option<String>,
        #[arg(long)]
        key: String,
        /// given (as listed), expiry (soonest first) or smallest (smallest available first).
        #[arg(long, default_value = "given")]
        order: String,
        #[command(flatten)]
        who: Who,
    },
    /// Move a lost or damaged card's whole balance to another card and close it.
    Transfer {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        key: String,
        #[command(flatten)]
        who: Who,
    },
    /// Append an internal note to a card (--merchant is its author).
    Note {
        #[arg(long)]
        number: String,
        #[arg(long)]
        text: String,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// Make an expired or suspended card usable again, under its program's policy; a decline says
    /// why (in `reason`).
    Reactivate(CardKeyed),
    /// Pay out the remaining balance and close the card.
    CashOut(CardKeyed),
    /// Link a card to a member id and set or clear VIP; what is not given is kept.
    Register {
        #[arg(long)]
        number: String,
        /// The member id; an empty string unlinks the card.
        #[arg(long)]
        member: Option<String>,
        #[arg(long, conflicts_with = "no_vip")]
        vip: bool,
        #[arg(long)]
        no_vip: bool,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
    /// Set, check or unlock a card's PIN.
    Pin {
        #[command(subcommand)]
        cmd: PinCmd,
    },
    /// Show or change a program's settings (the config file's keys).
    Program {
        #[command(subcommand)]
        cmd: ProgramCmd,
    },
    /// Reseller jobs: issue or activate cards by the thousand, or take a job back.
    Bulk {
        #[command(subcommand)]
        cmd: BulkCmd,
    },
    /// Committed events (history entries and alerts) after a position, in commit order, as JSON
    /// lines; `--follow` keeps waiting for new ones. Resume with `--from` the last `id` seen.
    Events {
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long)]
        follow: bool,
        /// Only events by this merchant (its own traffic and the alerts about it).
        #[arg(long)]
        merchant: Option<String>,
        /// Only history entries of cards of this program (alerts name no program: none then).
        #[arg(long)]
        program: Option<String>,
        /// Only these kinds, comma-separated: history kinds (issue, redeem, ...) and `alert`.
        #[arg(long, value_delimiter = ',')]
        kinds: Vec<String>,
    },
    /// Transactions, newest first, a page at a time.
    History {
        #[arg(long)]
        number: String,
        /// Show entries before this sequence number (from the previous page's "next_before").
        #[arg(long, default_value_t = 0)]
        before: u64,
        #[arg(long, default_value_t = 20)]
        limit: u16,
        /// Only entries of this kind (redeem, reload, capture, note, ...).
        #[arg(long)]
        kind: Option<String>,
    },
}

/// A card, its PIN, and the request's key.
#[derive(clap::Args, Debug)]
struct PinArgs {
    #[arg(long)]
    number: String,
    /// The PIN (4 to 12 digits); from the environment, it stays out of the process list.
    #[arg(long, env = "GIFTCTL_PIN", hide_env_values = true)]
    pin: String,
    #[arg(long)]
    key: Option<String>,
    #[command(flatten)]
    who: Who,
}

#[derive(Subcommand, Debug)]
enum PinCmd {
    /// Set or replace the PIN (a PIN lock stays until reset).
    Set(PinArgs),
    /// Check a PIN; a wrong one counts towards the lock.
    Verify(PinArgs),
    /// Lift a PIN lock.
    Reset {
        #[arg(long)]
        number: String,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
}

/// Which cards a job names: a range of consecutive numbers, or a manifest file.
#[derive(clap::Args, Debug)]
struct JobCards {
    /// The range's first number ...
    #[arg(long, requires = "count", conflicts_with = "manifest")]
    first: Option<String>,
    /// ... and how many cards it has.
    #[arg(long)]
    count: Option<u64>,
    /// A CSV file with one card number per line (its first column; a header line is skipped).
    #[arg(long, required_unless_present = "first")]
    manifest: Option<std::path::PathBuf>,
}

/// What every job command takes.
#[derive(clap::Args, Debug)]
struct JobRun {
    /// The job's id, chosen by the caller: running the same job again applies nothing twice and
    /// answers with the same summary (so an interrupted job is resumed by running it again).
    #[arg(long)]
    job: String,
    /// Cards per chunk, for a new job (at most 4096); a job run again keeps the chunk size it
    /// was opened with.
    #[arg(long, default_value_t = 1024)]
    chunk: usize,
    /// Chunks in flight at once.
    #[arg(long, default_value_t = 4)]
    window: usize,
    #[command(flatten)]
    who: Who,
}

#[derive(Subcommand, Debug)]
enum BulkCmd {
    /// Create inactive cards (inventory) with a value and an expiry.
    Issue {
        #[command(flatten)]
        cards: JobCards,
        #[arg(long)]
        amount: String,
        #[arg(long)]
        currency: String,
        #[arg(long, default_value = "default")]
        program: String,
        /// RFC 3339 time, or "never".
        #[arg(long, default_value = "never")]
        expires: String,
        /// Make this many new random numbers (kept in MANIFEST.round0, readable by its owner only)
        /// and issue them; replace any that was a card already (MANIFEST.round1, …, job ID~1, …);
        /// then list the box's cards in --manifest, which must not exist yet. The same command
        /// again resumes from the round files: nothing is issued twice, no round drawn twice.
        #[arg(long, requires = "manifest", requires = "prefix")]
        generate: Option<u64>,
        /// Leading digits of the numbers --generate makes: the program's number_prefix.
        #[arg(long, requires = "generate")]
        prefix: Option<String>,
        /// Digits of the numbers --generate makes, the check digit included: the program's
        /// number_length.
        #[arg(long, requires = "generate", default_value_t = 16)]
        length: usize,
        #[command(flatten)]
        run: JobRun,
    },
    /// Activate cards, optionally loading a value.
    Activate {
        #[command(flatten)]
        cards: JobCards,
        #[arg(long, requires = "currency")]
        amount: Option<String>,
        #[arg(long)]
        currency: Option<String>,
        #[command(flatten)]
        run: JobRun,
    },
    /// Take back what a job did, card by card; cards used since are reported, not touched.
    Reverse {
        #[command(flatten)]
        run: JobRun,
    },
}

/// The first round of `bulk issue --generate count`'s numbers: its file's, when it exists (a run
/// resumed, which must be the same job of the same merchant, format and count), else `count` new
/// numbers, written to it before anything is issued. Returns them with how many were made by this
/// run.
fn first_round(
    job: bulk::Job<'_>,
    manifest: &std::path::Path,
    count: u64,
    format: (&str, usize),
) -> Result<(Vec<CardNumber>, u64), Failure> {
    let path = bulk::round_path(manifest, 0);
    let header = bulk::round_header(job, format, 0, count as usize);
    let again = bulk::read_round(&path, &header).map_err(|e| {
        usage(format!("{e:#}: to resume that box, run the command it was first run with; else name a new --manifest"))
    })?;
    if let Some(numbers) = again {
        if numbers.len() as u64 != count {
            return Err(usage(format!("{} holds {} numbers, not {count}", path.display(), numbers.len())));
        }
        return Ok((numbers, 0));
    }
    if manifest.exists() {
        return Err(usage(format!(
            "--manifest {} exists, and {} (the numbers its job drew) does not: name a new file",
            manifest.display(),
            path.display()
        )));
    }
    if let Some(stale) = (1..bulk::DRAW_ROUNDS_MAX).map(|r| bulk::round_path(manifest, r)).find(|p| p.exists()) {
        return Err(usage(format!("{} is left from another box: name a new --manifest", stale.display())));
    }
    let numbers = bulk::generate(count, format.0, format.1, &Default::default())
        .map_err(|e| usage(format!("--generate: {e}")))?;
    bulk::write_manifest(&path, Some(&header), &numbers).map_err(Failure::Run)?;
    Ok((numbers, count))
}

fn job_cards(c: &JobCards) -> Result<bulk::Cards, Failure> {
    if let Some(path) = &c.manifest {
        let numbers = bulk::read_manifest(path).map_err(|e| usage(format!("--manifest {}: {e:#}", path.display())))?;
        return Ok(bulk::Cards::Manifest(numbers));
    }
    let first = c.first.as_deref().map(number).transpose()?.ok_or_else(|| usage("--first or --manifest"))?;
    let cards = bulk::Cards::Range { first, count: c.count.unwrap_or(0) };
    cards.check().map_err(|e| usage(format!("{e}")))?;
    Ok(cards)
}

/// Runs a job command; draws a progress bar on a terminal (not with --json) and prints the summary.
async fn bulk_command(cli: &Cli, cmd: &BulkCmd) -> Result<(), Failure> {
    let run = match cmd {
        BulkCmd::Issue { run, .. } | BulkCmd::Activate { run, .. } | BulkCmd::Reverse { run } => run,
    };
    bulk::check_job_id(&run.job).map_err(|e| usage(format!("--job: {e}")))?;
    let most = giftd::wire::JOB_CHUNK_CARDS_MAX as usize;
    if !(1..=most).contains(&run.chunk) || run.window == 0 {
        return Err(usage(format!("--chunk must be 1 to {most} and --window at least 1")));
    }
    // A bar on a terminal, none with --json or when stderr is a file or a pipe.
    let show = !cli.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {human_pos}/{human_len} cards, {rate}, {eta} left",
    )
    .expect("a valid template")
    .with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{:.0}/s", s.per_sec());
    })
    .progress_chars("=> ");
    // Drawn from the first progress on, when the job's size is known.
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::hidden())
        .with_style(style)
        .with_prefix(run.job.clone());
    let progress = |done: u64, total: u64| {
        if show && bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_length(total);
        bar.set_position(done);
    };
    let creds = credentials(cli)?;
    let job = bulk::Job {
        addr: &cli.addr,
        credentials: creds.as_ref(),
        merchant: &run.who.merchant,
        id: &run.job,
        chunk: run.chunk,
        window: run.window,
    };
    // With --generate: what its rounds came to (the numbers made by this run, 0 when it only
    // resumed), and the manifest's path.
    let mut generated = None;
    let done = match cmd {
        BulkCmd::Issue { cards, amount, currency: cur, program, expires, generate, prefix, length, .. } => {
            let work = bulk::Work::Issue {
                program: program.clone(),
                money: money(amount, currency(cur)?)?,
                expiry_ms: parse_expiry(expires)?,
            };
            match generate {
                Some(n) => {
                    let manifest = cards.manifest.as_deref().ok_or_else(|| usage("--generate needs --manifest"))?;
                    // Every round's job id must be valid before a number is drawn.
                    let most = bulk::JOB_ID_BYTES_MAX - 3;
                    if run.job.contains('~') || run.job.len() > most {
                        return Err(usage(format!(
                            "--job with --generate: 1 to {most} printable characters without '/' or '~' (later \
                             rounds' jobs are ID~1, ID~2, …)"
                        )));
                    }
                    let _lock = bulk::lock_box(manifest).map_err(Failure::Run)?;
                    let format = (prefix.as_deref().unwrap_or(""), *length);
                    let (first, made) = first_round(job, manifest, *n, format)?;
                    bulk::issue_drawn(job, manifest, first, format, &work, progress).await.map(|mut d| {
                        d.made += made;
                        let summary = std::mem::take(&mut d.summary);
                        let reply = d.job.clone();
                        generated = Some((d, manifest));
                        (reply, summary)
                    })
                }
                None => bulk::run(job, &job_cards(cards)?, &work, progress).await,
            }
        }
        BulkCmd::Activate { cards, amount, currency: cur, .. } => {
            let cards = job_cards(cards)?;
            let load = match (amount, cur) {
                (Some(a), Some(c)) => Some(money(a, currency(c)?)?),
                _ => None,
            };
            bulk::run(job, &cards, &bulk::Work::Activate { load }, progress).await
        }
        BulkCmd::Reverse { .. } => bulk::reverse(job, progress).await,
    };
    bar.finish_and_clear();
    let (job, summary) = done.map_err(Failure::Run)?;
    let mut obj = Map::new();
    obj.insert("result".into(), json!(job.result.name()));
    obj.insert("code".into(), json!(job.result as u16));
    obj.insert("job".into(), json!(run.job));
    obj.insert("count".into(), json!(job.count));
    if job.result == ResultCode::IdempotencyMismatch {
        obj.insert("reason".into(), json!("this job id was used for a job of another kind or size"));
    } else if job.result == ResultCode::JobNotFound {
        obj.insert("reason".into(), json!("no job has this id (for this --merchant)"));
    }
    if let Some((d, _)) = &generated {
        obj.insert("generated".into(), json!(d.made));
        obj.insert("replaced".into(), json!(d.replaced));
        obj.insert("rounds".into(), json!(d.rounds));
        obj.insert("listed".into(), json!(d.listed));
    }
    obj.insert("summary".into(), json!(summary.counts));
    let failures: Vec<Value> = summary
        .failures
        .iter()
        .map(|(i, last4, r)| json!({ "index": i, "last4": last4, "result": r.name() }))
        .collect();
    obj.insert("failures".into(), Value::Array(failures));
    if cli.json {
        println!("{}", Value::Object(obj));
    } else {
        let counts: Vec<String> = summary.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        if let Some((d, path)) = &generated {
            let made = match d.made {
                0 => "all drawn by an earlier run".to_string(),
                n => format!("{n} drawn by this run"),
            };
            let jobs = match d.rounds {
                2 => format!("job {}~1", run.job),
                n => format!("jobs {j}~1 to {j}~{}", n - 1, j = run.job),
            };
            let replaced = match d.replaced {
                0 => String::new(),
                n => format!("; {n} of them replace drawn numbers that were cards already, issued by {jobs}"),
            };
            if d.listed {
                println!("the cards are listed in {} ({made}{replaced})", path.display());
            } else {
                println!("{} was not written: not every card was issued ({made}{replaced})", path.display());
            }
        }
        println!("{}: job {} of {} cards: {}", job.result.name(), run.job, job.count, counts.join(", "));
        for (i, last4, r) in &summary.failures {
            println!("  card #{i} …{last4}: {}", r.name());
        }
    }
    // A box is listed only when whole: say where its numbers are meanwhile, and fail.
    if let Some((d, path)) = &generated {
        if !d.listed && job.result == ResultCode::Approved {
            return Err(Failure::Run(anyhow::anyhow!(
                "not every card was issued (see the failures), so {} was not written; the numbers drawn are in \
                 {} and any later round's file",
                path.display(),
                bulk::round_path(path, 0).display()
            )));
        }
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
enum ProgramCmd {
    /// A program's settings, every key.
    Get {
        #[arg(long)]
        name: String,
    },
    /// Create a program, or change some of its settings (the others are kept).
    Set {
        #[arg(long)]
        name: String,
        /// KEY=VALUE, repeatable: e.g. --set max_balance=500.00 --set pin_required=true.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// A key to return to its default, repeatable.
        #[arg(long = "unset", value_name = "KEY")]
        unsets: Vec<String>,
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        who: Who,
    },
}

fn pin(s: &str) -> Result<Pin, Failure> {
    Pin::parse(s).ok_or_else(|| usage("--pin must be 4 to 12 digits"))
}

/// The settings text after `sets` and `unsets` are applied to `current` (TOML lines). A value that
/// reads as a TOML integer or boolean is one; anything else is a string ("500.00", "USD").
fn merged_settings(current: &str, sets: &[String], unsets: &[String]) -> Result<String, Failure> {
    let mut table: toml::Table =
        current.parse().map_err(|e| usage(format!("giftd sent settings giftctl cannot read: {e}")))?;
    for u in unsets {
        table.remove(u);
    }
    for kv in sets {
        let (k, v) = kv.split_once('=').ok_or_else(|| usage(format!("--set {kv:?} must be KEY=VALUE")))?;
        let (k, v) = (k.trim(), v.trim());
        let value = match format!("v = {v}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")) {
            Some(x @ (toml::Value::Integer(_) | toml::Value::Boolean(_))) => x,
            _ => toml::Value::String(v.to_string()),
        };
        table.insert(k.to_string(), value);
    }
    Ok(toml::to_string(&table).unwrap_or_default())
}

enum Failure {
    /// Bad arguments (exit 2): nothing was sent.
    Usage(String),
    /// The command could not be carried out (exit 1): giftd unreachable, a connection lost, a file
    /// not written.
    Run(anyhow::Error),
}

fn usage(msg: impl Into<String>) -> Failure {
    Failure::Usage(msg.into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("giftctl: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("giftctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn number(s: &str) -> Result<CardNumber, Failure> {
    CardNumber::parse(s).ok_or_else(|| usage("--number must be 12 to 19 digits"))
}

fn currency(s: &str) -> Result<Currency, Failure> {
    Currency::parse(s).ok_or_else(|| usage(format!("unknown currency {s:?}")))
}

fn money(amount: &str, c: Currency) -> Result<Money, Failure> {
    let minor = parse_amount(amount, c).map_err(|e| usage(format!("--amount {amount:?}: {e}")))?;
    Ok(Money { currency: c, minor })
}

fn generated_key() -> String {
    format!("giftctl-{:016x}", rand::random::<u64>())
}

fn idem(who: &Who, key: Option<&str>) -> IdemRef {
    IdemRef { merchant: who.merchant.clone(), key: key.map(str::to_string).unwrap_or_else(generated_key) }
}

/// The amount's currency: as given, or the card's own (asked with a balance inquiry).
async fn card_currency(c: &mut Client, given: Option<&str>, n: &CardNumber) -> Result<Currency, Failure> {
    if let Some(g) = given {
        return currency(g);
    }
    match c.call(&Request::Balance { number: n.clone() }).await.map_err(Failure::Run)? {
        Reply::Card(Outcome { card: Some(v), .. }) => Ok(v.currency),
        // Unknown card: any currency will do, giftd answers card_not_found.
        _ => currency("USD"),
    }
}

/// The key, card and amount a [`Spend`] names; the currency is the card's unless given.
async fn spend_of(c: &mut Client, s: &Spend) -> Result<(IdemRef, CardNumber, Money), Failure> {
    let n = number(&s.number)?;
    let m = money(&s.amount, card_currency(c, s.currency.as_deref(), &n).await?)?;
    Ok((idem(&s.who, Some(s.key.as_str())), n, m))
}

fn parse_expiry(s: &str) -> Result<Option<i64>, Failure> {
    if s == "never" {
        return Ok(None);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| Some(t.timestamp_millis()))
        .map_err(|e| usage(format!("--expires {s:?}: {e} (use RFC 3339 or \"never\")")))
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    if let Cmd::Bulk { cmd } = &cli.cmd {
        return bulk_command(cli, cmd).await;
    }
    if let Cmd::Events { from, follow, merchant, program, kinds } = &cli.cmd {
        return events_command(cli, *from, *follow, merchant.as_deref(), program.as_deref(), kinds).await;
    }
    // Validate everything that needs no server before connecting.
    let req_without_server = match &cli.cmd {
        Cmd::Issue {
            number: n,
            generate: _,
            virtual_card,
            email,
            case,
            currency: cur,
            amount,
            program,
            expires,
            active,
            key,
            who,
        } => Some(Request::Issue {
            idem: idem(who, key.as_deref()),
            number: n.as_deref().map(number).transpose()?,
            program: program.clone(),
            money: money(amount, currency(cur)?)?,
            expiry_ms: parse_expiry(expires)?,
            active: *active,
            virtual_card: *virtual_card,
            email: email.clone(),
            case: case.clone(),
        }),
        Cmd::Pin { cmd: PinCmd::Set(a) } => Some(Request::PinSet {
            idem: idem(&a.who, a.key.as_deref()),
            number: number(&a.number)?,
            pin: pin(&a.pin)?,
        }),
        Cmd::Pin { cmd: PinCmd::Verify(a) } => Some(Request::PinVerify {
            idem: idem(&a.who, a.key.as_deref()),
            number: number(&a.number)?,
            pin: pin(&a.pin)?,
        }),
        Cmd::Pin { cmd: PinCmd::Reset { number: n, key, who } } => {
            Some(Request::PinReset { idem: idem(who, key.as_deref()), number: number(n)? })
        }
        Cmd::Program { cmd: ProgramCmd::Get { name } } => Some(Request::ProgramGet { name: name.clone() }),
        Cmd::Balance { number: n } => Some(Request::Balance { number: number(n)? }),
        Cmd::Lookup { number: n } => Some(Request::Lookup { number: number(n)? }),
        Cmd::History { number: n, before, limit, kind } => {
            let kind = match kind.as_deref() {
                None => None,
                Some(k) => {
                    Some((1..=u8::MAX).filter_map(TxnKind::from_u8).find(|t| t.name() == k).ok_or_else(|| {
                        usage(format!("--kind {k:?} is not a history kind (e.g. redeem, capture, note)"))
                    })?)
                }
            };
            if *limit == 0 || *limit > HISTORY_PAGE_MAX {
                return Err(usage(format!("--limit must be 1 to {HISTORY_PAGE_MAX}")));
            }
            Some(Request::History { number: number(n)?, before_seq: *before, limit: *limit, kind })
        }
        Cmd::Lock { number: n, reason, key, who } => Some(Request::Lock {
            idem: idem(who, key.as_deref()),
            number: number(n)?,
            reason: LockReason::parse(reason)
                .ok_or_else(|| usage("--reason must be one of fraud, lost, stolen, customer_request, system"))?,
        }),
        Cmd::Unlock { number: n, key, who } => {
            Some(Request::Unlock { idem: idem(who, key.as_deref()), number: number(n)? })
        }
        Cmd::Capture { hold, amount, currency: cur, key, who } => Some(Request::Capture {
            idem: idem(who, Some(key.as_str())),
            hold_id: *hold,
            money: money(amount, currency(cur)?)?,
        }),
        Cmd::Void { hold, key, who } => Some(Request::Void { idem: idem(who, Some(key.as_str())), hold_id: *hold }),
        Cmd::Transfer { from, to, key, who } => {
            let (from, to) = (number(from)?, number(to)?);
            if from.expose() == to.expose() {
                return Err(usage("--from and --to must be different cards"));
            }
            Some(Request::Transfer { idem: idem(who, Some(key.as_str())), number: from, to })
        }
        Cmd::Note { number: n, text, key, who } => {
            if text.is_empty() || text.len() > giftd::wire::NOTE_BYTES_MAX || text.chars().any(char::is_control) {
                return Err(usage("--text must be 1 to 500 bytes, without control characters"));
            }
            Some(Request::Note { idem: idem(who, key.as_deref()), number: number(n)?, text: text.clone() })
        }
        Cmd::Reactivate(a) => {
            Some(Request::Reactivate { idem: idem(&a.who, Some(&a.key)), number: number(&a.number)? })
        }
        Cmd::CashOut(a) => Some(Request::CashOut { idem: idem(&a.who, Some(&a.key)), number: number(&a.number)? }),
        Cmd::Reverse { original, key, who } => {
            if original.is_empty() {
                return Err(usage("--original must not be empty"));
            }
            Some(Request::Reverse { idem: idem(who, Some(key.as_str())), original: original.clone() })
        }
        _ => None,
    };
    let mut c = connect(cli).await?;
    let req = match (req_without_server, &cli.cmd) {
        (Some(r), _) => r,
        (None, Cmd::Activate { number: n, amount, currency: cur, key, who }) => {
            let n = number(n)?;
            let load = match amount {
                Some(a) => Some(money(a, card_currency(&mut c, cur.as_deref(), &n).await?)?),
                None => None,
            };
            Request::Activate { idem: idem(who, Some(key.as_str())), number: n, load }
        }
        (None, Cmd::Redeem { spend, invoice, partial, pin: pin_arg }) => {
            let (idem, number, money) = spend_of(&mut c, spend).await?;
            let pin = pin_arg.as_deref().map(pin).transpose()?;
            Request::Redeem { idem, number, money, allow_partial: *partial, invoice: invoice.clone(), pin }
        }
        (None, Cmd::Reload { spend }) => {
            let (idem, number, money) = spend_of(&mut c, spend).await?;
            Request::Reload { idem, number, money }
        }
        (None, Cmd::Authorize { spend, ttl_secs, partial, pin: pin_arg }) => {
            if *ttl_secs == Some(0) {
                return Err(usage("--ttl-secs must be at least 1"));
            }
            let (idem, number, money) = spend_of(&mut c, spend).await?;
            let pin = pin_arg.as_deref().map(pin).transpose()?;
            Request::Authorize { idem, number, money, allow_partial: *partial, ttl_secs: ttl_secs.unwrap_or(0), pin }
        }
        (None, Cmd::Refund { spend, original }) => {
            let (idem, number, money) = spend_of(&mut c, spend).await?;
            Request::Refund { idem, number, money, original: original.clone() }
        }
        (None, Cmd::SplitRedeem { numbers, amount, currency: cur, key, order, who }) => {
            let order = SplitOrder::parse(order).ok_or_else(|| usage("--order must be given, expiry or smallest"))?;
            if !(1..=SPLIT_CARDS_MAX).contains(&numbers.len()) {
                return Err(usage(format!("--numbers must list 1 to {SPLIT_CARDS_MAX} cards")));
            }
            let numbers = numbers.iter().map(|n| number(n)).collect::<Result<Vec<_>, _>>()?;
            let m = money(amount, card_currency(&mut c, cur.as_deref(), &numbers[0]).await?)?;
            Request::SplitRedeem { idem: idem(who, Some(key.as_str())), money: m, order, numbers }
        }
        (None, Cmd::Register { number: n, member, vip, no_vip, key, who }) => {
            let n = number(n)?;
            // What is not given is kept: read it first.
            let (now_vip, now_member) = match c.call(&Request::Lookup { number: n.clone() }).await {
                Ok(Reply::Lookup(l)) => (l.vip, l.member),
                Ok(_) => (false, String::new()),
                Err(e) => return Err(Failure::Run(e)),
            };
            let vip = if *vip {
                true
            } else if *no_vip {
                false
            } else {
                now_vip
            };
            let member = member.clone().unwrap_or(now_member);
            if member.len() > giftd::wire::STRING_BYTES_MAX {
                return Err(usage("--member is at most 64 bytes"));
            }
            let member = (!member.is_empty()).then_some(member);
            Request::Register { idem: idem(who, key.as_deref()), number: n, member, vip }
        }
        (None, Cmd::Program { cmd: ProgramCmd::Set { name, sets, unsets, key, who } }) => {
            // An update: the current settings (none for a new program), with the changes applied.
            let current = match c.call(&Request::ProgramGet { name: name.clone() }).await {
                Ok(Reply::Program(p)) if p.result == giftd::model::ResultCode::Approved => p.text,
                Ok(_) => String::new(),
                Err(e) => return Err(Failure::Run(e)),
            };
            let settings = merged_settings(&current, sets, unsets)?;
            Request::ProgramSet { idem: idem(who, key.as_deref()), name: name.clone(), settings }
        }
        (None, _) => unreachable!("every command without a server round trip is built above"),
    };
    let reply = c.call(&req).await.map_err(Failure::Run)?;
    let obj = to_json(&reply);
    if cli.json {
        println!("{}", Value::Object(obj));
    } else {
        println!("{}", sentence(&obj));
    }
    Ok(())
}

fn view_json(obj: &mut Map<String, Value>, v: &CardView) {
    let amt = |m| Value::String(format_amount(m, v.currency));
    obj.insert("last4".into(), json!(String::from_utf8_lossy(&v.last4)));
    obj.insert("status".into(), json!(v.status.name()));
    if v.reason != LockReason::None {
        obj.insert("lock_reason".into(), json!(v.reason.name()));
    }
    obj.insert("currency".into(), json!(v.currency.as_str()));
    obj.insert("balance".into(), amt(v.balance_minor));
    obj.insert("available".into(), amt(v.available_minor()));
    obj.insert("held".into(), amt(v.held_minor));
    obj.insert("expires".into(), v.expiry_ms.map(rfc3339).map(Value::String).unwrap_or(json!("never")));
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_else(|| ms.to_string())
}

/// Streams events as JSON lines until caught up (or, with `follow`, until interrupted).
async fn events_command(
    cli: &Cli,
    from: u64,
    follow: bool,
    merchant: Option<&str>,
    program: Option<&str>,
    kinds: &[String],
) -> Result<(), Failure> {
    let mut mask = 0u64;
    for k in kinds {
        mask |= match k.as_str() {
            "alert" => giftd::wire::EVENT_KIND_ALERT_BIT,
            _ => {
                let kind = (1..=u8::MAX).filter_map(TxnKind::from_u8).find(|t| t.name() == k);
                1 << kind.ok_or_else(|| {
                    usage(format!("--kinds: {k:?} is not a history kind (redeem, issue, ...) or alert"))
                })? as u8
            }
        };
    }
    let c = connect(cli).await?;
    let mut sub = c.subscribe(from, merchant.unwrap_or(""), program.unwrap_or(""), mask).await.map_err(Failure::Run)?;
    loop {
        let frame = sub.next().await.map_err(Failure::Run)?;
        for e in &frame.events {
            println!("{}", event_json(e));
        }
        if frame.caught_up && !follow {
            return Ok(());
        }
    }
}

fn event_json(e: &giftd::wire::EventView) -> Value {
    use giftd::wire::EventView;
    let card = |l: &[u8; 4]| format!("****{}", String::from_utf8_lossy(l));
    match e {
        EventView::Txn {
            id,
            kind,
            last4,
            program,
            merchant,
            currency,
            amount_minor,
            balance_after_minor,
            at_ms,
            email,
        } => {
            let mut v = json!({
                "id": id,
                "type": "txn",
                "kind": kind.name(),
                "card": card(last4),
                "program": program,
                "merchant": merchant,
                "currency": currency.as_str(),
                "amount": format_amount(*amount_minor, *currency),
                "balance_after": format_amount(*balance_after_minor, *currency),
                "at": rfc3339(*at_ms),
            });
            if !email.is_empty() {
                v["email"] = json!(email);
            }
            v
        }
        EventView::Alert { id, rule, last4, merchant, client, currency, observed, threshold, suspended, at_ms } => {
            let rule = giftd::engine::alerts::Rule::from_u8(*rule).map_or("unknown", |r| r.name());
            // A large amount is money in its currency; the other rules count requests.
            let figure = |v: i64| match currency {
                Some(c) => json!(format_amount(v, *c)),
                None => json!(v),
            };
            let mut v = json!({
                "id": id,
                "type": "alert",
                "rule": rule,
                "card": card(last4),
                "merchant": merchant,
                "currency": currency.map(|c| c.as_str().to_string()),
                "observed": figure(*observed),
                "threshold": figure(*threshold),
                "suspended": suspended,
                "at": rfc3339(*at_ms),
            });
            if !client.is_empty() {
                v["client"] = json!(client);
            }
            v
        }
    }
}

fn txns_json(txns: &[TxnView], c: Currency) -> Value {
    Value::Array(
        txns.iter()
            .map(|t| {
                json!({
                    "seq": t.seq,
                    "kind": t.kind.name(),
                    "amount": format_amount(t.amount_minor, c),
                    "balance_after": format_amount(t.balance_after_minor, c),
                    "at": rfc3339(t.at_ms),
                    "merchant": t.merchant,
                })
            })
            .collect(),
    )
}

/// A sentence for a decline that a support agent can read out, where the result code alone does not
/// say enough. Explanations giftd sends (reactivation, program settings) take precedence.
fn explain(result: ResultCode, card: Option<&CardView>) -> Option<String> {
    use ResultCode::*;
    let expires = card.and_then(|v| v.expiry_ms).map(rfc3339).unwrap_or_default();
    Some(match result {
        CardNotFound => "no card has this number".into(),
        CardClosed => "the card is closed".into(),
        CardSuspended => format!("the card is suspended ({})", card.map_or("", |v| v.reason.name())),
        CardPinLocked => "the card is PIN-locked after too many wrong PINs: `giftctl pin reset` lifts it".into(),
        CardExpired => format!("the card expired {expires}: `giftctl reactivate` may help"),
        CardInactive => "the card is not activated yet".into(),
        InsufficientFunds => match card {
            Some(v) => format!("only {} {} is available", format_amount(v.available_minor(), v.currency), v.currency),
            None => "not enough money available".into(),
        },
        PinRequired => "the card's program requires its PIN (--pin)".into(),
        PinNotSet => "the card has no PIN yet: `giftctl pin set` sets one".into(),
        PinIncorrect if card.is_some_and(|v| v.status == Status::PinLocked) => {
            "wrong PIN; that was the last try: the card is now PIN-locked".into()
        }
        PinIncorrect => "wrong PIN; the card locks after the program's number of wrong PINs in a row".into(),
        NotPinLocked => "the card is not PIN-locked and has no wrong PINs to clear".into(),
        LoadBelowMinimum => "the amount is below the program's smallest single load".into(),
        LoadAboveMaximum => "the amount is above the program's largest single load".into(),
        DailyLoadLimitExceeded => "with this load the card would pass its program's daily load limit".into(),
        MaxBalanceExceeded => "the balance would pass the program's maximum".into(),
        BadCheckDigit => "the number's check digit is wrong (the program asks for a Luhn check)".into(),
        HoldsOpen => "money is still held on the card: capture or void the holds first".into(),
        IdempotencyMismatch => "this key was used before for a different request".into(),
        _ => return None,
    })
}

/// The credentials --client and --key-file name, if any.
fn credentials(cli: &Cli) -> Result<Option<Credentials>, Failure> {
    match (&cli.client, &cli.key_file) {
        (Some(name), Some(path)) => Credentials::from_key_file(name, path).map(Some).map_err(|e| usage(e.to_string())),
        _ => Ok(None),
    }
}

/// Connects to giftd, authenticating when --client is given.
async fn connect(cli: &Cli) -> Result<Client, Failure> {
    Client::connect_as(&cli.addr, credentials(cli)?.as_ref()).await.map_err(Failure::Run)
}

fn to_json(reply: &Reply) -> Map<String, Value> {
    let mut obj = Map::new();
    obj.insert("result".into(), json!(reply.result().name()));
    obj.insert("code".into(), json!(reply.result() as u16));
    let card = match reply {
        Reply::Card(o) | Reply::Hold(o) | Reply::Issued(o, _) | Reply::Explained(o, _) => o.card.as_ref(),
        Reply::Lookup(l) => l.card.as_ref(),
        _ => None,
    };
    if let Some(why) = explain(reply.result(), card) {
        obj.insert("reason".into(), json!(why));
    }
    match reply {
        Reply::Explained(o, reason) => {
            if let Some(v) = &o.card {
                view_json(&mut obj, v);
            }
            obj.insert("reason".into(), json!(reason));
        }
        Reply::Issued(o, n) => {
            if let Some(v) = &o.card {
                view_json(&mut obj, v);
                obj.insert("approved".into(), json!(format_amount(o.approved_minor, v.currency)));
            }
            if let Some(n) = n {
                // The one time the full number is shown: the caller must keep it now.
                obj.insert("number".into(), json!(n.expose()));
            }
        }
        Reply::Job(j) => {
            obj.insert("count".into(), json!(j.count));
            if let Some(kind) = j.kind {
                obj.insert("kind".into(), json!(kind.name()));
                obj.insert("chunk_cards".into(), json!(j.chunk_cards));
            }
        }
        Reply::Batch(items) => {
            obj.insert("items".into(), json!(items.len()));
        }
        Reply::Auth(a) => {
            obj.insert("role".into(), json!(a.role.name()));
            obj.insert("merchant".into(), json!(a.merchant));
        }
        Reply::Chunk(c) => {
            obj.insert("items".into(), json!(c.items.len()));
        }
        Reply::Events(e) => {
            obj.insert("events".into(), Value::Array(e.events.iter().map(event_json).collect()));
        }
        Reply::Program(p) => {
            obj.insert("program".into(), json!(p.name));
            if p.result == giftd::model::ResultCode::Approved {
                let settings: toml::Table = p.text.parse().unwrap_or_default();
                obj.insert("settings".into(), serde_json::to_value(settings).unwrap_or(Value::Null));
            } else if !p.text.is_empty() {
                obj.insert("reason".into(), json!(p.text));
            }
        }
        Reply::Card(o) | Reply::Hold(o) => {
            if let Some(v) = &o.card {
                view_json(&mut obj, v);
                obj.insert("approved".into(), json!(format_amount(o.approved_minor, v.currency)));
            }
            if let Some(h) = &o.hold {
                obj.insert("hold_id".into(), json!(h.id));
                obj.insert("hold_expires".into(), json!(rfc3339(h.expires_ms)));
            }
        }
        Reply::Parts(p) => {
            if let Some(parts) = &p.parts {
                let c = parts.currency;
                obj.insert("currency".into(), json!(c.as_str()));
                obj.insert("approved".into(), json!(format_amount(p.approved_minor, c)));
                let items = parts
                    .items
                    .iter()
                    .map(|i| {
                        json!({
                            "last4": String::from_utf8_lossy(&i.last4),
                            "amount": format_amount(i.amount_minor, c),
                            "balance_after": format_amount(i.balance_after_minor, c),
                        })
                    })
                    .collect();
                obj.insert("parts".into(), Value::Array(items));
            }
        }
        Reply::Lookup(l) => {
            if let Some(v) = &l.card {
                view_json(&mut obj, v);
                obj.insert("program".into(), json!(l.program));
                obj.insert("vip".into(), json!(l.vip));
                obj.insert("pin_set".into(), json!(l.pin_set));
                obj.insert("pin_failures".into(), json!(l.pin_failures));
                obj.insert("virtual".into(), json!(l.virtual_card));
                if !l.email.is_empty() {
                    obj.insert("email".into(), json!(l.email));
                }
                let notes = l
                    .notes
                    .iter()
                    .map(|n| json!({ "at": rfc3339(n.at_ms), "author": n.author, "text": n.text }))
                    .collect();
                obj.insert("notes".into(), Value::Array(notes));
                if !l.member.is_empty() {
                    obj.insert("member".into(), json!(l.member));
                }
                obj.insert("created".into(), json!(rfc3339(l.created_ms)));
                obj.insert("updated".into(), json!(rfc3339(l.updated_ms)));
                obj.insert("transactions".into(), json!(l.txn_count));
                obj.insert("recent".into(), txns_json(&l.recent, v.currency));
                let holds = l
                    .holds
                    .iter()
                    .map(|h| {
                        json!({
                            "hold_id": h.id,
                            "amount": format_amount(h.amount_minor, v.currency),
                            "expires": rfc3339(h.expires_ms),
                        })
                    })
                    .collect();
                obj.insert("holds".into(), Value::Array(holds));
            }
        }
        Reply::History(h) => {
            if let Some(c) = h.currency {
                obj.insert("currency".into(), json!(c.as_str()));
                obj.insert("entries".into(), txns_json(&h.txns, c));
                obj.insert("next_before".into(), json!(h.next_before_seq));
            }
        }
        Reply::Hello(_) | Reply::Error(_) => {}
    }
    obj
}

fn sentence(obj: &Map<String, Value>) -> String {
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut out = s("result");
    if obj.contains_key("status") {
        out += &format!(
            ": card …{} {}{}, balance {} {}, available {}, held {}, expires {}",
            s("last4"),
            s("status"),
            obj.get("lock_reason").map(|r| format!(" ({})", r.as_str().unwrap_or(""))).unwrap_or_default(),
            s("balance"),
            s("currency"),
            s("available"),
            s("held"),
            s("expires"),
        );
    }
    if let Some(a) = obj.get("approved").and_then(Value::as_str) {
        out += &format!("; amount {a}");
    }
    if let Some(r) = obj.get("reason").and_then(Value::as_str) {
        out += &format!("; {r}");
    }
    if let Some(n) = obj.get("number").and_then(Value::as_str) {
        out += &format!("; number {n} (shown this once: keep it now)");
    }
    if let Some(Value::Object(settings)) = obj.get("settings") {
        out += &format!(" ({})", s("program"));
        for (k, v) in settings {
            out += &format!("\n  {k} = {v}");
        }
    }
    if let Some(h) = obj.get("hold_id").and_then(Value::as_u64) {
        out += &format!("; hold {h} until {}", s("hold_expires"));
    }
    for key in ["recent", "entries", "parts", "holds", "notes"] {
        if let Some(Value::Array(items)) = obj.get(key) {
            for t in items {
                out += &format!("\n  {t}");
            }
        }
    }
    if let Some(n) = obj.get("next_before").and_then(Value::as_u64).filter(|n| *n > 0) {
        out += &format!("\n  (more: --before {n})");
    }
    out
}
