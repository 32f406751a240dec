//! virtio-vsock packets (virtio 1.x §5.10.6): the 44-byte little-endian header, parsing of the
//! packets the guest sends (TX queue) and framing of those we send it (RX queue).
//!
//! A TX chain is refused when its header is short or unreadable, when it has device-writable
//! buffers (wrong direction), or when the header's length field claims more payload than the
//! chain carries or more than [`MAX_PAYLOAD`]. An RX chain must be device-writable only and hold
//! at least a header.

use vm_memory::{ByteValued, GuestMemoryBackend};

use crate::devices::virtio::chain::{Buf, BufReader, BufWriter, Chain};

/// The host's context id.
pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
/// Largest payload we accept or send in one packet (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// The packet header, as it lies in guest memory.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}
// SAFETY: plain integers, packed, any bit pattern valid; x86_64 is little endian like the wire.
unsafe impl ByteValued for Header {}

const _: () = assert!(std::mem::size_of::<Header>() == HDR_LEN);

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Header {
            src_cid,
            dst_cid,
            src_port,
            dst_port,
            len,
            type_,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        } = *self;
        write!(
            f,
            "vsock {src_cid}:{src_port} -> {dst_cid}:{dst_port} op {op} type {type_} len {len} \
             flags {flags:#x} buf_alloc {buf_alloc} fwd_cnt {fwd_cnt}"
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("TX packet has {0} readable bytes, less than a header")]
    ShortHeader(u64),
    #[error("cannot read the packet header from guest memory")]
    Unreadable,
    #[error("TX packet has device-writable buffers")]
    WritableInTx,
    #[error("RX buffer has device-readable buffers")]
    ReadableInRx,
    #[error("RX buffer of {0} bytes cannot hold a header")]
    SmallRx(u64),
    #[error("header claims a {0}-byte payload, more than the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u32),
    #[error("header claims a {claimed}-byte payload, the chain carries {present}")]
    PayloadMissing { claimed: u32, present: u64 },
}

/// A packet from the guest: its header and where its payload lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    /// Exactly `hdr.len` bytes (only for OP_RW; empty otherwise).
    pub payload: Vec<Buf>,
}

/// Parses a packet the guest queued on TX. On error, the header is returned when it could be
/// read, so the connection it names can be reset.
pub fn parse_tx<M: GuestMemoryBackend + ?Sized>(
    chain: &Chain,
    mem: &M,
) -> Result<TxPacket, (Option<Header>, PacketError)> {
    if !chain.writable.is_empty() {
        return Err((None, PacketError::WritableInTx));
    }
    let readable = chain.readable_len();
    if readable < HDR_LEN as u64 {
        return Err((None, PacketError::ShortHeader(readable)));
    }
    let mut r = BufReader::new(mem, &chain.readable);
    let mut hdr = Header::default();
    r.read_exact(hdr.as_mut_slice())
        .map_err(|_| (None, PacketError::Unreadable))?;
    let mut payload = Vec::new();
    if hdr.op == OP_RW {
        let len = hdr.len;
        if len > MAX_PAYLOAD {
            return Err((Some(hdr), PacketError::PayloadTooLong(len)));
        }
        let present = readable - HDR_LEN as u64;
        if u64::from(len) > present {
            return Err((
                Some(hdr),
                PacketError::PayloadMissing {
                    claimed: len,
                    present,
                },
            ));
        }
        payload = sub_bufs(&chain.readable, HDR_LEN as u64, u64::from(len));
    }
    Ok(TxPacket { hdr, payload })
}

/// Checks an RX chain and returns its capacity for payload.
pub fn rx_capacity(chain: &Chain) -> Result<u64, PacketError> {
    if !chain.readable.is_empty() {
        return Err(PacketError::ReadableInRx);
    }
    let cap = chain.writable_len();
    if cap < HDR_LEN as u64 {
        return Err(PacketError::SmallRx(cap));
    }
    Ok((cap - HDR_LEN as u64).min(u64::from(MAX_PAYLOAD)))
}

/// The payload part of an RX chain (after the header).
pub fn rx_payload_bufs(chain: &Chain) -> Vec<Buf> {
    sub_bufs(&chain.writable, HDR_LEN as u64, u64::MAX)
}

/// Writes `hdr` at the start of an RX chain.
pub fn write_rx_header<M: GuestMemoryBackend + ?Sized>(
    chain: &Chain,
    mem: &M,
    hdr: &Header,
) -> Result<(), vm_memory::GuestMemoryError> {
    BufWriter::new(mem, &chain.writable).write_all(hdr.as_slice())
}

/// `bufs` without their first `skip` bytes and cut to `take` bytes.
pub(crate) fn sub_bufs(bufs: &[Buf], mut skip: u64, mut take: u64) -> Vec<Buf> {
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
            addr: vm_memory::GuestAddress(b.addr.0 + skip),
            len: n as u32,
        });
        take -= n;
        skip = 0;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::chain::tests::mem;
    use vm_memory::{Bytes, GuestAddress};

    fn buf(addr: u64, len: u32) -> Buf {
        Buf {
            addr: GuestAddress(addr),
            len,
        }
    }

    #[test]
    fn parses_header_and_payload_across_buffers() {
        let m = mem();
        let hdr = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len: 10,
            type_: TYPE_STREAM,
            op: OP_RW,
            ..Default::default()
        };
        let bytes = hdr.as_slice().to_vec();
        m.write_slice(&bytes[..20], GuestAddress(0x1000)).unwrap();
        m.write_slice(&bytes[20..], GuestAddress(0x2000)).unwrap();
        m.write_slice(b"0123456789", GuestAddress(0x2000 + 24))
            .unwrap();
        let chain = Chain {
            readable: vec![buf(0x1000, 20), buf(0x2000, 24 + 16)],
            writable: vec![],
        };
        let p = parse_tx(&chain, &m).unwrap();
        assert_eq!(p.hdr, hdr);
        assert_eq!(p.payload, vec![buf(0x2000 + 24, 10)]);
    }

    #[test]
    fn hostile_packets_are_refused() {
        let m = mem();
        let mut hdr = Header {
            op: OP_RW,
            len: u32::MAX,
            ..Default::default()
        };
        m.write_obj(hdr, GuestAddress(0x1000)).unwrap();
        let c = Chain {
            readable: vec![buf(0x1000, 44)],
            writable: vec![],
        };
        assert_eq!(
            parse_tx(&c, &m).unwrap_err().1,
            PacketError::PayloadTooLong(u32::MAX)
        );
        hdr.len = 100;
        m.write_obj(hdr, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            parse_tx(&c, &m).unwrap_err().1,
            PacketError::PayloadMissing {
                claimed: 100,
                present: 0
            }
        );
        let short = Chain {
            readable: vec![buf(0x1000, 43)],
            writable: vec![],
        };
        assert_eq!(
            parse_tx(&short, &m).unwrap_err().1,
            PacketError::ShortHeader(43)
        );
        let wrong = Chain {
            readable: vec![buf(0x1000, 44)],
            writable: vec![buf(0x2000, 8)],
        };
        assert_eq!(
            parse_tx(&wrong, &m).unwrap_err().1,
            PacketError::WritableInTx
        );
        // A non-RW packet's length field is ignored.
        hdr.op = OP_REQUEST;
        m.write_obj(hdr, GuestAddress(0x1000)).unwrap();
        assert!(parse_tx(&c, &m).unwrap().payload.is_empty());

        assert_eq!(
            rx_capacity(&Chain {
                readable: vec![],
                writable: vec![buf(0x1000, 40)]
            }),
            Err(PacketError::SmallRx(40))
        );
        assert_eq!(
            rx_capacity(&Chain {
                readable: vec![buf(0x1000, 40)],
                writable: vec![buf(0x2000, 4096)]
            }),
            Err(PacketError::ReadableInRx)
        );
        assert_eq!(
            rx_capacity(&Chain {
                readable: vec![],
                writable: vec![buf(0x1000, 44), buf(0x2000, 0x10_0000)]
            }),
            Ok(u64::from(MAX_PAYLOAD))
        );
    }
}
