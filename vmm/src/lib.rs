//! KVM VMM
