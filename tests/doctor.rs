//! `blockfence doctor` end to end: the real binary on every sysfs fixture
//! (tests/fixtures/sysfs/<case>), on this machine's /sys (no NVMe here), and on
//! a real loop device. Exit code 0 when every volume passes, 1 when any fails.

mod common;

use common::{require_root_loop, run_with_timeout, CmdOutput, Scratch, COMMAND_TIMEOUT};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_blockfence");

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sysfs")
        .join(case)
}

fn doctor(args: &[&str]) -> CmdOutput {
    run_with_timeout(
        Command::new(BIN)
            .arg("doctor")
            .args(args)
            .env_remove("BLOCKFENCE_DOCTOR_VOLUMES"),
        COMMAND_TIMEOUT,
    )
    .expect("run blockfence doctor")
}

fn doctor_on(case: &str, extra: &[&str]) -> CmdOutput {
    let root = fixture(case);
    let mut args = vec!["--sysfs-root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    doctor(&args)
}

fn json_on(case: &str, extra: &[&str]) -> (i32, Value) {
    let mut a = vec!["--json"];
    a.extend_from_slice(extra);
    let out = doctor_on(case, &a);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("{case}: not JSON ({e}): {}", out.stdout));
    (out.status.code().unwrap(), v)
}

#[test]
fn every_fixture_gets_the_expected_verdict_and_exit_code() {
    for (case, pass) in [
        ("single-path", false),
        ("multipath-ana", true),
        ("lightbits", false),
        ("reconnecting", false),
        ("timeouts-unsafe", false),
        ("timeouts-safe", false),
    ] {
        let out = doctor_on(case, &[]);
        assert_eq!(
            out.status.code(),
            Some(if pass { 0 } else { 1 }),
            "{case}:\n{}{}",
            out.stdout,
            out.stderr
        );
        let want = if pass {
            "volume nvme0n1 (nvme0n1, /dev/nvme0n1): PASS"
        } else {
            "volume nvme0n1 (nvme0n1, /dev/nvme0n1): FAIL"
        };
        assert!(out.stdout.contains(want), "{case}:\n{}", out.stdout);
        if !pass {
            assert!(
                out.stdout.contains("  fix: "),
                "{case}: a failure names its fix:\n{}",
                out.stdout
            );
        }
        let (code, v) = json_on(case, &[]);
        assert_eq!(code, out.status.code().unwrap());
        assert_eq!(v["pass"], Value::Bool(pass), "{case}");
        assert_eq!(v["budget_ms"], 1027);
        assert_eq!(v["host_dead_ms"], 9200);
        assert_eq!(v["volumes"][0]["reservations"]["status"], "not_probed");
    }
}

#[test]
fn unsafe_timeouts_print_the_exact_fixes() {
    let out = doctor_on("timeouts-unsafe", &[]);
    let s = &out.stdout;
    assert!(s.contains("stale I/O via nvme0: queued writes live 610000 ms (detect 10000 ms + requeue 600000 ms until ctrl_loss_tmo): TOO LONG"), "{s}");
    assert!(
        s.contains("stale I/O via nvme1: queued writes live forever"),
        "{s}"
    );
    assert!(
        s.contains("fix: echo 0 > /sys/class/nvme/nvme0/fast_io_fail_tmo"),
        "{s}"
    );
    assert!(
        s.contains("fix: echo 0 > /sys/class/nvme/nvme1/fast_io_fail_tmo"),
        "{s}"
    );
    assert!(s.contains("--fast_io_fail_tmo=0"), "{s}");
    assert!(s.contains("--io-timeout-ms 9900"), "{s}");
}

#[test]
fn safe_timeouts_pass_with_parameters_that_leave_room_for_detection() {
    let out = doctor_on("timeouts-safe", &["--io-timeout-ms", "2000"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stdout);
    assert!(out.stdout.contains("0 of 1 volumes fail"));
    // Already fast_io_fail_tmo=0: no pointless echo, only the parameter fix.
    let out = doctor_on("timeouts-safe", &[]);
    assert!(!out.stdout.contains("echo 0 >"), "{}", out.stdout);
    assert!(
        out.stdout.contains("--io-timeout-ms 2000"),
        "{}",
        out.stdout
    );
    // Bad parameters are refused with the reason.
    let out = doctor_on("timeouts-safe", &["--lease-timeout-ms", "100"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("invalid lease parameters"),
        "{}",
        out.stderr
    );
}

#[test]
fn lightbits_volume_by_uuid_and_the_path_report() {
    let (code, v) = json_on(
        "lightbits",
        &["--volume", "pgdata=5f1c3e2a-8b7d-4c6e-9a1b-2d3e4f5a6b7c"],
    );
    assert_eq!(code, 1);
    let vol = &v["volumes"][0];
    assert_eq!(vol["name"], "pgdata");
    assert_eq!(vol["device"], "/dev/nvme0n1");
    assert_eq!(vol["namespace"]["lightbits"], true);
    assert_eq!(
        vol["namespace"]["volume_uuid"],
        "5f1c3e2a-8b7d-4c6e-9a1b-2d3e4f5a6b7c"
    );
    assert_eq!(vol["paths"].as_array().unwrap().len(), 3);
    assert_eq!(vol["paths"][0]["ana_state"], "optimized");
    assert_eq!(vol["paths"][1]["usable"], false);
    assert_eq!(vol["guard"]["lifetime_ms"], Value::Null);
    let out = doctor_on(
        "lightbits",
        &["--volume", "pgdata=5f1c3e2a-8b7d-4c6e-9a1b-2d3e4f5a6b7c"],
    );
    assert!(
        out.stdout
            .contains("note: Lightbits volume 5f1c3e2a-8b7d-4c6e-9a1b-2d3e4f5a6b7c"),
        "{}",
        out.stdout
    );
}

#[test]
fn reconnecting_namespace_reports_no_usable_path() {
    let out = doctor_on("reconnecting", &[]);
    assert!(
        out.stdout
            .contains("path nvme0: tcp connecting optimized, NOT usable"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("problem: no usable path"),
        "{}",
        out.stdout
    );
}

#[test]
fn no_nvme_is_said_clearly_and_passes() {
    let out = doctor_on("no-nvme", &[]);
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("no NVMe namespaces under"),
        "{}",
        out.stdout
    );
    let (code, v) = json_on("no-nvme", &[]);
    assert_eq!(code, 0);
    assert_eq!(v["nvme_found"], false);
    assert_eq!(v["volumes"].as_array().unwrap().len(), 0);
    // A loop device named explicitly: not NVMe, disk lease only, passes.
    let out = doctor_on("no-nvme", &["--volume", "db=/dev/loop0"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stdout);
    assert!(
        out.stdout.contains(
            "loop0 is not an NVMe namespace (loop device over /var/lib/blockfence/shared.img)"
        ),
        "{}",
        out.stdout
    );
}

#[test]
fn unknown_volume_and_bad_arguments_fail_with_a_reason() {
    let out = doctor_on("multipath-ana", &["--volume", "pg=nvme9n9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout
            .contains("problem: no block device or NVMe namespace matches \"nvme9n9\""),
        "{}",
        out.stdout
    );
    let out = doctor_on("multipath-ana", &["--volume", "justaname"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("expected NAME=DEVICE_OR_ID"),
        "{}",
        out.stderr
    );
    let scratch = Scratch::new("doctor-");
    let out = doctor(&["--sysfs-root", scratch.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stderr.contains("does not look like sysfs"),
        "{}",
        out.stderr
    );
}

#[test]
fn this_machine_without_nvme() {
    let has_nvme = std::fs::read_dir("/sys/class/nvme")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    let out = doctor(&[]);
    if has_nvme {
        eprintln!("this machine has NVMe controllers: only checking that doctor runs");
        assert!(matches!(out.status.code(), Some(0 | 1)), "{}", out.stderr);
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("no NVMe namespaces under /sys"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_real_loop_device_passes_as_disk_lease_only() {
    if !require_root_loop() {
        return;
    }
    let scratch = Scratch::new("doctor-loop-");
    let image = scratch.image("d.img", 32 << 20);
    // Retried: other test processes attach at the same time and `-f` may
    // lose the race for a free device.
    let mut dev = String::new();
    for _ in 0..10 {
        let out = run_with_timeout(
            Command::new("losetup").args(["-f", "--show"]).arg(&image),
            COMMAND_TIMEOUT,
        )
        .unwrap();
        if out.status.success() {
            dev = out.stdout.trim().to_owned();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(!dev.is_empty(), "cannot attach a loop device");
    let res = doctor(&["--volume", &format!("db={dev}"), "--json"]);
    let _ = run_with_timeout(Command::new("losetup").args(["-d", &dev]), COMMAND_TIMEOUT);
    assert_eq!(res.status.code(), Some(0), "{}{}", res.stdout, res.stderr);
    let v: Value = serde_json::from_str(&res.stdout).unwrap();
    assert_eq!(v["volumes"][0]["kind"], "block");
    assert_eq!(v["volumes"][0]["device"], dev.as_str());
    assert!(v["volumes"][0]["notes"][0]
        .as_str()
        .unwrap()
        .contains(&image.display().to_string()));
}
