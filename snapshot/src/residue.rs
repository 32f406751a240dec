//! Secret residue: a host-side scan of a capture's files for the secrets the host delivered.
//!
//! Defense in depth behind the guest agent (which zeroes its buffers) and the guest kernel (which
//! zeroes freed memory): before a snapshot becomes visible, every file it holds is searched for
//! each delivered secret, raw and in the encodings a program would plausibly hold it in: hex
//! (lower and upper case) and base64 (standard and URL-safe alphabets, at each of the three byte
//! alignments a value can have inside a longer base64 text, so only the characters that do not
//! depend on the neighbouring bytes). The result names secrets and counts pages; it never holds a
//! value.
//!
//! One Aho-Corasick automaton searches for every pattern of every secret in one pass. Two ways in:
//!
//! * [`StreamScan`]: data fed in file order as a capture writes it (guest memory is scanned from
//!   the capture's own chunks, in a thread beside the writer, instead of written and read back).
//!   It keeps the last `longest pattern - 1` bytes of what it was fed, so a match across two
//!   contiguous feeds (a chunk or page boundary) is still found, once.
//! * [`Scanner::scan_file`]: a file already on disk (the rootfs copy). Holes of a sparse file are
//!   never read, and the file is cut into chunks that the machine's threads scan in parallel (a
//!   chunk reads a little past its end, so a match across a chunk boundary is still found, and
//!   counted only by the chunk it starts in).
//!
//! Either way all-zero pages are skipped, a prefilter of sampled 4-byte grams (`GramFilter`)
//! lets the automaton search only around places a pattern could be, and a page is counted once
//! per secret however many matches start in it.
//!
//! Bounded: at most [`MAX_SECRETS`] secrets (more are reported as not scanned), and patterns come
//! from at most the first [`WINDOW`] bytes of a value (any full copy contains them). Values
//! shorter than [`MIN_LEN`] bytes are not scanned (they would match by chance) and are reported
//! as such. Trailing whitespace (the newline of `echo token > file`) is not part of the value
//! searched for, since programs commonly strip it.
//!
//! A match that spans an all-zero page is not found: only a value with 4 KiB of zeros could.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// Most secrets one scan searches for.
pub const MAX_SECRETS: usize = 128;
/// Patterns are derived from at most this many leading bytes of a value.
pub const WINDOW: usize = 256;
/// Values shorter than this (after trimming trailing whitespace) are not searched for.
pub const MIN_LEN: usize = 8;
/// Pages are counted in units of this many bytes.
pub const PAGE: u64 = 4096;
/// Bytes of file one thread scans at a time.
const CHUNK: u64 = 4 << 20;
/// Longest pattern: hex of a full window.
pub const MAX_PATTERN: usize = 2 * WINDOW;

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Why a scan could not be done.
#[derive(Debug, thiserror::Error)]
pub enum ResidueError {
    #[error("cannot build the secret scanner: {0}")]
    Build(#[from] aho_corasick::BuildError),
    #[error("cannot scan {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secret scan's thread panicked")]
    Panicked,
}

/// One secret to search for: its name and value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretValue {
    pub name: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SecretValue({}, <{} bytes>)",
            self.name,
            self.value.len()
        )
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        // The host's copy of a secret need not outlive the scan either.
        self.value.zeroize();
    }
}

impl SecretValue {
    /// The bytes patterns are made from: trailing whitespace trimmed, at most [`WINDOW`] bytes.
    fn window(&self) -> &[u8] {
        let end = self
            .value
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        &self.value[..end.min(WINDOW)]
    }
}

/// What a scan found, by secret name. Never holds a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretScan {
    /// Names searched for.
    pub scanned: Vec<String>,
    /// Secrets found, with the pages (4 KiB) that hold them.
    #[serde(default)]
    pub found: Vec<Residue>,
    /// Names not searched for, and why.
    #[serde(default)]
    pub skipped: Vec<Skipped>,
    /// Bytes read and searched (holes and zero pages excluded).
    #[serde(default)]
    pub bytes_scanned: u64,
    /// How long the scan took, its own time: a capture scans guest memory in a thread beside
    /// the writer, so it is not all added to the capture's.
    #[serde(default)]
    pub millis: u64,
}

impl SecretScan {
    /// Whether any secret was found.
    pub fn has_residue(&self) -> bool {
        !self.found.is_empty()
    }

    /// `name (N pages in file, ...)`, comma separated: for messages.
    pub fn summary(&self) -> String {
        self.found
            .iter()
            .map(|r| {
                let files: Vec<String> = r
                    .files
                    .iter()
                    .map(|f| format!("{} in {}", f.pages, f.file))
                    .collect();
                format!("{} ({} pages: {})", r.name, r.pages, files.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// One secret found in a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Residue {
    pub name: String,
    /// Pages holding it, over all files.
    pub pages: u64,
    pub files: Vec<FilePages>,
}

/// Pages of one file that hold a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePages {
    pub file: String,
    pub pages: u64,
}

/// A secret not searched for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// The automaton for a set of secrets, built once and used for every file of a capture.
pub struct Scanner {
    names: Vec<String>,
    skipped: Vec<Skipped>,
    /// Pattern index to the secrets it stands for (identical patterns are merged).
    owners: Vec<Vec<usize>>,
    automaton: Option<AhoCorasick>,
    longest: usize,
    filter: GramFilter,
}

/// Bytes in one sampled gram of [`GramFilter`].
const GRAM: usize = 4;

/// A prefilter in front of the automaton, which alone searches a few hundred MB/s: the set of
/// every 4-byte gram of every pattern, as a bitset indexed by a hash of the gram. An occurrence
/// of a pattern of length `L >= shortest` covers `L - 3` gram positions, so it holds a gram that
/// starts at a multiple of `stride = shortest - 3`: only grams at those positions are looked
/// up, and the automaton searches only around the ones found in the set. Exact: a match is
/// missed only if none of its sampled grams is in the set, which cannot be.
struct GramFilter {
    /// 0: no filter (a pattern shorter than a gram), search everything.
    stride: usize,
    bits: Vec<u64>,
    shift: u32,
}

impl GramFilter {
    fn new(patterns: &[Vec<u8>]) -> Self {
        let shortest = patterns.iter().map(Vec::len).min().unwrap_or(0);
        if shortest < GRAM {
            return Self {
                stride: 0,
                bits: Vec::new(),
                shift: 0,
            };
        }
        let grams: usize = patterns.iter().map(|p| p.len() + 1 - GRAM).sum();
        // About 32 bits per gram (few false candidates), between 4 KiB and 1 MiB.
        let log2 = (grams * 32)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(15, 23);
        let mut filter = Self {
            stride: shortest + 1 - GRAM,
            bits: vec![0; 1 << (log2 - 6)],
            shift: 32 - log2,
        };
        for p in patterns {
            for g in p.windows(GRAM) {
                let i = filter.index(g);
                filter.bits[i / 64] |= 1 << (i % 64);
            }
        }
        filter
    }

    fn index(&self, gram: &[u8]) -> usize {
        let g = u32::from_le_bytes([gram[0], gram[1], gram[2], gram[3]]);
        (g.wrapping_mul(0x9E37_79B1) >> self.shift) as usize
    }

    fn holds(&self, gram: &[u8]) -> bool {
        let i = self.index(gram);
        self.bits
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("names", &self.names)
            .field("patterns", &self.owners.len())
            .finish()
    }
}

impl Scanner {
    /// A scanner for `secrets` (bounded: see the module documentation).
    pub fn new(secrets: &[SecretValue]) -> Result<Self, ResidueError> {
        let mut names = Vec::new();
        let mut skipped = Vec::new();
        let mut index: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut owners: Vec<Vec<usize>> = Vec::new();
        for s in secrets {
            if names.len() >= MAX_SECRETS {
                skipped.push(Skipped {
                    name: s.name.clone(),
                    reason: format!("more than {MAX_SECRETS} secrets"),
                });
                continue;
            }
            let window = s.window();
            if window.len() < MIN_LEN {
                skipped.push(Skipped {
                    name: s.name.clone(),
                    reason: format!("shorter than {MIN_LEN} bytes: too short to tell from chance"),
                });
                continue;
            }
            let id = names.len();
            names.push(s.name.clone());
            for p in encodings(window) {
                let slot = *index.entry(p.clone()).or_insert_with(|| {
                    patterns.push(p);
                    owners.push(Vec::new());
                    owners.len() - 1
                });
                if !owners[slot].contains(&id) {
                    owners[slot].push(id);
                }
            }
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let filter = GramFilter::new(&patterns);
        let automaton = if patterns.is_empty() {
            None
        } else {
            // Standard semantics, for overlapping search: one secret's match must not hide
            // another's that overlaps it.
            Some(
                AhoCorasickBuilder::new()
                    .match_kind(MatchKind::Standard)
                    .build(&patterns)?,
            )
        };
        // The patterns are the secrets in other spellings: not for freed memory either.
        for p in &mut patterns {
            p.zeroize();
        }
        for (mut p, _) in index.drain() {
            p.zeroize();
        }
        Ok(Self {
            names,
            skipped,
            owners,
            automaton,
            longest,
            filter,
        })
    }

    /// Calls `found(start, pattern)` for every match wholly inside `hay`, in order of where they
    /// end (as the automaton's overlapping search reports them).
    fn matches(&self, ac: &AhoCorasick, hay: &[u8], mut found: impl FnMut(usize, usize)) {
        let mut search = |from: usize, to: usize| {
            for m in ac.find_overlapping_iter(&hay[from..to]) {
                found(from + m.start(), m.pattern().as_usize());
            }
        };
        let stride = self.filter.stride;
        if stride == 0 {
            search(0, hay.len());
            return;
        }
        // A gram in the set at `pos` may belong to a match that starts up to `longest - GRAM`
        // before it and ends up to `longest` after it: that window is searched. Overlapping
        // windows are merged (so each match is wholly inside exactly one searched range, and
        // ranges go up: matches still come in order of their end).
        let mut pending: Option<(usize, usize)> = None;
        let mut pos = 0;
        while pos + GRAM <= hay.len() {
            if self.filter.holds(&hay[pos..pos + GRAM]) {
                let from = pos.saturating_sub(self.longest - GRAM);
                let to = (pos + self.longest).min(hay.len());
                pending = match pending {
                    Some((a, b)) if from <= b => Some((a, to.max(b))),
                    Some((a, b)) => {
                        search(a, b);
                        Some((from, to))
                    }
                    None => Some((from, to)),
                };
            }
            pos += stride;
        }
        if let Some((a, b)) = pending {
            search(a, b);
        }
    }

    /// Whether there is nothing to search for.
    pub fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// Scans `files` (name shown in the report, path), each with all the machine's threads.
    pub fn scan_files(&self, files: &[(&str, &Path)]) -> Result<SecretScan, ResidueError> {
        let t0 = Instant::now();
        let mut per_file = Vec::new();
        let mut bytes = 0;
        for (name, path) in files {
            let (pages, b) = self.scan_file(path)?;
            bytes += b;
            per_file.push(((*name).to_string(), pages));
        }
        let millis = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok(self.report(per_file, bytes, millis))
    }

    /// Pages per secret in one file, and the bytes searched.
    pub fn scan_file(&self, path: &Path) -> Result<(Vec<u64>, u64), ResidueError> {
        let err = |source| ResidueError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut pages = vec![0u64; self.names.len()];
        let Some(ac) = &self.automaton else {
            return Ok((pages, 0));
        };
        let file = File::open(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        let chunks = data_chunks(&file, size).map_err(err)?;
        let next = AtomicUsize::new(0);
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(chunks.len().max(1));
        let overlap = self.longest.saturating_sub(1) as u64;
        let results: Vec<std::io::Result<(Vec<u64>, u64)>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut pages = vec![0u64; self.names.len()];
                        let mut bytes = 0u64;
                        let mut buf = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(start, len)) = chunks.get(i) else {
                                break;
                            };
                            let read_len = (len + overlap).min(size - start);
                            buf.resize(read_len as usize, 0);
                            file.read_exact_at(&mut buf, start)?;
                            bytes += self.scan_chunk(ac, &buf, len as usize, &mut pages);
                        }
                        buf.zeroize();
                        Ok((pages, bytes))
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("a scan thread panicked")))
                })
                .collect()
        });
        let mut bytes = 0;
        for r in results {
            let (p, b) = r.map_err(err)?;
            bytes += b;
            for (total, n) in pages.iter_mut().zip(p) {
                *total += n;
            }
        }
        Ok((pages, bytes))
    }

    /// Searches one chunk (`own` bytes of its own, then the overlap into the next) page run by
    /// page run, skipping all-zero pages; counts, per secret, the pages where a match starts
    /// (only inside `own`). Returns the bytes searched.
    fn scan_chunk(&self, ac: &AhoCorasick, buf: &[u8], own: usize, pages: &mut [u64]) -> u64 {
        let mut counter = PageCounter::new(self.names.len());
        let mut searched = 0u64;
        for (start, end) in nonzero_runs(buf, own) {
            searched += (end - start) as u64;
            self.matches(ac, &buf[start..end], |at, pattern| {
                let at = start + at;
                if at < own {
                    // (Else the next chunk's.)
                    counter.count(&self.owners[pattern], at as u64 / PAGE);
                }
            });
        }
        for (total, n) in pages.iter_mut().zip(counter.pages) {
            *total += n;
        }
        searched
    }

    /// A scan of one file fed in order as it is written (see [`StreamScan`]).
    pub fn stream(&self) -> StreamScan<'_> {
        StreamScan {
            scanner: self,
            counter: PageCounter::new(self.names.len()),
            tail: Vec::with_capacity(self.longest),
            tail_end: 0,
            junction: Vec::with_capacity(2 * self.longest),
            bytes: 0,
        }
    }

    /// Builds a report from per-file page counts (file name, pages per secret), files in the
    /// order given; `bytes` searched in all, `millis` the time it took.
    pub fn report(&self, files: Vec<(String, Vec<u64>)>, bytes: u64, millis: u64) -> SecretScan {
        let mut per_secret: Vec<Vec<FilePages>> = vec![Vec::new(); self.names.len()];
        for (name, pages) in files {
            for (i, n) in pages.into_iter().enumerate() {
                if n > 0 {
                    if let Some(list) = per_secret.get_mut(i) {
                        list.push(FilePages {
                            file: name.clone(),
                            pages: n,
                        });
                    }
                }
            }
        }
        let mut report = SecretScan {
            scanned: self.names.clone(),
            skipped: self.skipped.clone(),
            bytes_scanned: bytes,
            millis,
            ..SecretScan::default()
        };
        for (i, files) in per_secret.into_iter().enumerate() {
            if !files.is_empty() {
                report.found.push(Residue {
                    name: self.names[i].clone(),
                    pages: files.iter().map(|f| f.pages).sum(),
                    files,
                });
            }
        }
        report
    }
}

/// Pages per secret where a match starts, each page counted once per secret.
///
/// Matches come out of the automaton in order of where they end, and no pattern is longer than
/// [`MAX_PATTERN`] (< one page), so a match can start at most one page before the highest page
/// already counted: remembering the two highest pages counted per secret is exact.
struct PageCounter {
    pages: Vec<u64>,
    recent: Vec<[Option<u64>; 2]>,
}

impl PageCounter {
    fn new(secrets: usize) -> Self {
        Self {
            pages: vec![0; secrets],
            recent: vec![[None; 2]; secrets],
        }
    }

    fn count(&mut self, owners: &[usize], page: u64) {
        for &secret in owners {
            let (Some(recent), Some(total)) =
                (self.recent.get_mut(secret), self.pages.get_mut(secret))
            else {
                continue;
            };
            if recent.contains(&Some(page)) {
                continue;
            }
            *total += 1;
            // Keep the two highest: replace the lower (or an empty slot).
            let low = usize::from(recent[1] < recent[0]);
            if recent[low] < Some(page) {
                recent[low] = Some(page);
            }
        }
    }
}

/// A scan of one file's data fed in file order, in pieces of any size ([`Scanner::stream`]).
///
/// Pieces that follow each other in the file (the previous one ended where this one starts) are
/// searched as one text: the last `longest pattern - 1` bytes of what came before are kept, and
/// a match that starts there and ends in the new piece is found (it cannot be found in either
/// piece alone). A gap between pieces (a hole, a zero page, a page the file does not hold) ends
/// the text, as a zero page does in [`Scanner::scan_file`].
pub struct StreamScan<'a> {
    scanner: &'a Scanner,
    counter: PageCounter,
    /// The last bytes fed (at most longest - 1), ending at file offset `tail_end`.
    tail: Vec<u8>,
    tail_end: u64,
    /// The tail and the start of the next piece: where the matches across them are.
    junction: Vec<u8>,
    bytes: u64,
}

impl StreamScan<'_> {
    /// Searches `data`, which is the file's bytes at `offset`, skipping all-zero pages (pages
    /// are counted from the file's start; `offset` should be page-aligned).
    pub fn feed_nonzero(&mut self, offset: u64, data: &[u8]) {
        for (start, end) in nonzero_runs(data, data.len()) {
            self.feed(offset + start as u64, &data[start..end]);
        }
    }

    /// Searches `data`, the file's bytes at `offset`, as they are (zero pages included).
    pub fn feed(&mut self, offset: u64, data: &[u8]) {
        let Some(ac) = &self.scanner.automaton else {
            return;
        };
        if data.is_empty() {
            return;
        }
        self.bytes += data.len() as u64;
        let owners = &self.scanner.owners;
        let keep = self.scanner.longest.saturating_sub(1);
        if offset != self.tail_end {
            self.tail.zeroize();
            self.tail.clear();
        }
        if !self.tail.is_empty() {
            // Matches from the tail into `data`; those wholly in the tail were counted before,
            // those wholly in `data` are counted below.
            let t = self.tail.len();
            let tail_start = self.tail_end - t as u64;
            self.junction.clear();
            self.junction.extend_from_slice(&self.tail);
            self.junction
                .extend_from_slice(&data[..data.len().min(keep)]);
            for m in ac.find_overlapping_iter(&self.junction) {
                if m.start() < t && m.end() > t {
                    self.counter.count(
                        &owners[m.pattern().as_usize()],
                        (tail_start + m.start() as u64) / PAGE,
                    );
                }
            }
            self.junction.zeroize();
        }
        let counter = &mut self.counter;
        self.scanner.matches(ac, data, |at, pattern| {
            counter.count(&owners[pattern], (offset + at as u64) / PAGE);
        });
        // The new tail: the last `keep` bytes of the old tail followed by `data`.
        if data.len() >= keep {
            self.tail.zeroize();
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail[..excess].zeroize();
            self.tail.drain(..excess);
        }
        self.tail_end = offset + data.len() as u64;
    }

    /// Pages per secret (in [`Scanner`] order) and the bytes searched.
    pub fn finish(mut self) -> (Vec<u64>, u64) {
        (std::mem::take(&mut self.counter.pages), self.bytes)
    }
}

impl Drop for StreamScan<'_> {
    fn drop(&mut self) {
        // The tail may end in the first bytes of a secret.
        self.tail.zeroize();
        self.junction.zeroize();
    }
}

/// The runs of non-zero pages among the pages of `buf` that start before `own`, as byte ranges
/// of `buf` (a run may go on past `own`, into the overlap, while its pages are non-zero).
fn nonzero_runs(buf: &[u8], own: usize) -> Vec<(usize, usize)> {
    let page = PAGE as usize;
    let zero_at = |at: usize| is_zero(&buf[at..(at + page).min(buf.len())]);
    let mut runs = Vec::new();
    let mut at = 0;
    while at < own.min(buf.len()) {
        if zero_at(at) {
            at += page;
            continue;
        }
        let start = at;
        while at < buf.len() && !zero_at(at) {
            at += page;
        }
        runs.push((start, at.min(buf.len())));
    }
    runs
}

/// Every pattern for one value: raw, hex (both cases), base64 (both alphabets, three alignments).
pub fn encodings(value: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![value.to_vec()];
    out.push(hex(value, b"0123456789abcdef"));
    out.push(hex(value, b"0123456789ABCDEF"));
    for alphabet in [B64_STD, B64_URL] {
        for align in 0..3 {
            let p = base64_stable(value, align, alphabet);
            // A stable part shorter than the minimum would match by chance.
            if p.len() >= MIN_LEN {
                out.push(p);
            }
        }
    }
    out
}

fn hex(value: &[u8], digits: &[u8; 16]) -> Vec<u8> {
    value
        .iter()
        .flat_map(|b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
        .collect()
}

/// The base64 characters of `value` placed `align` bytes after the start of a 3-byte group: the
/// characters whose six bits all come from `value`, whatever bytes surround it.
fn base64_stable(value: &[u8], align: usize, alphabet: &[u8; 64]) -> Vec<u8> {
    let first_bit = 8 * align;
    let end_bit = first_bit + 8 * value.len();
    let bit = |i: usize| -> u8 {
        // Bit i of the stream (MSB first); only bits inside `value` are asked for.
        let b = i - first_bit;
        (value[b / 8] >> (7 - b % 8)) & 1
    };
    let k_first = first_bit.div_ceil(6);
    let k_end = end_bit / 6;
    (k_first..k_end)
        .map(|k| {
            let v = (0..6).fold(0u8, |acc, j| (acc << 1) | bit(6 * k + j));
            alphabet[usize::from(v)]
        })
        .collect()
}

fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && chunks.remainder().iter().all(|b| *b == 0)
}

/// The file's data (its holes left out), cut into page-aligned chunks of at most [`CHUNK`].
fn data_chunks(file: &File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(size).min(size);
        if hole <= data {
            break;
        }
        extents.push((data, hole));
        pos = hole;
    }
    let mut chunks = Vec::new();
    for (start, end) in extents {
        let mut at = start - start % PAGE;
        while at < end {
            let len = (end - at).min(CHUNK);
            chunks.push((at, len));
            at += len;
        }
    }
    Ok(chunks)
}

/// lseek with SEEK_DATA/SEEK_HOLE; `None` at ENXIO (no data from there on). A filesystem that
/// does not know holes reports all of the file as data, which is still correct.
fn seek(file: &File, pos: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(pos).map_err(std::io::Error::other)?;
    // SAFETY: lseek on a descriptor we own; it only moves the file offset, which nothing else
    // uses (all reads are positional).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &[u8] = b"s3cr3t-T0ken:with/+?symbols~~\xff\x00\x01end";

    fn secret(name: &str, value: &[u8]) -> SecretValue {
        SecretValue {
            name: name.into(),
            value: value.to_vec(),
        }
    }

    fn tmpfile(tag: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "residue-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn standard_base64(bytes: &[u8], alphabet: &[u8; 64]) -> Vec<u8> {
        // Reference encoder with padding, written independently of base64_stable.
        let mut out = Vec::new();
        for group in bytes.chunks(3) {
            let b = [
                group[0],
                *group.get(1).unwrap_or(&0),
                *group.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = [18, 12, 6, 0].map(|s| alphabet[((n >> s) & 63) as usize]);
            let keep = group.len() + 1;
            out.extend_from_slice(&chars[..keep]);
            out.extend(std::iter::repeat_n(b'=', 4 - keep));
        }
        out
    }

    fn pages_found(data: &[u8], secrets: &[SecretValue]) -> Vec<u64> {
        let scanner = Scanner::new(secrets).unwrap();
        let p = tmpfile("scan", data);
        let (pages, _) = scanner.scan_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        pages
    }

    /// VALUE as a program could hold it: raw, hex in both cases, and base64 in both alphabets
    /// inside a longer text at each of the three alignments.
    fn encoded_cases() -> Vec<(String, Vec<u8>)> {
        let alphabets: [&[u8; 64]; 2] = [B64_STD, B64_URL];
        let mut cases: Vec<(String, Vec<u8>)> = vec![
            ("raw".into(), VALUE.to_vec()),
            ("hex".into(), hex(VALUE, b"0123456789abcdef")),
            ("HEX".into(), hex(VALUE, b"0123456789ABCDEF")),
        ];
        for (ai, alphabet) in alphabets.iter().enumerate() {
            for lead in 0..3 {
                // A program's base64 of a longer text holding the value after `lead` bytes.
                let mut text = b"prefix"[..lead].to_vec();
                text.extend_from_slice(VALUE);
                text.extend_from_slice(b"suffix!");
                cases.push((
                    format!("base64 alphabet {ai} lead {lead}"),
                    standard_base64(&text, alphabet),
                ));
            }
        }
        cases
    }

    #[test]
    fn finds_each_encoding_at_each_alignment_and_page_offset() {
        for (what, encoded) in encoded_cases() {
            // At several offsets, including across a page boundary and a chunk boundary.
            for offset in [
                0usize,
                1,
                4095 - encoded.len() / 2,
                8190,
                CHUNK as usize - 3,
            ] {
                let mut data = vec![0u8; CHUNK as usize + 3 * 4096];
                data[offset..offset + encoded.len()].copy_from_slice(&encoded);
                let pages = pages_found(
                    &data,
                    &[secret("other", b"unrelated-value"), secret("token", VALUE)],
                );
                assert_eq!(pages, vec![0, 1], "{what} at {offset}");
            }
        }
    }

    #[test]
    fn clean_data_has_no_hits_and_zero_pages_are_not_searched() {
        let mut data = vec![0u8; 64 << 20];
        // Noise in a few pages that is not the value (but shares a prefix with it).
        for (i, b) in data[4096..3 * 4096].iter_mut().enumerate() {
            *b = b"s3cr3t-T0ken:with"[i % 17];
        }
        let scanner = Scanner::new(&[secret("token", VALUE)]).unwrap();
        let p = tmpfile("clean", &data);
        let (pages, bytes) = scanner.scan_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(pages, vec![0]);
        // Only the two non-zero pages (plus the overlap read past them) were searched.
        assert!(bytes <= 3 * 4096, "searched {bytes} bytes");
    }

    #[test]
    fn counts_pages_not_matches_and_reports_names_only() {
        let mut data = vec![0u8; 10 * 4096];
        for page in [1usize, 4, 9] {
            for k in 0..3 {
                let at = page * 4096 + k * 100;
                data[at..at + VALUE.len()].copy_from_slice(VALUE);
            }
        }
        let scanner = Scanner::new(&[secret("token", VALUE)]).unwrap();
        let p = tmpfile("count", &data);
        let report = scanner.scan_files(&[("memory.bin", &p)]).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(report.found.len(), 1);
        assert_eq!(report.found[0].name, "token");
        assert_eq!(report.found[0].pages, 3);
        let json = serde_json::to_string(&report).unwrap();
        assert!(!json.contains("s3cr3t"), "{json}");
    }

    #[test]
    fn sparse_holes_are_not_read() {
        let p = tmpfile("sparse", b"");
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        f.write_all_at(VALUE, (512 << 20) + 10).unwrap();
        drop(f);
        let scanner = Scanner::new(&[secret("token", VALUE)]).unwrap();
        let (pages, bytes) = scanner.scan_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(pages, vec![1]);
        assert!(
            bytes < 1 << 20,
            "searched {bytes} bytes of a 1 GiB sparse file"
        );
    }

    #[test]
    fn bounded_in_secrets_and_length_and_short_values_are_skipped() {
        let mut secrets: Vec<SecretValue> = (0..MAX_SECRETS + 5)
            .map(|i| secret(&format!("s{i}"), format!("value-number-{i:06}").as_bytes()))
            .collect();
        secrets.push(secret("short", b"abc\n"));
        let scanner = Scanner::new(&secrets).unwrap();
        assert_eq!(scanner.names.len(), MAX_SECRETS);
        assert_eq!(scanner.skipped.len(), 6);
        assert!(scanner.skipped.iter().any(|s| s.name == "short"));
        // A long value: patterns come from its first WINDOW bytes only, and still find it.
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let long: Vec<u8> = (0..100_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b'a' + (x % 26) as u8
            })
            .collect();
        let scanner = Scanner::new(&[secret("long", &long)]).unwrap();
        assert!(scanner.longest <= MAX_PATTERN);
        let mut data = vec![0u8; 200_000];
        data[7..7 + long.len()].copy_from_slice(&long);
        let p = tmpfile("long", &data);
        let (pages, _) = scanner.scan_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(pages, vec![1]);
    }

    #[test]
    fn trailing_newline_is_not_required() {
        let mut data = vec![0u8; 8192];
        data[100..100 + 16].copy_from_slice(b"tok-1234567890ab");
        assert_eq!(
            pages_found(&data, &[secret("t", b"tok-1234567890ab\n")]),
            vec![1]
        );
    }

    #[test]
    fn base64_stable_parts_are_substrings_of_real_encodings() {
        for lead in 0..3 {
            let mut text = vec![b'x'; lead];
            text.extend_from_slice(VALUE);
            text.push(b'y');
            let full = standard_base64(&text, B64_STD);
            let part = base64_stable(VALUE, lead, B64_STD);
            assert!(part.len() >= 4 * VALUE.len() / 3 - 3, "lead {lead}");
            assert!(
                full.windows(part.len()).any(|w| w == part),
                "lead {lead}: {} not in {}",
                String::from_utf8_lossy(&part),
                String::from_utf8_lossy(&full)
            );
        }
    }

    /// Feeds `data` to a stream in pieces cut at `cuts` (file offsets), as a capture's writer
    /// hands over its chunks.
    fn stream_pages(scanner: &Scanner, data: &[u8], cuts: &[usize]) -> Vec<u64> {
        let mut stream = scanner.stream();
        let mut at = 0;
        for &cut in cuts.iter().chain([data.len()].iter()) {
            stream.feed_nonzero(at as u64, &data[at..cut]);
            at = cut;
        }
        stream.finish().0
    }

    #[test]
    fn stream_finds_each_encoding_straddling_a_piece_boundary_once() {
        let scanner =
            Scanner::new(&[secret("other", b"unrelated-value"), secret("token", VALUE)]).unwrap();
        for (what, encoded) in encoded_cases() {
            let len = encoded.len();
            // The value at the end of a page, cut by a piece boundary at every byte of it (and
            // one piece boundary that is also the page boundary).
            let page_end = 3 * 4096;
            let at = page_end - len / 2;
            let mut data = vec![0u8; 6 * 4096];
            data[at..at + len].copy_from_slice(&encoded);
            // Other bytes on both pages, so neither page is zero whatever the cut.
            data[2 * 4096] = 1;
            data[page_end + 4000] = 1;
            for cut in at..=at + len {
                assert_eq!(
                    stream_pages(&scanner, &data, &[cut]),
                    vec![0, 1],
                    "{what} cut at {}",
                    cut - at
                );
            }
            // Cut into many small pieces (each shorter than the pattern) it is found too.
            let cuts: Vec<usize> = (1..data.len()).step_by(7).collect();
            assert_eq!(stream_pages(&scanner, &data, &cuts), vec![0, 1], "{what}");
            // Two copies in one page are one page; copies in two pages, two.
            let mut two = data.clone();
            two[100..100 + len].copy_from_slice(&encoded);
            two[200..200 + len].copy_from_slice(&encoded);
            assert_eq!(stream_pages(&scanner, &two, &[150]), vec![0, 2], "{what}");
        }
    }

    #[test]
    fn stream_does_not_join_pieces_that_are_not_contiguous() {
        let scanner = Scanner::new(&[secret("token", VALUE)]).unwrap();
        let (head, rest) = VALUE.split_at(10);
        let mut stream = scanner.stream();
        // The first half ends a page, the second starts a page two pages on: a gap between.
        let mut a = vec![1u8; 4096];
        a[4096 - head.len()..].copy_from_slice(head);
        let mut b = vec![1u8; 4096];
        b[..rest.len()].copy_from_slice(rest);
        stream.feed(0, &a);
        stream.feed(2 * 4096, &b);
        assert_eq!(stream.finish().0, vec![0]);
        // Contiguous, the same halves are one match.
        let mut stream = scanner.stream();
        stream.feed(0, &a);
        stream.feed(4096, &b);
        assert_eq!(stream.finish().0, vec![1]);
    }

    #[test]
    fn stream_and_file_scan_agree_on_a_file() {
        // Random pages with copies of several encodings at random places, some across pages.
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut data = vec![0u8; 64 * 4096];
        for p in 0..64 {
            if rnd() % 3 == 0 {
                continue; // a zero page
            }
            for b in &mut data[p * 4096..(p + 1) * 4096] {
                *b = rnd() as u8;
            }
        }
        let cases = encoded_cases();
        for _ in 0..20 {
            let (_, e) = &cases[(rnd() % cases.len() as u64) as usize];
            let at = (rnd() % (data.len() - e.len()) as u64) as usize;
            data[at..at + e.len()].copy_from_slice(e);
        }
        let scanner = Scanner::new(&[secret("token", VALUE), secret("b", b"zzzzzzzzzz")]).unwrap();
        let p = tmpfile("agree", &data);
        let (from_file, _) = scanner.scan_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(from_file[0] > 0);
        let cuts: Vec<usize> = (1..16).map(|i| i * 4096 * 4 - 4096 * (i % 2)).collect();
        assert_eq!(stream_pages(&scanner, &data, &cuts), from_file);
    }

    #[test]
    fn gram_prefilter_finds_exactly_what_the_automaton_alone_finds() {
        let mut x = 0x0bad_5eed_1234_5678u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Short values (the smallest stride), a long one, and one that is a prefix of another.
        let secrets = [
            secret("short", b"abcd1234"),
            secret("token", VALUE),
            secret("prefix", &VALUE[..12]),
            secret("long", &[b'q'; 200]),
        ];
        let scanner = Scanner::new(&secrets).unwrap();
        let ac = scanner.automaton.as_ref().unwrap();
        assert!(scanner.filter.stride >= 1);
        let mut patterns = Vec::new();
        for s in &secrets {
            patterns.extend(encodings(s.window()));
        }
        for round in 0..40 {
            // Text from a small alphabet that shares grams with the patterns (many candidates,
            // merged windows), or random bytes; copies of patterns and their pieces anywhere.
            let mut hay: Vec<u8> = (0..20_000)
                .map(|_| {
                    if round % 2 == 0 {
                        b"abcd1234s3cr3t-qT0ken"[(rnd() % 21) as usize]
                    } else {
                        rnd() as u8
                    }
                })
                .collect();
            for _ in 0..30 {
                let p = &patterns[(rnd() % patterns.len() as u64) as usize];
                let piece = if rnd() % 3 == 0 {
                    &p[..p.len() - 1]
                } else {
                    &p[..]
                };
                let at = (rnd() % (hay.len() - piece.len()) as u64) as usize;
                hay[at..at + piece.len()].copy_from_slice(piece);
            }
            let plain: Vec<(usize, usize)> = ac
                .find_overlapping_iter(&hay)
                .map(|m| (m.start(), m.pattern().as_usize()))
                .collect();
            let mut filtered = Vec::new();
            scanner.matches(ac, &hay, |at, p| filtered.push((at, p)));
            assert!(!plain.is_empty());
            assert_eq!(filtered, plain, "round {round}");
        }
    }
}
