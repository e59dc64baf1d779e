//! A SQLite database's reserve: a small file of real (not sparse) bytes kept beside the
//! database (`NAME.reserve`), given up when the disk is full so that a run can still be
//! marked failed instead of being left `running` ([`crate::Store::mark_incomplete`]).
//!
//! On a full disk even a one-row update needs room (its WAL frames); which writes still
//! fit depends on where SQLite's write-ahead log happened to be. Freeing the reserve makes
//! that last update certain. The reserve is written again the next time a writer opens the
//! database (after replaying what was spooled) with room to spare.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The reserve's size: room for 15 WAL frames of 4 KiB, several times what marking a
/// sweep's runs failed writes.
pub const SIZE: u64 = 64 << 10;

/// Where the reserve of the database at `db` lives.
pub fn path(db: &Path) -> PathBuf {
    db.with_extension("reserve")
}

/// Makes sure the reserve exists at its full size; best effort (a disk without room for it
/// keeps none, and the database works as before).
pub fn keep(db: &Path) {
    let p = path(db);
    if std::fs::metadata(&p).is_ok_and(|m| m.len() >= SIZE) {
        return;
    }
    let written = std::fs::File::create(&p).and_then(|mut f| {
        // Zeros written, not `set_len`: a sparse file would hold no blocks to give back.
        f.write_all(&vec![0u8; SIZE as usize])?;
        f.sync_all()
    });
    if let Err(e) = written {
        tracing::debug!("no room for the database's reserve {}: {e}", p.display());
        let _ = std::fs::remove_file(&p);
    }
}

/// Gives up the reserve; whether there was one to give up.
pub fn release(db: &Path) -> bool {
    std::fs::remove_file(path(db)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_kept_at_full_size_and_released_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("r.sqlite");
        keep(&db);
        assert_eq!(std::fs::metadata(path(&db)).unwrap().len(), SIZE);
        // A truncated reserve (a crash while writing it) is written again.
        std::fs::write(path(&db), b"x").unwrap();
        keep(&db);
        assert_eq!(std::fs::metadata(path(&db)).unwrap().len(), SIZE);
        assert!(release(&db));
        assert!(!release(&db), "nothing left to release");
        assert!(!path(&db).exists());
    }
}
