//! Resetting the guest's TCP connections to peers outside the guest after a restore or fork.
//!
//! A restored guest (or each of many forks) still believes in the connections it had when the
//! snapshot was taken, but the peer and the host's network backend have moved on: a new passt
//! knows none of them and drops their segments silently, so a process blocked on such a socket
//! would wait for TCP's retransmission timeout (many minutes). The agent aborts them instead, as
//! `ss -K` does: every TCP socket that is neither listening nor connected to the guest itself is
//! destroyed through the kernel's sock_diag netlink interface (`SOCK_DESTROY`, Linux 4.5+ with
//! `CONFIG_INET_DIAG_DESTROY`). Its owner sees `ECONNABORTED` at once, and the kernel sends the
//! peer an RST. Connections between two processes of the guest (loopback, or to one of its own
//! addresses) survive a restore intact and are kept.
//!
//! The structures are the kernel's UAPI (`linux/netlink.h`, `linux/sock_diag.h`,
//! `linux/inet_diag.h`), stable since Linux 4.5; no maintained crate offers `SOCK_DESTROY`, and the
//! three messages below are all this needs. Every reply is parsed with its lengths checked.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `SOCK_DIAG_BY_FAMILY` (linux/sock_diag.h): dump sockets of one family.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `SOCK_DESTROY` (linux/sock_diag.h): abort one socket, found by its inet_diag id.
const SOCK_DESTROY: u16 = 21;
/// `struct nlmsghdr`: len u32, type u16, flags u16, seq u32, pid u32.
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad (u8 each), states u32, id.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// `struct inet_diag_sockid`: sport, dport (be16), src[4], dst[4] (be32), if u32, cookie[2] u32.
const SOCKID_LEN: usize = 48;
/// Offsets in `inet_diag_sockid` of the source and destination addresses (16 bytes each; an
/// IPv4 address is the first 4).
const SOCKID_SRC: usize = 4;
const SOCKID_DST: usize = 20;
/// `struct inet_diag_msg`: family, state, timer, retrans (u8 each), id, then five u32.
const DIAG_MSG_LEN: usize = 4 + SOCKID_LEN + 20;
/// TCP states (include/net/tcp_states.h) that are connections: everything but LISTEN (10),
/// CLOSE (7), TIME_WAIT (6, nothing left to abort) and NEW_SYN_RECV (12, a request sock).
const CONNECTED_STATES: u32 = 1 << 1 // ESTABLISHED
    | 1 << 2 // SYN_SENT
    | 1 << 3 // SYN_RECV
    | 1 << 4 // FIN_WAIT1
    | 1 << 5 // FIN_WAIT2
    | 1 << 8 // CLOSE_WAIT
    | 1 << 9 // LAST_ACK
    | 1 << 11; // CLOSING
/// More sockets than this in one guest is not a workspace we know how to reason about: stop.
const MAX_SOCKETS: usize = 65_536;
/// Receive buffer for dump replies (the kernel fills up to about a page per message batch).
const RECV_BUF: usize = 64 * 1024;

/// What [`reset_external_tcp`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResetReport {
    /// Connections to peers outside the guest, aborted.
    pub reset: usize,
    /// Connections inside the guest (loopback or its own address), kept.
    pub kept_local: usize,
    /// Connections that were gone by the time they were aborted.
    pub gone: usize,
}

/// Why the reset failed.
#[derive(Debug, thiserror::Error)]
pub enum NetResetError {
    #[error("netlink sock_diag: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel cannot destroy sockets (CONFIG_INET_DIAG_DESTROY is off): {0}")]
    Unsupported(io::Error),
    #[error("malformed sock_diag reply: {0}")]
    Malformed(&'static str),
    #[error("more than {MAX_SOCKETS} TCP sockets")]
    TooMany,
}

/// One TCP socket as the dump reported it: enough to find it again and to classify it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Socket {
    family: u8,
    /// The raw `inet_diag_sockid`, passed back unchanged (its cookie makes the lookup exact).
    id: [u8; SOCKID_LEN],
}

impl Socket {
    /// Both ends in this guest: a loopback peer, or a peer at the socket's own address.
    fn is_guest_local(&self) -> bool {
        let src = &self.id[SOCKID_SRC..SOCKID_SRC + 16];
        let dst = &self.id[SOCKID_DST..SOCKID_DST + 16];
        match i32::from(self.family) {
            libc::AF_INET => {
                let d = Ipv4Addr::new(dst[0], dst[1], dst[2], dst[3]);
                d.is_loopback() || src[..4] == dst[..4]
            }
            libc::AF_INET6 => {
                let d = Ipv6Addr::from(<[u8; 16]>::try_from(dst).unwrap_or([0; 16]));
                let loopback =
                    d.is_loopback() || d.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback());
                loopback || src == dst
            }
            _ => false,
        }
    }
}

/// Aborts every TCP connection of this guest whose peer is outside it (IPv4 and IPv6).
pub fn reset_external_tcp() -> Result<ResetReport, NetResetError> {
    reset_tcp_where(|s| !s.is_guest_local())
}

/// Aborts the TCP connections `select` picks; the others count as kept.
fn reset_tcp_where(select: impl Fn(&Socket) -> bool) -> Result<ResetReport, NetResetError> {
    let nl = Netlink::open()?;
    let mut sockets = nl.dump(libc::AF_INET as u8)?;
    match nl.dump(libc::AF_INET6 as u8) {
        Ok(v6) => sockets.extend(v6),
        // A kernel without IPv6 has no AF_INET6 diag handler.
        Err(NetResetError::Io(e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let mut report = ResetReport::default();
    for s in &sockets {
        if !select(s) {
            report.kept_local += 1;
            continue;
        }
        match nl.destroy(s) {
            Ok(()) => report.reset += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => report.gone += 1,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                return Err(NetResetError::Unsupported(e))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(report)
}

struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> Result<Self, NetResetError> {
        // SAFETY: plain socket(2); the result is checked before it is owned.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: fd is a new descriptor nothing else owns.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: msg is a valid buffer of msg.len() bytes; an unconnected netlink socket sends
        // to the kernel.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != msg.len() {
            return Err(io::Error::other("short netlink send"));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Every TCP connection of `family`.
    fn dump(&self, family: u8) -> Result<Vec<Socket>, NetResetError> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        self.send(&request(
            SOCK_DIAG_BY_FAMILY,
            flags,
            1,
            family,
            &[0; SOCKID_LEN],
        ))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.recv(&mut buf)?;
            if n == 0 {
                return Err(NetResetError::Malformed(
                    "the dump ended without NLMSG_DONE",
                ));
            }
            if parse_dump(&buf[..n], &mut out)? {
                return Ok(out);
            }
            if out.len() > MAX_SOCKETS {
                return Err(NetResetError::TooMany);
            }
        }
    }

    fn destroy(&self, s: &Socket) -> io::Result<()> {
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
        self.send(&request(SOCK_DESTROY, flags, 2, s.family, &s.id))?;
        let mut buf = [0u8; 256];
        let n = self.recv(&mut buf)?;
        match parse_ack(&buf[..n]) {
            Some(0) => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Err(io::Error::other("no netlink ack for SOCK_DESTROY")),
        }
    }
}

/// An `nlmsghdr` followed by an `inet_diag_req_v2` for TCP with `id`.
fn request(kind: u16, flags: u16, seq: u32, family: u8, id: &[u8; SOCKID_LEN]) -> Vec<u8> {
    let mut m = Vec::with_capacity(NLMSG_HDR + REQ_LEN);
    m.extend_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&CONNECTED_STATES.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// One netlink message: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), NetResetError>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() < NLMSG_HDR {
            rest = &[];
            return Some(Err(NetResetError::Malformed("a truncated netlink header")));
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDR || len > rest.len() {
            rest = &[];
            return Some(Err(NetResetError::Malformed(
                "a netlink length out of bounds",
            )));
        }
        let payload = &rest[NLMSG_HDR..len];
        // NLMSG_ALIGN: messages start on 4-byte boundaries.
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some(Ok((kind, payload)))
    })
}

/// Appends the sockets in one batch of dump replies; true when the dump is complete.
fn parse_dump(buf: &[u8], out: &mut Vec<Socket>) -> Result<bool, NetResetError> {
    for m in messages(buf) {
        let (kind, payload) = m?;
        match i32::from(kind) {
            libc::NLMSG_DONE => return Ok(true),
            libc::NLMSG_ERROR => {
                return Err(match error_code(payload) {
                    Some(errno) => io::Error::from_raw_os_error(errno).into(),
                    None => NetResetError::Malformed("a truncated netlink error"),
                })
            }
            _ if kind == SOCK_DIAG_BY_FAMILY => {
                let msg = payload
                    .get(..DIAG_MSG_LEN)
                    .ok_or(NetResetError::Malformed("a short inet_diag_msg"))?;
                let mut id = [0u8; SOCKID_LEN];
                id.copy_from_slice(&msg[4..4 + SOCKID_LEN]);
                out.push(Socket { family: msg[0], id });
            }
            _ => {} // NLMSG_NOOP and the like
        }
    }
    Ok(false)
}

/// The errno of an `NLMSG_ERROR` ack (0 = success), if `buf` holds one.
fn parse_ack(buf: &[u8]) -> Option<i32> {
    messages(buf).find_map(|m| match m {
        Ok((kind, payload)) if i32::from(kind) == libc::NLMSG_ERROR => error_code(payload),
        _ => None,
    })
}

/// `struct nlmsgerr` starts with the negated errno.
fn error_code(payload: &[u8]) -> Option<i32> {
    let b: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(i32::from_ne_bytes(b).checked_neg().unwrap_or(i32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(len: usize, kind: u16) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend_from_slice(&(len as u32).to_ne_bytes());
        h.extend_from_slice(&kind.to_ne_bytes());
        h.extend_from_slice(&[0; 10]);
        h
    }

    fn diag_msg(family: u8, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut m = header(NLMSG_HDR + DIAG_MSG_LEN, SOCK_DIAG_BY_FAMILY);
        m.extend_from_slice(&[family, 1, 0, 0]);
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&80u16.to_be_bytes());
        // Written at the kernel's offsets, not through the constants the code reads with.
        id[4..8].copy_from_slice(&src);
        id[20..24].copy_from_slice(&dst);
        id[44..48].copy_from_slice(&[7, 7, 7, 7]); // cookie
        m.extend_from_slice(&id);
        m.extend_from_slice(&[0; 20]);
        m
    }

    #[test]
    fn a_dump_yields_its_sockets_and_ends_at_done() {
        let mut buf = diag_msg(2, [10, 0, 2, 15], [10, 0, 2, 2]);
        buf.extend(diag_msg(2, [127, 0, 0, 1], [127, 0, 0, 1]));
        let mut out = Vec::new();
        assert!(!parse_dump(&buf, &mut out).unwrap(), "no DONE yet");
        buf = header(NLMSG_HDR + 4, libc::NLMSG_DONE as u16);
        buf.extend_from_slice(&[0; 4]);
        assert!(parse_dump(&buf, &mut out).unwrap());
        assert_eq!(out.len(), 2);
        assert!(!out[0].is_guest_local(), "a peer on the gateway is outside");
        assert!(out[1].is_guest_local(), "loopback is inside");
        // The id goes back to the kernel unchanged, cookie included.
        let req = request(SOCK_DESTROY, 5, 2, out[0].family, &out[0].id);
        assert_eq!(req.len(), NLMSG_HDR + REQ_LEN);
        assert_eq!(&req[NLMSG_HDR + 8..], &out[0].id[..]);
        assert_eq!(&req[NLMSG_HDR + 8 + 44..], &[7, 7, 7, 7]);
    }

    #[test]
    fn a_connection_to_the_guests_own_address_is_local() {
        let mut out = Vec::new();
        parse_dump(&diag_msg(2, [10, 0, 2, 15], [10, 0, 2, 15]), &mut out).unwrap();
        assert!(out[0].is_guest_local());
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        let full = diag_msg(2, [1, 2, 3, 4], [5, 6, 7, 8]);
        // Every truncation, and lengths that lie.
        for cut in 1..full.len() {
            let mut out = Vec::new();
            assert!(parse_dump(&full[..cut], &mut out).is_err(), "cut at {cut}");
        }
        for len in [0u32, 15, 1000, u32::MAX] {
            let mut b = full.clone();
            b[..4].copy_from_slice(&len.to_ne_bytes());
            assert!(parse_dump(&b, &mut Vec::new()).is_err(), "length {len}");
        }
        // A short inet_diag_msg inside a well-formed message.
        let mut short = header(NLMSG_HDR + 8, SOCK_DIAG_BY_FAMILY);
        short.extend_from_slice(&[0; 8]);
        assert!(parse_dump(&short, &mut Vec::new()).is_err());
        assert_eq!(parse_ack(&[0; 3]), None);
    }

    /// The real kernel interface, in a network namespace of this test's own (root only): a
    /// loopback connection is found by the dump and, when picked, destroyed; its owner sees
    /// ECONNABORTED at once. Loopback because a fresh namespace has nothing else; the choice of
    /// what to destroy is tested above.
    #[test]
    fn a_picked_connection_is_aborted_by_the_kernel() {
        use std::io::Read;
        use std::net::{TcpListener, TcpStream};
        let t = std::thread::spawn(|| {
            // SAFETY: unshare affects only this thread, which owns everything made after it.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                eprintln!("skipped a_picked_connection_is_aborted_by_the_kernel: unshare(CLONE_NEWNET): {e} (needs root)");
                return;
            }
            loopback_up();
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
            let (_server, _) = l.accept().unwrap();
            let is_client = |s: &Socket| u16::from_be_bytes([s.id[2], s.id[3]]) == port;
            // The offsets agree with the kernel's: both ends are 127.0.0.1 and loopback is local.
            let seen = Netlink::open().unwrap().dump(libc::AF_INET as u8).unwrap();
            let client_sock = seen
                .iter()
                .find(|s| is_client(s))
                .expect("the dump lists the client");
            assert_eq!(client_sock.id[SOCKID_SRC..SOCKID_SRC + 4], [127, 0, 0, 1]);
            assert_eq!(client_sock.id[SOCKID_DST..SOCKID_DST + 4], [127, 0, 0, 1]);
            assert!(seen.iter().all(Socket::is_guest_local));
            // Found, and kept when not picked (both ends: the accepted socket's peer port differs).
            let r = reset_tcp_where(|_| false).unwrap();
            assert_eq!((r.reset, r.kept_local), (0, 2), "{r:?}");
            let r = reset_tcp_where(is_client).unwrap();
            assert_eq!((r.reset, r.kept_local), (1, 1), "{r:?}");
            client
                .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let e = client.read(&mut [0u8; 8]).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ECONNABORTED), "{e}");
        });
        t.join().unwrap();
    }

    /// `ip link set lo up` in the current network namespace.
    fn loopback_up() {
        // SAFETY: a plain socket for the ioctl; closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        // SAFETY: ifreq is plain data; all zeros is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
        let rc = unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) };
        let e = io::Error::last_os_error();
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        assert_eq!(rc, 0, "SIOCSIFFLAGS lo: {e}");
    }

    #[test]
    fn a_netlink_error_carries_its_errno() {
        let mut e = header(NLMSG_HDR + 4, libc::NLMSG_ERROR as u16);
        e.extend_from_slice(&(-libc::EOPNOTSUPP).to_ne_bytes());
        assert_eq!(parse_ack(&e), Some(libc::EOPNOTSUPP));
        match parse_dump(&e, &mut Vec::new()) {
            Err(NetResetError::Io(io)) => assert_eq!(io.raw_os_error(), Some(libc::EOPNOTSUPP)),
            other => panic!("{other:?}"),
        }
    }
}
