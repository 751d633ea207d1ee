//! The ember guest agent: runs as the guest's init and serves the host.
