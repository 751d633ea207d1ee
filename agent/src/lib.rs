//! The ember guest agent: runs as the guest's init and serves the host.
//!
//! The agent does an init's duties, marks "userspace reached" on the boot-timer port and prints
//! a readiness line. Then either it runs the one command given on the kernel command line
//! (`ember.run=<base64 of a sh -c script>`) and resets the guest, or it serves the host over
//! vsock port [`protocol::AGENT_VSOCK_PORT`] ([`server`]) for as long as the guest runs. The
//! host's side of that protocol is [`client`].

pub mod boot_report;
pub mod client;
pub mod forward;
pub mod init;
pub mod protocol;
pub mod resync;
pub mod server;
pub mod tarball;

/// The I/O ports of ember's boot timer, the byte that marks "userspace reached" and the
/// offset of the first milestone register. Must match `ember_devices::boot_timer` (a test
/// in `ember-vmm` checks).
pub const BOOT_TIMER_PORT: u16 = 0x440;
pub const BOOT_TIMER_PORT_LEN: u16 = 16;
pub const BOOT_TIMER_MAGIC: u8 = 123;
pub const BOOT_TIMER_MILESTONE_OFFSET: u16 = 4;

/// Where the agent lives in every guest image; the kernel is told `init=` this path.
pub const AGENT_GUEST_PATH: &str = "/sbin/ember-agent";

/// The kernel command-line key that carries a command for the agent to run at boot.
pub const RUN_PARAM: &str = "ember.run";

/// Extracts and decodes `ember.run=` from a kernel command line.
pub fn run_command_from_cmdline(cmdline: &str) -> Result<Option<String>, CmdlineError> {
    use base64::Engine;
    let Some(value) = cmdline.split_whitespace().find_map(|word| {
        word.strip_prefix(RUN_PARAM)
            .and_then(|rest| rest.strip_prefix('='))
    }) else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|e| CmdlineError::Base64(value.to_string(), e))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| CmdlineError::NotUtf8)
}

/// Encodes a command for `ember.run=`.
pub fn encode_run_command(script: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(script)
}

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("ember.run={0:?} is not valid base64: {1}")]
    Base64(String, base64::DecodeError),
    #[error("ember.run does not decode to UTF-8 text")]
    NotUtf8,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_command_round_trips_through_the_cmdline() {
        let script = "python3 -c 'print(44*44)' && echo \"done\"";
        let cmdline = format!(
            "console=ttyS0 {RUN_PARAM}={} quiet",
            encode_run_command(script)
        );
        assert_eq!(
            run_command_from_cmdline(&cmdline).unwrap().as_deref(),
            Some(script)
        );
    }

    #[test]
    fn absent_or_bad_run_command() {
        assert!(run_command_from_cmdline("console=ttyS0 ember.runx=abc")
            .unwrap()
            .is_none());
        assert!(run_command_from_cmdline("ember.run=***").is_err());
    }
}
