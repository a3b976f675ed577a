//! A NIC's MAC address as the VMM's `--net tap=NAME,mac=…` takes it: six hex pairs, `:`-separated.
//! The VMM, the host agent (which checks a MAC before it reaches a command line) and the VIM (which
//! picks one per VM) share this one parser.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, thiserror::Error)]
#[error("invalid MAC {0:?}: expected six hex pairs, aa:bb:cc:dd:ee:ff")]
pub struct BadMac(String);

impl Mac {
    /// A unicast, locally administered MAC from `bytes` (random ones, as the caller draws them).
    pub fn local(mut bytes: [u8; 6]) -> Mac {
        bytes[0] = (bytes[0] & 0xfe) | 0x02;
        Mac(bytes)
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl FromStr for Mac {
    type Err = BadMac;
    fn from_str(s: &str) -> Result<Mac, BadMac> {
        let bad = || BadMac(s.chars().take(40).collect());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for m in mac.iter_mut() {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        let m: Mac = "52:54:00:12:34:5F".parse().unwrap();
        assert_eq!(m, Mac([0x52, 0x54, 0, 0x12, 0x34, 0x5f]));
        assert_eq!(m.to_string(), "52:54:00:12:34:5f");
        for bad in [
            "52:54:00:12:34",
            "52:54:00:12:34:zz",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:+5",
            "aa:bb:cc:dd:ee:ff,tap=eth0",
            "",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        let l = Mac::local([0xff; 6]);
        assert!(l.is_unicast());
        assert_eq!(l.0[0] & 2, 2);
    }
}
