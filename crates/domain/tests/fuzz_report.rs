//! Hostile heartbeats: the report parser, fed random bytes and random JSON built around the
//! contract's field names, never panics, and what it accepts is within the contract.
//! `FUZZ_MS` sets the time per target (`scripts/fuzz.sh`: ten minutes).

use arbtest::arbitrary::{Result, Unstructured};
use domain::heartbeat::{CONTRACT_FIELDS, DISK_FIELDS, MAX_DISKS, MAX_REPORT_BYTES, parse_report};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicUsize, Ordering};

const NOW_MS: i64 = 1_800_000_000_000;

/// A JSON value, mostly near what an agent sends: the contract's names, numbers at and past
/// their limits, wrong types, deep nesting now and then.
fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let choice = if depth > 4 {
        u.int_in_range(0..=5)?
    } else {
        u.int_in_range(0..=8)?
    };
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(*u.choose(&[
            0i64,
            -1,
            1,
            100,
            101,
            i64::MAX,
            i64::MIN,
            4_294_967_296,
            1_800_000_000,
        ])?),
        3 => serde_json::Number::from_f64(
            *u.choose(&[0.0, 12.5, 100.0, 100.000_1, -0.0, 1e308, -1e-308, 99.999])?,
        )
        .map_or(Value::Null, Value::Number),
        4 => Value::String(u.arbitrary::<String>()?),
        5 => Value::String(
            (*u.choose(&["linux", "windows", "/", "C:", "web-01", "pve1", "", "\u{0}"])?)
                .to_owned(),
        ),
        6 | 7 => Value::Object(object(u, depth + 1)?),
        _ => {
            let len = u.int_in_range(0..=70)?;
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(if u.ratio(3, 4)? {
                    Value::Object(disk(u)?)
                } else {
                    value(u, depth + 1)?
                });
            }
            Value::Array(items)
        }
    })
}

fn object(u: &mut Unstructured<'_>, depth: u32) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for _ in 0..u.int_in_range(0..=14)? {
        let key = if u.ratio(9, 10)? {
            (*u.choose(CONTRACT_FIELDS)?).to_owned()
        } else {
            u.arbitrary::<String>()?
        };
        map.insert(key, value(u, depth)?);
    }
    Ok(map)
}

fn disk(u: &mut Unstructured<'_>) -> Result<Map<String, Value>> {
    let mut map = Map::new();
    for name in DISK_FIELDS {
        if u.ratio(9, 10)? {
            map.insert((*name).to_owned(), value(u, 5)?);
        }
    }
    Ok(map)
}

/// A valid report with a few of its fields removed, replaced by random values, or joined by
/// unknown ones: most runs sit at the edge between accepted and refused.
fn mutated_report(u: &mut Unstructured<'_>) -> Result<Value> {
    let mut report = serde_json::json!({
        "hostname": "web-01", "os": "linux", "cpu_percent": 12.5,
        "ram_used_bytes": 1_073_741_824i64, "ram_total_bytes": 4_294_967_296i64,
        "uptime_seconds": 3600, "machine_id": "5b0d6d8c-1111-2222-3333-444455556666",
        "vmid": 100, "node": "pve1", "agent_version": "1.0", "observed_at": 1_800_000_000,
        "disks": [{"mount": "/", "used_bytes": 5_368_709_120i64, "total_bytes": 21_474_836_480i64}],
    });
    let Some(map) = report.as_object_mut() else {
        return Ok(report);
    };
    for _ in 0..u.int_in_range(1..=4)? {
        let field = (*u.choose(CONTRACT_FIELDS)?).to_owned();
        match u.int_in_range(0..=3)? {
            0 => {
                map.remove(&field);
            }
            1 => {
                map.insert(u.arbitrary::<String>()?, value(u, 1)?);
            }
            _ => {
                map.insert(field, value(u, 1)?);
            }
        }
    }
    Ok(report)
}

/// Counts of accepted and refused reports, so a run that only ever refuses shows up.
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// What an accepted report must hold, whatever it was built from.
fn check(body: &[u8]) {
    let parsed = parse_report(body, NOW_MS);
    let counter = if parsed.is_ok() { &ACCEPTED } else { &REFUSED };
    counter.fetch_add(1, Ordering::Relaxed);
    if let Ok(accepted) = parsed {
        let h = &accepted.heartbeat;
        assert!((0.0..=100.0).contains(&h.cpu_percent), "{}", h.cpu_percent);
        assert!(h.ram_used_bytes >= 0 && h.ram_total_bytes >= 0);
        assert!(h.uptime_seconds >= 0);
        assert!(h.disks.len() <= MAX_DISKS);
        assert!(!h.hostname.is_empty());
        assert!(
            h.observed_ms <= NOW_MS,
            "the agent's clock never runs ahead of ours"
        );
        assert_eq!(h.received_ms, NOW_MS);
        if let Some(p) = h.disk_max_percent {
            assert!((0.0..=100.0).contains(&p), "{p}");
        }
    }
}

/// `FUZZ_MS` when set (`scripts/fuzz.sh`), else the suite's short run.
fn budget_ms(default: u64) -> u64 {
    std::env::var("FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_bytes_never_panic_the_report_parser() {
    arbtest::arbtest(|u| {
        let len = u.int_in_range(0..=MAX_REPORT_BYTES)?;
        let bytes = u.bytes(len.min(u.len()))?;
        check(bytes);
        Ok(())
    })
    .budget_ms(budget_ms(1_000));
}

#[test]
fn random_reports_never_panic_and_what_is_accepted_is_in_the_contract() {
    arbtest::arbtest(|u| {
        let body = if u.ratio(1, 4)? {
            Value::Object(object(u, 0)?)
        } else {
            mutated_report(u)?
        };
        check(body.to_string().as_bytes());
        Ok(())
    })
    .budget_ms(budget_ms(2_000))
    .run();
    // Both sides of the parser were reached, not only its refusals.
    assert!(ACCEPTED.load(Ordering::Relaxed) > 0, "nothing was accepted");
    assert!(REFUSED.load(Ordering::Relaxed) > 0, "nothing was refused");
}
