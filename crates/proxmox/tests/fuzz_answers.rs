//! Hostile Proxmox answers: the shapes the client reads (guest lists, a guest's status, a
//! task, a configuration's SMBIOS line, UPIDs), fed random JSON and text, never panic.
//! `FUZZ_MS` sets the time per target (`scripts/fuzz.sh`: ten minutes).

use arbtest::arbitrary::{Result, Unstructured};
use proxmox::types::{self, PveResource};
use serde_json::{Map, Value};

const RESOURCE_FIELDS: &[&str] = &[
    "vmid",
    "node",
    "type",
    "status",
    "name",
    "template",
    "lock",
    "hastate",
    "tags",
    "id",
    "uptime",
    "maxmem",
    "qmpstatus",
    "diskwrite",
    "netout",
    "exitstatus",
    "upid",
    "smbios1",
];

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<Value> {
    let choice = if depth > 3 {
        u.int_in_range(0..=5)?
    } else {
        u.int_in_range(0..=7)?
    };
    Ok(match choice {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(*u.choose(&[0i64, 1, -1, 100, 999_999_999, 1_000_000_000, i64::MAX])?),
        3 => Value::String(
            (*u.choose(&[
                "qemu",
                "lxc",
                "running",
                "stopped",
                "pve1",
                "100",
                "1",
                "0",
                "prod;web",
                "UPID:pve1:0000A1B2:0001C3D4:65A0B1C2:qmreset:100:root@pam!monitor:",
                "uuid=5B0D6D8C-1111-2222-3333-444455556666,manufacturer=QEMU",
                "",
            ])?)
            .to_owned(),
        ),
        4 | 5 => Value::String(u.arbitrary::<String>()?),
        6 => {
            let mut map = Map::new();
            for _ in 0..u.int_in_range(0..=12)? {
                map.insert(
                    (*u.choose(RESOURCE_FIELDS)?).to_owned(),
                    value(u, depth + 1)?,
                );
            }
            Value::Object(map)
        }
        _ => {
            let len = u.int_in_range(0..=8)?;
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(value(u, depth + 1)?);
            }
            Value::Array(items)
        }
    })
}

/// `FUZZ_MS` when set (`scripts/fuzz.sh`), else the suite's short run.
fn budget_ms(default: u64) -> u64 {
    std::env::var("FUZZ_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_guest_lists_never_panic_and_keep_only_known_guests() {
    arbtest::arbtest(|u| {
        let answer = value(u, 0)?;
        if let Ok(list) = serde_json::from_value::<Vec<PveResource>>(answer) {
            for resource in &list {
                // A guest the client does not understand is left out, never made up.
                if let Some(guest) = resource.cluster_guest() {
                    assert_eq!(guest.guest.vmid.get(), resource.vmid);
                    assert!(matches!(resource.kind.as_str(), "qemu" | "lxc"));
                }
            }
        }
        Ok(())
    })
    .budget_ms(budget_ms(1_000));
}

#[test]
fn random_text_never_panics_the_smbios_and_upid_readers() {
    arbtest::arbtest(|u| {
        let text: String = u.arbitrary()?;
        if let Some(uuid) = types::smbios_uuid(&text) {
            assert_eq!(uuid, uuid.to_lowercase());
        }
        let _ = types::upid_node(&text);
        let _ = types::upid_user(&text);
        let answer = value(u, 0)?;
        if let Ok(status) = serde_json::from_value::<types::PveVmStatus>(answer.clone()) {
            let _ = (
                status.is_running(),
                status.ha_managed(),
                status.guest_state(0),
            );
        }
        if let Ok(task) = serde_json::from_value::<types::PveTaskStatus>(answer.clone()) {
            // Success only once stopped with an OK or WARNINGS exit, never otherwise.
            if task.succeeded() {
                assert!(task.exitstatus.is_some());
            }
        }
        let _ = serde_json::from_value::<Vec<types::PveTaskEntry>>(answer.clone());
        let _ = serde_json::from_value::<types::PveVmConfig>(answer);
        Ok(())
    })
    .budget_ms(budget_ms(1_000));
}
