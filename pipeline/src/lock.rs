//! One writer per folder: an exclusive advisory lock (`flock(2)`) on `DIR/.lock`, held for the
//! whole of a command that writes into `DIR` (`pipeline prepare --out`, a `trainer run` folder).
//!
//! Two processes writing one folder corrupt it (each renames the other's temporary files away),
//! so the second one must fail at once and say who holds the folder. The lock is the `flock` on
//! the open file, not the file: the kernel releases it when the holder exits, also on `kill -9`,
//! so the file left behind by a dead process never blocks anyone. The file carries one line
//! describing its holder (pid, host, start time, command line) for the error of the process that
//! finds the folder taken; a holder clears it when it finishes normally.
//!
//! The file is never removed or replaced: a process that removed it while another one had it open
//! but not yet locked would let a third create a new file and lock that one, and two processes
//! would hold "the" lock at once. For the same reason the holder line is written in place rather
//! than through a temporary file and a rename, which would swap the locked inode.
//!
//! `flock` works on local filesystems and on NFS (Linux emulates it with POSIX byte-range locks
//! there); a filesystem without locking support fails with an error naming the file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the lock file inside a locked folder.
pub const LOCK_FILE: &str = ".lock";

/// Why a folder could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another live process holds the folder.
    #[error(
        "{dir}: another process is writing to this folder ({holder}); hint: wait for it to finish or stop it, {hint}"
    )]
    Held {
        dir: PathBuf,
        /// The holder's line from the lock file, or a note that it has not written one yet.
        holder: String,
        hint: String,
    },
    #[error(
        "cannot lock {path}: {source}; hint: the folder must be writable, on a filesystem with file locking"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An exclusive lock on a folder, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    /// Locks `dir` (which must exist) for this process, without waiting. `hint` completes the
    /// error when another process holds it: what else the user can do (e.g. "or choose another
    /// --out").
    pub fn acquire(dir: &Path, hint: &str) -> Result<FolderLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io_err = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err)?;
        // SAFETY: flock on a file descriptor this function owns and keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(io_err(err));
            }
            let mut line = String::new();
            // The holder may be between taking the lock and writing its line.
            let _ = file.read_to_string(&mut line);
            let line = line.trim();
            let holder = if line.is_empty() {
                "it has just started and not yet written its pid".to_owned()
            } else {
                line.to_owned()
            };
            return Err(LockError::Held {
                dir: dir.to_owned(),
                holder,
                hint: hint.to_owned(),
            });
        }
        let line = format!("{}\n", holder_line());
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(line.as_bytes()))
            .and_then(|()| file.sync_data())
            .map_err(io_err)?;
        Ok(FolderLock { file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // A finished holder leaves no description behind; closing the file releases the lock.
        let _ = self.file.set_len(0);
    }
}

/// `pid 1234 on host gpu-7, started 2026-01-31T12:00:00Z: pipeline prepare --out shards`.
fn holder_line() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let args: Vec<String> = std::env::args().collect();
    format!(
        "pid {} on host {}, started {}: {}",
        std::process::id(),
        hostname(),
        utc_timestamp(now),
        args.join(" ")
    )
}

/// This machine's host name, or `unknown`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length, which is what we pass.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if rc != 0 || end == 0 {
        return "unknown".into();
    }
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// `2025-12-20T12:00:00Z` from a unix time (civil-from-days, H. Hinnant's algorithm).
pub fn utc_timestamp(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_a_dead_holder_never_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let first = FolderLock::acquire(dir.path(), "or choose another --out").unwrap();
        let line = std::fs::read_to_string(first.path()).unwrap();
        assert!(
            line.starts_with(&format!("pid {} on host ", std::process::id())),
            "{line}"
        );
        assert!(line.contains(", started 20"), "{line}");

        // flock locks belong to the open file, so a second open in this process conflicts like
        // another process would.
        let err = FolderLock::acquire(dir.path(), "or choose another --out").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id()))
                && msg.contains("or choose another --out")
                && !msg.contains('\n'),
            "{msg}"
        );

        drop(first);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(),
            ""
        );
        // A lock file describing a holder that is gone (written by a process killed with -9)
        // is just a file: the lock itself went with the process.
        std::fs::write(
            dir.path().join(LOCK_FILE),
            "pid 999999 on host elsewhere, started 2020-01-01T00:00:00Z: pipeline prepare\n",
        )
        .unwrap();
        let again = FolderLock::acquire(dir.path(), "").unwrap();
        let line = std::fs::read_to_string(again.path()).unwrap();
        assert!(
            line.starts_with(&format!("pid {} ", std::process::id())),
            "{line}"
        );
    }

    #[test]
    fn timestamps() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(1_703_097_600), "2023-12-20T18:40:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
    }
}
