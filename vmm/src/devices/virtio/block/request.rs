//! Parsing of virtio-blk requests (virtio 1.x §5.2.6) from a checked descriptor chain.
//!
//! Layout, whatever the framing into descriptors: a 16-byte header (type, reserved, sector) and
//! any driver-written data in the device-readable part; data the device fills followed by one
//! status byte (the very last byte) in the device-writable part.
//!
//! The parser refuses, before any disk I/O: a chain without a writable status byte (nothing can
//! be reported: the chain is returned with used length 0), a header that is short or sits in
//! writable memory, data in the wrong direction (readable buffers for a read, writable ones for a
//! write), zero-length or unaligned transfers, sector ranges past the capacity (with overflow
//! checks), bad discard/write-zeroes segments and unknown request types. Chain-level problems
//! (loops, too many descriptors, buffers outside guest memory, zero-length descriptors) are
//! caught by [`chain::collect`](super::super::chain::collect) first.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use crate::devices::virtio::chain::{Buf, BufReader, Chain};

pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
/// Size of the request header.
pub const HEADER_LEN: u64 = 16;
/// Size of one discard/write-zeroes segment.
pub const SEGMENT_LEN: u64 = 16;

/// Limits the device advertises and enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Discard / write-zeroes segments per request.
    pub max_segments: u32,
    /// Sectors per discard / write-zeroes segment.
    pub max_segment_sectors: u32,
}

/// The command of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// A range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
    pub unmap: bool,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    /// For `In`/`GetId`: the writable buffers before the status byte; for `Out`: the readable
    /// buffers after the header.
    pub data: Vec<Buf>,
    /// Total bytes of `data`.
    pub data_len: u64,
    pub segments: Vec<Segment>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("no writable status byte at the end of the chain")]
    NoStatus,
    #[error("request header needs 16 device-readable bytes, the chain has {0}")]
    ShortHeader(u64),
    #[error("cannot read the request header from guest memory")]
    HeaderUnreadable,
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("{0:?} request carries data in the wrong direction")]
    WrongDirection(RequestType),
    #[error("{0:?} request has no data")]
    NoData(RequestType),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}..+{sectors} are past the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("discard/write-zeroes payload of {0} bytes is not a whole number of segments")]
    BadSegments(u64),
    #[error("{0} segments exceed the limit")]
    TooManySegments(u64),
    #[error("segment of {0} sectors exceeds the limit")]
    SegmentTooLarge(u32),
    #[error("segment flags {0:#x} are not allowed here")]
    SegmentFlags(u32),
}

impl RequestError {
    /// The status to report (there is always a status byte when this is asked).
    pub fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::SegmentFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    kind: u32,
    _reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, any bit pattern is valid.
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RawSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, any bit pattern is valid.
unsafe impl ByteValued for RawSegment {}

/// Where the status byte is: the last byte of the writable part.
pub fn status_addr(chain: &Chain) -> Option<GuestAddress> {
    let last = chain.writable.last()?;
    Some(GuestAddress(last.addr.0 + u64::from(last.len) - 1))
}

/// `bufs` without their first `skip` bytes and cut to `take` bytes.
fn sub_bufs(bufs: &[Buf], mut skip: u64, mut take: u64) -> Vec<Buf> {
    let mut out = Vec::new();
    for b in bufs {
        if take == 0 {
            break;
        }
        let len = u64::from(b.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        out.push(Buf {
            addr: GuestAddress(b.addr.0 + skip),
            len: n as u32,
        });
        take -= n;
        skip = 0;
    }
    out
}

fn check_range(sector: u64, bytes: u64, capacity: u64) -> Result<(), RequestError> {
    let sectors = bytes >> SECTOR_SHIFT;
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Parses a request. `Err((Some(status), e))`: refuse with that status byte; `Err((None, e))`:
/// no status can be written.
pub fn parse<M: GuestMemoryBackend + ?Sized>(
    chain: &Chain,
    mem: &M,
    limits: &Limits,
) -> Result<Request, (Option<GuestAddress>, RequestError)> {
    let status = status_addr(chain).ok_or((None, RequestError::NoStatus))?;
    let fail = |e| (Some(status), e);

    let readable = chain.readable_len();
    if readable < HEADER_LEN {
        return Err(fail(RequestError::ShortHeader(readable)));
    }
    let mut r = BufReader::new(mem, &chain.readable);
    let mut header = Header::default();
    r.read_exact(header.as_mut_slice())
        .map_err(|_| fail(RequestError::HeaderUnreadable))?;
    let kind = match header.kind {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        VIRTIO_BLK_T_DISCARD => RequestType::Discard,
        VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
        other => return Err(fail(RequestError::Unsupported(other))),
    };
    let out_len = readable - HEADER_LEN;
    let in_len = chain.writable_len() - 1;
    let mut req = Request {
        kind,
        sector: header.sector,
        data: Vec::new(),
        data_len: 0,
        segments: Vec::new(),
        status,
    };
    match kind {
        RequestType::In | RequestType::GetId => {
            if out_len != 0 {
                return Err(fail(RequestError::WrongDirection(kind)));
            }
            if in_len == 0 {
                return Err(fail(RequestError::NoData(kind)));
            }
            if kind == RequestType::In {
                if !in_len.is_multiple_of(SECTOR_SIZE) {
                    return Err(fail(RequestError::Unaligned(in_len)));
                }
                check_range(header.sector, in_len, limits.capacity).map_err(fail)?;
            }
            req.data = sub_bufs(&chain.writable, 0, in_len);
            req.data_len = in_len;
        }
        RequestType::Out => {
            if in_len != 0 {
                return Err(fail(RequestError::WrongDirection(kind)));
            }
            if out_len == 0 {
                return Err(fail(RequestError::NoData(kind)));
            }
            if !out_len.is_multiple_of(SECTOR_SIZE) {
                return Err(fail(RequestError::Unaligned(out_len)));
            }
            check_range(header.sector, out_len, limits.capacity).map_err(fail)?;
            req.data = sub_bufs(&chain.readable, HEADER_LEN, out_len);
            req.data_len = out_len;
        }
        RequestType::Flush => {}
        RequestType::Discard | RequestType::WriteZeroes => {
            if in_len != 0 {
                return Err(fail(RequestError::WrongDirection(kind)));
            }
            if out_len == 0 {
                return Err(fail(RequestError::NoData(kind)));
            }
            if !out_len.is_multiple_of(SEGMENT_LEN) {
                return Err(fail(RequestError::BadSegments(out_len)));
            }
            let n = out_len / SEGMENT_LEN;
            if n > u64::from(limits.max_segments) {
                return Err(fail(RequestError::TooManySegments(n)));
            }
            for _ in 0..n {
                let mut s = RawSegment::default();
                r.read_exact(s.as_mut_slice())
                    .map_err(|_| fail(RequestError::HeaderUnreadable))?;
                let allowed = if kind == RequestType::WriteZeroes {
                    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                } else {
                    0
                };
                if s.flags & !allowed != 0 {
                    return Err(fail(RequestError::SegmentFlags(s.flags)));
                }
                if s.num_sectors > limits.max_segment_sectors {
                    return Err(fail(RequestError::SegmentTooLarge(s.num_sectors)));
                }
                check_range(
                    s.sector,
                    u64::from(s.num_sectors) << SECTOR_SHIFT,
                    limits.capacity,
                )
                .map_err(fail)?;
                req.segments.push(Segment {
                    sector: s.sector,
                    num_sectors: s.num_sectors,
                    unmap: s.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
        }
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::tests::mem;
    use vm_memory::Bytes;

    const LIMITS: Limits = Limits {
        capacity: 100,
        max_segments: 4,
        max_segment_sectors: 50,
    };

    fn buf(addr: u64, len: u32) -> Buf {
        Buf {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn chain(readable: &[Buf], writable: &[Buf]) -> Chain {
        Chain {
            readable: readable.to_vec(),
            writable: writable.to_vec(),
        }
    }

    fn header(m: &crate::memory::GuestMemory, at: u64, kind: u32, sector: u64) {
        m.write_obj(
            Header {
                kind,
                _reserved: 0,
                sector,
            },
            GuestAddress(at),
        )
        .unwrap();
    }

    #[test]
    fn read_write_flush_get_id() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 10);
        let r = parse(
            &chain(&[buf(0x1000, 16)], &[buf(0x2000, 1024), buf(0x3000, 1)]),
            &m,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(0x3000));

        // Status as the last byte of a longer writable buffer, header split in two.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let c = chain(&[buf(0x1000, 8), buf(0x1008, 8)], &[buf(0x2000, 513)]);
        let r = parse(&c, &m, &LIMITS).unwrap();
        assert_eq!(r.data, vec![buf(0x2000, 512)]);
        assert_eq!(r.status, GuestAddress(0x2200));

        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 99);
        let r = parse(
            &chain(&[buf(0x1000, 16 + 512)], &[buf(0x3000, 1)]),
            &m,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.data, vec![buf(0x1010, 512)]);

        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16)], &[buf(0x3000, 1)]), &m, &LIMITS)
                .unwrap()
                .kind,
            RequestType::Flush
        );
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let r = parse(
            &chain(&[buf(0x1000, 16)], &[buf(0x2000, 20), buf(0x3000, 1)]),
            &m,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(r.data_len, 20);
    }

    #[test]
    fn hostile_requests_are_refused() {
        let m = mem();
        let status = Some(GuestAddress(0x3000));
        let st = &[buf(0x3000, 1)];
        // No writable part at all: nothing to report into.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16)], &[]), &m, &LIMITS),
            Err((None, RequestError::NoStatus))
        );
        // Header in writable memory (wrong direction) / too short.
        assert_eq!(
            parse(&chain(&[], &[buf(0x1000, 16), buf(0x3000, 1)]), &m, &LIMITS),
            Err((status, RequestError::ShortHeader(0)))
        );
        assert_eq!(
            parse(&chain(&[buf(0x1000, 8)], st), &m, &LIMITS),
            Err((status, RequestError::ShortHeader(8)))
        );
        // A read whose data buffer is device-readable.
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16 + 512)], st), &m, &LIMITS),
            Err((status, RequestError::WrongDirection(RequestType::In)))
        );
        // A write whose data buffer is device-writable.
        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            parse(
                &chain(&[buf(0x1000, 16)], &[buf(0x2000, 512), buf(0x3000, 1)]),
                &m,
                &LIMITS
            ),
            Err((status, RequestError::WrongDirection(RequestType::Out)))
        );
        // Zero-length and unaligned data.
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16)], st), &m, &LIMITS),
            Err((status, RequestError::NoData(RequestType::Out)))
        );
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16 + 100)], st), &m, &LIMITS),
            Err((status, RequestError::Unaligned(100)))
        );
        // Past the end, and sector arithmetic that would overflow.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 99);
        assert!(matches!(
            parse(
                &chain(&[buf(0x1000, 16)], &[buf(0x2000, 1024), buf(0x3000, 1)]),
                &m,
                &LIMITS
            ),
            Err((_, RequestError::OutOfRange { .. }))
        ));
        header(&m, 0x1000, VIRTIO_BLK_T_IN, u64::MAX);
        assert!(matches!(
            parse(
                &chain(&[buf(0x1000, 16)], &[buf(0x2000, 512), buf(0x3000, 1)]),
                &m,
                &LIMITS
            ),
            Err((_, RequestError::OutOfRange { .. }))
        ));
        // Huge (4 GiB - 1) claimed length in a 2 MiB guest never gets here: chain::collect
        // refuses it; a large in-memory one is still bounded by capacity.
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        assert!(matches!(
            parse(
                &chain(
                    &[buf(0x1000, 16)],
                    &[buf(0x2000, 0x10_0000), buf(0x3000, 1)]
                ),
                &m,
                &LIMITS
            ),
            Err((_, RequestError::OutOfRange { .. }))
        ));
        // Unknown type.
        header(&m, 0x1000, 77, 0);
        let e = parse(&chain(&[buf(0x1000, 16)], st), &m, &LIMITS).unwrap_err();
        assert_eq!(e.1, RequestError::Unsupported(77));
        assert_eq!(e.1.status(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let seg = |at: u64, sector: u64, n: u32, flags: u32| {
            m.write_obj(
                RawSegment {
                    sector,
                    num_sectors: n,
                    flags,
                },
                GuestAddress(at),
            )
            .unwrap()
        };
        let st = &[buf(0x3000, 1)];
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        seg(0x1010, 0, 8, 0);
        seg(0x1020, 90, 10, 0);
        let r = parse(&chain(&[buf(0x1000, 48)], st), &m, &LIMITS).unwrap();
        assert_eq!(r.segments.len(), 2);
        assert_eq!(r.segments[1].sector, 90);
        // Discard with the unmap flag: unsupported. Write-zeroes with it: fine.
        seg(0x1010, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(
            parse(&chain(&[buf(0x1000, 48)], st), &m, &LIMITS)
                .unwrap_err()
                .1,
            RequestError::SegmentFlags(1)
        );
        header(&m, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert!(
            parse(&chain(&[buf(0x1000, 32)], st), &m, &LIMITS)
                .unwrap()
                .segments[0]
                .unmap
        );
        // Ranges and counts.
        seg(0x1010, 95, 10, 0);
        assert!(matches!(
            parse(&chain(&[buf(0x1000, 32)], st), &m, &LIMITS),
            Err((_, RequestError::OutOfRange { .. }))
        ));
        seg(0x1010, 0, 51, 0);
        assert_eq!(
            parse(&chain(&[buf(0x1000, 32)], st), &m, &LIMITS)
                .unwrap_err()
                .1,
            RequestError::SegmentTooLarge(51)
        );
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16 + 5 * 16)], st), &m, &LIMITS)
                .unwrap_err()
                .1,
            RequestError::TooManySegments(5)
        );
        assert_eq!(
            parse(&chain(&[buf(0x1000, 16 + 8)], st), &m, &LIMITS)
                .unwrap_err()
                .1,
            RequestError::BadSegments(8)
        );
    }
}
