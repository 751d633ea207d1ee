//! What a VM is doing when its guest stopped answering: where each vCPU is, how far each
//! virtio queue got on both sides, and what the VMM's own threads wait on. Written to the log
//! when the agent does not answer in time, so a hang in a test run leaves evidence behind.

use std::fmt::Write;

use kvm_bindings::{kvm_mp_state, kvm_regs, kvm_sregs};
use virtio_queue::QueueState;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// The mp_state names KVM uses (`KVM_MP_STATE_*`).
fn mp_state_name(state: u32) -> &'static str {
    match state {
        0 => "runnable",
        1 => "uninitialized",
        2 => "init-received",
        3 => "halted",
        4 => "sipi-received",
        5 => "stopped",
        6 => "check-stop",
        7 => "operating",
        8 => "load",
        9 => "ap-reset-hold",
        10 => "suspended",
        _ => "unknown",
    }
}

/// One line about a paused vCPU.
pub fn describe_vcpu(
    index: u8,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    mp_state: &kvm_mp_state,
) -> String {
    let interrupts = if regs.rflags & (1 << 9) != 0 {
        "on"
    } else {
        "off"
    };
    format!(
        "vCPU {index}: {} rip {:#x} rsp {:#x} rflags {:#x} (interrupts {interrupts}) cs {:#x} cr0 {:#x} cr3 {:#x}",
        mp_state_name(mp_state.mp_state),
        regs.rip,
        regs.rsp,
        regs.rflags,
        sregs.cs.selector,
        sregs.cr0,
        sregs.cr3,
    )
}

/// A `u16` of a ring in guest memory, or a note that it could not be read.
fn ring_u16(mem: &GuestMemoryMmap, addr: u64) -> String {
    match mem.read_obj::<u16>(GuestAddress(addr)) {
        Ok(v) => u16::from_le(v).to_string(),
        Err(_) => format!("unreadable@{addr:#x}"),
    }
}

/// One line about a queue: the device's positions beside the driver's indexes in the rings
/// (with event indexes, what each side asked to be told about).
pub fn describe_queue(index: usize, state: &QueueState, mem: &GuestMemoryMmap) -> String {
    let mut line = format!(
        "queue {index}: ready {} size {} device next_avail {} next_used {}",
        state.ready, state.size, state.next_avail, state.next_used
    );
    if !state.ready || state.size == 0 {
        return line;
    }
    let size = u64::from(state.size);
    // Split ring layout: avail = flags, idx, ring[size], used_event; used = flags, idx,
    // ring[size] of 8-byte elements, avail_event.
    let _ = write!(
        line,
        " | ring avail.idx {} used.idx {}",
        ring_u16(mem, state.avail_ring + 2),
        ring_u16(mem, state.used_ring + 2)
    );
    if state.event_idx_enabled {
        let _ = write!(
            line,
            " used_event {} avail_event {}",
            ring_u16(mem, state.avail_ring + 4 + 2 * size),
            ring_u16(mem, state.used_ring + 4 + 8 * size)
        );
    } else {
        let _ = write!(
            line,
            " avail.flags {} used.flags {}",
            ring_u16(mem, state.avail_ring),
            ring_u16(mem, state.used_ring)
        );
    }
    line
}

/// One line per thread of this process: name, scheduler state and what it waits in.
pub fn describe_threads() -> String {
    let mut out = String::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return "threads: /proc/self/task is not readable\n".into();
    };
    let mut tasks: Vec<_> = tasks.flatten().map(|t| t.path()).collect();
    tasks.sort();
    for task in tasks {
        let read = |name: &str| {
            std::fs::read_to_string(task.join(name))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        // The state letter follows the parenthesised name in `stat`.
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let _ = writeln!(
            out,
            "thread {}: {} state {state} wchan {}",
            task.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            read("comm"),
            read("wchan"),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_line_shows_both_sides_of_the_rings() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let state = QueueState {
            max_size: 16,
            next_avail: 5,
            next_used: 4,
            event_idx_enabled: true,
            size: 16,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        };
        mem.write_obj(7u16.to_le(), GuestAddress(0x2002)).unwrap();
        mem.write_obj(4u16.to_le(), GuestAddress(0x3002)).unwrap();
        mem.write_obj(3u16.to_le(), GuestAddress(0x2000 + 4 + 32))
            .unwrap();
        mem.write_obj(6u16.to_le(), GuestAddress(0x3000 + 4 + 128))
            .unwrap();
        let line = describe_queue(1, &state, &mem);
        assert_eq!(
            line,
            "queue 1: ready true size 16 device next_avail 5 next_used 4 \
             | ring avail.idx 7 used.idx 4 used_event 3 avail_event 6"
        );
    }

    #[test]
    fn a_ring_outside_memory_is_reported_not_read() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let state = QueueState {
            max_size: 8,
            next_avail: 0,
            next_used: 0,
            event_idx_enabled: false,
            size: 8,
            ready: true,
            desc_table: 0,
            avail_ring: 0xffff_0000,
            used_ring: 0x100,
        };
        let line = describe_queue(0, &state, &mem);
        assert!(line.contains("avail.idx unreadable@0xffff0002"), "{line}");
        assert!(line.contains("used.idx 0"), "{line}");
    }

    #[test]
    fn a_vcpu_line_names_its_state_and_where_it_is() {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rflags: 0x246,
            ..Default::default()
        };
        let sregs = kvm_sregs::default();
        let line = describe_vcpu(0, &regs, &sregs, &kvm_mp_state { mp_state: 3 });
        assert!(
            line.starts_with("vCPU 0: halted rip 0xffffffff81000000"),
            "{line}"
        );
        assert!(line.contains("interrupts on"), "{line}");
    }

    #[test]
    fn this_process_threads_are_listed() {
        let threads = describe_threads();
        assert!(threads.lines().count() >= 1, "{threads}");
        assert!(threads.contains("state "), "{threads}");
    }
}
