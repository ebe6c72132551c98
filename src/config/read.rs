//! Reading the files a configuration names, bounded in size and time.
//!
//! The configuration file and every `password_file` are read at start and
//! on each reload, so a bad path must fail at once rather than hang or fill
//! memory: only regular files are read (a FIFO with no writer blocks an
//! `open` forever; `/dev/zero` never ends), and only up to a size cap.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::OFlag;

/// The largest configuration file read: far above any real one (4,096
/// backends take about 150 KB), and small enough that a hostile file is
/// parsed in well under a second.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

/// The largest `password_file` read.
pub const MAX_SECRET_BYTES: u64 = 64 << 10;

/// The text of the regular file at `path`, if it holds at most `limit` bytes
/// of UTF-8.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> io::Result<String> {
    // Refuse what is not a regular file before opening it: opening can
    // itself have effects (a FIFO waits for a writer, a tape rewinds).
    regular(&std::fs::metadata(path)?)?;
    // Should the path have been swapped for a FIFO since, a non-blocking
    // open still returns at once, and the check below refuses it.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NONBLOCK | OFlag::O_NOCTTY).bits())
        .open(path)?;
    let meta = file.metadata()?;
    regular(&meta)?;
    if meta.len() > limit {
        return Err(too_large(limit, format!("{} bytes", meta.len())));
    }
    read_up_to(file, meta.len(), limit)
}

/// Read at most `limit` bytes (a file may grow after it was measured).
fn read_up_to(file: File, size: u64, limit: u64) -> io::Result<String> {
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(limit, "it grew while being read".to_string()));
    }
    String::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

fn regular(meta: &Metadata) -> io::Result<()> {
    let t = meta.file_type();
    let what = if t.is_file() {
        return Ok(());
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown type"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("not a regular file ({what})"),
    ))
}

fn too_large(limit: u64, size: String) -> io::Error {
    let limit = match limit {
        l if l >= 1 << 20 && l % (1 << 20) == 0 => format!("{} MiB", l >> 20),
        l if l >= 1 << 10 && l % (1 << 10) == 0 => format!("{} KiB", l >> 10),
        l => format!("{l} bytes"),
    };
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("the file is larger than the limit of {limit} ({size})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_small_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "hello\n").unwrap();
        assert_eq!(read_bounded(&f, 6).unwrap(), "hello\n");
        let e = read_bounded(&f, 5).unwrap_err().to_string();
        assert_eq!(e, "the file is larger than the limit of 5 bytes (6 bytes)");
        let e = read_bounded(dir.path(), 100).unwrap_err().to_string();
        assert_eq!(e, "not a regular file (a directory)");
        let e = read_bounded(Path::new("/dev/null"), 100)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "not a regular file (a character device)");
        std::fs::write(&f, [0xff, 0xfe]).unwrap();
        assert_eq!(
            read_bounded(&f, 100).unwrap_err().to_string(),
            "not UTF-8 text"
        );
    }

    #[test]
    fn a_file_that_grows_after_it_was_measured_is_cut_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "0123456789").unwrap();
        let file = File::open(&f).unwrap();
        // Measured at 4 bytes, holding 10: the read stops after limit + 1.
        let e = read_up_to(file, 4, 8).unwrap_err().to_string();
        assert_eq!(
            e,
            "the file is larger than the limit of 8 bytes (it grew while being read)"
        );
    }
}
