//! The OpenAPI 3 document served at `/openapi.json`.

use serde_json::{json, Value};

fn op(summary: &str, status: &str) -> Value {
    json!({"summary": summary, "security": [{"token": []}],
           "responses": {status: {"description": "success"}, "400": {"description": "bad request"},
                         "401": {"description": "no or unknown token"}, "403": {"description": "not allowed"},
                         "404": {"description": "not found"},
                         "409": {"description": "conflicts with what exists (a name in use)"},
                         "413": {"description": "body larger than 64 KiB"},
                         "415": {"description": "body not application/json"},
                         "422": {"description": "body of the wrong shape"},
                         "429": {"description": "too many failed logins from this address"}}})
}

/// Names and ids: one format everywhere (`vim_proto::check_id`).
fn name() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,63}$", "minLength": 1, "maxLength": 63})
}

/// A file on vimd's machine: an absolute path (it must also exist and be a regular file).
fn path() -> Value {
    json!({"type": "string", "pattern": "^/", "minLength": 1})
}

/// An absolute path, or empty for none.
fn optional_path() -> Value {
    json!({"type": "string", "pattern": "^(/.*)?$"})
}

fn with_body(mut o: Value, schema: Value) -> Value {
    o["requestBody"] =
        json!({"required": true, "content": {"application/json": {"schema": schema}}});
    o
}

/// An operation with a `limit` query parameter.
fn with_limit(mut o: Value, default: u32, max: u32) -> Value {
    o["parameters"] = json!([{"name": "limit", "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": max, "default": default}}]);
    o
}

pub fn document() -> Value {
    let id = json!([{"name": "id", "in": "path", "required": true, "schema": name()}]);
    let with_id = |mut o: Value| {
        o["parameters"] = id.clone();
        o
    };
    let with_name = |mut o: Value| {
        o["parameters"] =
            json!([{"name": "name", "in": "path", "required": true, "schema": name()}]);
        o
    };
    let mut list_vms = op(
        "List VMs, oldest first, a page at a time (a consumer sees its own)",
        "200",
    );
    list_vms["parameters"] = json!([
        {"name": "limit", "in": "query",
         "schema": {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}},
        {"name": "after", "in": "query", "description": "the last VM id of the page before",
         "schema": name()}]);
    let mut console = op(
        "The end of the guest's serial log (at most `bytes`, default 1 MiB, at most 16 MiB)",
        "200",
    );
    console["parameters"] = json!([id[0].clone(),
        {"name": "bytes", "in": "query",
         "schema": {"type": "integer", "minimum": 1, "maximum": 16_777_216, "default": 1_048_576}}]);
    let mut events = with_limit(
        op(
            "List events: from `since` (ms since the epoch) on, or the newest `limit` (admin)",
            "200",
        ),
        1000,
        100_000,
    );
    if let Some(p) = events["parameters"].as_array_mut() {
        p.push(json!({"name": "since", "in": "query",
            "schema": {"type": "integer", "format": "int64", "minimum": 0, "maximum": i64::MAX}}));
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": "vimd", "version": env!("CARGO_PKG_VERSION"),
                 "description": "The Virtual Infrastructure Manager's API. Long operations answer 202 with a job id."},
        "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/hosts": {
                "get": op("List hosts", "200"),
                "post": with_body(op("Register a host and mint its NATS credentials; with `join`, also a \
                    single-use join token for the one command the new host runs (admin; docs/packages.md)", "200"),
                    json!({"type": "object", "required": ["id"], "additionalProperties": false,
                           "properties": {"id": name(),
                                          "join": {"type": "boolean", "default": false},
                                          "join_ttl_s": {"type": "integer", "minimum": 1, "maximum": 604_800, "nullable": true,
                                                         "description": "how long the join token works (default 3600; used with join only)"},
                                          "shared_dir": {"type": "string", "pattern": "^/[A-Za-z0-9._/-]{0,1023}$", "nullable": true,
                                                         "description": "the shared storage's path on the new host (default vimd's; used with join only)"}}})),
            },
            "/hosts/{id}": {"delete": with_id(op("Remove a host and revoke its NATS credentials; 409 while VMs are placed on it (admin)", "200"))},
            "/join/{token}": {"get": {"summary": "The join script for a join token, once (no API token: the join token is the proof); \
                a refusal is a script that says why and fails",
                "parameters": [{"name": "token", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "a shell script"}, "404": {"description": "no such join token"},
                              "410": {"description": "the join token was used or has expired"}}}},
            "/packages/{name}": {"get": {"summary": "A package joining hosts install (public)",
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "a Debian package"}, "404": {"description": "no such package"}}}},
            "/hosts/{id}/credentials": {"post": with_id(op("Issue a host new NATS credentials; the old stop working (admin)", "200"))},
            "/hosts/{id}/drain": {"post": with_id(op("Take no new VMs on the host and migrate its running VMs away; answers their job ids (admin)", "202"))},
            "/hosts/{id}/undrain": {"post": with_id(op("The host takes new VMs again (admin)", "200"))},
            "/images": {"post": with_body(op("Add an image; its files are copied to shared storage (admin)", "200"),
                json!({"type": "object", "required": ["name", "kernel"], "additionalProperties": false,
                       "properties": {"name": name(), "kernel": path(),
                                      "initrd": optional_path(), "cmdline": {"type": "string"},
                                      "disk": optional_path()}}))},
            "/tokens": {"post": with_body(op("Create an API token (admin)", "200"),
                json!({"type": "object", "required": ["name", "role"], "additionalProperties": false,
                       "properties": {"name": name(), "role": {"enum": ["admin", "consumer"]}}}))},
            "/vms": {
                "get": list_vms,
                "post": with_body(op("Create a VM", "202"),
                    json!({"type": "object", "required": ["name", "image", "vcpus", "memory_mib"],
                           "additionalProperties": false,
                           "properties": {"name": name(), "image": name(),
                                          "vcpus": {"type": "integer", "minimum": 1, "maximum": 254},
                                          "memory_mib": {"type": "integer", "minimum": 16, "maximum": 4194304},
                                          "net": {"type": "boolean", "default": true,
                                                  "description": "a NIC on its host's bridge, MAC fixed for life"},
                                          "ha": ha_policy(),
                                          "ha_priority": ha_priority(),
                                          "checkpoint_s": checkpoint_s(),
                                          "max_vcpus": {"type": "integer", "minimum": 1, "maximum": 254, "nullable": true,
                                                        "description": "the most vCPUs it can be resized to while it runs \
                                                                        (null or absent: the owner's scaling policy's ceiling, else 4 x vcpus; at most 254; at least vcpus)"},
                                          "max_memory_mib": {"type": "integer", "minimum": 16, "maximum": 1_048_576, "nullable": true,
                                                             "description": "the most memory it can be resized to while it runs, MiB \
                                                                             (null or absent: the owner's scaling policy's ceiling, else 4 x memory_mib; \
                                                                             at least memory_mib, and memory_mib plus whole 2 MiB blocks)"},
                                          "group": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,63}$", "nullable": true,
                                                    "description": "anti-affinity group: the caller's VMs of one group are kept on different hosts"},
                                          "sla_target": {"type": "number", "minimum": 50, "maximum": 100, "nullable": true,
                                                         "description": "availability target, percent (default 99.95; docs/sla.md)"}}})),
            },
            "/vms/{id}": {"get": with_id(op("Show a VM", "200")), "delete": with_id(op("Delete a VM", "202"))},
            "/vms/{id}/start": {"post": with_id(op("Start a VM", "202"))},
            "/vms/{id}/stop": {"post": with_id(op("Stop a VM (ACPI power button, forced after a timeout)", "202"))},
            "/vms/{id}/migrate": {"post": with_body(with_id(op(
                "Live-migrate a running VM to another host (admin; a consumer its own VMs when vimd allows it). \
                 The VM is `migrating` meanwhile; its host changes when the guest runs on the target.", "202")),
                json!({"type": "object", "additionalProperties": false,
                       "properties": {"to": name(),
                                      "downtime_ms": {"type": "integer", "minimum": 1, "maximum": 60_000}}}))},
            "/vms/{id}/suspend": {"post": with_id(op(
                "Suspend a running VM to shared storage (docs/suspend.md): its host's capacity is freed and it \
                 is `suspended`, on no host. 409 while it is not running or has a job under way.", "202"))},
            "/vms/{id}/resume": {"post": with_body(with_id(op(
                "Resume a suspended VM on any host with room, or `to` (docs/suspend.md); it waits \
                 `pending_resume` while none has room. The guest goes on where it was.", "202")),
                json!({"type": "object", "additionalProperties": false,
                       "properties": {"to": name()}}))},
            "/vms/{id}/auto-suspend": {"put": with_body(with_id(op(
                "Suspend the VM once its CPU use per vCPU stays at or below idle_pct for idle_s seconds \
                 (0: never, whatever its consumer's policy; inherit: follow its consumer's policy; \
                 docs/suspend.md). `vm start` resumes it.", "200")),
                auto_suspend(true))},
            "/consumers/{name}/auto-suspend": {"put": with_body(with_name(op(
                "Set a consumer's auto-suspend policy, for its VMs without one of their own \
                 (idle_s 0: none; admin; docs/suspend.md)", "200")),
                auto_suspend(false))},
            "/vms/{id}/resize": {"post": with_body(with_id(op(
                "Change a running VM's vCPUs (1 to its max_vcpus) and memory (up to its max_memory_mib, \
                 not below what it booted with) by hotplug (docs/hotplug.md); growing needs room on \
                 its host. Its host's answer, VM_Resized, says what the guest took.", "202")),
                json!({"type": "object", "minProperties": 1, "additionalProperties": false,
                       "properties": {"vcpus": {"type": "integer", "minimum": 1, "maximum": 254},
                                      "memory_mib": {"type": "integer", "minimum": 16, "maximum": 1_048_576}}}))},
            "/vms/{id}/scaling": {"put": with_body(with_id(op(
                "Set a VM's automatic scaling policy (its owner or an admin; it wins over its owner's; docs/scaling.md)", "200")),
                scaling_policy())},
            "/consumers/{name}/scaling": {"put": with_body(with_name(op(
                "Set a consumer's automatic scaling policy, for all its VMs (admin; docs/scaling.md)", "200")),
                scaling_policy())},
            "/scaling-policies": {"get": op("List scaling policies (a consumer sees its own and its VMs')", "200")},
            "/vms/{id}/ha": {"put": with_body(with_id(op(
                "Set a VM's HA policy: what failover does when its host fails (docs/failover.md)", "200")),
                json!({"type": "object", "required": ["ha"], "additionalProperties": false,
                       "properties": {"ha": ha_policy(), "priority": ha_priority(),
                                      "checkpoint_s": checkpoint_s()}}))},
            "/vms/{id}/console": {"get": console},
            "/cluster/balance": {
                "get": op("The balancer's settings, the imbalance now and each host's load (admin; docs/balance.md)", "200"),
                "put": with_body(op("Change the balancer's settings; what is absent stays (admin)", "200"),
                    balance_settings()),
            },
            "/cluster/balance/plan": {"get": op("Dry run: the moves the balancer would make now, with the imbalance and loads before and after; changes nothing (admin)", "200")},
            "/cluster/status": {"get": op("This vimd: whether it is the leader (the one that monitors hosts and fails them over; docs/ha.md) and its pid (admin)", "200")},
            "/metrics": {"get": op("Prometheus metrics, text exposition format (admin): hosts and VMs by state, jobs by kind and outcome with latency histograms, queue lag, heartbeat age, migration downtime and failover RTO histograms, each VM's CPU and memory", "200")},
            "/prices": {"get": op("Pricing plans' price histories and which consumer pays by which \
                (a consumer: its own plan's; docs/billing.md)", "200")},
            "/prices/{plan}": {"put": with_body(with_plan(op(
                "Set a plan's prices per vCPU-hour and per GiB-hour, from `since` (default now) on; a plan keeps \
                 the currency it was first priced in (409 otherwise; admin; docs/billing.md)", "200")),
                json!({"type": "object", "required": ["vcpu_hour", "gib_hour"], "additionalProperties": false,
                       "properties": {"vcpu_hour": amount(), "gib_hour": amount(),
                                      "currency": {"type": "string", "pattern": "^[A-Z]{3}$", "default": "EUR", "nullable": true},
                                      "since": {"type": "string", "format": "date-time", "nullable": true,
                                                "description": "from when (null or absent: now)"}}}))},
            "/consumers/{name}/plan": {"put": with_body(with_name(op(
                "Make a consumer pay by a plan that has prices (400 otherwise; admin; docs/billing.md)", "200")),
                json!({"type": "object", "required": ["plan"], "additionalProperties": false,
                       "properties": {"plan": plan()}}))},
            "/bill": {"get": with_period(op(
                "The fee for `from` to `to` (RFC 3339; to: now) per consumer and per VM, with the periods at each \
                 size and price; exact decimals as strings (a consumer: its own; docs/billing.md)", "200"),
                &[("consumer", name())])},
            "/sla/report": {"get": with_period(op(
                "Availability from the event log over `from` to `to` (RFC 3339; to: now): uptime, outages, MTTR \
                 and whether the target was met, per VM and together, for one VM, a consumer or all \
                 (a consumer: its own; docs/sla.md)", "200"),
                &[("vm", name()), ("consumer", name()),
                  ("target", json!({"type": "number", "minimum": 0, "maximum": 100}))])},
            "/webhooks": {
                "get": op("List webhooks (a consumer sees its own)", "200"),
                "post": with_body(op("Add a webhook: events of the kinds listed are POSTed to url, signed \
                    (X-Vim-Signature); a consumer's hears only its own VMs'. The answer has the secret, once.", "200"),
                    json!({"type": "object", "required": ["url", "events"], "additionalProperties": false,
                           "properties": {"url": {"type": "string", "pattern": "^https?://", "maxLength": 2048},
                                          "events": {"type": "array", "minItems": 1, "maxItems": 64,
                                                     "items": {"enum": event_kinds()}}}})),
            },
            "/webhooks/{id}": {"delete": with_id(op("Delete a webhook", "200"))},
            "/jobs": {"get": with_limit(op("List jobs, newest first (a consumer sees its own)", "200"), 100, 10_000)},
            "/jobs/{id}": {"get": with_id(op("Show a job", "200"))},
            "/events": {"get": events},
            "/events/stream": {"get": op("Server-sent events: jobs, hosts, VMs (admin)", "200")},
            "/audit": {"get": with_limit(op("The audit log, newest first (admin)", "200"), 1000, 100_000)},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}},
        }
    })
}

/// A path's pricing plan.
fn with_plan(mut o: Value) -> Value {
    o["parameters"] = json!([{"name": "plan", "in": "path", "required": true, "schema": plan()}]);
    o
}

fn plan() -> Value {
    json!({"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"})
}

/// An amount of money per hour: plain decimal text, 0 to 1,000,000, at most 10 decimals.
fn amount() -> Value {
    json!({"type": "string", "pattern": "^([0-9]{1,6}(\\.[0-9]{1,10})?|1000000(\\.0{1,10})?)$",
           "example": "0.0125"})
}

/// A report's period (`from` required, `to` optional) and `more` query parameters.
fn with_period(mut o: Value, more: &[(&str, Value)]) -> Value {
    let time = json!({"type": "string", "format": "date-time"});
    let mut p = vec![
        json!({"name": "from", "in": "query", "required": true, "schema": time}),
        json!({"name": "to", "in": "query", "schema": time}),
    ];
    for (n, schema) in more {
        p.push(json!({"name": n, "in": "query", "schema": schema}));
    }
    o["parameters"] = json!(p);
    o
}

/// A scaling policy as requests carry it: every field optional.
fn scaling_policy() -> Value {
    // null, like absent, means the default.
    let int = |lo: i64, hi: i64, d: &str| json!({"type": "integer", "minimum": lo, "maximum": hi, "nullable": true, "description": d});
    json!({"type": "object", "additionalProperties": false, "properties": {
        "enabled": {"type": "boolean", "default": true, "nullable": true},
        "up_pct": int(1, 100, "grow when CPU use stays at or above this (default 80)"),
        "up_window_s": int(1, 3600, "for this long (default 60)"),
        "down_pct": int(0, 99, "shrink when CPU use stays at or below this, below up_pct (default 15)"),
        "down_window_s": int(1, 3600, "for this long (default 60)"),
        "min_vcpus": int(1, 254, "the floor (default 1)"),
        "min_memory_mib": int(16, 4_194_304, "the floor (default 4096)"),
        "max_vcpus": int(1, 254, "the ceiling (default 128)"),
        "max_memory_mib": int(16, 4_194_304, "the ceiling (default 524288)"),
        "cooldown_s": int(0, 86_400, "after a change, before the next (default 120)")}})
}

/// Every event kind's name.
fn event_kinds() -> Vec<&'static str> {
    (1..256)
        .filter_map(|i| vim_proto::EventKind::try_from(i).ok())
        .map(|k| k.as_str())
        .collect()
}

/// A change to the balancer's settings: a field absent or null stays as it was.
fn balance_settings() -> Value {
    json!({"type": "object", "additionalProperties": false, "properties": {
        "on": {"type": "boolean", "nullable": true},
        "threshold": {"type": "number", "minimum": 0, "maximum": 10, "nullable": true},
        "interval_s": {"type": "integer", "minimum": 1, "maximum": 86_400, "nullable": true},
        "rounds": {"type": "integer", "minimum": 1, "maximum": 100, "nullable": true},
        "min_gain": {"type": "number", "minimum": 0, "maximum": 1, "nullable": true},
        "settle_s": {"type": "integer", "minimum": 0, "maximum": 86_400, "nullable": true}}})
}

/// An auto-suspend setting; a VM's may `inherit` its consumer's.
fn auto_suspend(vm: bool) -> Value {
    let mut o = json!({"type": "object", "additionalProperties": false,
        "properties": {"idle_pct": {"type": "integer", "minimum": 0, "maximum": 100, "default": 0},
                       "idle_s": {"type": "integer", "minimum": 0, "maximum": 2_592_000, "default": 0}}});
    if vm {
        o["properties"]["inherit"] = json!({"type": "boolean", "default": false});
    }
    o
}

/// A VM's HA policy, as requests carry it.
fn ha_policy() -> Value {
    json!({"enum": ["restart", "resume", "standby", "off"], "default": "restart",
           "description": "when its host fails: boot it again on another host, resume it there \
                           from its newest checkpoint (docs/checkpoint.md), promote its standby \
                           on another host (docs/standby.md), or leave it"})
}

fn checkpoint_s() -> Value {
    json!({"type": "integer", "minimum": 1, "maximum": 3600,
           "description": "with ha resume: seconds between checkpoints (default 5 at create; unchanged when absent)"})
}

fn ha_priority() -> Value {
    json!({"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0,
           "description": "among a failed host's VMs, the higher restart first"})
}
