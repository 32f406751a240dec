//! x86_64 specifics: the guest address map, boot protocol, registers, MSRs, CPUID and MP table.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
