//! Free space on the filesystem that will hold a folder, sizes as people read them, and the
//! warning both commands print when a run will not fit.

use std::io;
use std::path::{Path, PathBuf};

/// Free bytes for an unprivileged user on the filesystem holding `dir` (or its nearest
/// existing ancestor), and that filesystem's device id.
pub fn free_space(dir: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() || probe.as_os_str().is_empty() {
            probe = PathBuf::from(".");
            break;
        }
    }
    let dev = std::fs::metadata(&probe)?.dev();
    let c_path = std::ffi::CString::new(probe.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `st` points to writable memory of
    // the right type; statvfs only writes into it.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    let free = st.f_bavail as u64 * st.f_frsize as u64;
    Ok((free, dev))
}

/// The warning for a run that needs `needed` more bytes in `dir` than its filesystem has free
/// (`what` says what the bytes are for), or `None` when it fits or the disk cannot be asked.
pub fn shortfall(dir: &Path, needed: u64, what: &str, hint: &str) -> Option<String> {
    let (free, _) = free_space(dir).ok()?;
    (needed > free).then(|| {
        format!(
            "not enough free disk space in {}: {what} need {}, {} are free; hint: {hint}",
            dir.display(),
            human_bytes(needed),
            human_bytes(free)
        )
    })
}

/// Whether `e` (or an error it wraps) says the disk or the quota is full, or the file grew over
/// the process's size limit: the errors for which the space a write needs is worth reporting.
pub fn is_out_of_space(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

/// `1.97 GB`-style sizes (decimal units, as download speeds are quoted).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(2_150_000_000), "2.15 GB");
    }

    #[test]
    fn shortfall_names_the_folder_and_both_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (free, _) = free_space(dir.path()).unwrap();
        assert!(shortfall(dir.path(), 1, "the shards", "x").is_none());
        let w = shortfall(
            &dir.path().join("not/yet"),
            free + 1_000_000_000,
            "the shards",
            "x",
        )
        .unwrap();
        assert!(
            w.contains(&dir.path().join("not/yet").display().to_string())
                && w.contains(&human_bytes(free))
                && w.contains("the shards need")
                && w.ends_with("hint: x"),
            "{w}"
        );
    }
}
