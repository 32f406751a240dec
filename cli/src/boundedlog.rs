//! A log file that never grows past its bound: when a write would take it past `max` bytes, the
//! newest half is moved to the front and the rest cut off, so the file always ends with the
//! latest output (amortised, each byte is copied at most once more).
//!
//! The compaction works in place on the one descriptor (pread, pwrite, ftruncate): the thread
//! that writes (a vCPU thread, for the serial console) needs no other system call, and no
//! directory write.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The console log's default bound.
pub const DEFAULT_CONSOLE_MAX: u64 = 4 << 20;
/// The smallest bound accepted (smaller values are raised to it).
pub const MIN_MAX: u64 = 4096;

pub struct BoundedLog {
    file: File,
    len: u64,
    max: u64,
}

impl BoundedLog {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path, max: u64) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            file,
            len: 0,
            max: max.max(MIN_MAX),
        })
    }

    /// Keeps the newest `max / 2` bytes (cut at a line start when there is one).
    fn compact(&mut self) -> std::io::Result<()> {
        let keep = (self.max / 2).min(self.len);
        let mut tail = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut tail, self.len - keep)?;
        let start = tail
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + 1)
            .filter(|&i| i < tail.len())
            .unwrap_or(0);
        let tail = &tail[start..];
        self.file.write_all_at(tail, 0)?;
        self.file.set_len(tail.len() as u64)?;
        self.len = tail.len() as u64;
        Ok(())
    }
}

impl Write for BoundedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Anything beyond half the bound in one write: only its end can be kept anyway.
        let half = (self.max / 2) as usize;
        let data = if buf.len() > half {
            &buf[buf.len() - half..]
        } else {
            buf
        };
        if self.len + data.len() as u64 > self.max {
            self.compact()?;
        }
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_bound_and_keeps_the_latest_lines() {
        let dir = std::env::temp_dir().join(format!("boundedlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("console.log");
        let mut log = BoundedLog::create(&p, 8192).unwrap();
        for i in 0..10_000 {
            writeln!(log, "line {i}").unwrap();
            assert!(std::fs::metadata(&p).unwrap().len() <= 8192);
        }
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.ends_with("line 9999\n"),
            "{}",
            &text[text.len() - 40..]
        );
        // Whole lines only, in order.
        let nums: Vec<u32> = text
            .lines()
            .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(nums.len() > 300, "kept {} lines", nums.len());
        // One huge write keeps its end.
        log.write_all(&vec![b'x'; 100_000]).unwrap();
        assert!(std::fs::metadata(&p).unwrap().len() <= 8192);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
