//! x86-64: guest layout, boot protocol, vCPU boot state, CPUID and the MP table.

pub mod boot;
pub mod cpu_model;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;
