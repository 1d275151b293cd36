//! Proves the per-test time limit: `scripts/test.sh --self-test` runs this test under the
//! short `hang-check` profile of .config/nextest.toml and expects nextest to kill it and
//! name it as timed out. Ignored by default, and it returns at once unless
//! VMHC_HANG_SELF_TEST=1, so a run of the ignored tests cannot hang by accident.

#[test]
#[ignore = "hangs on purpose; run by scripts/test.sh --self-test"]
fn hangs_until_the_runner_kills_it() {
    if std::env::var("VMHC_HANG_SELF_TEST").as_deref() != Ok("1") {
        return;
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
