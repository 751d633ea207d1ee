//! `cargo xtask test`: the whole suite, as CI runs it.
//!
//! Unit tests run on the host. Tests that boot Linux are named `vmtest_*`; they run directly where
//! the host has hardware KVM, and inside the lab otherwise. If neither `/dev/kvm` nor QEMU is
//! available they are reported as SKIPPED, loudly; if the lab cannot start, the suite fails.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::lab::{run_in_lab, LabOptions};
use crate::util::{cargo, output, run, target_dir, Phases};
use crate::{deps, images, kernel};

/// The prefix of tests that need hardware-KVM semantics (a booted Linux guest) (hardware KVM or the lab).
pub const VM_TEST_PREFIX: &str = "vmtest_";

/// Tallies the suite's own end-to-end checks.
#[derive(Default)]
struct Checks {
    passed: u32,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, name: &str, result: Result<()>) {
        match result {
            Ok(()) => {
                eprintln!("check {name} ... ok");
                self.passed += 1;
            }
            Err(err) => {
                eprintln!("check {name} ... FAILED: {err:#}");
                self.failed.push(name.to_string());
            }
        }
    }
}

/// Paths of the guest artifacts, exported to VM tests through the environment.
#[derive(Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
    /// The runtime images (`ember serve` finds them in the cache; named here for the log).
    pub runtimes: Vec<(String, PathBuf)>,
    /// More of the VM tests' environment (e.g. a test filter).
    pub extra_env: Vec<(String, String)>,
}

impl Artifacts {
    pub fn ensure() -> Result<Artifacts> {
        Ok(Artifacts {
            kernel: kernel::ensure()?,
            initramfs: images::initramfs()?,
            rootfs: images::rootfs()?,
            runtimes: crate::runtimes::build(&[], None)?,
            extra_env: Vec::new(),
        })
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("EMBER_KERNEL".into(), self.kernel.display().to_string()),
            (
                "EMBER_INITRAMFS".into(),
                self.initramfs.display().to_string(),
            ),
            ("EMBER_ROOTFS".into(), self.rootfs.display().to_string()),
            (
                "EMBER_RUNTIME_IMAGES".into(),
                self.runtimes
                    .iter()
                    .map(|(name, path)| format!("{name}={}", path.display()))
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        ]
        .into_iter()
        .chain(self.extra_env.iter().cloned())
        .chain(crate::sdk::tool_env())
        .collect()
    }
}

/// How VM tests can run on this host.
enum VmRunner {
    Direct,
    Lab,
    Unavailable,
}

fn vm_runner(ember: &std::path::Path) -> Result<VmRunner> {
    let status = Command::new(ember)
        .arg("doctor")
        .stdout(std::process::Stdio::null())
        .status()?;
    if status.success() {
        return Ok(VmRunner::Direct);
    }
    let has_kvm = std::path::Path::new("/dev/kvm").exists();
    let has_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Ok(if has_qemu {
        VmRunner::Lab
    } else if !has_kvm {
        VmRunner::Unavailable
    } else {
        bail!("this host's /dev/kvm cannot run Linux and qemu-system-x86_64 is missing: run `cargo xtask deps`")
    })
}

/// The crates embedders use as libraries; their docs must build without warnings.
const LIBRARY_CRATES: &[&str] = &[
    "ember-vmm",
    "ember-agent",
    "ember-snapshot-store",
    "ember-remote",
    "ember-devices",
    "ember-client",
];

/// Crates a process's crate must not link, checked with `cargo tree`: the jailed VMM process
/// carries no async runtime, HTTP stack or chart library; the service and the API client link
/// neither the CLI nor the bench harness; the client does not link the service. xtask must
/// build on a fresh host before `cargo xtask deps` installs libclang, which the VMM's
/// userfaultfd bindings need.
const FORBIDDEN_EDGES: &[(&str, &[&str])] = &[
    ("xtask", &["ember-vmm", "userfaultfd-sys"]),
    (
        "ember-sandbox",
        &[
            "tokio",
            "axum",
            "hyper",
            "plotters",
            "ember-service",
            "ember-client",
            "ember-remote",
            "object_store",
        ],
    ),
    ("ember-remote", &["ember-sandbox", "ember-vmm", "axum"]),
    ("ember-service", &["ember-cli", "ember-bench", "plotters"]),
    (
        "ember-client",
        &["ember-service", "ember-cli", "ember-sandbox", "axum"],
    ),
];

fn check_crate_edges() -> Result<()> {
    for (krate, forbidden) in FORBIDDEN_EDGES {
        let tree = output(cargo().args([
            "tree", "--quiet", "-p", krate, "-e", "normal", "--prefix", "none", "--format", "{p}",
        ]))?;
        for line in tree.lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if forbidden.contains(&name) {
                bail!("{krate} links {name}, which it must not (see its lib.rs)");
            }
        }
    }
    Ok(())
}

pub fn run_all(skip_deps: bool) -> Result<i32> {
    let mut phases = Phases::new();
    let mut checks = Checks::default();
    if !skip_deps {
        phases.run("debian packages", deps::ensure)?;
    }
    phases.run("rustfmt", || run(cargo().args(["fmt", "--all", "--check"])))?;
    phases.run("clippy", || {
        run(cargo().args([
            "clippy",
            "--quiet",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    phases.run("crate edges", check_crate_edges)?;
    // The library crates' documentation, links and all: what embedders read.
    phases.run("library docs", || {
        run(cargo()
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--quiet", "--no-deps"])
            .args(LIBRARY_CRATES.iter().flat_map(|c| ["-p", c])))
    })?;
    phases.run("fuzz targets build", crate::fuzz::build_targets)?;
    phases.run("host tests (unit, no guest)", || {
        run(cargo().args(["test", "--workspace", "--", "--skip", VM_TEST_PREFIX]))
    })?;
    phases.run(
        "SDKs (build, types against the API, unit tests)",
        crate::sdk::check,
    )?;
    // The in-process benchmarks build and run (briefly: figures come from full runs).
    phases.run("criterion benches (--quick)", || {
        run(cargo().args([
            "bench",
            "--quiet",
            "-p",
            "ember-benches",
            "--bench",
            "store",
            "--bench",
            "restore",
            "--bench",
            "devices",
            "--bench",
            "vm_restore",
            "--",
            "--quick",
        ]))
    })?;
    // Every fuzz target builds and runs clean for a while (full runs: `cargo xtask fuzz`).
    phases.run(
        &format!("fuzz targets ({FUZZ_SECONDS_IN_SUITE} s each)"),
        || match crate::fuzz::run_targets(FUZZ_SECONDS_IN_SUITE, None)? {
            0 => Ok(()),
            _ => bail!("a fuzz target found a crash"),
        },
    )?;

    let artifacts = phases.run("guest kernel, initramfs, rootfs", Artifacts::ensure)?;
    phases.run("artifact checks", || {
        checks.check("kernel cache hit is fast", check_kernel_cache_hit());
        checks.check(
            "rootfs holds python3, node and the agent",
            check_rootfs(&artifacts.rootfs),
        );
        Ok(())
    })?;

    run_vm_phases(&mut phases, &mut checks, &artifacts, None)?;
    phases.summary();
    println!(
        "xtask checks: {} passed, {} failed",
        checks.passed,
        checks.failed.len()
    );
    if !checks.failed.is_empty() {
        eprintln!("failed checks: {}", checks.failed.join(", "));
        return Ok(1);
    }
    Ok(0)
}

/// `cargo xtask vm-tests [--filter F]`: the VM tests alone, as the suite runs them.
pub fn run_vm_tests_only(filter: Option<&str>) -> Result<i32> {
    let mut phases = Phases::new();
    let mut checks = Checks::default();
    let artifacts = phases.run("guest kernel, initramfs, rootfs", Artifacts::ensure)?;
    // The SDKs' live suites run from their compiled form.
    if filter.is_none_or(|f| "vmtest_sdk_typescript".contains(f) || f.contains("sdk")) {
        phases.run("TypeScript SDK build", crate::sdk::build_typescript)?;
    }
    run_vm_phases(&mut phases, &mut checks, &artifacts, filter)?;
    phases.summary();
    Ok(i32::from(!checks.failed.is_empty()))
}

fn run_vm_phases(
    phases: &mut Phases,
    checks: &mut Checks,
    artifacts: &Artifacts,
    filter: Option<&str>,
) -> Result<()> {
    run(cargo()
        .args(["build", "--quiet"])
        .args(crate::util::PRODUCT_BINARIES))?;
    let ember = target_dir().join("debug/ember");
    let vm_bins = phases.run("build VM test binaries", vm_test_binaries)?;
    let mut artifacts = artifacts.clone();
    if let Some(filter) = filter {
        artifacts
            .extra_env
            .push(("EMBER_VM_TEST_FILTER".into(), filter.into()));
    }
    let artifacts = &artifacts;
    match vm_runner(&ember)? {
        VmRunner::Unavailable => {
            println!("SKIPPED: VM tests: this host has neither /dev/kvm nor qemu-system-x86_64");
        }
        VmRunner::Direct => {
            phases.run("VM tests (hardware KVM)", || {
                run_vm_tests_direct(&vm_bins, artifacts)
            })?;
        }
        VmRunner::Lab => {
            phases.run("host doctor names PVM", || {
                checks.check(
                    "ember doctor on this host exits non-zero and names the backend",
                    check_host_doctor(&ember),
                );
                Ok(())
            })?;
            phases.run("lab checks", || {
                lab_checks(checks);
                Ok(())
            })?;
            phases.run("VM tests (in the lab)", || {
                run_vm_tests_in_lab(&vm_bins, artifacts)
            })?;
        }
    }
    Ok(())
}

fn check_kernel_cache_hit() -> Result<()> {
    let start = Instant::now();
    let path = kernel::ensure()?;
    let secs = start.elapsed().as_secs_f64();
    eprintln!("  second `xtask kernel`: {secs:.2}s -> {}", path.display());
    if secs >= 5.0 {
        bail!("a cached kernel took {secs:.1}s to return (must be < 5s)");
    }
    Ok(())
}

fn check_rootfs(image: &std::path::Path) -> Result<()> {
    let bin = images::ext4_list(image, "/usr/bin")?;
    for name in ["python3", "node"] {
        if !bin.iter().any(|n| n == name) {
            bail!("/usr/bin/{name} is missing from {}", image.display());
        }
    }
    // bookworm merges /usr: /sbin is a symlink to usr/sbin.
    let sbin = images::ext4_list(image, "/usr/sbin")?;
    if !sbin.iter().any(|n| n == "ember-agent") {
        bail!(
            "{} is missing from {}",
            images::AGENT_GUEST_PATH,
            image.display()
        );
    }
    Ok(())
}

fn check_host_doctor(ember: &std::path::Path) -> Result<()> {
    let out = Command::new(ember).arg("doctor").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status.success() {
        bail!("ember doctor exited 0 on a host whose KVM cannot run Linux:\n{text}");
    }
    if !(text.contains("PVM") || text.contains("absent") || text.contains("neither vmx nor svm")) {
        bail!("ember doctor did not name the KVM backend:\n{text}");
    }
    Ok(())
}

/// Runs `argv` in the lab, in a fresh lab once more if the first one's L1 wedged (a fault of
/// the emulated lab, not of the check).
fn run_in_lab_once_more(argv: &[String], opts: &LabOptions) -> Result<i32> {
    match run_in_lab(argv, opts) {
        Err(err) if err.downcast_ref::<crate::lab::LabFailure>().is_some() => {
            eprintln!("lab: {err:#}\nlab: running the check once more in a fresh lab");
            run_in_lab(argv, opts)
        }
        other => other,
    }
}

fn lab_checks(checks: &mut Checks) {
    let opts = LabOptions::default();
    let argv = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let run_in_lab = run_in_lab_once_more;
    checks.check(
        "lab propagates failure (false)",
        (|| {
            let rc = run_in_lab(&argv(&["false"]), &opts)?;
            if rc == 0 {
                bail!("`false` in the lab exited 0");
            }
            Ok(())
        })(),
    );
    checks.check(
        "lab propagates exit status 7",
        (|| {
            let rc = run_in_lab(&argv(&["sh", "-c", "exit 7"]), &opts)?;
            if rc != 7 {
                bail!("`sh -c 'exit 7'` in the lab exited {rc}");
            }
            Ok(())
        })(),
    );
    checks.check(
        "ember doctor in the lab reports hardware KVM",
        (|| {
            let rc = run_in_lab(
                &argv(&[
                    "sh",
                    "-c",
                    "ember doctor | tee /tmp/doctor; grep -q 'kvm kind: *hardware' /tmp/doctor",
                ]),
                &opts,
            )?;
            if rc != 0 {
                bail!("ember doctor in the lab exited {rc} or did not report hardware KVM");
            }
            Ok(())
        })(),
    );
}

/// Test executables of the workspace (built, not run), by `cargo test --no-run`.
fn vm_test_binaries() -> Result<Vec<PathBuf>> {
    let json = output(cargo().args(["test", "--workspace", "--no-run", "--message-format=json"]))?;
    let bins: Vec<PathBuf> = json.lines().filter_map(test_executable).collect();
    if bins.is_empty() {
        bail!("cargo test --no-run listed no test executables");
    }
    Ok(bins)
}

/// The test executable one line of cargo's JSON messages names, if it is a test artifact.
fn test_executable(line: &str) -> Option<PathBuf> {
    let message: serde_json::Value = serde_json::from_str(line).ok()?;
    if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
        return None;
    }
    message["executable"].as_str().map(PathBuf::from)
}

/// How long the suite runs each fuzz target.
const FUZZ_SECONDS_IN_SUITE: u64 = 20;

/// How long one VM test may run before it counts as hung (the slowest, the contract test,
/// takes ~15 min in a lab beside another, and labs vary by ±40 %);
/// `EMBER_VM_TEST_TIMEOUT_S` overrides it (the harness's own tests).
const VM_TEST_TIMEOUT_S: u32 = 1200;
/// When a still-running VM test's VMMs are asked (SIGUSR1) to log what their VMs are doing,
/// and those logs are printed: a hang leaves evidence instead of only a timeout.
/// `EMBER_VM_TEST_WATCHDOG_S` overrides it.
const VM_TEST_WATCHDOG_S: u32 = 1140;

/// The slowest VM tests (a minute or more in the lab), slowest first: they start first.
const SLOW_VM_TESTS: &[&str] = &[
    "vmtest_templates_build_once_restore_ready_and_rebuild_only_what_changed",
    "vmtest_bench_quick_writes_a_report_with_ratios_and_charts",
    "vmtest_the_service_keeps_its_openapi_contract",
    "vmtest_sandbox_networks_egress_allow_lists_none_exposed_ports_and_four_clones_leave_nothing_behind",
    "vmtest_a_snapshot_saved_on_one_host_resumes_on_another_through_the_remote_tier",
    "vmtest_service_story_snapshot_restore_fork_and_restart",
    "vmtest_diff_snapshots_store_only_dirty_pages_and_snapshots_share_objects",
    "vmtest_ember_run_and_restore_share_a_snapshot_through_a_remote_tier",
    "vmtest_a_short_soak_leaves_nothing_behind_and_draws_its_curve",
    "vmtest_hundreds_of_requests_to_a_silent_agent_harm_no_other_sandbox",
    "vmtest_file_restores_map_the_materialised_memory_and_fall_back_from_a_damaged_file",
    "vmtest_a_warm_pool_serves_boots_and_restores_replaces_dead_vmms_and_absorbs_bursts",
];

/// A shell script that runs the `vmtest_` tests of every binary one at a time, each under a
/// time limit (so one hung test fails alone, by name), and fails if any fails.
fn vm_test_script(bins: &[PathBuf]) -> String {
    let ember_bin = crate::util::sh_quote(&target_dir().join("debug/ember").to_string_lossy());
    let mut script = format!(
        r#"failed=""
passed=0
lab_faults=0
digest=$(mktemp)
timeout_s=${{EMBER_VM_TEST_TIMEOUT_S:-{VM_TEST_TIMEOUT_S}}}
watchdog_s=${{EMBER_VM_TEST_WATCHDOG_S:-{VM_TEST_WATCHDOG_S}}}
# Tests an earlier lab of this suite run already finished ("pass NAME" / "fail NAME"): a lab
# that died part-way is followed by one that runs only the rest.
done_file="${{EMBER_VM_TESTS_DONE:-/dev/null}}"
claims="${{EMBER_VM_TESTS_CLAIMS:-}}"
lane="${{EMBER_LAB_LANE:-1}}"
ember_bin={ember_bin}
# The lab's emulated SVM (QEMU TCG) now and then loses a guest's registers and leaves the L1
# host's in their place: the guest vCPU then sits at an address inside the L1's KVM module,
# where no guest of ember's has code, and hangs or triple faults. A failed test whose stall
# report shows that is a lab fault: it runs once more. A triple fault leaves no such record
# (KVM resets the vCPU, and tracing its exits in the L1 means patching the L1's kernel text
# live, which wedges the L1 under multi-threaded TCG), so in the lab a failed test whose guest
# triple faulted also runs once more, said as a suspicion; a failure that repeats counts. At
# most 3 reruns a suite. The range of the L1's KVM module symbols, zero-padded hex "lowest highest":
# Only symbols in the module area count (0xffffffffa0000000 up): the L1's core kernel text is
# where the guest's is (0xffffffff81…), so an address there proves nothing.
kvm_text=$(awk '$4 ~ /^\[kvm/ {{ a = sprintf("%16s", $1); gsub(/ /, "0", a); if (a < "ffffffffa0000000") next; if (lo == "" || a < lo) lo = a; if (a > hi) hi = a }} END {{ if (lo != "") print lo, hi }}' "${{EMBER_L1_KALLSYMS:-/proc/kallsyms}}" 2>/dev/null)
# Prints the first rip in files $@ that lies in the L1's KVM module text; fails if none does.
l1_rip() {{
    [ -n "$kvm_text" ] || return 1
    cat "$@" 2>/dev/null | grep -o 'rip 0x[0-9a-f]*' | awk -v range="$kvm_text" '
        BEGIN {{ split(range, r, " ") }}
        {{ a = sprintf("%16s", substr($2, 3)); gsub(/ /, "0", a)
          # The upper end at 1 MiB granularity: code runs on past the last symbol start.
          if (a >= r[1] && substr(a, 1, 11) <= substr(r[2], 1, 11)) {{ print $2; found = 1; exit }} }}
        END {{ exit !found }}'
}}
run_once() {{
    marker=$(mktemp)
    : > "$out.watchdog"
    (
        # Ends within a second of the test (the marker goes): nothing to kill, no race. Time is
        # read from the clock (/proc/uptime, no fork), not counted in sleeps: in a busy lab each
        # `sleep 1` took well over a second, and the count never reached the limit before the
        # test's own timeout.
        read -r up _ < /proc/uptime
        deadline=$((${{up%.*}} + watchdog_s))
        while :; do
            sleep 1
            [ -e "$marker" ] || exit 0
            read -r up _ < /proc/uptime
            [ "${{up%.*}}" -lt $deadline ] || break
        done
        echo "VM test $2 still running after $watchdog_s s; what its VMs are doing:"
        pkill -USR1 -f '/(ember-vmm|ember run|ember restore) '
        sleep 5
        find /tmp \( -name vmm.log -o -name 'ember-stall-*.txt' \) -newer "$marker" 2>/dev/null | while read -r log; do
            echo "--- $log (tail)"
            tail -n 100 "$log"
        done
    ) > "$out.watchdog" 2>&1 &
    watchdog=$!
    if [ -n "$claims" ]; then
        # Lanes: the output comes whole when the test ends, not interleaved with another lab's.
        {{ timeout -k 10 "$timeout_s" "$1" --exact "$2" --test-threads=1; echo $? > "$out.status"; }} > "$out" 2>&1
        cat "$out"
    else
        {{ timeout -k 10 "$timeout_s" "$1" --exact "$2" --test-threads=1; echo $? > "$out.status"; }} 2>&1 | tee "$out"
    fi
    status=$(cat "$out.status")
    rm -f "$marker"
    wait $watchdog
    cat "$out.watchdog" >&2
    # VMMs a test left behind (a timed-out test's children, say) would slow every later test.
    left=$(pgrep -f "^$ember_bin(-vmm)? " | wc -l)
    if [ "$left" != 0 ]; then
        echo "VM test $2 left $left ember processes running; killing them" >&2
        pkill -KILL -f "^$ember_bin(-vmm)? "
    fi
}}
one() {{
    if grep -qxF -e "pass $2" -e "fail $2" "$done_file" 2>/dev/null; then
        echo "VM test $2: finished already (in another lab, or an earlier one)"
        return
    fi
    # Tests that reach the registries run only in a lab with an uplink (lane 1), and first:
    # the uplink goes down before the lab's first other test, which then keeps to this machine.
    case "$2" in
        *uplink*) [ -n "${{EMBER_LAB_UPLINK:-}}" ] || return ;;
        *) if [ -n "${{EMBER_LAB_UPLINK:-}}" ]; then
               ip link set eth0 down && echo "lab: the uplink is down from here on"
               unset EMBER_LAB_UPLINK
           fi ;;
    esac
    # Labs running side by side (lanes) share the list: each test goes to the first lane
    # that claims it (mkdir on the host's folder is atomic across labs).
    if [ -n "$claims" ]; then
        mkdir "$claims/$2" 2>/dev/null || return
        echo "$lane" > "$claims/$2/lane"
        echo "VM test $2: started in lane $lane"
    fi
    out=$(mktemp)
    attempt=1
    while :; do
        run_once "$1" "$2"
        if [ "$status" = 0 ] || [ $attempt != 1 ] || [ $lab_faults -ge 3 ]; then
            break
        fi
        if rip=$(l1_rip "$out" "$out.watchdog"); then
            echo "VM test $2: lab fault, not a test failure: a guest vCPU held the L1 host's registers (rip $rip is in the L1's KVM module: the emulated SVM lost the guest's state); running the test once more" >&2
        elif [ -n "${{EMBER_IN_LAB:-}}" ] && grep -q 'triple fault (shutdown)' "$out" "$out.watchdog" 2>/dev/null; then
            echo "VM test $2: a guest triple faulted in the lab, the way the emulated SVM's lost guest states end when they do not hang (no evidence either way: KVM resets the vCPU); running the test once more, and a second failure counts" >&2
        else
            break
        fi
        lab_faults=$((lab_faults + 1))
        attempt=2
    done
    if [ "$status" != 0 ]; then
        # The panic (or the output's end) in brief, repeated after the last test: a long log
        # shown only in part still says why each test failed.
        {{ echo "--- $2 (exit status $status)"
          grep -m1 -A6 'panicked at' "$out" || tail -n 8 "$out"; }} | cut -c1-800 >> "$digest"
    fi
    rm -f "$out" "$out.watchdog" "$out.status"
    if [ "$status" = 0 ]; then
        passed=$((passed + 1))
        echo "pass $2" >> "$done_file"
        return
    fi
    [ "$status" = 124 ] && echo "VM test $2 timed out after $timeout_s s" >&2
    failed="$failed $2"
    echo "fail $2" >> "$done_file"
}}
"#
    );
    // Every binary is listed once (exec'ing one from the lab's share takes a second or two):
    // "N TEST" lines, N the binary's number; the slowest tests first, so that lanes end close
    // together, then the rest in the binaries' order.
    script.push_str("listed=$(mktemp)\n");
    for (n, bin) in bins.iter().enumerate() {
        let bin = crate::util::sh_quote(&bin.to_string_lossy());
        script.push_str(&format!(
            "bin_{n}={bin}\n\"$bin_{n}\" --list 2>/dev/null | sed -n 's/: test$//p' | grep '{VM_TEST_PREFIX}' | grep -F -e \"${{EMBER_VM_TEST_FILTER:-}}\" | sed 's/^/{n} /' >> \"$listed\"\n"
        ));
    }
    script.push_str(&format!(
        "{{ grep ' [^ ]*uplink[^ ]*$' \"$listed\"; for slow in {}; do grep \" $slow$\" \"$listed\"; done; }} > \"$listed.order\"\ngrep -vxF -f \"$listed.order\" \"$listed\" >> \"$listed.order\"\n",
        SLOW_VM_TESTS.join(" ")
    ));
    // fd 3: a test reading its stdin must not eat the list.
    script.push_str(
        "while read -r n t <&3; do eval \"bin=\\$bin_$n\"; one \"$bin\" \"$t\"; done 3< \"$listed.order\"\nrm -f \"$listed\" \"$listed.order\"\n",
    );
    script.push_str(
        r#"earlier=$(sed -n 's/^fail / /p' "$done_file" 2>/dev/null | tr -d '\n')
for t in $earlier; do case " $failed " in *" $t "*) ;; *) failed="$failed $t" ;; esac; done
if [ -s "$digest" ]; then
    echo "VM test failures in this lab, in brief:"
    cat "$digest"
fi
rm -f "$digest"
echo "VM tests: $passed passed in this lab${failed:+, failed:$failed}"
[ -z "$failed" ]
"#,
    );
    script
}

fn run_vm_tests_direct(bins: &[PathBuf], artifacts: &Artifacts) -> Result<()> {
    let status = Command::new("sh")
        .arg("-c")
        .arg(vm_test_script(bins))
        .envs(artifacts.env())
        .status()
        .context("running VM tests")?;
    if !status.success() {
        bail!("VM tests failed");
    }
    Ok(())
}

/// Labs each lane may take, when L1 kernels die under them.
const MAX_VM_TEST_LABS: u32 = 3;

/// How many labs run VM tests side by side: `EMBER_LAB_LANES`, else 2 on a host with two
/// cores or more. One lab of two vCPUs keeps only ~1.2 of two cores busy (its tests wait on
/// guests much of the time); two labs of one vCPU each ran a set of tests 1.45x sooner (two
/// labs of two vCPUs each ran no sooner at all: each test took twice as long).
fn lab_lanes() -> u32 {
    if let Some(lanes) = std::env::var("EMBER_LAB_LANES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    {
        return lanes.clamp(1, 4);
    }
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 2) as u32)
}

/// vCPUs of each lab: `EMBER_LAB_CPUS`, else the host's cores shared among the lanes.
fn lab_cpus(lanes: u32) -> u32 {
    std::env::var("EMBER_LAB_CPUS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
            (cores / lanes).max(1)
        })
}

fn run_vm_tests_in_lab(bins: &[PathBuf], artifacts: &Artifacts) -> Result<()> {
    // Which tests finished, and which lane took which, kept on the host (the target folder is
    // shared with every lab): a lab whose L1 kernel dies (nested KVM under TCG: a wedge or
    // panic in its KVM path, seen every few runs) is followed by one that runs only the tests
    // not finished yet. A test that failed is never run again.
    let done_file = target_dir().join("vm-tests-done");
    let claims = target_dir().join("vm-tests-claims");
    let _ = std::fs::remove_file(&done_file);
    let _ = std::fs::remove_dir_all(&claims);
    std::fs::create_dir_all(&claims)?;
    // Built once, before labs start side by side.
    crate::lab::ensure_image()?;
    let lanes = lab_lanes();
    let script = vm_test_script(bins);
    let results: Vec<Result<i32>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (1..=lanes)
            .map(|lane| {
                let mut env = artifacts.env();
                env.push((
                    "EMBER_VM_TESTS_DONE".into(),
                    done_file.display().to_string(),
                ));
                env.push(("EMBER_LAB_LANE".into(), lane.to_string()));
                if lanes > 1 {
                    env.push(("EMBER_VM_TESTS_CLAIMS".into(), claims.display().to_string()));
                }
                let opts = LabOptions {
                    env,
                    cpus: lab_cpus(lanes),
                    // The lane that runs the tests that install from the registries.
                    uplink: lane == 1,
                    // Room for a lane's share of the tests (~25 min on a 2-core host) and
                    // for a lab that dies part-way, within CI's 90 minutes.
                    timeout: Duration::from_secs(50 * 60),
                    ..Default::default()
                };
                let (script, claims, done_file) = (&script, &claims, &done_file);
                scope.spawn(move || run_lane(lane, script, &opts, claims, done_file))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a lab lane panicked")))
            })
            .collect()
    });
    let mut failed = Vec::new();
    for (lane, result) in (1..).zip(results) {
        match result {
            Ok(0) => {}
            Ok(rc) => failed.push(format!("lane {lane}: VM tests failed (exit {rc})")),
            Err(err) => failed.push(format!("lane {lane}: {err:#}")),
        }
    }
    if !failed.is_empty() {
        bail!("VM tests in the lab failed: {}", failed.join("; "));
    }
    Ok(())
}

/// One lane: labs run the script until it ends, a fresh lab going on where one whose L1 died
/// stopped (the tests it had claimed and not finished go back to this lane).
fn run_lane(
    lane: u32,
    script: &str,
    opts: &LabOptions,
    claims: &std::path::Path,
    done_file: &std::path::Path,
) -> Result<i32> {
    let argv = ["sh".into(), "-c".into(), script.to_string()];
    let mut labs = 1;
    loop {
        match run_in_lab(&argv, opts) {
            Err(err)
                if err.downcast_ref::<crate::lab::LabFailure>().is_some()
                    && labs < MAX_VM_TEST_LABS =>
            {
                labs += 1;
                release_unfinished_claims(lane, claims, done_file);
                eprintln!(
                    "lab (lane {lane}): {err:#}\nlab (lane {lane}): the VM tests not finished \
                     yet go on in a fresh lab ({labs} of at most {MAX_VM_TEST_LABS})"
                );
            }
            other => return other,
        }
    }
}

/// Removes the claims `lane` holds on tests the done file does not record as finished.
fn release_unfinished_claims(lane: u32, claims: &std::path::Path, done_file: &std::path::Path) {
    let done = std::fs::read_to_string(done_file).unwrap_or_default();
    let finished: std::collections::HashSet<&str> = done
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(_, t)| t))
        .collect();
    for entry in std::fs::read_dir(claims).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let holder = std::fs::read_to_string(entry.path().join("lane")).unwrap_or_default();
        if holder.trim() == lane.to_string() && !finished.contains(name.as_str()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests;
