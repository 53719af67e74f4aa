//! PostgreSQL's WAL archiver as `pg_stat_archiver` reports it: whether the WAL that the
//! backups need for point-in-time recovery is leaving the server (docs/backups.md). Read
//! every few seconds by `crate::archiving`; nothing here is on a request's path.
//!
//! Everything is read in one statement that needs no privilege beyond connecting:
//! `pg_stat_archiver`, `pg_settings` and `pg_current_wal_lsn()` are open to every role, so
//! the service's runtime role does not need `pg_monitor`. (Counting the `.ready` files of
//! `pg_wal/archive_status` would be more direct, but `pg_ls_archive_statusdir()` needs it.)

use super::{Pool, Sql};
use crate::error::Error;

/// One reading of the archiver. Ages are measured on PostgreSQL's clock, so the service's own
/// clock does not matter.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiverStats {
    /// `archive_mode`: `off`, `on` or `always`.
    pub mode: String,
    /// WAL files archived since the statistics were reset (a counter that only grows).
    pub archived_count: i64,
    /// Failed attempts to archive (each retry counts), likewise.
    pub failed_count: i64,
    pub last_archived_wal: Option<String>,
    /// Seconds since the last file was archived.
    pub last_archived_age: Option<f64>,
    pub last_failed_wal: Option<String>,
    /// Seconds since the last failed attempt.
    pub last_failed_age: Option<f64>,
    /// Where WAL is written now; `None` on a server in recovery (a standby does not archive).
    pub current_lsn: Option<u64>,
    /// `wal_segment_size` in bytes, to turn a segment's file name into a position.
    pub segment_size: u64,
}

impl ArchiverStats {
    /// Whether the last attempt failed: a failure newer than the last success (or a failure
    /// and never a success).
    pub fn failing(&self) -> bool {
        match (self.last_failed_age, self.last_archived_age) {
            (Some(failed), Some(archived)) => failed < archived,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    /// The position where the last archived WAL segment ends, if the last file archived was a
    /// segment (it may also be a timeline history file or a backup label).
    pub fn archived_up_to(&self) -> Option<u64> {
        self.last_archived_wal.as_deref().and_then(|name| segment_end(name, self.segment_size))
    }
}

/// The end position of WAL segment `name` (`TTTTTTTTLLLLLLLLSSSSSSSS`, 24 hex digits: timeline,
/// then the segment number split at 4 GiB), or `None` for any other file name.
pub fn segment_end(name: &str, segment_size: u64) -> Option<u64> {
    if name.len() != 24 || !name.bytes().all(|b| b.is_ascii_hexdigit()) || segment_size == 0 {
        return None;
    }
    let high = u64::from_str_radix(&name[8..16], 16).ok()?;
    let low = u64::from_str_radix(&name[16..24], 16).ok()?;
    let segments_per_high = 0x1_0000_0000 / segment_size;
    Some((high * segments_per_high + low + 1) * segment_size)
}

/// A position as PostgreSQL writes it, `16/B374D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

/// Reads no table of the application and locks nothing.
const ARCHIVER: Sql = Sql {
    params: &[],
    text: "
    SELECT current_setting('archive_mode'),
           a.archived_count, a.failed_count,
           a.last_archived_wal, extract(epoch FROM now() - a.last_archived_time)::float8,
           a.last_failed_wal, extract(epoch FROM now() - a.last_failed_time)::float8,
           CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
           (SELECT setting::int8 FROM pg_settings WHERE name = 'wal_segment_size')
    FROM pg_stat_archiver a",
};

/// One reading, on a pooled connection (of the primary, when `DATABASE_URL` lists several).
pub async fn read(pool: &Pool) -> Result<ArchiverStats, Error> {
    let rows = pool.get().await?.query(&ARCHIVER, &[]).await?;
    let row = rows.first().ok_or_else(|| Error::Internal("pg_stat_archiver returned no row".to_owned()))?;
    let current_lsn: Option<String> = row.get(7);
    Ok(ArchiverStats {
        mode: row.get(0),
        archived_count: row.get(1),
        failed_count: row.get(2),
        last_archived_wal: row.get(3),
        last_archived_age: row.get(4),
        last_failed_wal: row.get(5),
        last_failed_age: row.get(6),
        current_lsn: current_lsn.as_deref().and_then(parse_lsn),
        segment_size: row.get::<_, i64>(8).try_into().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB_16: u64 = 16 * 1024 * 1024;

    /// Segment 5 of the first 4 GiB ends where segment 6 starts; the timeline does not count.
    #[test]
    fn a_segment_name_gives_where_it_ends() {
        assert_eq!(segment_end("000000010000000000000005", MIB_16), Some(6 * MIB_16));
        assert_eq!(segment_end("000000020000000000000005", MIB_16), Some(6 * MIB_16));
        // High part 1: 256 segments of 16 MiB per 4 GiB before it.
        assert_eq!(segment_end("0000000100000001000000FF", MIB_16), Some((256 + 255 + 1) * MIB_16));
    }

    /// Backup labels, history files and partial segments are not segments.
    #[test]
    fn other_archived_files_give_no_position() {
        for name in ["000000010000000000000002.00000028.backup", "00000002.history", "000000010000000000000007.partial"]
        {
            assert_eq!(segment_end(name, MIB_16), None, "{name}");
        }
    }

    #[test]
    fn positions_parse_as_postgresql_writes_them() {
        assert_eq!(parse_lsn("0/3000050"), Some(0x300_0050));
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("nonsense"), None);
    }

    #[test]
    fn failing_means_the_last_attempt_failed() {
        let stats = |failed: Option<f64>, archived: Option<f64>| ArchiverStats {
            mode: "on".into(),
            archived_count: 0,
            failed_count: 0,
            last_archived_wal: None,
            last_archived_age: archived,
            last_failed_wal: None,
            last_failed_age: failed,
            current_lsn: None,
            segment_size: MIB_16,
        };
        assert!(stats(Some(1.0), Some(30.0)).failing());
        assert!(stats(Some(1.0), None).failing());
        assert!(!stats(Some(30.0), Some(1.0)).failing());
        assert!(!stats(None, Some(1.0)).failing());
        assert!(!stats(None, None).failing());
    }
}
