//! ember's virtual machine monitor.

pub mod probe;
