//! vimctl's bill and SLA report, printed for people (tables) or spreadsheets (CSV); `--json`
//! prints vimd's answer as it is.

use serde_json::Value;

use super::utc_ms;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn n(v: &Value) -> f64 {
    v.as_f64().unwrap_or_default()
}

fn ms(v: &Value) -> String {
    utc_ms(v.as_i64().unwrap_or_default())
}

/// A query string with its values encoded (times carry `+` and `:`).
pub fn query(path: &str, params: &[(&str, Option<String>)]) -> String {
    let given: Vec<(&str, &str)> = params
        .iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (*k, v)))
        .collect();
    match reqwest::Url::parse_with_params("http://vimd/", &given) {
        Ok(u) => format!("{path}?{}", u.query().unwrap_or_default()),
        Err(_) => path.to_string(),
    }
}

/// The bill: per consumer its VMs' fees and total, and each VM's periods at each size.
pub fn print_bill(r: &Value) {
    println!("bill {} .. {}", ms(&r["from"]), ms(&r["to"]));
    for c in r["consumers"].as_array().into_iter().flatten() {
        println!(
            "\nconsumer {}  plan {}  total {} {}",
            s(&c["consumer"]),
            s(&c["plan"]),
            s(&c["total"]),
            s(&c["currency"])
        );
        for vm in c["vms"].as_array().into_iter().flatten() {
            println!(
                "  VM {}  {} s  {} {}",
                s(&vm["vm_id"]),
                s(&vm["seconds"]),
                s(&vm["fee"]),
                s(&c["currency"])
            );
            for p in vm["periods"].as_array().into_iter().flatten() {
                let price = match (p["vcpu_hour"].as_str(), p["gib_hour"].as_str()) {
                    (Some(v), Some(g)) => format!("{v}/vCPU-h + {g}/GiB-h"),
                    _ => "unpriced".into(),
                };
                println!(
                    "    {} .. {}  {} vCPUs {} MiB  {} s  {}  {}",
                    ms(&p["from"]),
                    ms(&p["to"]),
                    p["vcpus"],
                    p["memory_mib"],
                    s(&p["seconds"]),
                    price,
                    s(&p["fee"])
                );
            }
        }
    }
}

/// The bill as CSV: one row per period, with the VM's and the consumer's totals repeated so a
/// spreadsheet can sum or pivot either way.
pub fn print_bill_csv(r: &Value) {
    println!("consumer,plan,currency,vm_id,from,to,seconds,vcpus,memory_mib,vcpu_hour,gib_hour,period_fee,vm_fee,consumer_total");
    for c in r["consumers"].as_array().into_iter().flatten() {
        for vm in c["vms"].as_array().into_iter().flatten() {
            for p in vm["periods"].as_array().into_iter().flatten() {
                println!(
                    "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                    s(&c["consumer"]),
                    s(&c["plan"]),
                    s(&c["currency"]),
                    s(&vm["vm_id"]),
                    ms(&p["from"]),
                    ms(&p["to"]),
                    s(&p["seconds"]),
                    p["vcpus"],
                    p["memory_mib"],
                    s(&p["vcpu_hour"]),
                    s(&p["gib_hour"]),
                    s(&p["fee"]),
                    s(&vm["fee"]),
                    s(&c["total"])
                );
            }
        }
    }
}

/// The availability report: each VM, its outages, and the whole.
pub fn print_sla(r: &Value) {
    let target = r["target"].as_f64();
    println!("availability {} .. {}", ms(&r["from"]), ms(&r["to"]));
    for vm in r["vms"].as_array().into_iter().flatten() {
        println!(
            "\nVM {} ({}, {})  {:.4} % up  target {} %  {}",
            s(&vm["vm_id"]),
            s(&vm["name"]),
            s(&vm["owner"]),
            n(&vm["uptime_pct"]),
            vm["target"],
            if vm["met"].as_bool() == Some(true) {
                "met"
            } else {
                "MISSED"
            }
        );
        let outages = vm["outages"].as_array().map_or(&[][..], |v| v);
        println!(
            "  {} outage(s), {:.1} s down of {:.0} s, MTTR {:.1} s",
            outages.len(),
            n(&vm["down_s"]),
            n(&vm["expected_s"]),
            n(&vm["mttr_s"])
        );
        for o in outages {
            let len = (o["to"].as_i64().unwrap_or_default()
                - o["from"].as_i64().unwrap_or_default()) as f64
                / 1000.0;
            println!(
                "    {} .. {}  {:.1} s  {}{}",
                ms(&o["from"]),
                ms(&o["to"]),
                len,
                s(&o["cause"]),
                if o["ongoing"].as_bool() == Some(true) {
                    " (still down)"
                } else {
                    ""
                }
            );
        }
    }
    println!(
        "\nall: {:.4} % up, {} outage(s), {:.1} s down, MTTR {:.1} s{}",
        n(&r["uptime_pct"]),
        r["outages"],
        n(&r["down_s"]),
        n(&r["mttr_s"]),
        match target {
            Some(t) => format!(
                ", target {t} % {}",
                if r["met"].as_bool() == Some(true) {
                    "met"
                } else {
                    "MISSED"
                }
            ),
            None => String::new(),
        }
    );
}
