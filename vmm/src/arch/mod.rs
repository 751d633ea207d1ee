//! Architecture-specific set-up. ember runs x86-64 guests only.

pub mod x86_64;
