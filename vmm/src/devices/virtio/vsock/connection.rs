//! One vsock stream connection between a guest port and a host Unix socket: its state machine
//! and credit-based flow control (virtio 1.x §5.10.6.3).
//!
//! Credit: we advertise `buf_alloc` bytes of buffer and count in `fwd_cnt` the bytes we passed on
//! to the host socket; the guest may have at most `buf_alloc` bytes in flight, which bounds what
//! we ever buffer for a slow host reader (a guest that sends more is reset). In the other
//! direction we send at most the guest's free credit (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`).
//!
//! The host socket is watched edge-triggered; `host_readable`/`host_writable` remember an edge
//! until the socket says EAGAIN.

use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vm_memory::GuestMemoryBackend;

use super::packet::{
    Header, HOST_CID, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::devices::virtio::chain::{Buf, BufReader, BufWriter};

/// Buffer we advertise per connection, and so the most we ever hold for one.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
/// Tell the guest about freed buffer space once this much was forwarded since the last report.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent (or queued) to the guest, waiting for RESPONSE.
    LocalInit,
    Established,
    /// We told the guest the host side is gone (SHUTDOWN), waiting for its RST.
    Closing,
    /// Done: the caller removes it once any queued RST has gone out.
    Dead,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConnError {
    #[error("guest sent {0} bytes beyond the credit we gave it")]
    CreditOverrun(u64),
    #[error("guest packet for a connection in state {0:?}")]
    BadState(State),
    #[error("host socket: {0}")]
    Host(String),
    #[error("cannot read the guest's payload")]
    GuestMemory,
}

pub struct Connection {
    pub stream: UnixStream,
    pub guest_cid: u64,
    /// Our (host) port.
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    pub state: State,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Guest data not yet written to the host socket.
    tx_buf: Vec<u8>,
    /// Bytes for the host that are not guest data ("OK <port>\n"), written first.
    prefix: Vec<u8>,
    pub host_readable: bool,
    host_eof: bool,
    peer_shutdown: u32,
    want_request: bool,
    want_response: bool,
    want_rst: bool,
    want_shutdown: bool,
    want_credit_update: bool,
    credit_requested: bool,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state: State::LocalInit,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_buf: Vec::new(),
            prefix: Vec::new(),
            host_readable: false,
            host_eof: false,
            peer_shutdown: 0,
            want_request: false,
            want_response: false,
            want_rst: false,
            want_shutdown: false,
            want_credit_update: false,
            credit_requested: false,
        }
    }

    /// A host client asked (CONNECT) for the guest's `peer_port`: we send REQUEST.
    pub fn host_initiated(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut c = Self::new(stream, guest_cid, local_port, peer_port);
        c.want_request = true;
        c
    }

    /// The guest's REQUEST reached a host listener: we answer RESPONSE.
    pub fn guest_initiated(stream: UnixStream, hdr: &Header) -> Self {
        let mut c = Self::new(stream, hdr.src_cid, hdr.dst_port, hdr.src_port);
        c.state = State::Established;
        c.want_response = true;
        c.update_peer_credit(hdr);
        c
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// Bytes the guest can still take.
    fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether an RX buffer would get a packet from us now.
    pub fn wants_rx(&self) -> bool {
        self.want_rst
            || self.want_request
            || self.want_response
            || self.want_shutdown
            || self.want_credit_update
            || (self.state == State::Established
                && self.host_readable
                && !self.host_eof
                && (self.peer_free() > 0 || !self.credit_requested))
    }

    pub fn is_dead(&self) -> bool {
        self.state == State::Dead && !self.want_rst
    }

    /// Ends the connection with an RST to the guest.
    pub fn reset(&mut self) {
        if self.state != State::Dead {
            self.want_rst = true;
            self.state = State::Dead;
        }
    }

    fn header(&mut self, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.want_credit_update = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Produces the next packet for the guest into an RX buffer whose payload part is
    /// `payload` (at most `cap` bytes). Returns its header (its `len` bytes of payload already
    /// in guest memory), or `None` when there is nothing to send now.
    pub fn next_rx<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        payload: &[Buf],
        cap: u64,
    ) -> Option<Header> {
        if self.want_rst {
            self.want_rst = false;
            return Some(self.header(OP_RST, 0, 0));
        }
        if self.want_request {
            self.want_request = false;
            return Some(self.header(OP_REQUEST, 0, 0));
        }
        if self.want_response {
            self.want_response = false;
            return Some(self.header(OP_RESPONSE, 0, 0));
        }
        if self.state == State::Established && self.host_readable && !self.host_eof {
            let max = u64::from(self.peer_free()).min(cap);
            if max == 0 {
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Some(self.header(OP_CREDIT_REQUEST, 0, 0));
                }
            } else {
                let mut w = BufWriter::new(mem, payload);
                match w.read_from(&mut self.stream, max) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                        self.want_shutdown = true;
                    }
                    Ok(n) => {
                        self.rx_cnt += Wrapping(n as u32);
                        return Some(self.header(OP_RW, n as u32, 0));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => self.host_readable = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.host_readable = false;
                        self.host_eof = true;
                        self.want_shutdown = true;
                    }
                }
            }
        }
        if self.want_shutdown {
            self.want_shutdown = false;
            if self.state == State::Established {
                self.state = State::Closing;
            }
            return Some(self.header(OP_SHUTDOWN, 0, SHUTDOWN_RCV | SHUTDOWN_SEND));
        }
        if self.want_credit_update {
            return Some(self.header(OP_CREDIT_UPDATE, 0, 0));
        }
        None
    }

    /// Handles a packet from the guest for this connection.
    pub fn handle_tx<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        hdr: &Header,
        payload: &[Buf],
    ) -> Result<(), ConnError> {
        self.update_peer_credit(hdr);
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
        match hdr.op {
            OP_RST => {
                self.state = State::Dead;
                self.want_rst = false;
                Ok(())
            }
            OP_RESPONSE if self.state == State::LocalInit => {
                self.state = State::Established;
                self.prefix = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host()
            }
            OP_RW if self.state == State::Established || self.state == State::Closing => {
                self.send_to_host(mem, payload, u64::from(hdr.len))
            }
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                self.want_credit_update = true;
                Ok(())
            }
            OP_SHUTDOWN => {
                self.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if self.peer_shutdown & SHUTDOWN_SEND != 0 && self.tx_buf.is_empty() {
                    let _ = self.stream.shutdown(std::net::Shutdown::Write);
                }
                if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // The guest closed: pass on what it sent, then finish with RST.
                    let _ = self.flush_to_host();
                    self.reset();
                }
                Ok(())
            }
            _ => Err(ConnError::BadState(self.state)),
        }
    }

    fn send_to_host<M: GuestMemoryBackend + ?Sized>(
        &mut self,
        mem: &M,
        payload: &[Buf],
        len: u64,
    ) -> Result<(), ConnError> {
        let buffered = self.tx_buf.len() as u64;
        if buffered + len > u64::from(CONN_BUF_ALLOC) {
            return Err(ConnError::CreditOverrun(
                buffered + len - u64::from(CONN_BUF_ALLOC),
            ));
        }
        let mut r = BufReader::new(mem, payload);
        let mut sent = 0;
        if self.tx_buf.is_empty() && self.prefix.is_empty() {
            match r.write_to(&mut self.stream, len) {
                Ok(n) => sent = n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(ConnError::Host(e.to_string())),
            }
        }
        if sent < len {
            let start = self.tx_buf.len();
            self.tx_buf.resize(start + (len - sent) as usize, 0);
            r.read_exact(&mut self.tx_buf[start..])
                .map_err(|_| ConnError::GuestMemory)?;
        }
        self.forwarded(sent as u32);
        Ok(())
    }

    fn forwarded(&mut self, n: u32) {
        self.fwd_cnt += Wrapping(n);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.want_credit_update = true;
        }
    }

    /// Writes buffered bytes to the host socket (on EPOLLOUT, and after RESPONSE).
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        while !self.prefix.is_empty() {
            match self.stream.write(&self.prefix) {
                Ok(n) => {
                    self.prefix.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Host(e.to_string())),
            }
        }
        let mut done = 0;
        let result = loop {
            if done == self.tx_buf.len() {
                break Ok(());
            }
            match self.stream.write(&self.tx_buf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(ConnError::Host(e.to_string())),
            }
        };
        self.tx_buf.drain(..done);
        self.forwarded(done as u32);
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        result
    }

    pub fn buffered(&self) -> usize {
        self.tx_buf.len()
    }
}
