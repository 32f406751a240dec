//! The page server's wire protocol, over a Unix `SOCK_SEQPACKET` socket (one message per frame).
//!
//! Every frame, little endian:
//! `magic "MAPG" | version u16 | kind u16 | body length u32 | body | CRC32 u32`
//! (the CRC covers everything before it). A frame is at most [`MAX_FRAME`] bytes.
//!
//! A session: the VMM sends `Hello` with its userfaultfd attached (SCM_RIGHTS) and its memory
//! layout; the server answers `Accept` or `Refuse` (with a stable reason code) and, once accepted,
//! serves faults until either side closes the socket. The VMM may send `StatsRequest` (answered
//! with `Stats`) and `Bye`; the server may send `Fatal` (it cannot serve this VM any more) before
//! closing. The open socket is the liveness signal both ways.
//!
//! Decoding never trusts a length before bounding it, and never panics: every check that can
//! refuse a frame is a [`ProtocolError`] with a [`RefuseCode`].

pub const MAGIC: [u8; 4] = *b"MAPG";
/// Bump on any incompatible change; a peer speaking another version is refused as such.
pub const VERSION: u16 = 1;
/// Largest frame either side sends or accepts.
pub const MAX_FRAME: usize = 4096;
/// Most guest memory regions in one layout.
pub const MAX_REGIONS: usize = 64;
/// Longest client label, in bytes.
pub const MAX_LABEL: usize = 128;
/// Longest reason text in `Refuse` / `Fatal`.
pub const MAX_REASON: usize = 512;

const HEADER: usize = 4 + 2 + 2 + 4;
const TRAILER: usize = 4;
const REGION_BYTES: usize = 32;
const PAGE: u64 = super::sys::PAGE;

const KIND_HELLO: u16 = 1;
const KIND_ACCEPT: u16 = 2;
const KIND_REFUSE: u16 = 3;
const KIND_STATS_REQUEST: u16 = 4;
const KIND_STATS: u16 = 5;
const KIND_FATAL: u16 = 6;
const KIND_BYE: u16 = 7;

/// One guest RAM region: `len` bytes at guest physical `guest_addr`, mapped in the VMM at
/// `host_addr`, whose contents are at `file_offset` in `memory.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub guest_addr: u64,
    pub host_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

impl Region {
    pub fn host_end(&self) -> u64 {
        self.host_addr.saturating_add(self.len)
    }
    pub fn file_end(&self) -> u64 {
        self.file_offset.saturating_add(self.len)
    }
}

/// A VM's guest memory as the server needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    pub regions: Vec<Region>,
}

impl Layout {
    /// The layout of `mem` restored from a memory file written by
    /// [`crate::memfile::write_memory`]: its regions back to back, in address order.
    pub fn from_guest_memory<M: vm_memory::GuestMemoryBackend>(mem: &M) -> Self {
        use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
        let mut off = 0u64;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map(|p| p as u64)
                .unwrap_or(0);
            regions.push(Region {
                guest_addr: r.start_addr().0,
                host_addr: host,
                len: r.len(),
                file_offset: off,
            });
            off += r.len();
        }
        Self { regions }
    }

    /// Bytes of guest memory.
    pub fn total_len(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Refuses an empty or oversized layout, unaligned or empty regions, address arithmetic
    /// that wraps, overlaps (host, guest or file ranges) and, with `file_len`, any region that
    /// reaches past the memory file.
    pub fn validate(&self, file_len: Option<u64>) -> Result<(), ProtocolError> {
        let bad = |s: String| Err(ProtocolError::BadLayout(s));
        if self.regions.is_empty() {
            return bad("no regions".into());
        }
        if self.regions.len() > MAX_REGIONS {
            return Err(ProtocolError::TooLarge(format!(
                "{} regions (at most {MAX_REGIONS})",
                self.regions.len()
            )));
        }
        for (i, r) in self.regions.iter().enumerate() {
            if r.len == 0 {
                return bad(format!("region {i} is empty"));
            }
            if (r.guest_addr | r.host_addr | r.len | r.file_offset) % PAGE != 0 {
                return bad(format!("region {i} is not page aligned: {r:x?}"));
            }
            if r.host_addr == 0 {
                return bad(format!("region {i} has host address 0"));
            }
            if r.guest_addr.checked_add(r.len).is_none()
                || r.host_addr.checked_add(r.len).is_none()
                || r.file_offset.checked_add(r.len).is_none()
            {
                return bad(format!("region {i} wraps the address space: {r:x?}"));
            }
            if let Some(fl) = file_len {
                if r.file_end() > fl {
                    return Err(ProtocolError::OutsideFile(format!(
                        "region {i} covers file bytes {:#x}..{:#x}, the memory file has {fl:#x}",
                        r.file_offset,
                        r.file_end()
                    )));
                }
            }
        }
        for (what, key) in [
            ("host", (|r: &Region| r.host_addr) as fn(&Region) -> u64),
            ("guest", |r: &Region| r.guest_addr),
            ("file", |r: &Region| r.file_offset),
        ] {
            let mut v: Vec<(u64, u64)> = self
                .regions
                .iter()
                .map(|r| (key(r), key(r) + r.len))
                .collect();
            v.sort_unstable();
            if let Some(w) = v.windows(2).find(|w| w[1].0 < w[0].1) {
                return bad(format!(
                    "{what} ranges overlap: {:#x}..{:#x} and {:#x}..{:#x}",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ));
            }
        }
        Ok(())
    }
}

/// What a VMM sends first, with its userfaultfd attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub page_size: u32,
    /// The userfaultfd features the VMM enabled (the server learns which events can arrive).
    pub features: u64,
    pub label: String,
    pub layout: Layout,
}

/// The server's answer to an accepted `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    pub client_id: u64,
    /// Bytes served around each fault.
    pub chunk_bytes: u64,
    /// Pages of a recorded working set this session prefetches (0: none).
    pub prefetch_pages: u64,
    /// This session's first touches are being recorded as the snapshot's working set.
    pub recording: bool,
}

/// Counters of one session (or, summed, of a server).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Page-fault messages received.
    pub faults: u64,
    /// Pages placed with UFFDIO_COPY (fault chunks and prefetch).
    pub pages_copied: u64,
    /// Pages placed with UFFDIO_ZEROPAGE (holes in the memory file, removed pages).
    pub zero_pages: u64,
    /// Of the above, pages placed by prefetch.
    pub prefetched_pages: u64,
    /// Pages the VMM dropped (remove / unmap events).
    pub removed_pages: u64,
    /// Fills that found the page already there (EEXIST).
    pub already_present: u64,
    /// Fills retried because the VMM's address space was changing (EAGAIN).
    pub retries: u64,
}

impl Counters {
    const N: usize = 7;

    fn to_array(self) -> [u64; Self::N] {
        [
            self.faults,
            self.pages_copied,
            self.zero_pages,
            self.prefetched_pages,
            self.removed_pages,
            self.already_present,
            self.retries,
        ]
    }

    fn from_array(a: [u64; Self::N]) -> Self {
        Self {
            faults: a[0],
            pages_copied: a[1],
            zero_pages: a[2],
            prefetched_pages: a[3],
            removed_pages: a[4],
            already_present: a[5],
            retries: a[6],
        }
    }

    pub fn add(&mut self, o: &Counters) {
        let a = self.to_array();
        let b = o.to_array();
        let mut s = [0u64; Self::N];
        for i in 0..Self::N {
            s[i] = a[i].saturating_add(b[i]);
        }
        *self = Self::from_array(s);
    }
}

/// A session's statistics as sent to its VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SessionStats {
    pub counters: Counters,
    /// Pages of the working set this session prefetches.
    pub prefetch_total: u64,
    /// Whether prefetch has gone through the whole working set.
    pub prefetch_done: bool,
}

/// Why a peer's frame was refused. Stable codes travel in `Refuse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    Malformed,
    UnsupportedVersion,
    TooLarge,
    BadLayout,
    OutsideFile,
    NotUserfaultfd,
    Busy,
    PageSize,
    Unexpected,
    Unsupported,
    /// A code this build does not know (from a newer peer).
    Other(u16),
}

impl RefuseCode {
    pub fn to_wire(self) -> u16 {
        match self {
            RefuseCode::Malformed => 1,
            RefuseCode::UnsupportedVersion => 2,
            RefuseCode::TooLarge => 3,
            RefuseCode::BadLayout => 4,
            RefuseCode::OutsideFile => 5,
            RefuseCode::NotUserfaultfd => 6,
            RefuseCode::Busy => 7,
            RefuseCode::PageSize => 8,
            RefuseCode::Unexpected => 9,
            RefuseCode::Unsupported => 10,
            RefuseCode::Other(c) => c,
        }
    }

    pub fn from_wire(c: u16) -> Self {
        match c {
            1 => RefuseCode::Malformed,
            2 => RefuseCode::UnsupportedVersion,
            3 => RefuseCode::TooLarge,
            4 => RefuseCode::BadLayout,
            5 => RefuseCode::OutsideFile,
            6 => RefuseCode::NotUserfaultfd,
            7 => RefuseCode::Busy,
            8 => RefuseCode::PageSize,
            9 => RefuseCode::Unexpected,
            10 => RefuseCode::Unsupported,
            c => RefuseCode::Other(c),
        }
    }

    /// A stable machine-readable name.
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::Malformed => "malformed",
            RefuseCode::UnsupportedVersion => "unsupported-version",
            RefuseCode::TooLarge => "too-large",
            RefuseCode::BadLayout => "bad-layout",
            RefuseCode::OutsideFile => "outside-file",
            RefuseCode::NotUserfaultfd => "not-userfaultfd",
            RefuseCode::Busy => "busy",
            RefuseCode::PageSize => "page-size",
            RefuseCode::Unexpected => "unexpected-message",
            RefuseCode::Unsupported => "unsupported-feature",
            RefuseCode::Other(_) => "unknown",
        }
    }
}

impl std::fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("protocol version {found} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion { found: u16 },
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("bad memory layout: {0}")]
    BadLayout(String),
    #[error("layout outside the memory file: {0}")]
    OutsideFile(String),
    #[error("page size {0} is not supported (the server serves 4096-byte pages)")]
    PageSize(u32),
}

impl ProtocolError {
    pub fn code(&self) -> RefuseCode {
        match self {
            ProtocolError::Malformed(_) => RefuseCode::Malformed,
            ProtocolError::UnsupportedVersion { .. } => RefuseCode::UnsupportedVersion,
            ProtocolError::TooLarge(_) => RefuseCode::TooLarge,
            ProtocolError::BadLayout(_) => RefuseCode::BadLayout,
            ProtocolError::OutsideFile(_) => RefuseCode::OutsideFile,
            ProtocolError::PageSize(_) => RefuseCode::PageSize,
        }
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Accept(Accept),
    Refuse { code: RefuseCode, reason: String },
    StatsRequest,
    Stats(SessionStats),
    Fatal(String),
    Bye,
}

fn frame(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body.len() + TRAILER);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Message {
    /// The frame for this message. Over-long labels and reasons are cut to their limits.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let kind = match self {
            Message::Hello(h) => {
                let label = clip(&h.label, MAX_LABEL).as_bytes();
                b.extend_from_slice(&h.page_size.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                b.extend_from_slice(&h.features.to_le_bytes());
                b.extend_from_slice(&(h.layout.regions.len() as u32).to_le_bytes());
                b.extend_from_slice(&(label.len() as u32).to_le_bytes());
                for r in &h.layout.regions {
                    for v in [r.guest_addr, r.host_addr, r.len, r.file_offset] {
                        b.extend_from_slice(&v.to_le_bytes());
                    }
                }
                b.extend_from_slice(label);
                KIND_HELLO
            }
            Message::Accept(a) => {
                b.extend_from_slice(&a.client_id.to_le_bytes());
                b.extend_from_slice(&a.chunk_bytes.to_le_bytes());
                b.extend_from_slice(&a.prefetch_pages.to_le_bytes());
                b.extend_from_slice(&u32::from(a.recording).to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                KIND_ACCEPT
            }
            Message::Refuse { code, reason } => {
                let r = clip(reason, MAX_REASON).as_bytes();
                b.extend_from_slice(&code.to_wire().to_le_bytes());
                b.extend_from_slice(&(r.len() as u16).to_le_bytes());
                b.extend_from_slice(r);
                KIND_REFUSE
            }
            Message::StatsRequest => KIND_STATS_REQUEST,
            Message::Stats(s) => {
                for v in s.counters.to_array() {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.extend_from_slice(&s.prefetch_total.to_le_bytes());
                b.extend_from_slice(&u64::from(s.prefetch_done).to_le_bytes());
                KIND_STATS
            }
            Message::Fatal(reason) => {
                let r = clip(reason, MAX_REASON).as_bytes();
                b.extend_from_slice(&(r.len() as u16).to_le_bytes());
                b.extend_from_slice(r);
                KIND_FATAL
            }
            Message::Bye => KIND_BYE,
        };
        frame(kind, &b)
    }

    /// Parses one frame; refuses anything not exactly as `encode` writes it.
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let malformed = |s: &str| Err(ProtocolError::Malformed(s.to_string()));
        if bytes.len() > MAX_FRAME {
            return Err(ProtocolError::TooLarge(format!(
                "a {}-byte frame (at most {MAX_FRAME})",
                bytes.len()
            )));
        }
        if bytes.len() < 4 || bytes[..4] != MAGIC {
            return malformed("wrong magic");
        }
        if bytes.len() < 6 {
            return malformed("truncated header");
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion { found: version });
        }
        if bytes.len() < HEADER + TRAILER {
            return malformed("truncated header");
        }
        let kind = u16::from_le_bytes([bytes[6], bytes[7]]);
        let body_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if body_len > MAX_FRAME {
            return Err(ProtocolError::TooLarge(format!("a {body_len}-byte body")));
        }
        if HEADER + body_len + TRAILER != bytes.len() {
            return malformed("length field does not match the frame");
        }
        let crc_at = bytes.len() - TRAILER;
        let stored = u32::from_le_bytes([
            bytes[crc_at],
            bytes[crc_at + 1],
            bytes[crc_at + 2],
            bytes[crc_at + 3],
        ]);
        if crc32fast::hash(&bytes[..crc_at]) != stored {
            return malformed("CRC mismatch");
        }
        let body = &bytes[HEADER..crc_at];
        let mut r = Reader(body);
        let msg = match kind {
            KIND_HELLO => Message::Hello(decode_hello(&mut r)?),
            KIND_ACCEPT => {
                let client_id = r.u64()?;
                let chunk_bytes = r.u64()?;
                let prefetch_pages = r.u64()?;
                let flags = r.u32()?;
                let reserved = r.u32()?;
                if flags > 1 {
                    return malformed("unknown accept flags");
                }
                // Zero as `encode` writes it, so that a later version can give it a meaning
                // without this one misreading it.
                if reserved != 0 {
                    return malformed("reserved accept field is not zero");
                }
                Message::Accept(Accept {
                    client_id,
                    chunk_bytes,
                    prefetch_pages,
                    recording: flags == 1,
                })
            }
            KIND_REFUSE => {
                let code = RefuseCode::from_wire(r.u16()?);
                let reason = r.text(MAX_REASON)?;
                Message::Refuse { code, reason }
            }
            KIND_STATS_REQUEST => Message::StatsRequest,
            KIND_STATS => {
                let mut a = [0u64; Counters::N];
                for v in &mut a {
                    *v = r.u64()?;
                }
                let prefetch_total = r.u64()?;
                let done = r.u64()?;
                if done > 1 {
                    return malformed("prefetch flag out of range");
                }
                Message::Stats(SessionStats {
                    counters: Counters::from_array(a),
                    prefetch_total,
                    prefetch_done: done == 1,
                })
            }
            KIND_FATAL => Message::Fatal(r.text(MAX_REASON)?),
            KIND_BYE => Message::Bye,
            k => {
                return Err(ProtocolError::Malformed(format!(
                    "unknown message kind {k}"
                )))
            }
        };
        if !r.0.is_empty() {
            return malformed("trailing bytes in the body");
        }
        Ok(msg)
    }
}

fn decode_hello(r: &mut Reader<'_>) -> Result<Hello, ProtocolError> {
    let page_size = r.u32()?;
    let flags = r.u32()?;
    let features = r.u64()?;
    let count = r.u32()? as usize;
    let label_len = r.u32()? as usize;
    if count > MAX_REGIONS {
        return Err(ProtocolError::TooLarge(format!(
            "{count} regions (at most {MAX_REGIONS})"
        )));
    }
    if label_len > MAX_LABEL {
        return Err(ProtocolError::TooLarge(format!(
            "a {label_len}-byte label (at most {MAX_LABEL})"
        )));
    }
    if r.0.len() != count * REGION_BYTES + label_len {
        return Err(ProtocolError::Malformed(
            "hello body does not match its region count and label length".into(),
        ));
    }
    if flags != 0 {
        return Err(ProtocolError::Malformed(format!(
            "unknown hello flags {flags:#x}"
        )));
    }
    if page_size as u64 != PAGE {
        return Err(ProtocolError::PageSize(page_size));
    }
    let mut regions = Vec::with_capacity(count);
    for _ in 0..count {
        regions.push(Region {
            guest_addr: r.u64()?,
            host_addr: r.u64()?,
            len: r.u64()?,
            file_offset: r.u64()?,
        });
    }
    let label = r.bytes(label_len)?;
    let label = std::str::from_utf8(label)
        .ok()
        .filter(|s| !s.chars().any(char::is_control))
        .ok_or_else(|| ProtocolError::Malformed("label is not printable UTF-8".into()))?
        .to_string();
    Ok(Hello {
        page_size,
        features,
        label,
        layout: Layout { regions },
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Malformed("truncated body".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        let b = self.bytes(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        let b = self.bytes(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn text(&mut self, max: usize) -> Result<String, ProtocolError> {
        let n = self.u16()? as usize;
        if n > max {
            return Err(ProtocolError::TooLarge(format!("a {n}-byte text")));
        }
        // Strict: a lossy decode would accept (and re-encode differently, up to three times
        // longer) bytes that `encode`, which writes only `String`s, never sends.
        std::str::from_utf8(self.bytes(n)?)
            .map(str::to_string)
            .map_err(|_| ProtocolError::Malformed("text is not UTF-8".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(i: u64) -> Region {
        Region {
            guest_addr: i << 32,
            host_addr: 0x7f00_0000_0000 + (i << 30),
            len: 1 << 20,
            file_offset: i << 20,
        }
    }

    fn hello(n: usize) -> Hello {
        Hello {
            page_size: 4096,
            features: 8,
            label: "vm-1 ✓".into(),
            layout: Layout {
                regions: (0..n as u64).map(region).collect(),
            },
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello(3)),
            Message::Hello(hello(MAX_REGIONS)),
            Message::Accept(Accept {
                client_id: 7,
                chunk_bytes: 65536,
                prefetch_pages: 12,
                recording: true,
            }),
            Message::Refuse {
                code: RefuseCode::OutsideFile,
                reason: "region 0 ...".into(),
            },
            Message::StatsRequest,
            Message::Stats(SessionStats {
                counters: Counters {
                    faults: 1,
                    pages_copied: 2,
                    zero_pages: 3,
                    prefetched_pages: 4,
                    removed_pages: 5,
                    already_present: 6,
                    retries: 7,
                },
                prefetch_total: 9,
                prefetch_done: true,
            }),
            Message::Fatal("gone".into()),
            Message::Bye,
        ]
    }

    #[test]
    fn round_trip_and_limits() {
        for m in all_messages() {
            let f = m.encode();
            assert!(f.len() <= MAX_FRAME, "{m:?}: {}", f.len());
            assert_eq!(Message::decode(&f).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        for m in all_messages() {
            let f = m.encode();
            for n in 0..f.len() {
                assert!(Message::decode(&f[..n]).is_err(), "{m:?} cut at {n}");
            }
            for i in 0..f.len() {
                for bit in 0..8 {
                    let mut g = f.clone();
                    g[i] ^= 1 << bit;
                    assert!(Message::decode(&g).is_err(), "{m:?} flip {i}.{bit}");
                }
            }
            let mut longer = f.clone();
            longer.push(0);
            assert!(Message::decode(&longer).is_err());
        }
    }

    fn reframe(kind: u16, body: &[u8]) -> Vec<u8> {
        frame(kind, body)
    }

    #[test]
    fn hostile_frames_are_refused_with_their_code() {
        // Another version, even with a valid CRC.
        let mut f = Message::Bye.encode();
        f[4] = 2;
        let n = f.len() - 4;
        let crc = crc32fast::hash(&f[..n]);
        f[n..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            Message::decode(&f).unwrap_err().code(),
            RefuseCode::UnsupportedVersion
        );
        // A region count far beyond the limit, CRC valid.
        let mut body = Vec::new();
        body.extend_from_slice(&4096u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            Message::decode(&reframe(KIND_HELLO, &body))
                .unwrap_err()
                .code(),
            RefuseCode::TooLarge
        );
        // An oversized frame.
        assert_eq!(
            Message::decode(&vec![0u8; MAX_FRAME + 1])
                .unwrap_err()
                .code(),
            RefuseCode::TooLarge
        );
        // A huge length field.
        let mut f = Message::Bye.encode();
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Message::decode(&f).is_err());
        // Wrong page size.
        let mut h = hello(1);
        h.page_size = 65536;
        assert_eq!(
            Message::decode(&Message::Hello(h).encode())
                .unwrap_err()
                .code(),
            RefuseCode::PageSize
        );
        // Control characters in the label.
        let mut h = hello(1);
        h.label = "a\nb".into();
        assert!(Message::decode(&Message::Hello(h).encode()).is_err());
        // Unknown kind.
        assert!(Message::decode(&reframe(99, &[])).is_err());
    }

    /// Found by the `pageserver_protocol` fuzz target (its input, length and CRC made right):
    /// a `Refuse` whose reason is not UTF-8 was accepted with U+FFFD in place of the bytes, a
    /// message `encode` cannot have written.
    #[test]
    fn text_that_is_not_utf8_is_refused() {
        let body = [0, 0, 8, 0, 0, 0, 0, 0, 0xff, 0, 0x30, 0x8d];
        assert_eq!(
            Message::decode(&reframe(KIND_REFUSE, &body))
                .unwrap_err()
                .code(),
            RefuseCode::Malformed
        );
        let body = [2, 0, 0xc3, 0x28];
        assert!(Message::decode(&reframe(KIND_FATAL, &body)).is_err());
    }

    /// Found by the `pageserver_protocol` fuzz target (its input, CRC made right): an `Accept`
    /// with its reserved word set was accepted, though `encode` always writes it zero.
    #[test]
    fn accept_with_a_reserved_word_set_is_refused() {
        let body = [
            0x7, 0x0, 0x30, 0x31, 0x0, 0x20, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0,
            0x0, 0x1, 0x0, 0x0, 0x0, 0x0, 0x40, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x0, 0x31,
        ];
        assert_eq!(
            Message::decode(&reframe(KIND_ACCEPT, &body))
                .unwrap_err()
                .code(),
            RefuseCode::Malformed
        );
    }

    #[test]
    fn layouts_are_validated() {
        let ok = hello(3).layout;
        ok.validate(Some(3 << 20)).unwrap();
        assert_eq!(
            ok.validate(Some((3 << 20) - 4096)).unwrap_err().code(),
            RefuseCode::OutsideFile
        );
        type Edit = Box<dyn Fn(&mut Layout)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("empty", Box::new(|l| l.regions.clear())),
            ("zero len", Box::new(|l| l.regions[1].len = 0)),
            ("unaligned host", Box::new(|l| l.regions[1].host_addr += 1)),
            ("unaligned len", Box::new(|l| l.regions[1].len += 512)),
            (
                "unaligned file",
                Box::new(|l| l.regions[1].file_offset += 8),
            ),
            ("null host", Box::new(|l| l.regions[0].host_addr = 0)),
            (
                "host overlap",
                Box::new(|l| l.regions[1].host_addr = l.regions[0].host_addr + 4096),
            ),
            (
                "guest overlap",
                Box::new(|l| l.regions[2].guest_addr = l.regions[1].guest_addr),
            ),
            (
                "file overlap",
                Box::new(|l| l.regions[2].file_offset = l.regions[1].file_offset + 8192),
            ),
            (
                "wrap",
                Box::new(|l| l.regions[0].guest_addr = u64::MAX - 4095),
            ),
        ];
        for (name, f) in cases {
            let mut l = ok.clone();
            f(&mut l);
            assert_eq!(
                l.validate(Some(1 << 40)).unwrap_err().code(),
                RefuseCode::BadLayout,
                "{name}"
            );
        }
        let big = Layout {
            regions: (0..MAX_REGIONS as u64 + 1).map(region).collect(),
        };
        assert_eq!(big.validate(None).unwrap_err().code(), RefuseCode::TooLarge);
    }
}
