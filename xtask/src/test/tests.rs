use super::*;
use std::path::Path;

#[test]
fn reads_executable_from_cargo_json() {
    let line = r#"{"reason":"compiler-artifact","profile":{"test":true},"executable":"/t/deps/x \"q\"-1234","fresh":true}"#;
    assert_eq!(
        test_executable(line),
        Some(PathBuf::from("/t/deps/x \"q\"-1234"))
    );
    let library = r#"{"reason":"compiler-artifact","profile":{"test":false},"executable":null}"#;
    assert_eq!(test_executable(library), None);
    assert_eq!(test_executable("not json"), None);
}

/// A fake test binary in folder `dir`: `--list` lists `tests` (and a test
/// without the VM prefix), a run appends the test's name to `dir/ran` and then runs
/// `body` (`$2` is the test's name, `{ran}` the record's path). Returns (binary, record).
fn fake_test_binary(dir: &Path, tests: &[&str], body: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let bin = dir.join("fake-tests");
    let ran = dir.join("ran");
    let list: String = tests.iter().map(|t| format!("{t}: test\\n")).collect();
    std::fs::write(
        &bin,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --list ]; then printf '{list}other: test\\n'; exit 0; fi\n\
             echo \"$2\" >> {ran}\n{body}",
            ran = ran.display(),
            body = body.replace("{ran}", &ran.display().to_string())
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, ran)
}

/// Runs the VM test script over a fake test binary with tests a, b (failing) and c, with
/// `done` as the record of an earlier lab; returns (exit success, tests run, record).
fn run_script_with_record(done: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!(
        "xtask-vmscript-{}-{}",
        std::process::id(),
        done.len()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let (bin, ran) = fake_test_binary(
        &dir,
        &["vmtest_a", "vmtest_b", "vmtest_c"],
        "[ \"$2\" != vmtest_b ]\n",
    );
    let record = dir.join("done");
    std::fs::write(&record, done).unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg(vm_test_script(&[bin]))
        .env("EMBER_VM_TESTS_DONE", &record)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    let result = (
        status.success(),
        std::fs::read_to_string(&ran).unwrap_or_default(),
        std::fs::read_to_string(&record).unwrap(),
    );
    std::fs::remove_dir_all(&dir).unwrap();
    result
}

#[test]
fn a_guest_holding_the_l1_hosts_registers_is_a_lab_fault_and_runs_once_more() {
    let dir = std::env::temp_dir().join(format!("xtask-labfault-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kallsyms = dir.join("kallsyms");
    std::fs::write(
        &kallsyms,
        "ffffffff81000000 T _text\n\
         ffffffff81400000 t __pfx_kvm_in_the_core\t[kvm]\n\
         ffffffffc041b170 t __svm_vcpu_run\t[kvm_amd]\n\
         ffffffffc0600000 t kvm_vcpu_ioctl\t[kvm]\n",
    )
    .unwrap();
    // l fails once with its vCPU inside the L1's kvm_amd, then passes; g fails with a
    // guest address (a real failure: not rerun); h fails twice in the L1's KVM (a second
    // lab fault in one test is a failure).
    let (bin, ran) = fake_test_binary(
        &dir,
        &["vmtest_l", "vmtest_g", "vmtest_h"],
        "case \"$2\" in\n\
         vmtest_l) [ $(grep -c vmtest_l {ran}) = 2 ] && exit 0; echo 'vCPU 0: runnable rip 0xffffffffc041b20c rsp 0xffa0000000a13b60'; exit 101 ;;\n\
         vmtest_g) echo 'vCPU 0: runnable rip 0xffffffff81404657'; exit 101 ;;\n\
         vmtest_h) echo 'vCPU 1: halted rip 0xffffffffc0600010'; exit 101 ;;\n\
         esac\n",
    );
    let record = dir.join("done");
    let out = Command::new("sh")
        .arg("-c")
        .arg(vm_test_script(&[bin]))
        .env("EMBER_VM_TESTS_DONE", &record)
        .env("EMBER_L1_KALLSYMS", &kallsyms)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap(),
        "vmtest_l\nvmtest_l\nvmtest_g\nvmtest_h\nvmtest_h\n"
    );
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "pass vmtest_l\nfail vmtest_g\nfail vmtest_h\n"
    );
    assert!(
        stderr.contains("VM test vmtest_l: lab fault, not a test failure")
            && stderr.contains("rip 0xffffffffc041b20c is in the L1's KVM module"),
        "{stderr}"
    );
    assert!(!stderr.contains("VM test vmtest_g: lab fault"), "{stderr}");
    // Each failure is repeated in brief at the end.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let brief = stdout
        .split("VM test failures in this lab, in brief:")
        .nth(1)
        .unwrap_or_else(|| panic!("no digest:\n{stdout}"));
    assert!(
        brief.contains("--- vmtest_g (exit status 101)\nvCPU 0: runnable rip 0xffffffff81404657")
            && brief.contains("--- vmtest_h (exit status 101)")
            && !brief.contains("vmtest_l"),
        "{brief}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_guest_triple_fault_in_the_lab_runs_the_test_once_more_and_nowhere_else() {
    let dir = std::env::temp_dir().join(format!("xtask-triple-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // t triple faults on its first run only.
    let (bin, ran) = fake_test_binary(
        &dir,
        &["vmtest_t"],
        "[ $(grep -c . {ran}) -ge 2 ] && exit 0\n\
         echo 'INFO ember_vmm::vcpu] vCPU 0 triple fault (shutdown) at rip 0xfff0'; exit 101\n",
    );
    let run = |in_lab: bool| {
        let _ = std::fs::remove_file(&ran);
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(vm_test_script(std::slice::from_ref(&bin)))
            .env("EMBER_VM_TESTS_DONE", dir.join("done"))
            .env_remove("EMBER_IN_LAB")
            .stdout(std::process::Stdio::null());
        if in_lab {
            cmd.env("EMBER_IN_LAB", "1");
        }
        let out = cmd.output().unwrap();
        let _ = std::fs::remove_file(dir.join("done"));
        (
            out.status.success(),
            std::fs::read_to_string(&ran).unwrap(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, ran_in_lab, stderr) = run(true);
    assert!(ok, "{stderr}");
    assert_eq!(ran_in_lab, "vmtest_t\nvmtest_t\n");
    assert!(
        stderr.contains("VM test vmtest_t: a guest triple faulted in the lab"),
        "{stderr}"
    );
    // On a real host a triple fault is the test's failure.
    let (ok, ran_on_host, _) = run(false);
    assert!(!ok);
    assert_eq!(ran_on_host, "vmtest_t\n");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_hung_test_gets_its_stall_report_on_time_and_a_lab_fault_in_it_runs_once_more() {
    let dir = std::env::temp_dir().join(format!("xtask-watchdog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kallsyms = dir.join("kallsyms");
    std::fs::write(&kallsyms, "ffffffffc041b170 t __svm_vcpu_run\t[kvm_amd]\n").unwrap();
    // Where the watchdog looks for stall reports (a VMM writes them to its temp folder).
    let report = PathBuf::from(format!("/tmp/ember-stall-xtask-{}.txt", std::process::id()));
    // The first run hangs after leaving a stall report with a vCPU in the L1's KVM; the
    // second passes.
    let (bin, ran) = fake_test_binary(
        &dir,
        &["vmtest_hang"],
        &format!(
            "[ $(grep -c . {{ran}}) = 2 ] && exit 0\n\
             sleep 1; echo 'vCPU 0: runnable rip 0xffffffffc041b20c' > {report}\nsleep 60\n",
            report = report.display()
        ),
    );
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg(vm_test_script(&[bin]))
        .env("EMBER_VM_TESTS_DONE", dir.join("done"))
        .env("EMBER_L1_KALLSYMS", &kallsyms)
        .env("EMBER_VM_TEST_TIMEOUT_S", "15")
        .env("EMBER_VM_TEST_WATCHDOG_S", "3")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&report);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("VM test vmtest_hang still running after 3 s")
            && stderr.contains("rip 0xffffffffc041b20c is in the L1's KVM module"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap(),
        "vmtest_hang\nvmtest_hang\n"
    );
    // The first run is stopped by its time limit; the watchdog reported well before.
    assert!(started.elapsed() < Duration::from_secs(40));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_later_lab_runs_only_the_tests_not_finished_and_keeps_earlier_failures() {
    // A first lab: every test runs; b fails.
    let (ok, ran, record) = run_script_with_record("");
    assert!(!ok);
    assert_eq!(ran, "vmtest_a\nvmtest_b\nvmtest_c\n");
    assert_eq!(record, "pass vmtest_a\nfail vmtest_b\npass vmtest_c\n");
    // The lab died after a passed and b failed: only c runs, and b's failure still counts.
    let (ok, ran, _) = run_script_with_record("pass vmtest_a\nfail vmtest_b\n");
    assert!(!ok);
    assert_eq!(ran, "vmtest_c\n");
    // The lab died after a passed: b (failing) and c run.
    let (ok, ran, _) = run_script_with_record("pass vmtest_a\n");
    assert!(!ok);
    assert_eq!(ran, "vmtest_b\nvmtest_c\n");
    // Everything but c passed earlier: c passes, the suite passes.
    let (ok, ran, _) = run_script_with_record("pass vmtest_a\npass vmtest_b\n");
    assert!(ok);
    assert_eq!(ran, "vmtest_c\n");
}

#[test]
fn two_lanes_share_the_tests_and_each_runs_once() {
    let dir = std::env::temp_dir().join(format!("xtask-lanes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tests = ["vmtest_a", "vmtest_b", "vmtest_c", "vmtest_d"];
    let (bin, ran) = fake_test_binary(&dir, &tests, "sleep 0.3\n");
    let (claims, record) = (dir.join("claims"), dir.join("done"));
    std::fs::create_dir_all(&claims).unwrap();
    let lanes: Vec<_> = ["1", "2"]
        .into_iter()
        .map(|lane| {
            Command::new("sh")
                .arg("-c")
                .arg(vm_test_script(std::slice::from_ref(&bin)))
                .env("EMBER_VM_TESTS_DONE", &record)
                .env("EMBER_VM_TESTS_CLAIMS", &claims)
                .env("EMBER_LAB_LANE", lane)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut lane in lanes {
        assert!(lane.wait().unwrap().success());
    }
    let mut ran: Vec<String> = std::fs::read_to_string(&ran)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    ran.sort();
    assert_eq!(ran, tests);
    // Each claim names its lane; a lane whose lab died gives back only what it did not finish.
    std::fs::write(claims.join("vmtest_d/lane"), "2\n").unwrap();
    std::fs::write(&record, "pass vmtest_a\npass vmtest_b\npass vmtest_c\n").unwrap();
    std::fs::create_dir_all(claims.join("vmtest_e")).unwrap();
    std::fs::write(claims.join("vmtest_e/lane"), "1\n").unwrap();
    release_unfinished_claims(2, &claims, &record);
    assert!(!claims.join("vmtest_d").exists());
    assert!(claims.join("vmtest_c").exists() && claims.join("vmtest_e").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_slowest_tests_run_first_and_once() {
    let dir = std::env::temp_dir().join(format!("xtask-slowfirst-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let slow = SLOW_VM_TESTS[1];
    let (bin, ran) = fake_test_binary(&dir, &["vmtest_a", slow, "vmtest_b"], "true\n");
    let status = Command::new("sh")
        .arg("-c")
        .arg(vm_test_script(std::slice::from_ref(&bin)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read_to_string(&ran).unwrap(),
        format!("{slow}\nvmtest_a\nvmtest_b\n")
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
