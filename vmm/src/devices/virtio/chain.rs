//! Descriptor chains as the devices see them: a checked list of guest buffers, split into the
//! device-readable part and the device-writable part that must follow it (virtio 1.x §2.7.4.2),
//! plus gather/scatter over those buffers through vm-memory's bounds-checked accessors.
//!
//! `virtio-queue` bounds a chain by the queue size (so a loop ends) and checks indirect tables;
//! what it cannot tell us is that the chain was cut short, which [`collect`] detects: the last
//! descriptor it yielded still says "next".

use std::io::ErrorKind;
use std::ops::Deref;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, VolatileMemoryError,
    WriteVolatile,
};

/// A guest buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buf {
    pub addr: GuestAddress,
    pub len: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("empty descriptor chain (bad head index or unreadable descriptor)")]
    Empty,
    #[error(
        "descriptor chain cut short: a loop, a next index out of range or an unreadable descriptor"
    )]
    Truncated,
    #[error("descriptor chain has more than {max} descriptors")]
    TooLong { max: usize },
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    #[error("zero-length descriptor")]
    ZeroLength,
    #[error("chain's total length overflows")]
    Overflow,
}

/// A validated chain: every buffer lies inside guest memory and is non-empty; readable buffers
/// come first.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Chain {
    pub readable: Vec<Buf>,
    pub writable: Vec<Buf>,
}

impl Chain {
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|b| u64::from(b.len)).sum()
    }
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|b| u64::from(b.len)).sum()
    }
}

/// Walks `chain` (at most `max` descriptors) and checks every buffer against `mem`.
pub fn collect<M, G>(chain: DescriptorChain<M>, mem: &G, max: usize) -> Result<Chain, ChainError>
where
    M: Deref,
    M::Target: vm_memory::GuestMemory,
    G: GuestMemoryBackend + ?Sized,
{
    let mut out = Chain::default();
    let mut last: Option<Descriptor> = None;
    let mut count = 0usize;
    let mut total: u64 = 0;
    for desc in chain {
        count += 1;
        if count > max {
            return Err(ChainError::TooLong { max });
        }
        let buf = Buf {
            addr: desc.addr(),
            len: desc.len(),
        };
        if buf.len == 0 {
            return Err(ChainError::ZeroLength);
        }
        if !GuestMemoryBackend::check_range(mem, buf.addr, buf.len as usize) {
            return Err(ChainError::OutOfBounds {
                addr: buf.addr.0,
                len: buf.len,
            });
        }
        total = total
            .checked_add(u64::from(buf.len))
            .ok_or(ChainError::Overflow)?;
        if desc.is_write_only() {
            out.writable.push(buf);
        } else if !out.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        } else {
            out.readable.push(buf);
        }
        last = Some(desc);
    }
    match last {
        None => Err(ChainError::Empty),
        Some(d) if d.has_next() => Err(ChainError::Truncated),
        Some(_) => Ok(out),
    }
}

/// Reads sequentially from a list of guest buffers.
pub struct BufReader<'a, M: ?Sized> {
    mem: &'a M,
    bufs: &'a [Buf],
    idx: usize,
    off: u32,
}

impl<'a, M: GuestMemoryBackend + ?Sized> BufReader<'a, M> {
    pub fn new(mem: &'a M, bufs: &'a [Buf]) -> Self {
        Self {
            mem,
            bufs,
            idx: 0,
            off: 0,
        }
    }

    pub fn remaining(&self) -> u64 {
        self.bufs[self.idx.min(self.bufs.len())..]
            .iter()
            .map(|b| u64::from(b.len))
            .sum::<u64>()
            - u64::from(self.off)
    }

    fn advance(&mut self, n: u32) {
        self.off += n;
        if self.idx < self.bufs.len() && self.off == self.bufs[self.idx].len {
            self.idx += 1;
            self.off = 0;
        }
    }

    /// Fills `out` completely, or fails (leaving the position undefined) when the buffers end or
    /// memory cannot be read.
    pub fn read_exact(&mut self, mut out: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        while !out.is_empty() {
            let Some(b) = self.bufs.get(self.idx) else {
                return Err(vm_memory::GuestMemoryError::PartialBuffer {
                    expected: out.len(),
                    completed: 0,
                });
            };
            let n = ((b.len - self.off) as usize).min(out.len());
            self.mem
                .read_slice(&mut out[..n], b.addr.unchecked_add(u64::from(self.off)))?;
            out = &mut out[n..];
            self.advance(n as u32);
        }
        Ok(())
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, mut n: u64) -> bool {
        while n > 0 {
            let Some(b) = self.bufs.get(self.idx) else {
                return false;
            };
            let k = u64::from(b.len - self.off).min(n);
            self.advance(k as u32);
            n -= k;
        }
        true
    }

    /// Writes up to `max` bytes from guest memory to `dst`, one write(2) per contiguous piece,
    /// stopping at the first short write. Returns the bytes written; `WouldBlock` only when
    /// nothing was written.
    pub fn write_to<W: WriteVolatile>(&mut self, dst: &mut W, max: u64) -> std::io::Result<u64> {
        let mut done = 0u64;
        while done < max {
            let Some(b) = self.bufs.get(self.idx) else {
                break;
            };
            let n = u64::from(b.len - self.off).min(max - done) as usize;
            let addr = b.addr.unchecked_add(u64::from(self.off));
            let mut short = false;
            for slice in GuestMemoryBackend::get_slices(self.mem, addr, n) {
                let slice = slice.map_err(|e| std::io::Error::other(e.to_string()))?;
                match dst.write_volatile(&slice) {
                    Ok(k) => {
                        done += k as u64;
                        self.advance(k as u32);
                        if k < slice.len() {
                            short = true;
                            break;
                        }
                    }
                    Err(e) => {
                        let e = volatile_io_error(e);
                        if done > 0 && e.kind() == ErrorKind::WouldBlock {
                            return Ok(done);
                        }
                        return Err(e);
                    }
                }
            }
            if short || n == 0 {
                break;
            }
        }
        Ok(done)
    }
}

/// Writes sequentially into a list of guest buffers.
pub struct BufWriter<'a, M: ?Sized> {
    mem: &'a M,
    bufs: &'a [Buf],
    idx: usize,
    off: u32,
    written: u64,
}

impl<'a, M: GuestMemoryBackend + ?Sized> BufWriter<'a, M> {
    pub fn new(mem: &'a M, bufs: &'a [Buf]) -> Self {
        Self {
            mem,
            bufs,
            idx: 0,
            off: 0,
            written: 0,
        }
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn remaining(&self) -> u64 {
        self.bufs[self.idx.min(self.bufs.len())..]
            .iter()
            .map(|b| u64::from(b.len))
            .sum::<u64>()
            - u64::from(self.off)
    }

    fn advance(&mut self, n: u32) {
        self.off += n;
        self.written += u64::from(n);
        if self.idx < self.bufs.len() && self.off == self.bufs[self.idx].len {
            self.idx += 1;
            self.off = 0;
        }
    }

    /// Writes all of `data`, or fails when the buffers are too small.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
        while !data.is_empty() {
            let Some(b) = self.bufs.get(self.idx) else {
                return Err(vm_memory::GuestMemoryError::PartialBuffer {
                    expected: data.len(),
                    completed: 0,
                });
            };
            let n = ((b.len - self.off) as usize).min(data.len());
            self.mem
                .write_slice(&data[..n], b.addr.unchecked_add(u64::from(self.off)))?;
            data = &data[n..];
            self.advance(n as u32);
        }
        Ok(())
    }

    /// Reads up to `max` bytes from `src` straight into guest memory, one read(2) per
    /// contiguous piece, stopping at the first short read. Returns the bytes read; `Ok(0)` with
    /// `max > 0` means end of stream, `WouldBlock` that nothing was there.
    pub fn read_from<R: ReadVolatile>(&mut self, src: &mut R, max: u64) -> std::io::Result<u64> {
        let mut done = 0u64;
        while done < max {
            let Some(b) = self.bufs.get(self.idx) else {
                break;
            };
            let n = u64::from(b.len - self.off).min(max - done) as usize;
            let addr = b.addr.unchecked_add(u64::from(self.off));
            let mut short = false;
            for slice in GuestMemoryBackend::get_slices(self.mem, addr, n) {
                let mut slice = slice.map_err(|e| std::io::Error::other(e.to_string()))?;
                match src.read_volatile(&mut slice) {
                    Ok(k) => {
                        done += k as u64;
                        self.advance(k as u32);
                        if k < slice.len() {
                            short = true;
                            break;
                        }
                    }
                    Err(e) => {
                        let e = volatile_io_error(e);
                        if done > 0 && e.kind() == ErrorKind::WouldBlock {
                            return Ok(done);
                        }
                        return Err(e);
                    }
                }
            }
            if short || n == 0 {
                break;
            }
        }
        Ok(done)
    }
}

/// vm-memory wraps the I/O error of a volatile read/write; unwrap it so callers can see
/// `WouldBlock`.
fn volatile_io_error(e: VolatileMemoryError) -> std::io::Error {
    match e {
        VolatileMemoryError::IOError(io) => io,
        other => std::io::Error::other(other.to_string()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::GuestMemory;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    pub fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    pub fn d(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    fn first_chain(m: &GuestMemory, descs: &[RawDescriptor]) -> Result<Chain, ChainError> {
        let vq = MockSplitQueue::new(m, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        use virtio_queue::QueueT;
        let c = q.pop_descriptor_chain(m).unwrap();
        collect(c, m, 8)
    }

    #[test]
    fn good_chain_splits_readable_and_writable() {
        let m = mem();
        let c = first_chain(
            &m,
            &[
                d(0x10_0000, 16, VRING_DESC_F_NEXT, 1),
                d(0x10_1000, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 2),
                d(0x10_2000, 1, VRING_DESC_F_WRITE, 0),
            ],
        )
        .unwrap();
        assert_eq!(c.readable.len(), 1);
        assert_eq!(c.writable.len(), 2);
        assert_eq!(c.writable_len(), 513);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let m = mem();
        // A loop: 0 -> 1 -> 0 ...
        assert_eq!(
            first_chain(
                &m,
                &[
                    d(0x10_0000, 16, VRING_DESC_F_NEXT, 1),
                    d(0x10_1000, 16, VRING_DESC_F_NEXT, 0),
                ]
            ),
            Err(ChainError::TooLong { max: 8 })
        );
        // Next index past the queue.
        assert_eq!(
            first_chain(&m, &[d(0x10_0000, 16, VRING_DESC_F_NEXT, 99)]),
            Err(ChainError::Truncated)
        );
        // Out of guest memory, and straddling its end.
        assert!(matches!(
            first_chain(&m, &[d(0x4000_0000, 16, 0, 0)]),
            Err(ChainError::OutOfBounds { .. })
        ));
        assert!(matches!(
            first_chain(&m, &[d(0x1f_fff0, 0x20, 0, 0)]),
            Err(ChainError::OutOfBounds { .. })
        ));
        assert!(matches!(
            first_chain(&m, &[d(u64::MAX - 4, 16, 0, 0)]),
            Err(ChainError::OutOfBounds { .. })
        ));
        assert_eq!(
            first_chain(&m, &[d(0x10_0000, 0, 0, 0)]),
            Err(ChainError::ZeroLength)
        );
        assert_eq!(
            first_chain(
                &m,
                &[
                    d(0x10_0000, 16, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 1),
                    d(0x10_1000, 16, 0, 0),
                ]
            ),
            Err(ChainError::ReadableAfterWritable)
        );
    }

    #[test]
    fn gather_and_scatter_cross_buffers() {
        let m = mem();
        let bufs = [
            Buf {
                addr: GuestAddress(0x1000),
                len: 3,
            },
            Buf {
                addr: GuestAddress(0x2000),
                len: 5,
            },
        ];
        let mut w = BufWriter::new(&m, &bufs);
        w.write_all(b"abcdefg").unwrap();
        assert_eq!(w.written(), 7);
        assert_eq!(w.remaining(), 1);
        assert!(w.write_all(b"xy").is_err());
        let mut r = BufReader::new(&m, &bufs);
        let mut out = [0u8; 7];
        r.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"abcdefg");
        assert_eq!(r.remaining(), 1);
    }
}
