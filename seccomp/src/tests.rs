use std::process::Command;

use super::*;

/// Set in the child process of a probe: which probe to run.
const PROBE_ENV: &str = "EMBER_SECCOMP_PROBE";

#[test]
fn every_kind_compiles_in_every_mode() {
    for kind in ThreadKind::ALL {
        assert!(compile(kind, Mode::Off).unwrap().is_none());
        for mode in [Mode::Enforce, Mode::Log] {
            let program = compile(kind, mode).unwrap().expect("a filter");
            assert!(
                program.len() > 10,
                "{kind:?}: {} instructions",
                program.len()
            );
        }
    }
    assert!(compile_clone3_fallback(ThreadKind::Control).is_ok());
}

#[test]
fn the_vcpu_thread_may_not_do_what_a_vcpu_never_does() {
    // The lists keep to their purpose: a vCPU neither opens files nor makes sockets nor
    // starts programs; the fault handler has no sockets; nobody but control threads clones.
    let vcpu = allowed_numbers(ThreadKind::Vcpu);
    for call in [
        libc::SYS_openat,
        libc::SYS_socket,
        libc::SYS_execve,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_connect,
    ] {
        assert!(!vcpu.contains(&call), "vCPU allows {call}");
    }
    let faults = allowed_numbers(ThreadKind::MemoryFaults);
    for call in [
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
    ] {
        assert!(
            !faults.contains(&call),
            "the memory-faults thread allows {call}"
        );
    }
    for kind in ThreadKind::ALL {
        let calls = allowed_numbers(kind);
        for call in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_fork,
        ] {
            assert!(!calls.contains(&call), "{kind:?} allows {call}");
        }
        if kind != ThreadKind::Control {
            assert!(!calls.contains(&libc::SYS_clone), "{kind:?} may clone");
        }
    }
}

fn allowed_numbers(kind: ThreadKind) -> Vec<i64> {
    let mut calls: Vec<i64> = lists::COMMON
        .iter()
        .chain(&lists::allowed(kind))
        .copied()
        .collect();
    calls.extend(lists::restricted(kind).iter().map(|(call, _)| *call));
    calls
}

/// Runs probe `name` in a child process (this test binary, running only [`probe_child`]) and
/// returns its exit code and stderr.
fn run_probe(name: &str) -> (Option<i32>, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "tests::probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, name)
        .env_remove("EMBER_SECCOMP")
        .output()
        .expect("run the probe");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The child side of [`run_probe`]; does nothing in a normal test run.
#[test]
fn probe_child() {
    let Ok(probe) = std::env::var(PROBE_ENV) else {
        return;
    };
    let result = std::thread::spawn(move || probe_in_thread(&probe))
        .join()
        .expect("probe thread");
    // Reaching here means no call was trapped.
    eprintln!("probe finished: {result}");
    std::process::exit(0);
}

fn probe_in_thread(probe: &str) -> String {
    match probe {
        "vcpu-socket" => {
            install_with(ThreadKind::Vcpu, Mode::Enforce).unwrap();
            // SAFETY: a plain socket(2) call; the filter is expected to stop it.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            format!("socket returned {fd}")
        }
        "vcpu-ioctls" => {
            install_with(ThreadKind::Vcpu, Mode::Enforce).unwrap();
            // A KVM request on a non-KVM fd is allowed through (and fails in the kernel)...
            // SAFETY: ioctl on stdin with a request that takes no argument.
            let kvm = unsafe { libc::ioctl(0, 0xAE00 as _, 0) };
            let errno = std::io::Error::last_os_error();
            eprintln!("KVM_GET_API_VERSION on stdin: {kvm} ({errno})");
            // ...a terminal request is not.
            let mut termios = std::mem::MaybeUninit::<libc::termios>::uninit();
            // SAFETY: TCGETS writes a termios into a buffer of that size.
            let tty = unsafe { libc::ioctl(0, libc::TCGETS, termios.as_mut_ptr()) };
            format!("TCGETS returned {tty}")
        }
        "control-threads-and-fork" => {
            install_with(ThreadKind::Control, Mode::Enforce).unwrap();
            // Threads start (clone3 answers ENOSYS, clone with CLONE_THREAD is allowed).
            let answer = std::thread::spawn(|| 42).join().unwrap();
            eprintln!("thread answered {answer}");
            // A new process does not.
            // SAFETY: fork(2); the filter is expected to stop it before any child exists.
            let pid = unsafe { libc::fork() };
            format!("fork returned {pid}")
        }
        "control-prctl" => {
            install_with(ThreadKind::Control, Mode::Enforce).unwrap();
            // Naming a thread is allowed (std does it in every named thread)...
            let named = std::thread::Builder::new()
                .name("probe-named".into())
                .spawn(|| std::thread::current().name().map(str::to_string))
                .unwrap()
                .join()
                .unwrap();
            eprintln!("named thread {named:?}");
            // ...clearing the signal that ties the VMM to its supervisor is not.
            // SAFETY: prctl(2) with an integer argument; the filter is expected to stop it.
            let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0 as libc::c_ulong) };
            format!("PR_SET_PDEATHSIG returned {rc}")
        }
        "deny-getpid" => {
            // write stays allowed whatever the list says: the trap needs it.
            std::env::set_var(
                "EMBER_SECCOMP_DENY",
                "serial-output:getpid, serial-output:write, vcpu:nosuchcall",
            );
            install_with(ThreadKind::SerialOutput, Mode::Enforce).unwrap();
            eprintln!("write still allowed");
            // SAFETY: getpid(2) through syscall(2), bypassing any cache in the C library.
            let pid = unsafe { libc::syscall(libc::SYS_getpid) };
            format!("getpid returned {pid}")
        }
        "log-mode" => {
            install_with(ThreadKind::Vcpu, Mode::Log).unwrap();
            // SAFETY: a plain socket(2) call, allowed (and logged) in log mode.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            format!("socket returned {}", i32::from(fd >= 0))
        }
        other => panic!("unknown probe {other}"),
    }
}

#[test]
fn a_forbidden_call_ends_the_process_naming_the_thread_and_the_call() {
    let (code, stderr) = run_probe("vcpu-socket");
    assert_eq!(code, Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr
            .contains("ember: seccomp: the vcpu thread made a forbidden system call: socket (41)"),
        "{stderr}"
    );
    assert!(!stderr.contains("probe finished"), "{stderr}");
}

#[test]
fn a_vcpu_thread_may_issue_kvm_ioctls_only() {
    let (code, stderr) = run_probe("vcpu-ioctls");
    assert!(
        stderr.contains("KVM_GET_API_VERSION on stdin: -1"),
        "{stderr}"
    );
    assert_eq!(code, Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("forbidden system call: ioctl (16)"),
        "{stderr}"
    );
}

#[test]
fn a_control_thread_starts_threads_but_no_processes() {
    let (code, stderr) = run_probe("control-threads-and-fork");
    assert!(stderr.contains("thread answered 42"), "{stderr}");
    assert_eq!(code, Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("the control thread made a forbidden system call: clone (56)"),
        "{stderr}"
    );
}

#[test]
fn a_control_thread_names_threads_but_cannot_clear_its_death_signal() {
    let (code, stderr) = run_probe("control-prctl");
    assert!(
        stderr.contains("named thread Some(\"probe-named\")"),
        "{stderr}"
    );
    assert_eq!(code, Some(EXIT_SECCOMP), "{stderr}");
    assert!(
        stderr.contains("the control thread made a forbidden system call: prctl (157)"),
        "{stderr}"
    );
}

#[test]
fn a_call_taken_off_a_list_is_trapped() {
    let (code, stderr) = run_probe("deny-getpid");
    assert_eq!(code, Some(EXIT_SECCOMP), "{stderr}");
    assert!(stderr.contains("write still allowed"), "{stderr}");
    assert!(
        stderr.contains("the serial-output thread made a forbidden system call: getpid (39)"),
        "{stderr}"
    );
    assert_eq!(handler::syscall_number("ioctl"), Some(libc::SYS_ioctl));
}

#[test]
fn log_mode_lets_the_call_through() {
    let (code, stderr) = run_probe("log-mode");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("probe finished: socket returned 1"),
        "{stderr}"
    );
}

#[test]
fn syscall_names_and_numbers_format_without_allocating() {
    assert_eq!(handler::syscall_name(libc::SYS_execve), Some("execve"));
    assert_eq!(handler::syscall_name(100_000), None);
    let mut line = handler::Line::default();
    line.push_number(-12);
    line.push(b" ");
    line.push_number(0);
    line.push(b" ");
    line.push_number(i32::MAX);
    assert_eq!(&line.buf[..line.len], b"-12 0 2147483647");
}
