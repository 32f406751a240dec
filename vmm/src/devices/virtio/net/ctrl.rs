//! The virtio-net control virtqueue (virtio 1.x §5.1.6.5). We offer VIRTIO_NET_F_CTRL_VQ with
//! VIRTIO_NET_F_CTRL_MAC_ADDR only, so that a Linux guest can change its MAC on a running link
//! (a fork takes an address of its own) and tell the device, which shows it in config space.
//!
//! A command is one chain: device-readable `class: u8, command: u8, data...`, then one
//! device-writable byte the device sets to VIRTIO_NET_OK or VIRTIO_NET_ERR. Everything in it
//! comes from the guest: the chain is validated by [`chain::collect`], its readable part is read
//! only when it is at most [`MAX_COMMAND_LEN`] bytes, and anything malformed or unknown is
//! answered with VIRTIO_NET_ERR (or, with no byte to answer in, returned unanswered), never acted on.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};

use super::super::chain::{self, BufReader, BufWriter};
use crate::devices::config::MacAddr;
use crate::memory::GuestMemory;

/// The longest command read: a header plus two MAC tables of [`MAC_TABLE_MAX`] entries. Longer
/// ones are refused unread (we do not offer VIRTIO_NET_F_CTRL_RX, so Linux never sends tables).
pub const MAX_COMMAND_LEN: u64 = 2 + 2 * (4 + 6 * MAC_TABLE_MAX);
/// Entries per MAC filter table accepted in VIRTIO_NET_CTRL_MAC_TABLE_SET.
pub const MAC_TABLE_MAX: u64 = 64;

/// The device's answer to one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Ok,
    Err,
}

impl Ack {
    fn byte(self) -> u8 {
        match self {
            Ack::Ok => VIRTIO_NET_OK as u8,
            Ack::Err => VIRTIO_NET_ERR as u8,
        }
    }
}

/// Handles one control chain; `mac` is the device's current address, changed by a valid
/// VIRTIO_NET_CTRL_MAC_ADDR_SET. Returns the used length (1 when the ack byte was written, 0
/// for a chain that had no room for it or was itself invalid).
pub fn handle(
    c: virtio_queue::DescriptorChain<&GuestMemory>,
    mem: &GuestMemory,
    max_descs: usize,
    mac: &mut MacAddr,
) -> u32 {
    let Ok(c) = chain::collect(c, mem, max_descs) else {
        return 0;
    };
    if c.writable.is_empty() {
        // Nowhere to say ERR: the command is not carried out either.
        return 0;
    }
    let ack = command(&c, mem, mac);
    let mut w = BufWriter::new(mem, &c.writable);
    match w.write_all(&[ack.byte()]) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

fn command(c: &chain::Chain, mem: &GuestMemory, mac: &mut MacAddr) -> Ack {
    let len = c.readable_len();
    if !(2..=MAX_COMMAND_LEN).contains(&len) {
        return Ack::Err;
    }
    // Bounded above: at most MAX_COMMAND_LEN bytes.
    let mut buf = vec![0u8; len as usize];
    if BufReader::new(mem, &c.readable)
        .read_exact(&mut buf)
        .is_err()
    {
        return Ack::Err;
    }
    let (class, cmd, data) = (u32::from(buf[0]), u32::from(buf[1]), &buf[2..]);
    match (class, cmd) {
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
            let Ok(new) = <[u8; 6]>::try_from(data) else {
                return Ack::Err;
            };
            // A multicast or all-zero address cannot be a station's own.
            if new[0] & 1 != 0 || new == [0; 6] {
                return Ack::Err;
            }
            *mac = MacAddr(new);
            Ack::Ok
        }
        // We deliver every frame the back end gives us (passt sends only what is the guest's),
        // so any filter is already honoured as far as it can be; a well-formed table is OK.
        (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
            if mac_tables_well_formed(data) {
                Ack::Ok
            } else {
                Ack::Err
            }
        }
        // Promiscuous and all-multicast on or off: the same reasoning; one byte of data.
        (VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI) => {
            if data.len() == 1 {
                Ack::Ok
            } else {
                Ack::Err
            }
        }
        // We never set VIRTIO_NET_S_ANNOUNCE, so there is nothing to clear; no data.
        (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) if data.is_empty() => Ack::Ok,
        // RX extras, VLAN, MQ, offloads, ...: features we did not offer.
        _ => Ack::Err,
    }
}

/// Two `le32 entries; u8 macs[entries][6]` tables (unicast, then multicast) filling `data`
/// exactly.
fn mac_tables_well_formed(mut data: &[u8]) -> bool {
    for _ in 0..2 {
        let Some((n, rest)) = data.split_first_chunk::<4>() else {
            return false;
        };
        let n = u64::from(u32::from_le_bytes(*n));
        if n > MAC_TABLE_MAX {
            return false;
        }
        // n <= 64, so this is at most 384.
        let bytes = (n * 6) as usize;
        let Some(rest) = rest.get(bytes..) else {
            return false;
        };
        data = rest;
    }
    data.is_empty()
}
