//! `ember-agent`: the guest's init and the host's agent inside the sandbox.

use std::process::Command;

use ember_agent::init;

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        init::mount_pseudo_filesystems();
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
        }
        Ok(None) => {}
        Err(err) => eprintln!("ember-agent: {err}"),
    }
    if is_init {
        init::reap_forever();
    }
}
