//! The host CPU's identity, recorded in every manifest: restoring onto another vendor is refused.

use core::arch::x86_64::__cpuid;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCpu {
    /// CPUID leaf 0 vendor string, e.g. "GenuineIntel".
    pub vendor: String,
    /// The brand string from CPUID leaves 0x80000002..4.
    pub model: String,
}

fn regs_to_string(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_matches(char::from(0))
        .trim()
        .to_string()
}

impl HostCpu {
    pub fn current() -> Self {
        let l0 = __cpuid(0);
        let vendor = regs_to_string(&[l0.ebx, l0.edx, l0.ecx]);
        let max_ext = __cpuid(0x8000_0000).eax;
        let model = if max_ext >= 0x8000_0004 {
            let regs: Vec<u32> = (0x8000_0002u32..=0x8000_0004)
                .flat_map(|leaf| {
                    let r = __cpuid(leaf);
                    [r.eax, r.ebx, r.ecx, r.edx]
                })
                .collect();
            regs_to_string(&regs)
        } else {
            String::new()
        };
        Self { vendor, model }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_is_a_known_x86_vendor() {
        let c = HostCpu::current();
        assert_eq!(c.vendor.len(), 12, "{c:?}");
        assert!(c.vendor.is_ascii(), "{c:?}");
    }
}
