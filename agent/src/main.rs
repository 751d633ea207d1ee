//! `ember-agent`: the guest's init and the host's agent inside the sandbox.

use std::process::Command;
use std::sync::Arc;

use ember_agent::boot_report;
use ember_agent::forward::FORWARD_VSOCK_PORT;
use ember_agent::init;
use ember_agent::protocol::AGENT_VSOCK_PORT;
use ember_agent::server::{serve_forever, serve_forwards_forever, ServerConfig, VsockListener};

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        init::mount_pseudo_filesystems();
        boot_report::note_started();
    }
    // Right after the note: the VMM puts the guest's clock on its own by this pair.
    let timer_granted = boot_report::mark_boot_complete();
    if is_init {
        init::bring_up_loopback();
    }
    // Only init's boot is the guest's boot; a debugging run by hand reports nothing.
    let report_milestones = is_init && timer_granted;
    println!("ember-agent {}: ready", env!("CARGO_PKG_VERSION"));

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match ember_agent::run_command_from_cmdline(&cmdline) {
        Ok(Some(script)) => {
            if report_milestones {
                boot_report::report_from_kernel_log();
            }
            let status = Command::new("/bin/sh").arg("-c").arg(&script).status();
            match status {
                Ok(status) => println!("ember-agent: command exited with {status}"),
                Err(err) => println!("ember-agent: cannot start /bin/sh: {err}"),
            }
            if is_init {
                init::sync_and_reset();
            }
            return;
        }
        Ok(None) => {}
        Err(err) => eprintln!("ember-agent: {err}"),
    }

    let listener = match VsockListener::bind(AGENT_VSOCK_PORT) {
        Ok(listener) => Some(listener),
        Err(err) => {
            eprintln!("ember-agent: not serving the host: {err}");
            None
        }
    };
    // Exposed ports: TCP servers on the guest's loopback, reached over vsock.
    match VsockListener::bind(FORWARD_VSOCK_PORT) {
        Ok(forwards) => {
            let spawned = std::thread::Builder::new()
                .name("vsock-forwards".to_string())
                .spawn(move || serve_forwards_forever(forwards));
            if let Err(err) = spawned {
                eprintln!("ember-agent: cannot serve exposed ports: {err}");
            }
        }
        Err(err) => eprintln!("ember-agent: not serving exposed ports: {err}"),
    }
    if report_milestones {
        if listener.is_some() {
            boot_report::note_listening();
        }
        boot_report::report_from_kernel_log();
    }
    if is_init {
        if let Some(listener) = listener {
            let config = Arc::new(ServerConfig::new(|| init::sync_and_reset()));
            let spawned = std::thread::Builder::new()
                .name("vsock-accept".to_string())
                .spawn(move || serve_forever(listener, config));
            if let Err(err) = spawned {
                eprintln!("ember-agent: cannot start the vsock server: {err}");
            }
        }
        // PID 1 keeps reaping orphans, never the commands the server runs (they are owned).
        init::reap_orphans_forever();
    }
    // Not init (started by hand for debugging): serve in the foreground; Shutdown exits.
    if let Some(listener) = listener {
        let config = Arc::new(ServerConfig::new(|| std::process::exit(0)));
        serve_forever(listener, config);
    }
    std::process::exit(1);
}
