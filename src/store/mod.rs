//! The store: RocksDB, the group-commit writer, recovery. The only module that names rocksdb.
//!
//! Group commit: request threads append [`Effects`] to the open group (a mutex-guarded vector); the
//! committer thread swaps the vector out and writes the whole group as one `WriteBatch` (WAL append
//! and memtable insert, no sync). The syncer thread then fdatasyncs the WAL, which covers every group
//! written before the sync began, and publishes the highest such group as durable. Replies wait on
//! that number, so nothing is acknowledged before it is synced. The two threads overlap: one group's
//! fsync runs while the next group is written. A failed write or sync stops the process.
//!
//! Cards are checkpointed, not written per decision: each history entry carries the card record as
//! it left it. Every `checkpoint_every`, the committer hands the checkpoint thread the ids written
//! since the last checkpoint; the thread syncs the WAL (so they are durable), reads those entries back
//! (each card's last record), writes the records, sorted, into a table file of their own and
//! ingests it into the `cards` family (no WAL, no memtable), then records the last history id it
//! covers.
//! Recovery loads `cards` and replays the history entries after that id. History ids grow in commit
//! order (they are assigned as effects join a group), so "after that id" is exactly "not in the
//! checkpoint".

pub mod records;
mod stall;

use crate::card_number::{CardKey, CardKeyState};
use crate::engine::{
    Appended, CardRecord, Effect, EffectTxns, Effects, IdemKey, IdemRecord, InvoiceKey, Journal, NoteRecord, Settled,
    TxnRecord,
};
use crate::metrics::{CommitStage, Metrics, StoreStats};
use crate::model::{Currency, TxnKind};
use rocksdb::{
    BlockBasedOptions, ColumnFamilyDescriptor, DBRecoveryMode, Direction, IteratorMode, MemtableFactory, Options,
    SliceTransform, WriteBatch, WriteOptions, DB,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const CF_CARDS: &str = "cards";
const CF_HISTORY: &str = "history";
const CF_IDEM: &str = "idem";
const CF_INVOICES: &str = "invoices";
const CF_META: &str = "meta";
const CF_SETTLED: &str = "settled";
const CF_NOTES: &str = "notes";
/// Security alerts, keyed like history by their id in the shared sequence.
const CF_ALERTS: &str = "alerts";
const CFS: [&str; 8] = [CF_CARDS, CF_HISTORY, CF_IDEM, CF_INVOICES, CF_META, CF_SETTLED, CF_NOTES, CF_ALERTS];
/// Hashed idempotency and invoice keys are 32 bytes.
const KEY_BYTES: usize = 32;
/// WAL kept before the oldest memtables are flushed.
const WAL_BYTES_MAX: u64 = 128 << 20;
/// The default limit on what RocksDB's flushes and compactions write a second. A WAL fdatasync
/// waits for the disk to persist every write sent before it, table data included.
/// `loadtest/scripts/fsync-beside-writer.py` on this machine: fdatasync p99 0.24 ms alone, 17 ms
/// beside a thread streaming a file at full speed, 0.35 ms beside one held to 100 MiB/s with
/// 256 KiB syncs (1 MiB syncs: 0.62 ms; 50 MiB/s gained nothing more). Redeem p99 during a
/// 1M-card activation fell from 6.5 to 3.5 ms, and in later pairs from 4.0 to 3.2 ms (medians of
/// 4 pairs each); the activation's speed did not move beyond the noise. It must stay above the
/// rate history is written, or memtables wait for their flush and writes stall: a 1M-card
/// activation writes about 75 MB/s.
pub const TABLE_WRITE_BYTES_PER_SEC: u64 = 100 << 20;
/// The limiter hands out its budget this often: small grants, so a flush never sends more than
/// about 256 KiB at once.
const TABLE_WRITE_REFILL_US: i64 = 2_500;
/// A table being written is sent to the disk (sync_file_range) every this many bytes.
const TABLE_SYNC_BYTES: u64 = 256 << 10;
/// RocksDB's write buffer for each file. A table's writer sends its data to the disk only when it
/// empties this buffer, so the buffer, not `TABLE_SYNC_BYTES`, sets what one sync_file_range sends:
/// at RocksDB's default (1 MiB), a flush held to 100 MiB/s sent a megabyte every 10 ms, and the
/// WAL fdatasyncs that met one took a millisecond or two longer. During a 1M-card activation the
/// redeems over 2 ms came in bursts 10.4 ms apart (or a multiple). At the sync size, over 9
/// interleaved pairs (`p99-during-bulk.sh 1024 4`): redeems giftd answered within 2 ms during the
/// job, median 98.9 % against 98.0 %; client p99 2.9 against 3.2 ms. Batch frames (flags 2) kept
/// their throughput within this machine's noise (517k against 560k/s, 7 pairs, the last 3 even).
/// A WAL write larger than this (a bulk chunk) is written in pieces, still as one write of the log.
const FILE_BUFFER_BYTES: u64 = TABLE_SYNC_BYTES;
/// Memtable size per column family.
const WRITE_BUFFER_BYTES: usize = 32 << 20;
/// Memtable size of the idempotency family, which takes a random key per decision. Measured at
/// 64×16: 8 MiB 122k/s, 32 MiB 130k/s, 64 MiB 144k/s (medians of two, sync).
const IDEM_WRITE_BUFFER_BYTES: usize = 64 << 20;
/// Share of each idempotency/invoice memtable given to its bloom filter: the usual lookup is a
/// miss ("a new key"), which the filter answers without walking the skiplist.
const MEMTABLE_BLOOM_RATIO: f64 = 0.1;

/// The pace of a checkpoint, in bytes a second of history read and card records written. Every
/// reply shares the CPU and the disk with it: at full speed, the checkpoint after a 1M-card job
/// (about 110 MB of history to read, 60 MB of records to write) would take both for seconds.
/// (Measured when checkpoints went through the WAL at full speed: fsyncs of 100 to 750 ms, a
/// redeem stalled 1.7 s, twenty seconds after a 1M-card issue.) It must stay above the rate
/// history is written, or checkpoints fall behind: 140k redeems/s write about 16 MB/s.
const CHECKPOINT_BYTES_PER_SEC: u64 = 32 << 20;
/// Bytes a checkpoint reads or writes between two looks at its pace.
const CHECKPOINT_PACE_STEP_BYTES: u64 = 1 << 20;
/// Bytes a checkpoint reads or writes between two yields of the CPU. The pace leaves the CPU idle
/// on average, but each step runs flat out for milliseconds once the thread wakes, and the
/// scheduler let a woken committer or syncer wait for it to end: during the 3 s a checkpoint read a
/// 1M-card job's history, 1,012 and 969 redeems took over 2 ms, mostly waiting for the committer
/// to start their group's write. Yielding every 64 KiB (about 600 entries): 182 and 42. Nice 19
/// for the thread gave 343 and 385; `SCHED_IDLE` 152 and 106, but a thread under it could starve
/// while payments keep both cores busy, and replay after a restart would grow without bound.
/// Redeem p99 over a 12 s run with a 1M-card activation: 2.3 ms against 4.6 ms (8 pairs).
const CHECKPOINT_YIELD_BYTES: u64 = 64 << 10;
/// How often the committer looks whether the running checkpoint has finished, when it has cards
/// for the next one.
const CHECKPOINT_POLL: Duration = Duration::from_millis(20);
/// Level-0 files of the card table before RocksDB would stall writes for it: out of reach, since a
/// checkpoint (one file each) never needs a write to wait.
const CARDS_L0_FILES_MAX: i32 = 1 << 20;
/// Where checkpoint table files are written before RocksDB takes them in (under the data dir).
const CHECKPOINT_DIR: &str = "checkpoint";
/// Meta key of the last history id the `cards` family reflects.
const CHECKPOINT_KEY: &[u8] = b"checkpoint/txn_id";
/// Entries one filtered history page may look at: a card with a long history and few entries of
/// the kind asked for is paged through, never walked whole in one request.
const HISTORY_SCAN_MAX: usize = 10_000;
/// Hold ids below this value are taken (see `Effects::hold_id_next`).
const HOLD_ID_KEY: &[u8] = b"holds/id_next";
/// Meta keys of programs set by admin updates: this prefix, then the name; the value is the
/// program's settings text (the config file's keys).
const PROGRAM_KEY_PREFIX: &[u8] = b"program/";

/// Exit status after a failed WAL write or sync (EX_IOERR): never continue on unknown durability.
pub const EXIT_IO_ERROR: i32 = 74;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every group is fsynced before any of its replies leave (the default and the contract).
    Sync,
    /// Opt-in, for comparison only: replies leave after the write; the WAL is synced every
    /// `interval_ms`. A crash can lose up to that much acknowledged work.
    Relaxed { interval_ms: u64 },
}

impl Durability {
    /// The label every figure and the startup log carry.
    pub fn label(&self) -> String {
        match self {
            Durability::Sync => "sync".into(),
            Durability::Relaxed { interval_ms } => format!("relaxed-{interval_ms}ms"),
        }
    }
}

/// What recovery read back.
pub struct Recovered {
    pub cards: Vec<(CardKey, CardRecord)>,
    /// History entries replayed over the last checkpoint.
    pub replayed: u64,
    /// Per currency: money that entered (issued, loaded) and left (redeemed) since the beginning.
    pub totals: BTreeMap<Currency, (i128, i128)>,
    /// Hold ids below this are taken.
    pub hold_id_next: u64,
    /// Programs set by admin updates: (name, settings text), newest settings of each.
    pub programs: Vec<(String, String)>,
}

struct Pending {
    state: Mutex<PendingState>,
    wake: Condvar,
}

struct PendingState {
    entries: Vec<Effects>,
    open_group: u64,
    /// The last history id handed out.
    txn_id: u64,
    closing: bool,
    /// Entries are waiting that the committer was not woken for (batch items; see
    /// `Effects::batched`): the next append that wants its write soon wakes it.
    unannounced: bool,
    /// When the open group's first entry was appended: its wait for the committer starts then.
    opened_at: Option<Instant>,
}

/// The highest group written to the WAL (not yet necessarily synced), for the syncer.
struct Written {
    state: Mutex<WrittenState>,
    wake: Condvar,
}

struct WrittenState {
    group: u64,
    /// The last id (history entry or alert) in `group`.
    txn_id: u64,
    closing: bool,
    /// When the oldest group written since the last sync began finished its write: the longest
    /// any written group has waited for the next sync.
    unsynced_since: Option<Instant>,
}

/// What the syncer publishes: the last durable commit group (replies wait for it) and the last
/// durable id of the history-and-alerts sequence (event subscriptions read up to it).
struct Published {
    group: watch::Sender<u64>,
    txn_id: watch::Sender<u64>,
    /// The durable group again, for a thread that blocks until a group is durable (a bulk
    /// append: see `Store::append`).
    group_blocking: Mutex<u64>,
    group_wake: Condvar,
}

impl Published {
    fn publish_group(&self, group: u64) {
        self.group.send_replace(group);
        *self.group_blocking.lock().expect("durable lock") = group;
        self.group_wake.notify_all();
    }

    /// Blocks the calling thread until `group` is durable.
    fn wait_group(&self, group: u64) {
        let mut g = self.group_blocking.lock().expect("durable lock");
        while *g < group {
            g = self.group_wake.wait(g).expect("durable lock");
        }
    }
}

pub struct Store {
    db: Arc<DB>,
    pending: Arc<Pending>,
    written: Arc<Written>,
    durable: watch::Receiver<u64>,
    durable_txn_id: watch::Receiver<u64>,
    published: Arc<Published>,
    /// The group of the last bulk append (see `Store::append`), locked from before a bulk append
    /// waits for it until the next one is appended.
    bulk_group: Mutex<u64>,
    committer: Mutex<Option<JoinHandle<()>>>,
    syncer: Mutex<Option<JoinHandle<()>>>,
}

fn fail(what: &str, e: &dyn std::fmt::Display) -> ! {
    tracing::error!(error = %e, "{what} failed; stopping: durability is unknown");
    std::process::exit(EXIT_IO_ERROR)
}

/// How the store uses the disk, besides its durability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// How often changed cards are checkpointed into the card table.
    pub checkpoint_every: Duration,
    /// The most RocksDB's flushes and compactions write a second; 0: no limit.
    pub table_write_bytes_per_sec: u64,
}

impl Tuning {
    /// Checkpoints this often, table writes at the default limit.
    pub fn checkpoint_every(every: Duration) -> Tuning {
        Tuning { checkpoint_every: every, table_write_bytes_per_sec: TABLE_WRITE_BYTES_PER_SEC }
    }
}

impl Store {
    /// Opens (or creates) the database in `dir` and reads back every card and the ledger totals.
    pub fn open(
        dir: &Path,
        durability: Durability,
        tuning: Tuning,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Store, Recovered)> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // RocksDB's flush and compaction threads keep the normal priority. During a 1M-card
        // activation a flush was two thirds of the time giftd's payment threads waited over
        // 0.5 ms for a CPU (`perf sched`), but at nice 19 redeem p99 during the job did not move
        // (2.87 against 2.82 ms, 3 pairs) and a starved flush stalled writes under a load that
        // keeps both cores busy: batch frames lost a quarter of their throughput.
        opts.increase_parallelism(2);
        // fdatasync is enough for the WAL; its metadata is preallocated.
        opts.set_use_fsync(false);
        // A torn tail after kill -9 holds only unacknowledged writes: recover up to it.
        opts.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
        // Overwriting a recycled WAL file needs no inode size update, so each fdatasync writes data
        // only: about 3x faster than appending on this machine's ext4 (80 µs vs 290 µs, dd dsync).
        opts.set_recycle_log_file_num(4);
        // Bounds the WAL kept for recovery (restart replays it) and lets old WAL files become
        // obsolete, hence recyclable: without it, the rarely written meta family would keep every
        // WAL alive up to RocksDB's default of four times all memtables (gigabytes).
        opts.set_max_total_wal_size(WAL_BYTES_MAX);
        // Flushes and compactions write their tables out a little at a time (sync_file_range)
        // instead of leaving hundreds of megabytes dirty in the page cache: otherwise a WAL
        // fdatasync waits behind that writeback, and every reply with it (measured during a
        // 1M-card job: fsyncs of over 50 ms, redeem p99 of half a second).
        opts.set_bytes_per_sync(TABLE_SYNC_BYTES);
        opts.set_writable_file_max_buffer_size(FILE_BUFFER_BYTES);
        // And no faster than this: a WAL fdatasync makes the disk persist whatever table data
        // was sent before it, so a flush written at full speed puts milliseconds into each sync
        // while it runs (see `TABLE_WRITE_BYTES_PER_SEC`).
        if tuning.table_write_bytes_per_sec > 0 {
            let rate = i64::try_from(tuning.table_write_bytes_per_sec).unwrap_or(i64::MAX);
            opts.set_ratelimiter(rate, TABLE_WRITE_REFILL_US, 10);
        }
        // One committer writes every group (the checkpoint thread only its id in `meta`), and
        // the vector memtable needs this off: RocksDB then inserts one writer's batch at a time.
        opts.set_allow_concurrent_memtable_write(false);
        let cfs = CFS.iter().map(|name| ColumnFamilyDescriptor::new(*name, cf_options(name)));
        let db = Arc::new(DB::open_cf_descriptors(&opts, dir.join("db"), cfs)?);
        let (recovered, checkpoint_txn_id) = recover(&db)?;
        // A checkpoint's table file is moved into the database once written; one left here was cut
        // off by a crash (its cards are replayed from history instead) or already ingested.
        let checkpoint_dir = dir.join(CHECKPOINT_DIR);
        if checkpoint_dir.exists() {
            std::fs::remove_dir_all(&checkpoint_dir)?;
        }
        std::fs::create_dir_all(&checkpoint_dir)?;
        let txn_id = last_txn_id(&db)?;
        // What recovery read from the WAL is made durable before anything is served from it: an
        // event subscription reads up to `txn_id` at once.
        db.flush_wal(true)?;
        let (tx, rx) = watch::channel(0u64);
        let (txn_tx, txn_rx) = watch::channel(txn_id);
        let durable = Arc::new(Published {
            group: tx,
            txn_id: txn_tx,
            group_blocking: Mutex::new(0),
            group_wake: Condvar::new(),
        });
        let published = durable.clone();
        let pending = Arc::new(Pending {
            state: Mutex::new(PendingState {
                entries: Vec::new(),
                open_group: 1,
                txn_id,
                closing: false,
                unannounced: false,
                opened_at: None,
            }),
            wake: Condvar::new(),
        });
        let written = Arc::new(Written {
            state: Mutex::new(WrittenState { group: 0, txn_id, closing: false, unsynced_since: None }),
            wake: Condvar::new(),
        });
        let committer = {
            let (db, pending, written, durable, metrics) =
                (db.clone(), pending.clone(), written.clone(), durable.clone(), metrics.clone());
            let totals = recovered.totals.clone();
            let hold_id_next = recovered.hold_id_next;
            // Replayed entries are not in the card table yet: the first checkpoint folds them in.
            let checkpoint =
                Checkpoint::start(db.clone(), checkpoint_dir, tuning.checkpoint_every, checkpoint_txn_id, txn_id)?;
            std::thread::Builder::new().name("giftd-committer".into()).spawn(move || {
                let ledger = Ledger { totals, hold_id_next };
                commit_loop(&db, &pending, &written, &durable, durability, ledger, checkpoint, &metrics)
            })?
        };
        let syncer = {
            let (db, written) = (db.clone(), written.clone());
            std::thread::Builder::new()
                .name("giftd-syncer".into())
                .spawn(move || sync_loop(&db, &written, &durable, durability, &metrics))?
        };
        let store = Store {
            db,
            pending,
            written,
            durable: rx,
            durable_txn_id: txn_rx,
            published,
            bulk_group: Mutex::new(0),
            committer: Mutex::new(Some(committer)),
            syncer: Mutex::new(Some(syncer)),
        };
        Ok((store, recovered))
    }

    /// The highest commit group that is durable. Replies for group `g` wait until this is ≥ `g`.
    pub fn durable(&self) -> watch::Receiver<u64> {
        self.durable.clone()
    }

    /// The last durable id of the sequence history entries and alerts share: every id up to it is
    /// written and synced, and no later write takes an id below it.
    pub fn durable_txn_id(&self) -> watch::Receiver<u64> {
        self.durable_txn_id.clone()
    }

    /// Wakes the committer for the batch items appended without waking it (`Effects::batched`).
    /// Woken at the first append of each group, the committer wrote a batch's items in groups of
    /// about a dozen, each a WAL write, while the batch's handler was still deciding the rest;
    /// woken by the batch, it writes them in groups of hundreds (measured: 13 decisions a group
    /// on average before, 130 after, and 10 to 20 % more batch redeems a second).
    pub fn write_batched(&self) {
        let mut s = self.pending.state.lock().expect("pending lock");
        if s.unannounced {
            s.unannounced = false;
            self.pending.wake.notify_one();
        }
    }

    /// History of a card, newest first: up to `limit` entries with `seq < before_seq`, read back
    /// along the chain that starts at the card's newest entry, `last_txn_id`. Each step is a point
    /// read, so a page costs its distance from the newest entry: cheap for the recent pages support
    /// reads, linear for deep ones. (Keying history by card instead would make every decision an
    /// insert at a random place in the memtable: measured, a quarter of all throughput.)
    /// A read error or a broken chain stops the process, as in [`Store::get`]: a short page would
    /// be a wrong answer.
    /// A card's history entries older than `before_seq`, newest first, at most `limit` (of one
    /// kind, when given), walking its chain back from `last_txn_id`. A filtered walk looks at most
    /// `HISTORY_SCAN_MAX` entries per call. Also returns where to resume: the seq of the last entry
    /// looked at when the chain goes on, else 0.
    pub fn history(
        &self,
        card: &CardKey,
        last_txn_id: u64,
        before_seq: u64,
        limit: usize,
        kind: Option<TxnKind>,
    ) -> (Vec<TxnRecord>, u64) {
        let mut out = Vec::new();
        let mut id = last_txn_id;
        let (mut scanned, mut last_seq) = (0, 0);
        while id != 0 && out.len() < limit && scanned < HISTORY_SCAN_MAX {
            let Some(v) = self.get(CF_HISTORY, &records::history_key(id)) else {
                fail("history read", &format_args!("entry {id} of a card's chain is missing"))
            };
            let (t, _) = records::decode_history(&records::history_key(id), &v)
                .unwrap_or_else(|e| fail("history record decode", &e));
            if t.card != *card {
                fail("history read", &format_args!("entry {id} belongs to another card"));
            }
            id = t.prev_id;
            if t.seq < before_seq {
                scanned += 1;
                last_seq = t.seq;
                if kind.is_none_or(|k| k == t.kind) {
                    out.push(t);
                }
            }
        }
        (out, if id != 0 { last_seq } else { 0 })
    }

    /// A card's notes, newest first, from the one with history id `last_note_id` back, at most
    /// `limit`. Like history, read only once the card's last change is durable.
    pub fn notes(&self, last_note_id: u64, limit: usize) -> Vec<NoteRecord> {
        let mut out = Vec::new();
        let mut id = last_note_id;
        while id != 0 && out.len() < limit {
            let Some(v) = self.get(CF_NOTES, &records::history_key(id)) else {
                fail("notes read", &format_args!("note {id} of a card's chain is missing"))
            };
            let n = records::decode_note(&v).unwrap_or_else(|e| fail("note decode", &e));
            id = n.prev_id;
            out.push(n);
        }
        out
    }

    /// The committed events with ids in `after+1 ..= upto`, in id order: history entries (with
    /// the card record as each left it) and alerts, at most `limit`. Returns them and the last id
    /// read (`upto` when the range is exhausted), from which the next call goes on.
    /// Read without filling the block cache: a subscriber catching up reads old history once, and
    /// must not evict the blocks that decisions and lookups use.
    pub fn events(&self, after: u64, upto: u64, limit: usize) -> (Vec<(u64, StoredEvent)>, u64) {
        let from = records::history_key(after.saturating_add(1));
        let read = |name: &str| {
            let cf = self.db.cf_handle(name).expect("column family");
            let mut opts = rocksdb::ReadOptions::default();
            opts.fill_cache(false);
            self.db.iterator_cf_opt(cf, opts, IteratorMode::From(&from, Direction::Forward)).map(|item| {
                let (k, v) = item.unwrap_or_else(|e| fail("event read", &e));
                let id: [u8; 8] = k.as_ref().try_into().unwrap_or_else(|_| fail("event read", &"bad key"));
                (u64::from_be_bytes(id), k, v)
            })
        };
        let mut history = read(CF_HISTORY).take_while(|(id, _, _)| *id <= upto).peekable();
        let mut alerts = read(CF_ALERTS).take_while(|(id, _, _)| *id <= upto).peekable();
        let mut out = Vec::new();
        while out.len() < limit {
            let next_is_history = match (history.peek(), alerts.peek()) {
                (None, None) => return (out, upto),
                (Some(h), Some(a)) => h.0 < a.0,
                (h, _) => h.is_some(),
            };
            if next_is_history {
                let (id, k, v) = history.next().expect("peeked");
                let (txn, card) = records::decode_history(&k, &v).unwrap_or_else(|e| fail("history record decode", &e));
                out.push((id, StoredEvent::Txn(txn, Box::new(card))));
            } else {
                let (id, _, v) = alerts.next().expect("peeked");
                out.push((
                    id,
                    StoredEvent::Alert(records::decode_alert(&v).unwrap_or_else(|e| fail("alert decode", &e))),
                ));
            }
        }
        let last = out.last().map_or(after, |(id, _)| *id);
        (out, last)
    }

    /// Figures for dashboards: the commit queue and what RocksDB says about memory and stalls.
    /// A property that cannot be read counts as 0: these are observations, not durability.
    pub fn stats(&self) -> StoreStats {
        let commit_queue_decisions = self.pending.state.lock().expect("pending lock").entries.len();
        let int = |cf: &rocksdb::ColumnFamily, name: &str| self.db.property_int_value_cf(cf, name).ok().flatten();
        let mut stats = StoreStats { commit_queue_decisions, ..StoreStats::default() };
        for name in CFS {
            let cf = self.db.cf_handle(name).expect("column family");
            stats.memtable_bytes += int(cf, "rocksdb.cur-size-all-mem-tables").unwrap_or(0);
            stats.pending_compaction_bytes += int(cf, "rocksdb.estimate-pending-compaction-bytes").unwrap_or(0);
        }
        let db_wide = |name: &str| self.db.property_int_value(name).ok().flatten().unwrap_or(0);
        stats.write_stopped = db_wide("rocksdb.is-write-stopped") > 0;
        stats.write_delayed = db_wide("rocksdb.actual-delayed-write-rate") > 0;
        stats.write_stall_seconds = self.write_stall_seconds();
        stats
    }

    /// Stops the committer and the syncer after everything appended so far is written and synced,
    /// with a final checkpoint so the next start has nothing to replay.
    pub fn close(&self) {
        self.pending.state.lock().expect("pending lock").closing = true;
        self.pending.wake.notify_all();
        if let Some(t) = self.committer.lock().expect("committer lock").take() {
            let _ = t.join();
        }
        self.written.state.lock().expect("written lock").closing = true;
        self.written.wake.notify_all();
        if let Some(t) = self.syncer.lock().expect("syncer lock").take() {
            let _ = t.join();
        }
        if let Err(e) = self.db.flush_wal(true) {
            fail("final WAL sync", &e);
        }
    }

    fn get(&self, cf: &str, key: &[u8]) -> Option<rocksdb::DBPinnableSlice<'_>> {
        let cf = self.db.cf_handle(cf).expect("column family");
        match self.db.get_pinned_cf(cf, key) {
            Ok(v) => v,
            // A read error means the store is unhealthy; answering "unknown key" could apply a
            // request twice, so stop instead.
            Err(e) => fail("read", &e),
        }
    }
}

/// Per column family options, chosen for how each family is used. The committer inserts every
/// decision on one thread, so memtable inserts and the flushes behind them are the store's main
/// cost (profiled at 64×16):
/// - `cards` is written only by ingesting checkpoint table files, and only ever read by a full scan
///   at recovery; its memtable stays empty.
/// - `history` keys are ids that grow: a plain skiplist appends at its end, and flushes and
///   compactions move sorted runs.
/// - `idem` and `invoices` are point lookups of hashed (random) 32-byte keys, mostly misses: a
///   plain skiplist with a bloom filter in the memtable and in the tables. (A hash-of-skiplists
///   memtable inserts faster but must build a full skiplist at every flush; measured, it cost a
///   third of the throughput.)
fn cf_options(name: &str) -> Options {
    let mut o = Options::default();
    o.set_write_buffer_size(WRITE_BUFFER_BYTES);
    // Room for two memtables to wait for flush while a third fills: a burst then does not stall
    // writes (a stall would hold every reply).
    o.set_max_write_buffer_number(4);
    match name {
        CF_CARDS => {
            o.set_memtable_factory(MemtableFactory::Vector);
            // RocksDB slows or stops every write in the database when one family's level-0
            // files or pending compaction pile up. Here they are checkpoints, which no reply
            // waits for: a stall on their account would hold payments for nothing.
            o.set_level_zero_slowdown_writes_trigger(CARDS_L0_FILES_MAX);
            o.set_level_zero_stop_writes_trigger(CARDS_L0_FILES_MAX);
            o.set_soft_pending_compaction_bytes_limit(0);
            o.set_hard_pending_compaction_bytes_limit(0);
        }
        CF_IDEM | CF_INVOICES | CF_SETTLED => {
            // The prefix is the whole key, so the memtable's prefix bloom is a whole-key bloom.
            o.set_prefix_extractor(SliceTransform::create_fixed_prefix(KEY_BYTES));
            o.set_memtable_prefix_bloom_ratio(MEMTABLE_BLOOM_RATIO);
            // Every decision adds a key here: larger memtables flush (and compact) less often.
            o.set_write_buffer_size(IDEM_WRITE_BUFFER_BYTES);
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            o.set_block_based_table_factory(&table);
        }
        _ => {}
    }
    o
}

/// The store's key for an idempotency key or an invoice: SHA-256 of its bytes, a fixed 32 bytes (the
/// prefix its family's memtable bloom is keyed by). Neither is secret (no card number is in them), so
/// the hash need not be keyed.
fn hashed_key(bytes: &[u8]) -> [u8; KEY_BYTES] {
    Sha256::digest(bytes).into()
}

impl Journal for Store {
    fn find_idem(&self, key: &IdemKey) -> Option<IdemRecord> {
        let v = self.get(CF_IDEM, &hashed_key(&key.0))?;
        match records::decode_idem(&v) {
            Ok(r) => Some(r),
            Err(e) => fail("idempotency record decode", &e),
        }
    }

    fn find_idems(&self, keys: &[IdemKey]) -> Vec<Option<IdemRecord>> {
        let cf = self.db.cf_handle(CF_IDEM).expect("column family");
        let hashed: Vec<[u8; KEY_BYTES]> = keys.iter().map(|k| hashed_key(&k.0)).collect();
        // RocksDB sorts the keys itself and probes each table's filter once for all of them.
        let found = self.db.batched_multi_get_cf(cf, &hashed, false);
        found
            .into_iter()
            .map(|r| match r {
                Ok(None) => None,
                Ok(Some(v)) => match records::decode_idem(&v) {
                    Ok(r) => Some(r),
                    Err(e) => fail("idempotency record decode", &e),
                },
                // As in `get`: "unknown key" on a read error could apply a request twice.
                Err(e) => fail("read", &e),
            })
            .collect()
    }

    fn find_settled(&self, key: &IdemKey) -> Option<Settled> {
        let v = self.get(CF_SETTLED, &hashed_key(&key.0))?;
        match records::decode_settled(&v) {
            Ok(s) => Some(s),
            Err(e) => fail("settled record", &e),
        }
    }

    fn effect_of(&self, txns: EffectTxns, hold_id: u64) -> Option<Effect> {
        let entries = (txns.first..txns.first + txns.parts as u64)
            .map(|id| {
                let key = records::history_key(id);
                let v = self.get(CF_HISTORY, &key)?;
                match records::decode_history(&key, &v) {
                    Ok(entry) => Some(entry),
                    Err(e) => fail("history record decode", &e),
                }
            })
            .collect::<Option<Vec<_>>>()?;
        Effect::from_history(&entries, hold_id)
    }

    fn cards_of(&self, first_txn_id: u64, count: usize) -> Vec<CardKey> {
        let cf = self.db.cf_handle(CF_HISTORY).expect("column family");
        let from = records::history_key(first_txn_id);
        let mut cards = Vec::with_capacity(count);
        for item in self.db.iterator_cf(cf, IteratorMode::From(&from, rocksdb::Direction::Forward)).take(count) {
            let (k, v) = item.unwrap_or_else(|e| fail("history read", &e));
            let (t, _) = records::decode_history(&k, &v).unwrap_or_else(|e| fail("history record decode", &e));
            if t.id != first_txn_id + cards.len() as u64 {
                fail(
                    "history read",
                    &format_args!("entry {} of a chunk is missing", first_txn_id + cards.len() as u64),
                );
            }
            cards.push(t.card);
        }
        cards
    }

    fn invoice_used(&self, key: &InvoiceKey) -> bool {
        self.get(CF_INVOICES, &hashed_key(&key.0)).is_some()
    }

    fn latest_group(&self) -> u64 {
        // The open group once something is in it; before that, the last group handed to the
        // committer (the open group is written only when it holds something).
        let s = self.pending.state.lock().expect("pending lock");
        if s.entries.is_empty() {
            s.open_group - 1
        } else {
            s.open_group
        }
    }

    fn append(&self, mut effects: Effects) -> Appended {
        // A bulk chunk enters the commit pipeline only once the chunk before it is durable. Its
        // thousands of entries take the committer a fraction of a millisecond to write and the
        // syncer up to a millisecond or two to sync, and the payments that arrive meanwhile wait
        // for both. With two chunks in the pipeline, the sync of the payments written during the
        // first chunk's sync would also carry the second's bytes: they would wait for two. The
        // next chunk is decided while the last one syncs, so the job loses little (the lock is
        // held only by the bulk thread, which decides one chunk at a time).
        let mut bulk_group = effects.bulk.then(|| {
            let last = self.bulk_group.lock().expect("bulk lock");
            self.published.wait_group(*last);
            last
        });
        let mut s = self.pending.state.lock().expect("pending lock");
        // Assigned here, under the lock that orders groups, so ids grow in commit order.
        let first_txn_id = if effects.changes.is_empty() { 0 } else { s.txn_id + 1 };
        s.txn_id = effects.assign_ids(s.txn_id + 1) - 1;
        if let Some((_, r)) = &mut effects.idem {
            if let Some(e) = &r.effect {
                r.effect_txns = Some(EffectTxns::of(first_txn_id, e, &effects.changes));
            }
            if let Some(crate::engine::Bulk::Chunk(c)) = r.bulk.as_deref_mut() {
                c.first_txn_id = first_txn_id;
            }
        }
        let batched = effects.batched;
        if s.entries.is_empty() {
            s.opened_at = Some(Instant::now());
        }
        s.entries.push(effects);
        if batched {
            s.unannounced = true;
        } else if s.entries.len() == 1 || s.unannounced {
            s.unannounced = false;
            self.pending.wake.notify_one();
        }
        if let Some(last) = &mut bulk_group {
            **last = s.open_group;
        }
        Appended { group: s.open_group, first_txn_id }
    }
}

/// The newest history entry id in the store (0 when there is none): ids continue from it.
/// The last id of the sequence history entries and alerts share.
fn last_txn_id(db: &DB) -> anyhow::Result<u64> {
    let mut last = 0;
    for name in [CF_HISTORY, CF_ALERTS] {
        let cf = db.cf_handle(name).expect("column family");
        if let Some(item) = db.iterator_cf(cf, IteratorMode::End).next() {
            let (k, _) = item?;
            let id: [u8; 8] = k.as_ref().try_into().map_err(|_| records::Corrupt { what: "history key" })?;
            last = last.max(u64::from_be_bytes(id));
        }
    }
    Ok(last)
}

/// Loads the card table, then replays the history written after its checkpoint. Returns also the
/// last history id the card table reflects: the entries after it are for the next checkpoint.
fn recover(db: &DB) -> anyhow::Result<(Recovered, u64)> {
    let mut cards = HashMap::new();
    let cf = db.cf_handle(CF_CARDS).expect("cards column family");
    for item in db.iterator_cf(cf, IteratorMode::Start) {
        let (k, v) = item?;
        let key: [u8; 32] = k.as_ref().try_into().map_err(|_| records::Corrupt { what: "card key" })?;
        cards.insert(CardKey(key), records::decode_card(&v)?);
    }
    let meta = db.cf_handle(CF_META).expect("meta column family");
    let checkpoint = match db.get_cf(meta, CHECKPOINT_KEY)? {
        None => 0,
        Some(v) => u64::from_le_bytes(v.as_slice().try_into().map_err(|_| records::Corrupt { what: "checkpoint" })?),
    };
    let mut replayed_entries = 0;
    let cf = db.cf_handle(CF_HISTORY).expect("history column family");
    let from = records::history_key(checkpoint + 1);
    for item in db.iterator_cf(cf, IteratorMode::From(&from, Direction::Forward)) {
        let (k, v) = item?;
        let (txn, rec) = records::decode_history(&k, &v)?;
        // Entries are in commit order, so the last one seen for a card is its state.
        cards.insert(txn.card, rec);
        replayed_entries += 1;
    }
    let hold_id_next = match db.get_cf(meta, HOLD_ID_KEY)? {
        None => 1,
        Some(v) => u64::from_le_bytes(v.as_slice().try_into().map_err(|_| records::Corrupt { what: "hold id" })?),
    };
    let mut totals = BTreeMap::new();
    let cf = db.cf_handle(CF_META).expect("meta column family");
    for item in db.prefix_iterator_cf(cf, b"totals/") {
        let (k, v) = item?;
        if !k.starts_with(b"totals/") {
            break;
        }
        let (c, credit, debit) = records::decode_totals(&k, &v)?;
        totals.insert(c, (credit, debit));
    }
    let mut programs = Vec::new();
    for item in db.prefix_iterator_cf(cf, PROGRAM_KEY_PREFIX) {
        let (k, v) = item?;
        if !k.starts_with(PROGRAM_KEY_PREFIX) {
            break;
        }
        let name =
            std::str::from_utf8(&k[PROGRAM_KEY_PREFIX.len()..]).map_err(|_| records::Corrupt { what: "program" })?;
        let text = std::str::from_utf8(&v).map_err(|_| records::Corrupt { what: "program" })?;
        programs.push((name.to_string(), text.to_string()));
    }
    let cards = cards.into_iter().collect();
    Ok((Recovered { cards, replayed: replayed_entries, totals, hold_id_next, programs }, checkpoint))
}

/// One committed event, as the store keeps it.
#[derive(Debug)]
pub enum StoredEvent {
    Txn(TxnRecord, Box<CardRecord>),
    Alert(crate::engine::alerts::AlertRecord),
}

/// The committer's side of checkpoints: how far history is written, how far the card table
/// covers it, and whether the checkpoint thread is busy. The committer keeps no card records for
/// checkpoints: the thread reads them back from history.
struct Checkpoint {
    every: Duration,
    /// The last history id in a written group.
    written_txn_id: u64,
    /// The last history id handed to the checkpoint thread: the card table reflects every entry
    /// up to it once that checkpoint is done.
    covered_txn_id: u64,
    last_started: Instant,
    running: bool,
    /// Set at shutdown: a checkpoint already running stops pacing itself.
    hurry: Arc<AtomicBool>,
    jobs: Option<std::sync::mpsc::SyncSender<CheckpointJob>>,
    done: std::sync::mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

/// One checkpoint, for the checkpoint thread: fold history entries `from_txn_id..=upto_txn_id`
/// into the card table.
struct CheckpointJob {
    from_txn_id: u64,
    upto_txn_id: u64,
    /// At shutdown nothing waits for a reply: written as fast as the disk goes.
    unpaced: bool,
}

impl Checkpoint {
    /// `covered_txn_id`: the id the card table reflects (recovery's checkpoint); the entries after
    /// it, up to `written_txn_id`, were replayed and go into the next checkpoint.
    fn start(
        db: Arc<DB>,
        dir: PathBuf,
        every: Duration,
        covered_txn_id: u64,
        written_txn_id: u64,
    ) -> std::io::Result<Checkpoint> {
        let (jobs, jobs_rx) = std::sync::mpsc::sync_channel(1);
        let (done_tx, done) = std::sync::mpsc::channel();
        let hurry = Arc::new(AtomicBool::new(false));
        let thread_hurry = hurry.clone();
        let thread = std::thread::Builder::new()
            .name("giftd-checkpoint".into())
            .spawn(move || checkpoint_loop(&db, &dir, &thread_hurry, jobs_rx, done_tx))?;
        Ok(Checkpoint {
            every,
            written_txn_id,
            covered_txn_id,
            last_started: Instant::now(),
            running: false,
            hurry,
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    fn running(&mut self) -> bool {
        if self.running {
            match self.done.try_recv() {
                Ok(()) => self.running = false,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                // Gone without a word: checkpoints would stop, and a clean stop would wait forever.
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    fail("checkpoint", &"the checkpoint thread stopped")
                }
            }
        }
        self.running
    }

    /// How long the committer may sleep with no group to write: until the next checkpoint is due
    /// when history grew (a little while, if the last one is still being written), else until
    /// woken.
    fn idle_wait(&mut self) -> Option<Duration> {
        if self.written_txn_id == self.covered_txn_id {
            None
        } else if self.running() {
            Some(CHECKPOINT_POLL)
        } else {
            Some(self.every.saturating_sub(self.last_started.elapsed()))
        }
    }

    /// Starts a checkpoint of the history written since the last one, when one is due (or `now`)
    /// and the thread is free. The committer only passes two ids.
    fn step(&mut self, now: bool) {
        if self.written_txn_id == self.covered_txn_id
            || self.running()
            || !(now || self.last_started.elapsed() >= self.every)
        {
            return;
        }
        let job =
            CheckpointJob { from_txn_id: self.covered_txn_id + 1, upto_txn_id: self.written_txn_id, unpaced: now };
        self.covered_txn_id = self.written_txn_id;
        self.last_started = Instant::now();
        self.running = true;
        if self.jobs.as_ref().is_none_or(|j| j.send(job).is_err()) {
            fail("checkpoint", &"the checkpoint thread stopped");
        }
    }

    /// At shutdown, once every group is written: checkpoints everything, so that a restart
    /// replays nothing, and waits for it.
    fn finish(mut self) {
        self.hurry.store(true, Ordering::Relaxed);
        while self.written_txn_id != self.covered_txn_id || self.running() {
            self.step(true);
            if self.running() {
                std::thread::sleep(CHECKPOINT_POLL);
            }
        }
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Holds a checkpoint under `CHECKPOINT_BYTES_PER_SEC`, looking every
/// `CHECKPOINT_PACE_STEP_BYTES`, and yields the CPU every `CHECKPOINT_YIELD_BYTES`; or neither
/// (`paced` false, or `hurry` set: at shutdown).
struct Pace<'a> {
    paced: bool,
    hurry: &'a AtomicBool,
    started: Instant,
    bytes: u64,
    looked_at: u64,
}

impl Pace<'_> {
    fn advance(&mut self, bytes: u64) {
        let before = self.bytes;
        self.bytes += bytes;
        if !self.paced || self.hurry.load(Ordering::Relaxed) {
            return;
        }
        if before / CHECKPOINT_YIELD_BYTES != self.bytes / CHECKPOINT_YIELD_BYTES {
            std::thread::yield_now();
        }
        if self.bytes - self.looked_at < CHECKPOINT_PACE_STEP_BYTES {
            return;
        }
        self.looked_at = self.bytes;
        let due = Duration::from_nanos(self.bytes.saturating_mul(1_000_000_000) / CHECKPOINT_BYTES_PER_SEC);
        if let Some(ahead) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(ahead);
        }
    }
}

/// The checkpoint thread. For each job it first syncs the WAL, so that the job's entries are durable
/// (a card table that reflected an entry a crash then took from the WAL would disagree with
/// history and the ledger), reads them
/// back in id order keeping each card's last record (as recovery replays them), writes those,
/// sorted by key, into a table file at a pace (`CHECKPOINT_BYTES_PER_SEC`), has RocksDB ingest it
/// into `cards`, and then records the history id it covers. Ingestion makes the file durable (the
/// file and RocksDB's manifest are synced) before the id is written, so whatever the id says is in
/// the table. A checkpoint lost in a crash only means a longer replay: the id is not synced here,
/// and leftover files are removed at open.
fn checkpoint_loop(
    db: &DB,
    dir: &Path,
    hurry: &AtomicBool,
    jobs: std::sync::mpsc::Receiver<CheckpointJob>,
    done: std::sync::mpsc::Sender<()>,
) {
    let cards_cf = db.cf_handle(CF_CARDS).expect("cards column family");
    let history_cf = db.cf_handle(CF_HISTORY).expect("history column family");
    let meta_cf = db.cf_handle(CF_META).expect("meta column family");
    // The writer drops each megabyte written from the page cache (which starts its writeback),
    // and the pace bounds what is dirty: rust-rocksdb's writer takes no `bytes_per_sync`.
    let file_opts = cf_options(CF_CARDS);
    let mut ingest = rocksdb::IngestExternalFileOptions::default();
    ingest.set_move_files(true);
    let mut latest: HashMap<CardKey, CardRecord, CardKeyState> = HashMap::default();
    // Only the keys are sorted: a second copy of a million records would double the peak.
    let mut keys: Vec<CardKey> = Vec::new();
    let mut value = Vec::new();
    for job in jobs {
        // Every entry of the job was written before it was sent, so this sync makes them all
        // durable: one more fdatasync per checkpoint, where waiting for the syncer could take a
        // whole interval in relaxed mode (and hold a clean stop that long).
        if let Err(e) = db.flush_wal(true) {
            fail("WAL sync", &e);
        }
        let mut pace = Pace { paced: !job.unpaced, hurry, started: Instant::now(), bytes: 0, looked_at: 0 };
        // Read once, newest first: a card's newest entry is the one the table keeps, so only that
        // one is decoded, and a card changed a thousand times since the last checkpoint costs
        // one decode, not a thousand. Not worth the block cache the payments' lookups use.
        let mut read = rocksdb::ReadOptions::default();
        read.fill_cache(false);
        read.set_iterate_lower_bound(records::history_key(job.from_txn_id));
        read.set_iterate_upper_bound(records::history_key(job.upto_txn_id.saturating_add(1)));
        for item in db.iterator_cf_opt(history_cf, read, IteratorMode::End) {
            let (k, v) = item.unwrap_or_else(|e| fail("checkpoint history read", &e));
            let card = records::history_card(&v).unwrap_or_else(|e| fail("history record decode", &e));
            if let std::collections::hash_map::Entry::Vacant(newest) = latest.entry(card) {
                let (_, rec) = records::decode_history(&k, &v).unwrap_or_else(|e| fail("history record decode", &e));
                newest.insert(rec);
            }
            pace.advance((k.len() + v.len()) as u64);
        }
        keys.clear();
        keys.extend(latest.keys().copied());
        keys.sort_unstable();
        let path = dir.join(format!("{:020}.sst", job.upto_txn_id));
        let (mut result, mut ingest_ms, cards) = (Ok(()), 0, keys.len());
        if !keys.is_empty() {
            let mut file = rocksdb::SstFileWriter::create(&file_opts);
            result = file.open(&path).and_then(|()| {
                for key in &keys {
                    value.clear();
                    records::encode_card(&mut value, &latest[key]);
                    file.put(key.0, &value)?;
                    pace.advance((key.0.len() + value.len()) as u64);
                }
                file.finish()
            });
            let ingest_started = Instant::now();
            result = result.and_then(|()| db.ingest_external_file_cf_opts(cards_cf, &ingest, vec![&path]));
            ingest_ms = ingest_started.elapsed().as_millis() as u64;
        }
        latest.clear();
        let result = result.and_then(|()| db.put_cf(meta_cf, CHECKPOINT_KEY, job.upto_txn_id.to_le_bytes()));
        // Moved into the database by ingestion; removed here if anything failed before that.
        let _ = std::fs::remove_file(&path);
        if let Err(e) = result {
            fail("checkpoint", &e);
        }
        tracing::info!(
            cards,
            upto_txn_id = job.upto_txn_id,
            secs = pace.started.elapsed().as_secs_f64(),
            ingest_ms,
            "checkpoint written"
        );
        if done.send(()).is_err() {
            return;
        }
    }
}

/// What the committer keeps running totals of, written to `meta` with the groups that change them.
struct Ledger {
    /// Per currency: (credits, debits) since the beginning.
    totals: BTreeMap<Currency, (i128, i128)>,
    hold_id_next: u64,
}

#[allow(clippy::too_many_arguments)]
fn commit_loop(
    db: &DB,
    pending: &Pending,
    written: &Written,
    durable: &Published,
    durability: Durability,
    ledger: Ledger,
    mut checkpoint: Checkpoint,
    metrics: &Metrics,
) {
    let cfs = CFS.map(|name| db.cf_handle(name).expect("column family"));
    // The syncer makes writes durable; a synced write here would serialise fsync with the next group.
    let wopts = WriteOptions::default();
    let Ledger { mut totals, mut hold_id_next } = ledger;
    let mut spare: Vec<Effects> = Vec::new();
    let mut sorted = SortedBatch::default();
    loop {
        let taken = {
            let mut s = pending.state.lock().expect("pending lock");
            while s.entries.is_empty() && !s.closing {
                match checkpoint.idle_wait() {
                    None => s = pending.wake.wait(s).expect("pending lock"),
                    Some(d) if d.is_zero() => break,
                    Some(d) => {
                        let (guard, timeout) = pending.wake.wait_timeout(s, d).expect("pending lock");
                        s = guard;
                        if timeout.timed_out() {
                            break;
                        }
                    }
                }
            }
            if s.entries.is_empty() {
                if s.closing {
                    drop(s);
                    // Everything is written: checkpoint it all, so a restart replays nothing.
                    checkpoint.finish();
                    return;
                }
                None
            } else {
                let g = s.open_group;
                s.open_group += 1;
                s.unannounced = false;
                // Ids are assigned under this lock as effects join, so the group holds exactly the
                // ids after the previous group's last, up to this.
                Some((std::mem::replace(&mut s.entries, std::mem::take(&mut spare)), g, s.txn_id, s.opened_at.take()))
            }
        };
        if let Some((mut group_entries, group, group_txn_id, opened_at)) = taken {
            if let Some(at) = opened_at {
                metrics.commit_wait_observe(CommitStage::Write, at.elapsed());
            }
            let decisions = group_entries.len();
            sorted.clear();
            let mut touched: Vec<Currency> = Vec::new();
            let mut hold_ids_used = false;
            for e in group_entries.drain(..) {
                if let Some(n) = e.hold_id_next {
                    hold_ids_used |= n > hold_id_next;
                    hold_id_next = hold_id_next.max(n);
                }
                if let Some((i, note)) = &e.note {
                    let id = e.changes[*i].txn.id;
                    sorted.put(CfIndex::Notes, &records::history_key(id), |b| records::encode_note(b, note));
                }
                for c in e.changes {
                    let t = &c.txn;
                    sorted.put(CfIndex::History, &records::history_key(t.id), |b| {
                        records::encode_history(b, t, &c.record)
                    });
                    checkpoint.written_txn_id = t.id;
                }
                if let Some((k, st)) = &e.settled {
                    sorted.put(CfIndex::Settled, &hashed_key(&k.0), |b| records::encode_settled(b, st));
                }
                if let Some((k, rec)) = &e.idem {
                    sorted.put(CfIndex::Idem, &hashed_key(&k.0), |b| records::encode_idem(b, rec));
                }
                for (i, a) in e.alerts.iter().enumerate() {
                    let id = e.alert_id + i as u64;
                    sorted.put(CfIndex::Alerts, &records::history_key(id), |b| records::encode_alert(b, a));
                }
                if let Some(k) = &e.invoice {
                    sorted.put(CfIndex::Invoices, &hashed_key(&k.0), |_| {});
                }
                if let Some((name, text)) = &e.program {
                    let key = [PROGRAM_KEY_PREFIX, name.as_bytes()].concat();
                    sorted.put(CfIndex::Meta, &key, |b| b.extend_from_slice(text.as_bytes()));
                }
                if let Some(l) = &e.ledger {
                    let t = totals.entry(l.currency).or_default();
                    t.0 += l.credit_minor as i128;
                    t.1 += l.debit_minor as i128;
                    if !touched.contains(&l.currency) {
                        touched.push(l.currency);
                    }
                }
            }
            for c in touched {
                let (credit, debit) = totals[&c];
                sorted.put(CfIndex::Meta, &records::totals_key(c), |b| {
                    b.extend_from_slice(&records::encode_totals(credit, debit))
                });
            }
            if hold_ids_used {
                sorted.put(CfIndex::Meta, HOLD_ID_KEY, |b| b.extend_from_slice(&hold_id_next.to_le_bytes()));
            }
            let batch = sorted.sorted_batch(&cfs);
            let bytes = batch.size_in_bytes();
            let started = Instant::now();
            if let Err(e) = db.write_opt(batch, &wopts) {
                fail("WAL write", &e);
            }
            metrics.wal_observe(decisions, bytes, started.elapsed());
            {
                let mut w = written.state.lock().expect("written lock");
                (w.group, w.txn_id) = (group, group_txn_id);
                w.unsynced_since.get_or_insert_with(Instant::now);
            }
            if durability == Durability::Sync {
                written.wake.notify_one();
            } else {
                // Relaxed (opt-in): acknowledged once written; the syncer catches up every interval.
                // The id waits for that sync: subscriptions serve only what is synced, in every
                // mode, so an id once sent never names a different event after a crash.
                durable.publish_group(group);
            }
            spare = group_entries;
        }
        checkpoint.step(false);
    }
}

/// Column families in `CFS` order; a sorted batch orders its entries by this, then by key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CfIndex {
    // No commit group writes cards (checkpoints are files), but the indices follow `CFS`.
    #[expect(dead_code, reason = "keeps the indices in CFS order")]
    Cards = 0,
    History = 1,
    Idem = 2,
    Invoices = 3,
    Meta = 4,
    Settled = 5,
    Notes = 6,
    Alerts = 7,
}

/// A commit group's writes, sorted by (column family, key) before they go into the `WriteBatch`.
/// RocksDB inserts a batch's entries in order; sorted, neighbouring inserts touch neighbouring
/// memory (measured: ~4% more redeems/s at 64×16). The sort is stable, so two writes of one key in
/// a group keep their order and the later one wins. The buffers are reused across groups.
#[derive(Default)]
struct SortedBatch {
    bytes: Vec<u8>,
    /// (column family, key range, value range) into `bytes`.
    entries: Vec<(CfIndex, std::ops::Range<usize>, std::ops::Range<usize>)>,
}

impl SortedBatch {
    fn clear(&mut self) {
        self.bytes.clear();
        self.entries.clear();
    }

    fn put(&mut self, cf: CfIndex, key: &[u8], encode_value: impl FnOnce(&mut Vec<u8>)) {
        let k = self.bytes.len();
        self.bytes.extend_from_slice(key);
        let v = self.bytes.len();
        encode_value(&mut self.bytes);
        self.entries.push((cf, k..v, v..self.bytes.len()));
    }

    fn sorted_batch(&mut self, cfs: &[&rocksdb::ColumnFamily; 8]) -> WriteBatch {
        let bytes = &self.bytes;
        self.entries.sort_by(|a, b| (a.0, &bytes[a.1.clone()]).cmp(&(b.0, &bytes[b.1.clone()])));
        let mut batch = WriteBatch::default();
        for (cf, k, v) in &self.entries {
            batch.put_cf(cfs[*cf as usize], &bytes[k.clone()], &bytes[v.clone()]);
        }
        batch
    }
}

/// Syncs the WAL and publishes what that made durable. In sync mode it runs whenever something is
/// written and not yet synced; in relaxed mode, every `interval_ms`.
fn sync_loop(db: &DB, written: &Written, durable: &Published, durability: Durability, metrics: &Metrics) {
    let mut synced = 0;
    loop {
        let target = {
            let mut s = written.state.lock().expect("written lock");
            match durability {
                Durability::Sync => {
                    while s.group <= synced && !s.closing {
                        s = written.wake.wait(s).expect("written lock");
                    }
                }
                // Not once closing: the last sync must not wait out a whole interval.
                Durability::Relaxed { interval_ms } if !s.closing => {
                    s = written.wake.wait_timeout(s, Duration::from_millis(interval_ms)).expect("written lock").0;
                }
                Durability::Relaxed { .. } => {}
            }
            if s.closing && s.group <= synced {
                return;
            }
            (s.group, s.txn_id, s.unsynced_since.take())
        };
        let (target, target_txn_id, unsynced_since) = target;
        if let Some(at) = unsynced_since {
            metrics.commit_wait_observe(CommitStage::Sync, at.elapsed());
        }
        let started = Instant::now();
        // Everything written before this call is in the WAL file; the fdatasync covers all of it.
        if let Err(e) = db.flush_wal(true) {
            fail("WAL sync", &e);
        }
        metrics.wal_fsync_observe(started.elapsed());
        // The id first: whoever sees a reply acknowledged then finds its event to subscribe to.
        durable.txn_id.send_replace(target_txn_id);
        if durability == Durability::Sync {
            durable.publish_group(target);
        }
        synced = target;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::CardChange;

    /// A chunk enters the commit pipeline only once the chunk before it is durable: its append
    /// returns no sooner. (Back to back, without that wait, the next append would return within
    /// microseconds, long before the previous group could be written and synced.)
    #[test]
    fn a_bulk_append_waits_until_the_bulk_append_before_it_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open_without_checkpoints(dir.path(), Arc::new(Metrics::new()));
        let durable = store.durable();
        let mut previous = None;
        for key in 1..=20u8 {
            let at = store.append(Effects { bulk: true, ..issue(CardKey([key; 32]), 100) });
            if let Some(previous) = previous {
                assert!(*durable.borrow() >= previous, "chunk {key} was appended before the one before it was durable");
            }
            previous = Some(at.group);
        }
        store.close();
    }

    /// A sync store whose checkpoint never comes due: only appends and a clean stop write.
    fn open_without_checkpoints(dir: &Path, metrics: Arc<Metrics>) -> (Store, Recovered) {
        Store::open(dir, Durability::Sync, Tuning::checkpoint_every(Duration::from_secs(3600)), metrics).unwrap()
    }

    fn issue(key: CardKey, balance_minor: i64) -> Effects {
        let record = CardRecord::plain_for_tests(balance_minor, 1_800_000_000_000);
        let txn = TxnRecord {
            id: 0,
            prev_id: 0,
            card: key,
            seq: 1,
            kind: TxnKind::Issue,
            amount_minor: balance_minor,
            balance_after_minor: balance_minor,
            at_ms: record.updated_ms,
            merchant: "test".into(),
        };
        let mut effects = Effects::default();
        effects.changes.push(CardChange { record, txn });
        effects
    }

    fn checkpoint_txn_id(store: &Store) -> Option<u64> {
        let v = store.get(CF_META, CHECKPOINT_KEY)?;
        Some(u64::from_le_bytes(v.as_ref().try_into().unwrap()))
    }

    /// The card table is durable once ingested, outside the WAL's order, so a checkpoint syncs the
    /// entries it covers itself. Relaxed mode with the syncer a minute away: checkpoints still
    /// happen (each after its own sync), a clean stop does not wait for the syncer, and the next
    /// open loads the card from the table and replays nothing.
    #[test]
    fn checkpoints_sync_what_they_cover_and_a_clean_stop_covers_all() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let relaxed = Durability::Relaxed { interval_ms: 60_000 };
        let every = Duration::from_millis(10);
        let (store, recovered) =
            Store::open(dir.path(), relaxed, Tuning::checkpoint_every(every), metrics.clone()).unwrap();
        assert!(recovered.cards.is_empty());
        let key = CardKey([7; 32]);
        let at = store.append(issue(key, 2_500));
        assert_eq!(at.first_txn_id, 1);
        let started = Instant::now();
        while checkpoint_txn_id(&store) != Some(1) {
            assert!(started.elapsed() < Duration::from_secs(10), "no checkpoint, though one is due every 10 ms");
            std::thread::sleep(Duration::from_millis(10));
        }
        store.append(issue(CardKey([8; 32]), 700));
        store.close();
        assert!(started.elapsed() < Duration::from_secs(10), "a clean stop waited for the syncer");
        assert_eq!(checkpoint_txn_id(&store), Some(2), "a clean stop checkpoints every entry");
        drop(store);
        let (store, recovered) =
            Store::open(dir.path(), Durability::Sync, Tuning::checkpoint_every(every), metrics).unwrap();
        assert_eq!(recovered.replayed, 0);
        let mut cards: Vec<_> = recovered.cards.iter().map(|(k, r)| (*k, r.balance_minor, r.last_txn_id)).collect();
        cards.sort_by_key(|c| c.2);
        assert_eq!(cards, [(key, 2_500, 1), (CardKey([8; 32]), 700, 2)]);
        store.close();
    }

    /// The table-write limit reaches RocksDB (its options log names the limiter), and 0 leaves
    /// RocksDB without one. So do the sizes that bound each writeback a table's writer starts.
    #[test]
    fn the_table_write_limit_is_rocksdbs_rate_limiter() {
        for (bytes_per_sec, limited) in [(TABLE_WRITE_BYTES_PER_SEC, true), (0, false)] {
            let dir = tempfile::tempdir().unwrap();
            let tuning = Tuning {
                table_write_bytes_per_sec: bytes_per_sec,
                ..Tuning::checkpoint_every(Duration::from_secs(3600))
            };
            let (store, _) = Store::open(dir.path(), Durability::Sync, tuning, Arc::new(Metrics::new())).unwrap();
            store.close();
            let log = std::fs::read_to_string(dir.path().join("db").join("LOG")).unwrap();
            let line = log.lines().find(|l| l.contains("Options.rate_limiter:")).expect("options logged");
            assert_eq!(!line.ends_with("(nil)"), limited, "{bytes_per_sec} B/s: {line}");
            assert!(log.contains(&format!("Options.bytes_per_sync: {TABLE_SYNC_BYTES}")), "bytes_per_sync");
            let buffer = format!("Options.writable_file_max_buffer_size: {FILE_BUFFER_BYTES}");
            assert!(log.contains(&buffer), "writable_file_max_buffer_size");
        }
    }

    /// A card changed several times between two checkpoints is checkpointed as its newest entry
    /// left it (the checkpoint reads history newest first and decodes one entry per card).
    #[test]
    fn a_checkpoint_keeps_each_cards_newest_record() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (store, _) = open_without_checkpoints(dir.path(), metrics.clone());
        let (a, b) = (CardKey([1; 32]), CardKey([2; 32]));
        for (card, balance_minor) in [(a, 100), (b, 5), (a, 200), (a, 300), (b, 6)] {
            store.append(issue(card, balance_minor));
        }
        // A clean stop checkpoints every entry; the next open then replays none.
        store.close();
        drop(store);
        let (store, recovered) = open_without_checkpoints(dir.path(), metrics);
        assert_eq!(recovered.replayed, 0);
        let mut cards: Vec<_> = recovered.cards.iter().map(|(k, r)| (k.0[0], r.balance_minor, r.last_txn_id)).collect();
        cards.sort();
        assert_eq!(cards, [(1, 300, 4), (2, 6, 5)]);
        store.close();
    }

    /// Batch items are written when the batch asks, but a request that comes alone meanwhile is
    /// not held back by them: its append wakes the committer for everything pending.
    #[test]
    fn a_lone_append_after_unannounced_batch_items_is_written_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        // No checkpoint is due, so only an append or the batch wakes the committer.
        let (store, _) = open_without_checkpoints(dir.path(), metrics);
        let durable = store.durable();
        let wait_durable = |group: u64, what: &str| {
            let started = Instant::now();
            while *durable.borrow() < group {
                assert!(started.elapsed() < Duration::from_secs(10), "{what} was never written");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let batched = |key: u8| Effects { batched: true, ..issue(CardKey([key; 32]), 100) };
        // Once this is written, the committer sleeps until an append or the batch wakes it.
        let warm = store.append(issue(CardKey([9; 32]), 100));
        wait_durable(warm.group, "the first append");
        std::thread::sleep(Duration::from_millis(100));
        let first = store.append(batched(1));
        let lone = store.append(issue(CardKey([2; 32]), 100));
        assert_eq!(first.group, lone.group, "the lone append joins the open group");
        wait_durable(lone.group, "a lone append behind a batch item");
        let item = store.append(batched(3));
        store.write_batched();
        wait_durable(item.group, "a batch item after write_batched");
        store.close();
    }
}
