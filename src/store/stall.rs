//! Write-stall time, which RocksDB keeps only inside the text of its `rocksdb.dbstats` property.
//!
//! The stall gauges are read at scrape time, so a stall that starts and ends between two scrapes
//! (50 ms to 2 s ones have been measured here) is never seen by them. RocksDB also adds up the time
//! writes waited, delayed or stopped (the same figure as its `rocksdb.stall.micros` ticker), and
//! prints the sum in that property with no statistics object needed: statistics would cost every
//! write and read some CPU, one text property per scrape costs nothing on the hot path.

use super::Store;

impl Store {
    /// Seconds writes have waited on RocksDB's write controller (delayed or stopped) since the
    /// database was opened; None when the property cannot be read or its format is not known.
    /// A wait is added when it ends, so a stop in progress is seen by `write_stopped` alone.
    /// Reading the property also restarts the "interval" figures RocksDB prints with it, which only
    /// its LOG file shows.
    pub fn write_stall_seconds(&self) -> Option<f64> {
        let text = self.db.property_value("rocksdb.dbstats").ok().flatten()?;
        cumulative_stall_seconds(&text)
    }
}

/// The cumulative stall of a `rocksdb.dbstats` text, whose line reads
/// `Cumulative stall: 00:00:1.234 H:M:S, 0.1 percent` (hours, minutes, seconds to the millisecond).
fn cumulative_stall_seconds(dbstats: &str) -> Option<f64> {
    let line = dbstats.lines().find_map(|l| l.strip_prefix("Cumulative stall: "))?;
    let hms = line.strip_suffix(" percent")?.split_once(" H:M:S")?.0;
    let mut parts = hms.split(':').map(str::parse::<f64>);
    let (Some(Ok(h)), Some(Ok(m)), Some(Ok(s)), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    Some(h * 3600.0 + m * 60.0 + s)
}

#[cfg(test)]
mod tests {
    use super::cumulative_stall_seconds;
    use crate::metrics::Metrics;
    use crate::store::{Durability, Store};
    use std::sync::Arc;
    use std::time::Duration;

    /// The RocksDB this crate is built with still prints the line: a format change would leave the
    /// counter silently at 0.
    #[test]
    fn a_fresh_store_has_stalled_for_zero_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let every = Duration::from_secs(60);
        let (store, _) = Store::open(
            dir.path(),
            Durability::Sync,
            crate::store::Tuning::checkpoint_every(every),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert_eq!(store.write_stall_seconds(), Some(0.0));
        store.close();
    }

    #[test]
    fn the_cumulative_stall_is_read_from_dbstats_text() {
        let text = "\n** DB Stats **\nUptime(secs): 7.0 total, 7.0 interval\n\
            Cumulative writes: 12 writes, 40 keys, 12 commit groups, 1.0 writes per commit group, ingest: 0.00 GB, 0.00 MB/s\n\
            Cumulative WAL: 12 writes, 12 syncs, 1.00 writes per sync, written: 0.00 GB, 0.00 MB/s\n\
            Cumulative stall: 01:02:3.250 H:M:S, 0.1 percent\n\
            Interval stall: 00:00:0.000 H:M:S, 0.0 percent\n";
        assert_eq!(cumulative_stall_seconds(text), Some(3600.0 + 120.0 + 3.25));
        assert_eq!(cumulative_stall_seconds("Cumulative stall: 00:00:0.000 H:M:S, 0.0 percent\n"), Some(0.0));
        assert_eq!(cumulative_stall_seconds("Interval stall: 00:00:1.000 H:M:S, 0.0 percent\n"), None);
        assert_eq!(cumulative_stall_seconds("Cumulative stall: 1.000 ms, 0.0 percent\n"), None);
    }
}
