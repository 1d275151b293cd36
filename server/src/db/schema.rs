//! Diesel table definitions, identical for SQLite and PostgreSQL.

// `vms` also has `revision`, raised by every update (migration 000014): it is read as SQL
// (`store::revision`) so this table stays within diesel's 32-column build.
diesel::table! {
    vms (id) {
        id -> BigInt,
        hostname -> Text,
        os -> Text,
        machine_id -> Nullable<Text>,
        agent_version -> Nullable<Text>,
        reported_vmid -> Nullable<BigInt>,
        reported_node -> Nullable<Text>,
        proxmox_node -> Nullable<Text>,
        proxmox_vmid -> Nullable<BigInt>,
        proxmox_type -> Nullable<Text>,
        auto_reset -> Bool,
        status -> Text,
        status_since_ms -> BigInt,
        status_reason -> Text,
        first_seen_ms -> BigInt,
        last_seen_ms -> Nullable<BigInt>,
        observed_at_ms -> Nullable<BigInt>,
        cpu_percent -> Nullable<Double>,
        ram_used_bytes -> Nullable<BigInt>,
        ram_total_bytes -> Nullable<BigInt>,
        disk_used_bytes -> Nullable<BigInt>,
        disk_total_bytes -> Nullable<BigInt>,
        disk_max_percent -> Nullable<Double>,
        disks_json -> Nullable<Text>,
        uptime_seconds -> Nullable<BigInt>,
        proxmox_link_source -> Nullable<Text>,
        remediation_phase -> Text,
        phase_reason -> Nullable<Text>,
        incident_attempts -> BigInt,
        next_action_ms -> Nullable<BigInt>,
        last_reset_ms -> Nullable<BigInt>,
        link_verified -> Bool,
    }
}

diesel::table! {
    events (id) {
        id -> BigInt,
        at_ms -> BigInt,
        kind -> Text,
        vm_id -> Nullable<BigInt>,
        message -> Text,
    }
}

diesel::table! {
    metric_samples (id) {
        id -> BigInt,
        vm_id -> BigInt,
        observed_ms -> BigInt,
        received_ms -> BigInt,
        cpu_percent -> Double,
        ram_used_bytes -> BigInt,
        ram_total_bytes -> BigInt,
        disk_used_bytes -> BigInt,
        disk_total_bytes -> BigInt,
        disk_max_percent -> Nullable<Double>,
        uptime_seconds -> BigInt,
    }
}

diesel::table! {
    status_changes (id) {
        id -> BigInt,
        vm_id -> BigInt,
        from_status -> Text,
        to_status -> Text,
        at_ms -> BigInt,
        reason -> Text,
    }
}

diesel::table! {
    reset_attempts (id) {
        id -> BigInt,
        vm_id -> BigInt,
        action -> Text,
        trigger_source -> Text,
        requested_by -> Nullable<Text>,
        mode -> Text,
        proxmox_node -> Nullable<Text>,
        proxmox_vmid -> Nullable<BigInt>,
        upid -> Nullable<Text>,
        outcome -> Text,
        error -> Nullable<Text>,
        evidence_json -> Nullable<Text>,
        created_ms -> BigInt,
        sent_ms -> Nullable<BigInt>,
        finished_ms -> Nullable<BigInt>,
        notice -> Nullable<Text>,
    }
}

diesel::table! {
    vm_tags (vm_id, tag) {
        vm_id -> BigInt,
        tag -> Text,
        source -> Text,
    }
}

diesel::table! {
    notify_channels (id) {
        id -> BigInt,
        name -> Text,
        kind -> Text,
        target -> Text,
        secret -> Nullable<Text>,
        created_ms -> BigInt,
    }
}

diesel::table! {
    notify_rules (id) {
        id -> BigInt,
        channel_id -> BigInt,
        kinds -> Text,
        tag -> Nullable<Text>,
        repeat_ms -> Nullable<BigInt>,
        created_ms -> BigInt,
    }
}

diesel::table! {
    notifications (id) {
        id -> BigInt,
        channel_id -> BigInt,
        rule_id -> Nullable<BigInt>,
        kind -> Text,
        vm_id -> Nullable<BigInt>,
        message_json -> Text,
        state -> Text,
        attempts -> Integer,
        next_attempt_ms -> BigInt,
        last_error -> Nullable<Text>,
        created_ms -> BigInt,
        sent_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    maintenance_windows (id) {
        id -> BigInt,
        name -> Text,
        scope -> Text,
        scope_value -> Nullable<Text>,
        starts_ms -> Nullable<BigInt>,
        ends_ms -> Nullable<BigInt>,
        recurrence -> Nullable<Text>,
        duration_ms -> Nullable<BigInt>,
        created_by -> Text,
        created_ms -> BigInt,
    }
}

diesel::table! {
    notify_cursors (name) {
        name -> Text,
        last_id -> BigInt,
    }
}

diesel::table! {
    runtime_config (key) {
        key -> Text,
        value -> Text,
        updated_ms -> BigInt,
    }
}

diesel::table! {
    credentials (name) {
        name -> Text,
        token_hash -> Text,
        created_ms -> BigInt,
    }
}

diesel::table! {
    agent_credentials (id) {
        id -> BigInt,
        vm_id -> BigInt,
        token_hash -> Text,
        created_ms -> BigInt,
        confirmed_ms -> Nullable<BigInt>,
        revoked_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    enrolment_tokens (id) {
        id -> BigInt,
        token_hash -> Text,
        label -> Text,
        created_by -> Text,
        created_ms -> BigInt,
        expires_ms -> Nullable<BigInt>,
        max_uses -> Nullable<BigInt>,
        uses -> BigInt,
        guest_node -> Nullable<Text>,
        guest_vmid -> Nullable<BigInt>,
        guest_type -> Nullable<Text>,
        revoked_ms -> Nullable<BigInt>,
        last_used_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    users (id) {
        id -> BigInt,
        username -> Text,
        password_hash -> Text,
        role -> Text,
        created_ms -> BigInt,
        password_changed_ms -> BigInt,
    }
}

diesel::table! {
    sessions (id_hash) {
        id_hash -> Text,
        user_id -> Nullable<BigInt>,
        data -> Text,
        expires_ms -> BigInt,
    }
}

diesel::table! {
    api_tokens (id) {
        id -> BigInt,
        user_id -> BigInt,
        token_hash -> Text,
        label -> Text,
        role -> Text,
        created_ms -> BigInt,
        last_used_ms -> Nullable<BigInt>,
        revoked_ms -> Nullable<BigInt>,
    }
}

diesel::table! {
    audit_log (id) {
        id -> BigInt,
        at_ms -> BigInt,
        actor -> Text,
        action -> Text,
        target -> Nullable<Text>,
        source -> Nullable<Text>,
        outcome -> Text,
        detail -> Nullable<Text>,
    }
}

diesel::joinable!(api_tokens -> users (user_id));
diesel::joinable!(agent_credentials -> vms (vm_id));
diesel::joinable!(metric_samples -> vms (vm_id));
diesel::joinable!(status_changes -> vms (vm_id));
diesel::joinable!(reset_attempts -> vms (vm_id));
diesel::joinable!(vm_tags -> vms (vm_id));
diesel::joinable!(notify_rules -> notify_channels (channel_id));

diesel::allow_tables_to_appear_in_same_query!(
    vms,
    events,
    metric_samples,
    status_changes,
    reset_attempts,
    runtime_config,
    credentials,
    agent_credentials,
    enrolment_tokens,
    users,
    sessions,
    api_tokens,
    audit_log,
    vm_tags,
    notify_channels,
    notify_rules,
    notifications,
    maintenance_windows,
    notify_cursors,
);
