//! The guest's own account of its boot, for ember's boot timer (`ember_devices::boot_timer`):
//! "userspace reached" as a magic byte, then the kernel's time to init, the agent's start and
//! its readiness, each as 32-bit microseconds on one clock.
//!
//! That clock is the kernel log's (`local_clock`, since the kernel started). The agent puts
//! its own moments on it by writing debug-level lines to `/dev/kmsg` and reading their
//! timestamps back: `CLOCK_BOOTTIME` would not do, as it runs on jiffies until the kernel
//! switches clocksource and falls behind whenever the boot keeps interrupts off (a verbose
//! console), so it can put the agent's start before the kernel ran init.

use std::io::Write;

/// A point of the boot reported to ember; the order is the boot timer's register order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    KernelRanInit = 0,
    AgentStarted = 1,
    AgentReady = 2,
}

/// What the agent writes to the kernel log at its start and once it listens for the host.
const STARTED: &str = "ember-agent: started";
const LISTENING: &str = "ember-agent: listening";

/// Writes the magic byte to ember's boot-timer port so the VMM logs "userspace reached".
/// False if this process may not write the port (then it must not report milestones either).
pub fn mark_boot_complete() -> bool {
    if !grant_boot_timer_ports() {
        return false;
    }
    // SAFETY: the port was granted above; writing one byte to it has no effect on this
    // process's memory. Under ember it is the boot-timer device; elsewhere an unused port.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") crate::BOOT_TIMER_PORT,
            in("al") crate::BOOT_TIMER_MAGIC,
            options(nomem, nostack, preserves_flags)
        );
    }
    true
}

/// Notes the agent's start in the kernel log (call as early as `/dev` is mounted).
pub fn note_started() {
    note_in_kernel_log(STARTED);
}

/// Notes that the agent listens for the host.
pub fn note_listening() {
    note_in_kernel_log(LISTENING);
}

/// Reports the milestones the kernel log holds so far to the boot timer. Call only after
/// [`mark_boot_complete`] returned true (without the ports, the write faults).
pub fn report_from_kernel_log() {
    let Some(log) = read_kernel_log() else {
        return;
    };
    for (milestone, us) in milestones(&log) {
        report(milestone, us);
    }
}

/// The milestones found in `log` (the kernel log's text), each with its timestamp in µs.
pub fn milestones(log: &str) -> Vec<(Milestone, u64)> {
    let find = |wanted: &dyn Fn(&str) -> bool| {
        log.lines()
            .filter_map(log_line)
            .find(|(_, message)| wanted(message))
            .map(|(us, _)| us)
    };
    let found = [
        (Milestone::KernelRanInit, find(&is_init_message)),
        (Milestone::AgentStarted, find(&|m| m == STARTED)),
        (Milestone::AgentReady, find(&|m| m == LISTENING)),
    ];
    found
        .into_iter()
        .filter_map(|(m, us)| Some((m, us?)))
        .collect()
}

/// The timestamp in µs of a kernel log line "<6>[    0.880611] Run /init as init process"
/// (the priority prefix is optional).
pub fn init_line_us(line: &str) -> Option<u64> {
    log_line(line)
        .filter(|(_, m)| is_init_message(m))
        .map(|(us, _)| us)
}

fn is_init_message(message: &str) -> bool {
    message.starts_with("Run ") && message.ends_with(" as init process")
}

/// A kernel log line's timestamp (µs) and message: "<6>[    0.880611] message".
fn log_line(line: &str) -> Option<(u64, &str)> {
    let line = line.trim();
    let line = match line.strip_prefix('<') {
        Some(rest) => rest.split_once('>')?.1,
        None => line,
    };
    let (stamp, message) = line.strip_prefix('[')?.split_once(']')?;
    let (secs, fraction) = stamp.trim().split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    let micros: u64 = format!("{fraction:0<6}").get(..6)?.parse().ok()?;
    Some((secs * 1_000_000 + micros, message.trim()))
}

/// Writes `message` to the kernel log at debug level (off every console unless the guest was
/// booted with `loglevel=8`). Best effort: a guest without /dev/kmsg reports less.
fn note_in_kernel_log(message: &str) {
    if let Ok(mut kmsg) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        let _ = kmsg.write_all(format!("<7>{message}\n").as_bytes());
    }
}

/// The kernel log buffer's text, in one `syslog(2)` call (no /dev/kmsg record loop).
fn read_kernel_log() -> Option<String> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size).ok().filter(|&n| n > 0)?.min(4 << 20);
    let mut buf = vec![0u8; size];
    // SAFETY: READ_ALL writes at most `size` bytes into `buf`, which holds that many.
    let read = unsafe {
        libc::klogctl(
            SYSLOG_ACTION_READ_ALL,
            buf.as_mut_ptr().cast(),
            size as libc::c_int,
        )
    };
    buf.truncate(usize::try_from(read).ok()?);
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// Reports `milestone` at `us` to the boot timer.
fn report(milestone: Milestone, us: u64) {
    let port = crate::BOOT_TIMER_PORT + crate::BOOT_TIMER_MILESTONE_OFFSET + 4 * milestone as u16;
    let value = u32::try_from(us).unwrap_or(u32::MAX);
    // SAFETY: as in `mark_boot_complete`: a port write with no effect on this process's memory.
    unsafe {
        std::arch::asm!(
            "out dx, eax",
            in("dx") port,
            in("eax") value,
            options(nomem, nostack, preserves_flags)
        );
    }
}

/// Lets this process write the boot timer's ports; false (and a message) if it may not.
fn grant_boot_timer_ports() -> bool {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    let rc = unsafe {
        libc::ioperm(
            crate::BOOT_TIMER_PORT.into(),
            crate::BOOT_TIMER_PORT_LEN.into(),
            1,
        )
    };
    if rc != 0 {
        eprintln!(
            "ember-agent: ioperm for the boot timer: {}",
            std::io::Error::last_os_error()
        );
    }
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_line_timestamps_are_read_with_or_without_a_priority() {
        let line = "<6>[    0.880611] Run /sbin/ember-agent as init process";
        assert_eq!(init_line_us(line), Some(880_611));
        assert_eq!(
            init_line_us("[   12.5] Run /init as init process"),
            Some(12_500_000)
        );
        assert_eq!(init_line_us("[    0.880611] Run /init"), None);
        assert_eq!(init_line_us("<6>[    0.1] Freeing unused memory"), None);
        assert_eq!(init_line_us("Run /init as init process"), None);
        assert_eq!(init_line_us("[abc] Run /init as init process"), None);
        assert_eq!(init_line_us("1.52 0.98"), None);
    }

    #[test]
    fn milestones_come_from_the_first_matching_lines_of_the_log() {
        let log = "<6>[    0.000000] Linux version 6.1\n\
                   <6>[    0.719338] Run /init as init process\n\
                   <15>[    0.730586] ember-agent: started\n\
                   <15>[    0.731000] ember-agent: started\n\
                   <4>[    0.750000] something else\n\
                   <15>[    0.801200] ember-agent: listening\n";
        assert_eq!(
            milestones(log),
            [
                (Milestone::KernelRanInit, 719_338),
                (Milestone::AgentStarted, 730_586),
                (Milestone::AgentReady, 801_200),
            ]
        );
        let partial = "<6>[    0.719338] Run /init as init process\n";
        assert_eq!(milestones(partial), [(Milestone::KernelRanInit, 719_338)]);
        assert_eq!(milestones("garbage\n[x] y"), []);
    }
}
