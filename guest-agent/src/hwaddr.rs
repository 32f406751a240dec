//! Setting a network interface's MAC address from inside the guest (a fork takes its own).
//!
//! `SIOCSIFHWADDR` on an `AF_INET` socket: busybox's `ip link set address` needs `AF_PACKET`,
//! which a minimal guest kernel leaves out. On a running virtio-net link the change goes
//! through the device's control queue (VIRTIO_NET_F_CTRL_MAC_ADDR), so the link stays up.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Parses `aa:bb:cc:dd:ee:ff`: a unicast address, not all zeros.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts
            .next()
            .ok_or_else(|| format!("bad MAC address {s:?}"))?;
        if p.len() != 2 {
            return Err(format!("bad MAC address {s:?}"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("bad MAC address {s:?}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("bad MAC address {s:?}"));
    }
    if mac[0] & 1 != 0 || mac == [0; 6] {
        return Err(format!("{s} is not a station's own address"));
    }
    Ok(mac)
}

/// Sets `ifname`'s hardware address.
pub fn set_mac(ifname: &str, mac: [u8; 6]) -> io::Result<()> {
    // SAFETY: ifreq is plain data; all zeros is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {ifname:?}"),
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name) {
        *d = *s as libc::c_char;
    }
    // SAFETY: writing the hwaddr member of the union we own.
    unsafe {
        req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(mac) {
            *d = s as libc::c_char;
        }
    }
    // SAFETY: plain socket(2); checked before it is owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is new and ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCSIFHWADDR reads the ifreq we own.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFHWADDR, &req) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_mac("52:54:0a:bB:00:ff"),
            Ok([0x52, 0x54, 0x0a, 0xbb, 0x00, 0xff])
        );
        for bad in [
            "",
            "52:54:0a:bb:00",
            "52:54:0a:bb:00:ff:01",
            "52:54:0a:bb:0:ff",
            "zz:54:0a:bb:00:ff",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52-54-0a-bb-00-ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_interface_name_is_refused_before_any_ioctl() {
        let mac = [0x52, 0x54, 0, 0, 0, 1];
        for bad in ["", "a-name-longer-than-15", "e\0th0"] {
            let e = set_mac(bad, mac).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
    }
}
