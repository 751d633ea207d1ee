//! ember's emulated devices. Each device lives in its own folder; the VMM composes them.
