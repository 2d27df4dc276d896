//! Bulk jobs, client side (giftctl uses this). A job is a durable record on giftd (`job_open`: its
//! kind, card count and chunk size, idempotent on the job id) plus its cards, sent a chunk at a
//! time (`job_chunk`). Each chunk is decided card by card and recorded once, under its place in the
//! job, so running a job again (after a kill, a lost connection, or only to see its summary)
//! applies nothing twice and answers with the same summary. Taking a job back is one reversal per
//! chunk.

use crate::card_number::CardNumber;
use crate::client::Client;
use crate::engine::ChunkWork;
use crate::model::{Money, ResultCode};
use crate::wire::{IdemRef, JobKind, JobReply, Reply, Request, JOB_CHUNK_CARDS_MAX, STRING_BYTES_MAX};
use anyhow::{bail, Context};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};

/// Longest job id (a key).
pub const JOB_ID_BYTES_MAX: usize = STRING_BYTES_MAX;
/// Failures a summary lists one by one (the counts cover all of them).
pub const FAILURES_LISTED_MAX: usize = 100;

/// The cards of a job.
#[derive(Clone, Debug)]
pub enum Cards {
    /// `first`, `first + 1`, …, `first + count − 1`, all as long as `first`.
    Range {
        first: CardNumber,
        count: u64,
    },
    Manifest(Vec<CardNumber>),
}

impl Cards {
    pub fn count(&self) -> u64 {
        match self {
            Cards::Range { count, .. } => *count,
            Cards::Manifest(v) => v.len() as u64,
        }
    }

    /// The `i`-th card; None past the range's end or if the number would grow a digit.
    pub fn get(&self, i: u64) -> Option<CardNumber> {
        match self {
            Cards::Manifest(v) => v.get(i as usize).cloned(),
            Cards::Range { first, count } => {
                if i >= *count {
                    return None;
                }
                let digits = first.expose();
                let n = digits.parse::<u64>().ok()?.checked_add(i)?;
                CardNumber::parse(&format!("{n:0width$}", width = digits.len()))
                    .filter(|c| c.expose().len() == digits.len())
            }
        }
    }

    /// Whether every number of a range exists (its last number has as many digits as its first).
    pub fn check(&self) -> anyhow::Result<()> {
        if self.count() == 0 {
            bail!("a job needs at least one card");
        }
        if let Cards::Range { count, .. } = self {
            if self.get(count - 1).is_none() {
                bail!("the range runs past the last number of its length");
            }
        }
        Ok(())
    }
}

/// What to do to each card.
#[derive(Clone, Debug)]
pub enum Work {
    /// Create inactive cards (a reseller's inventory) with this value and expiry.
    Issue { program: String, money: Money, expiry_ms: Option<i64> },
    /// Activate cards, loading this value if given.
    Activate { load: Option<Money> },
}

impl Work {
    pub fn kind(&self) -> JobKind {
        match self {
            Work::Issue { .. } => JobKind::Issue,
            Work::Activate { .. } => JobKind::Activate,
        }
    }
}

/// How a job's cards came out: a count per outcome, and the first failures one by one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub counts: BTreeMap<&'static str, u64>,
    /// (index in the job, last 4 digits, result) of the first failures.
    pub failures: Vec<(u64, String, ResultCode)>,
    /// The index of every card an issue job found was a card already (`already_exists`): a
    /// generated inventory replaces them (`issue_drawn`).
    pub existing: Vec<u64>,
}

impl Summary {
    fn add(&mut self, outcome: &'static str, failed: Option<(u64, String, ResultCode)>) {
        *self.counts.entry(outcome).or_default() += 1;
        if let Some(f) = failed {
            if self.failures.len() < FAILURES_LISTED_MAX {
                self.failures.push(f);
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.values().sum()
    }
}

pub fn check_job_id(job: &str) -> anyhow::Result<()> {
    if job.is_empty() || job.len() > JOB_ID_BYTES_MAX || job.contains('/') || !job.bytes().all(|b| b.is_ascii_graphic())
    {
        bail!("a job id is 1 to {JOB_ID_BYTES_MAX} printable characters without '/'");
    }
    Ok(())
}

/// The name a card's outcome is counted under, and whether it is a failure. `kind` None: taking
/// a job back.
fn outcome_of(kind: Option<JobKind>, result: ResultCode, changed: bool) -> (&'static str, bool) {
    match (kind, result) {
        (Some(JobKind::Issue), ResultCode::Approved) => ("issued", false),
        (Some(JobKind::Issue), ResultCode::CardExists) => ("already_exists", true),
        (Some(JobKind::Activate), ResultCode::Approved) => ("activated", false),
        (Some(JobKind::Activate), ResultCode::AlreadyActive) => ("already_active", true),
        (Some(_), ResultCode::CardNotFound) => ("not_found", true),
        // Taking back: a card the job did not change (its operation was declined, or its chunk
        // never sent) has nothing to undo.
        (None, ResultCode::Approved) if !changed => ("nothing_to_undo", false),
        (None, ResultCode::Approved) => ("reversed", false),
        (None, ResultCode::CardUsed | ResultCode::InsufficientFunds) => ("used", true),
        (_, other) => (other.name(), true),
    }
}

/// Sends the job's chunks (`chunk` cards each, the last one shorter), `window` chunk frames in
/// flight, the chunk that starts at card `first` built by `request(first, end)`, and counts each
/// card's answer with `count(index, result, changed)`.
async fn drive(
    c: Client,
    total: u64,
    chunk: u64,
    window: usize,
    mut request: impl FnMut(u64, u64) -> anyhow::Result<Request>,
    mut count: impl FnMut(u64, ResultCode, bool),
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<()> {
    let (mut tx, mut rx) = c.into_split();
    let mut in_flight: VecDeque<(u64, u64, u64)> = VecDeque::new();
    let (mut next, mut done) = (0u64, 0u64);
    while done < total {
        while next < total && in_flight.len() < window.max(1) {
            let end = (next + chunk).min(total);
            let id = tx.send(&request(next, end)?);
            in_flight.push_back((id, next, end));
            next = end;
        }
        tx.flush().await?;
        let (id, from, to) = in_flight.pop_front().expect("a chunk is in flight");
        let (got, reply) = rx.recv().await?;
        if got != id {
            bail!("reply for request {got}, expected {id}");
        }
        match reply {
            Reply::Chunk(r) if r.result == ResultCode::Approved && r.items.len() as u64 == to - from => {
                for (i, (result, changed)) in (from..to).zip(r.items) {
                    count(i, result, changed);
                }
            }
            // A reversal of a chunk that was never sent: nothing to undo (its key now bars it).
            Reply::Chunk(r) if r.result == ResultCode::Approved && r.items.is_empty() => {
                (from..to).for_each(|i| count(i, ResultCode::Approved, false));
            }
            // The whole chunk declined (e.g. `original_reversed`: it was taken back before it
            // was sent): every card of it says so.
            Reply::Chunk(r) if r.items.is_empty() => (from..to).for_each(|i| count(i, r.result, false)),
            other => bail!("a chunk of {} cards was answered {other:?}", to - from),
        }
        done = to;
        progress(done, total);
    }
    Ok(())
}

/// A job of a merchant on a giftd, and how it is sent: `chunk` cards a chunk (for a new job; a job
/// run again keeps the chunk size it was opened with), `window` chunk frames in flight.
#[derive(Clone, Copy, Debug)]
pub struct Job<'a> {
    pub addr: &'a str,
    /// Who to authenticate as, for a server that requires it.
    pub credentials: Option<&'a crate::client::Credentials>,
    pub merchant: &'a str,
    pub id: &'a str,
    pub chunk: usize,
    pub window: usize,
}

/// The job's record, if it was opened.
async fn find(c: &mut Client, merchant: &str, job: &str) -> anyhow::Result<JobReply> {
    match c.call(&Request::JobGet { merchant: merchant.into(), job: job.into() }).await? {
        Reply::Job(j) => Ok(j),
        other => bail!("job_get answered {}", other.result().name()),
    }
}

/// Runs (or runs again) `job`: records it, then does `work` to every card, a chunk at a time.
pub async fn run(
    job: Job<'_>,
    cards: &Cards,
    work: &Work,
    progress: impl FnMut(u64, u64),
) -> anyhow::Result<(JobReply, Summary)> {
    let Job { addr, credentials, merchant, id: job, chunk, window } = job;
    check_job_id(job)?;
    cards.check()?;
    let mut c = Client::connect_as(addr, credentials).await?;
    // A job run again is sent in the chunks it was first sent in: a chunk is what is idempotent.
    let found = find(&mut c, merchant, job).await?;
    let chunk_cards = if found.result == ResultCode::Approved {
        found.chunk_cards
    } else {
        chunk.clamp(1, JOB_CHUNK_CARDS_MAX as usize) as u16
    };
    let open = Request::JobOpen {
        idem: IdemRef { merchant: merchant.into(), key: job.into() },
        kind: work.kind(),
        count: u32::try_from(cards.count()).context("too many cards for one job")?,
        chunk_cards,
    };
    let opened = match c.call(&open).await? {
        Reply::Job(j) => j,
        other => bail!("job_open answered {}", other.result().name()),
    };
    if opened.result != ResultCode::Approved {
        // The id is taken by a job of another kind or size: nothing of this one is sent.
        return Ok((opened, Summary::default()));
    }
    let chunk_work = match work {
        Work::Issue { program, money, expiry_ms } => {
            ChunkWork::Issue { program: program.clone(), money: *money, expiry_ms: *expiry_ms }
        }
        Work::Activate { load } => ChunkWork::Activate { load: *load },
    };
    let request = |first: u64, end: u64| -> anyhow::Result<Request> {
        let numbers = (first..end)
            .map(|i| cards.get(i).context("card index past the job's cards"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Request::JobChunk {
            merchant: merchant.into(),
            job: job.into(),
            first: first as u32,
            work: chunk_work.clone(),
            numbers,
        })
    };
    let mut summary = Summary::default();
    let kind = Some(work.kind());
    let count = |i: u64, result: ResultCode, changed: bool| {
        let (name, failed) = outcome_of(kind, result, changed);
        let last4 = || cards.get(i).map(|n| String::from_utf8_lossy(&n.last4()).into_owned()).unwrap_or_default();
        summary.add(name, failed.then(|| (i, last4(), result)));
        if kind == Some(JobKind::Issue) && result == ResultCode::CardExists {
            summary.existing.push(i);
        }
    };
    drive(c, cards.count(), chunk_cards as u64, window, request, count, progress).await?;
    Ok((opened, summary))
}

/// Takes back what `job` did, a chunk at a time: every card it activated is made inactive again,
/// where it still can be (a card used since is reported, not touched).
pub async fn reverse(job: Job<'_>, progress: impl FnMut(u64, u64)) -> anyhow::Result<(JobReply, Summary)> {
    let Job { addr, credentials, merchant, id: job, window, .. } = job;
    check_job_id(job)?;
    let mut c = Client::connect_as(addr, credentials).await?;
    let found = find(&mut c, merchant, job).await?;
    if found.result != ResultCode::Approved {
        return Ok((found, Summary::default()));
    }
    let request = |first: u64, _end: u64| -> anyhow::Result<Request> {
        Ok(Request::JobChunk {
            merchant: merchant.into(),
            job: job.into(),
            first: first as u32,
            work: ChunkWork::Reverse,
            numbers: Vec::new(),
        })
    };
    let mut summary = Summary::default();
    let count = |i: u64, result: ResultCode, changed: bool| {
        let (name, failed) = outcome_of(None, result, changed);
        summary.add(name, failed.then(|| (i, String::new(), result)));
    };
    drive(c, found.count as u64, found.chunk_cards as u64, window, request, count, progress).await?;
    Ok((found, summary))
}

/// Numbers for a new inventory: `count` distinct random numbers in a program's format (its
/// `number_prefix`, random digits, then the Luhn check digit: `length` digits in all), the same
/// format giftd's own generated numbers take, none of them in `taken` (numbers by value). The
/// format must leave at least `NUMBER_RANDOM_DIGITS_MIN` random digits: 10^9 values or more for at
/// most `JOB_CARDS_MAX` numbers, so a repeat (skipped) is rare and the loop ends. From the
/// operating system's generator through a CSPRNG: a number must not be guessable from the others
/// on the same box of cards.
pub fn generate(count: u64, prefix: &str, length: usize, taken: &HashSet<u64>) -> anyhow::Result<Vec<CardNumber>> {
    use crate::card_number::{CARD_NUMBER_DIGITS_MAX, CARD_NUMBER_DIGITS_MIN};
    use crate::engine::program::NUMBER_RANDOM_DIGITS_MIN;
    use rand::SeedableRng;
    if !(1..=crate::wire::JOB_CARDS_MAX as u64).contains(&count) {
        bail!("a job has 1 to {} cards", crate::wire::JOB_CARDS_MAX);
    }
    if !(CARD_NUMBER_DIGITS_MIN..=CARD_NUMBER_DIGITS_MAX).contains(&length) {
        bail!("a card number has {CARD_NUMBER_DIGITS_MIN} to {CARD_NUMBER_DIGITS_MAX} digits");
    }
    if prefix.is_empty()
        || !prefix.bytes().all(|b| b.is_ascii_digit())
        || prefix.len() + NUMBER_RANDOM_DIGITS_MIN + 1 > length
    {
        bail!(
            "the prefix must be digits leaving at least {NUMBER_RANDOM_DIGITS_MIN} random digits and the check digit"
        );
    }
    let mut rng = rand::rngs::StdRng::from_rng(rand::rngs::OsRng)?;
    // Seen numbers by value: 8 bytes each for a job's 10M.
    let mut seen = HashSet::with_capacity(count as usize);
    let mut numbers = Vec::with_capacity(count as usize);
    while (numbers.len() as u64) < count {
        let n = CardNumber::generate(prefix, length, &mut rng);
        let value = number_value(&n);
        if !taken.contains(&value) && seen.insert(value) {
            numbers.push(n);
        }
    }
    Ok(numbers)
}

/// Writes `numbers` to a new manifest at `path` (after `header`, if any, as its first line), one per
/// line, readable by its owner only: they are
/// the cards' full numbers, and this file is the only place they are kept (giftd keeps keyed hashes).
/// Never replaces a file: the numbers go to a `.partial` file beside it, synced, which then takes
/// the name only if nothing has it (a hard link), and the directory is synced; so after a crash the
/// manifest is either whole or not there, and cards are issued only once it is durable.
pub fn write_manifest(path: &std::path::Path, header: Option<&str>, numbers: &[CardNumber]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    // A `.partial` left by an interrupted run held numbers no card was issued under: start over,
    // in a file made now, so that its mode is ours whoever made the old one.
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", partial.display()))
        }
        _ => {}
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("creating {}", partial.display()))?;
    // Through a buffer, not one string of the whole file: 170 MB for a 10M-card box.
    let mut out = std::io::BufWriter::with_capacity(1 << 20, f);
    header
        .into_iter()
        .chain(numbers.iter().map(CardNumber::expose))
        .try_for_each(|line| writeln!(out, "{line}"))
        .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .with_context(|| format!("writing {}", partial.display()))?;
    let linked = std::fs::hard_link(&partial, path).with_context(|| format!("creating {}", path.display()));
    std::fs::remove_file(&partial).with_context(|| format!("removing {}", partial.display()))?;
    linked?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// A card number by value: its digits (at most 19) as a u64, 8 bytes a number in the sets a
/// generated inventory keeps.
fn number_value(n: &CardNumber) -> u64 {
    n.expose().parse().expect("a card number has at most 19 digits")
}

/// The card numbers of a manifest: a CSV file, the number first on each line, quoted or not (a
/// header line is skipped, and so are empty lines). An error names the line, never its number.
pub fn read_manifest(path: &Path) -> anyhow::Result<Vec<CardNumber>> {
    parse_manifest(&std::fs::read_to_string(path)?)
}

fn parse_manifest(text: &str) -> anyhow::Result<Vec<CardNumber>> {
    let mut numbers = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let field = line.split(',').next().unwrap_or("").trim().trim_matches('"');
        if field.is_empty() || (i == 0 && !field.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        numbers.push(CardNumber::parse(field).with_context(|| format!("line {}: not a card number", i + 1))?);
    }
    Ok(numbers)
}

/// Rounds a generated inventory may take to replace its numbers that were cards already. Each
/// round replaces the few of the round before that were: unless a format is nearly full, the
/// second round has none.
pub const DRAW_ROUNDS_MAX: usize = 16;

/// Where a generated inventory keeps the numbers it drew in `round`: beside its manifest.
pub fn round_path(manifest: &Path, round: usize) -> PathBuf {
    let mut path = manifest.as_os_str().to_owned();
    path.push(format!(".round{round}"));
    PathBuf::from(path)
}

/// The job that issues a generated inventory's `round`: round 0 is the job named, and each later
/// round a job of its own (a job's cards are fixed when it opens), `JOB~1`, `JOB~2`, …; so a
/// generated inventory's job id has no `~` of its own.
pub fn round_job(job: &str, round: usize) -> String {
    if round == 0 {
        job.to_string()
    } else {
        format!("{job}~{round}")
    }
}

/// The first line of a round's file: what it was drawn for. A run reads a round back only for the
/// same job, merchant, format and count; any other would issue cards a second time (the numbers of
/// a box issued under another job id are all cards already, and would all be "replaced").
pub fn round_header(job: Job<'_>, format: (&str, usize), round: usize, count: usize) -> String {
    format!(
        "# giftctl bulk issue --generate: round {round} of job {} of merchant {:?}, {count} numbers, prefix {}, {} digits",
        job.id, job.merchant, format.0, format.1
    )
}

/// A round's numbers, read back from its file if it exists (None if not), which must have been
/// drawn for `header`. The error never quotes the file's lines: they may be card numbers.
pub fn read_round(path: &Path, header: &str) -> anyhow::Result<Option<Vec<CardNumber>>> {
    let text = match std::fs::read_to_string(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("reading {}", path.display()))?,
    };
    if text.lines().next() != Some(header) {
        bail!(
            "{} was drawn for another job, merchant, format or count: its first line is not {header:?}",
            path.display()
        );
    }
    Ok(Some(parse_manifest(&text).with_context(|| format!("{}", path.display()))?))
}

/// Holds a generated inventory's lock (`MANIFEST.lock`, kept) until dropped: two runs for one box
/// at once would each draw, and one's file could name the numbers the other issued.
pub fn lock_box(manifest: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let mut path = manifest.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; the lock goes with the file.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("{} is held: another giftctl is working on this box", path.display());
    }
    Ok(f)
}

/// What a generated inventory came to, over its rounds.
#[derive(Debug)]
pub struct Drawn {
    /// Round 0's job record: the job the command named.
    pub job: JobReply,
    /// Every round's outcomes together, but for the numbers that were cards already (replaced);
    /// a failure's index is its card's place in its round's job.
    pub summary: Summary,
    /// How many numbers drawn were cards already, each replaced by a number of the next round.
    pub replaced: u64,
    /// Numbers made by this run after round 0 (a round read back from its file makes none).
    pub made: u64,
    pub rounds: usize,
    /// Whether the manifest lists the inventory: written only once every card of it was issued.
    pub listed: bool,
}

/// Issues a generated inventory whose first round of numbers, `first`, is already in its file
/// (`round_path(manifest, 0)`, under `round_header`). A drawn number can be a card already (a box
/// of another reseller, in the same format): its job does not issue it, and it is replaced by a
/// new number, drawn in the next round and issued by that round's job (`round_job`), until a round
/// has none. Each round's numbers are in their file before any is issued, so running this again
/// (after a kill or a lost connection) runs the same jobs with the same numbers: nothing is issued
/// twice, and the summary is the same. Then the manifest is written, listing only the inventory's
/// cards: a number that was a card already would be another card's number printed on a second card.
pub async fn issue_drawn(
    job: Job<'_>,
    manifest: &Path,
    first: Vec<CardNumber>,
    format: (&str, usize),
    work: &Work,
    mut progress: impl FnMut(u64, u64),
) -> anyhow::Result<Drawn> {
    check_job_id(&round_job(job.id, DRAW_ROUNDS_MAX - 1)).context("the job id leaves no room for a round's")?;
    if job.id.contains('~') {
        bail!("a generated inventory's job id has no '~': its rounds' jobs are JOB~1, JOB~2, …");
    }
    let count = first.len();
    // A listed box was drawn whole before: its rounds are read back, never drawn again.
    let listed_before = manifest.exists();
    let mut rounds = vec![first];
    let mut existing_by_round: Vec<HashSet<u64>> = Vec::new();
    // Every number drawn so far, by value: made only when a round has numbers to replace.
    let mut taken: Option<HashSet<u64>> = None;
    let mut drawn = Drawn {
        // Round 0's, set before anything returns.
        job: JobReply { result: ResultCode::JobNotFound, kind: None, count: 0, chunk_cards: 0 },
        summary: Summary::default(),
        replaced: 0,
        made: 0,
        rounds: 0,
        listed: false,
    };
    loop {
        let round = rounds.len() - 1;
        let id = round_job(job.id, round);
        let cards = Cards::Manifest(std::mem::take(&mut rounds[round]));
        let (reply, summary) = run(Job { id: &id, ..job }, &cards, work, &mut progress).await?;
        let Cards::Manifest(numbers) = cards else { unreachable!("a manifest was made") };
        rounds[round] = numbers;
        drawn.rounds = round + 1;
        if round == 0 {
            drawn.job = reply.clone();
        }
        if reply.result != ResultCode::Approved {
            if round == 0 {
                // The id is another job's: nothing was sent.
                drawn.summary = summary;
                return Ok(drawn);
            }
            bail!("job {id} (round {round} of the inventory's numbers) answered {}", reply.result.name());
        }
        for (outcome, n) in &summary.counts {
            if *outcome != "already_exists" {
                *drawn.summary.counts.entry(outcome).or_default() += n;
            }
        }
        for failure in summary.failures.iter().filter(|f| f.2 != ResultCode::CardExists) {
            if drawn.summary.failures.len() < FAILURES_LISTED_MAX {
                drawn.summary.failures.push(failure.clone());
            }
        }
        let (size, replace) = (rounds[round].len(), summary.existing.len());
        let issued = summary.counts.get("issued").copied().unwrap_or(0) as usize;
        drawn.replaced += replace as u64;
        existing_by_round.push(summary.existing.into_iter().collect());
        if replace == 0 || issued + replace < size {
            // Whole, or some cards were declined for another reason (replacing the others would
            // not make the box whole: those declines are recorded for good).
            break;
        }
        if replace > size / 10 + 10 {
            bail!(
                "{replace} of round {round}'s {size} numbers were cards already, far more than chance: was this \
                 box issued before under another job id or merchant? Nothing more was drawn"
            );
        }
        if round + 1 == DRAW_ROUNDS_MAX {
            bail!("after {DRAW_ROUNDS_MAX} rounds, {replace} drawn numbers were still cards already: the format is nearly full");
        }
        let taken = taken.get_or_insert_with(|| rounds.iter().flatten().map(number_value).collect());
        let path = round_path(manifest, round + 1);
        let header = round_header(job, format, round + 1, replace);
        let next = match read_round(&path, &header)? {
            Some(next) => {
                if next.len() != replace || next.iter().any(|n| taken.contains(&number_value(n))) {
                    bail!("{} does not hold {replace} new numbers", path.display());
                }
                next
            }
            None if listed_before => {
                bail!("{} exists, but {} (numbers it lists) is missing", manifest.display(), path.display())
            }
            None => {
                let next = generate(replace as u64, format.0, format.1, taken)?;
                write_manifest(&path, Some(&header), &next)?;
                drawn.made += replace as u64;
                next
            }
        };
        taken.extend(next.iter().map(number_value));
        rounds.push(next);
    }
    if drawn.summary.counts.get("issued").copied().unwrap_or(0) != count as u64 {
        // Some were declined for another reason (the summary says which): no manifest lists a
        // box that is not whole.
        return Ok(drawn);
    }
    // Each round's numbers but those that were cards already, kept in place in round 0's vector.
    let mut rounds = rounds.into_iter().zip(&existing_by_round).map(|(mut round, existing)| {
        let mut i = 0u64;
        round.retain(|_| {
            i += 1;
            !existing.contains(&(i - 1))
        });
        round
    });
    let mut numbers = rounds.next().expect("round 0");
    rounds.for_each(|round| numbers.extend(round));
    if listed_before {
        // Written by an earlier run of the same job, which this one has only read back.
        if read_manifest(manifest).with_context(|| format!("{}", manifest.display()))? != numbers {
            bail!("{} exists and lists other numbers than this job's cards", manifest.display());
        }
    } else {
        write_manifest(manifest, None, &numbers)?;
    }
    drawn.listed = true;
    Ok(drawn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_numbers_are_distinct_and_in_the_programs_format() {
        let numbers = generate(20_000, "6035", 16, &HashSet::new()).unwrap();
        assert_eq!(numbers.len(), 20_000);
        let distinct: std::collections::HashSet<&str> = numbers.iter().map(|n| n.expose()).collect();
        assert_eq!(distinct.len(), numbers.len());
        for n in &numbers {
            assert!(n.expose().starts_with("6035") && n.expose().len() == 16 && n.luhn_ok());
        }
        // Random, not a sequence: consecutive numbers are far apart (a range's would differ by 1).
        let body = |n: &CardNumber| n.expose()[..15].parse::<u64>().unwrap();
        assert!(numbers.windows(2).filter(|w| body(&w[0]).abs_diff(body(&w[1])) < 1_000).count() < 10);
    }

    #[test]
    fn generated_numbers_avoid_the_taken_ones() {
        // The smallest format (10^9 numbers), and a first draw of 200,000 taken: a second draw
        // blind to them would repeat about 40 of them.
        let first = generate(200_000, "603", 13, &HashSet::new()).unwrap();
        let taken: HashSet<u64> = first.iter().map(number_value).collect();
        let second = generate(200_000, "603", 13, &taken).unwrap();
        assert_eq!(second.len(), 200_000);
        assert!(second.iter().all(|n| !taken.contains(&number_value(n))));
    }

    #[test]
    fn rounds_have_their_own_files_and_jobs() {
        let manifest = Path::new("/tmp/box 7.csv");
        assert_eq!(round_path(manifest, 0), Path::new("/tmp/box 7.csv.round0"));
        assert_eq!(round_path(manifest, 12), Path::new("/tmp/box 7.csv.round12"));
        assert_eq!((round_job("inv-7", 0).as_str(), round_job("inv-7", 3).as_str()), ("inv-7", "inv-7~3"));
        assert!(check_job_id(&round_job(&"j".repeat(JOB_ID_BYTES_MAX - 3), DRAW_ROUNDS_MAX - 1)).is_ok());
    }

    #[test]
    fn a_round_is_read_back_only_for_its_own_job_and_a_box_is_worked_on_by_one_run() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = dir.path().join("box.csv");
        let job = Job { addr: "127.0.0.1:1", credentials: None, merchant: "r-9", id: "inv-9", chunk: 1, window: 1 };
        let header = round_header(job, ("6035", 16), 0, 2);
        let path = round_path(&manifest, 0);
        assert!(read_round(&path, &header).unwrap().is_none(), "not drawn yet");
        let numbers = generate(2, "6035", 16, &HashSet::new()).unwrap();
        write_manifest(&path, Some(&header), &numbers).unwrap();
        assert_eq!(read_round(&path, &header).unwrap(), Some(numbers.clone()));
        assert_eq!(read_manifest(&path).unwrap(), numbers, "the header is skipped as a manifest's");
        for other in [
            round_header(Job { merchant: "r-10", ..job }, ("6035", 16), 0, 2),
            round_header(Job { id: "inv-10", ..job }, ("6035", 16), 0, 2),
            round_header(job, ("6036", 16), 0, 2),
            round_header(job, ("6035", 16), 0, 3),
        ] {
            let e = read_round(&path, &other).unwrap_err().to_string();
            assert!(e.contains("drawn for another") && !e.contains(numbers[0].expose()), "{e}");
        }
        let held = lock_box(&manifest).unwrap();
        assert!(lock_box(&manifest).is_err(), "a second run is refused while the first holds the box");
        drop(held);
        assert!(lock_box(&manifest).is_ok());
    }

    #[test]
    fn a_format_without_nine_random_digits_or_a_bad_count_is_refused() {
        assert!(generate(10, "603", 13, &HashSet::new()).is_ok(), "3 + 9 random + 1 check digit: the shortest format");
        for (count, prefix, length) in [
            (10, "6035", 13),
            (10, "603512", 15),
            (10, "60a5", 16),
            (10, "", 16),
            (10, "6035", 20),
            (10, "60", 11),
            (0, "6035", 16),
            (10_000_001, "6035", 16),
        ] {
            assert!(generate(count, prefix, length, &HashSet::new()).is_err(), "{count} {prefix} {length}");
        }
    }

    #[test]
    fn a_manifest_is_written_owner_only_and_never_replaces_a_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cards.csv");
        let numbers = generate(3, "6035", 16, &HashSet::new()).unwrap();
        // A stale `.partial`, readable by all, from an interrupted run: replaced, not reused.
        std::fs::write(dir.path().join("cards.csv.partial"), "6035000000000006\n").unwrap();
        std::fs::set_permissions(dir.path().join("cards.csv.partial"), std::fs::Permissions::from_mode(0o644)).unwrap();
        write_manifest(&path, None, &numbers).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, numbers.iter().map(|n| n.expose()).collect::<Vec<_>>());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_manifest(&path, None, &generate(3, "6035", 16, &HashSet::new()).unwrap()).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "the first manifest stays");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["cards.csv"], "no .partial file is left behind");
    }
}
