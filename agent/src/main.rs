//! `ember-agent`: the guest's init and the host's agent inside the sandbox.

use std::process::Command;
use std::sync::Arc;

use ember_agent::forward::FORWARD_VSOCK_PORT;
use ember_agent::init;
use ember_agent::protocol::AGENT_VSOCK_PORT;
use ember_agent::server::{serve_forever, serve_forwards_forever, ServerConfig, VsockListener};

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        init::mount_pseudo_filesystems();
        init::bring_up_loopback();
    }
    init::mark_boot_complete();
    println!("ember-agent {}: ready", env!("CARGO_PKG_VERSION"));

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    match ember_agent::run_command_from_cmdline(&cmdline) {
        Ok(Some(script)) => {
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
