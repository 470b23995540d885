//! `txmq topic|group|tx|dlq`: operator commands, through the running server's admin API.

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cli::{DlqCommand, GroupCommand, TopicCommand, TxCommand};

fn base(server: &str) -> String {
    if server.starts_with("http://") || server.starts_with("https://") {
        server.trim_end_matches('/').to_string()
    } else {
        format!("http://{}", server.trim_end_matches('/'))
    }
}

/// Calls the admin API; a non-2xx answer becomes an error carrying the server's message.
fn call(server: &str, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let url = format!("{}{path}", base(server));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let response = match (method, body) {
        ("GET", _) => agent.get(&url).call(),
        (_, Some(b)) => agent.post(&url).send_json(b),
        (_, None) => agent.post(&url).send_empty(),
    };
    let mut response = response.with_context(|| {
        format!("cannot reach the txmq admin API at {url} (is `txmq serve` running?)")
    })?;
    let status = response.status();
    let value: Value = response
        .body_mut()
        .read_json()
        .with_context(|| format!("{url} answered {status} without JSON"))?;
    if !status.is_success() {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("request failed");
        bail!("{msg} ({status})");
    }
    Ok(value)
}

fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
    );
}

/// A JSON value as a table cell (strings without quotes).
fn cell(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `txmq topic ...`.
pub fn topic(cmd: &TopicCommand) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create {
            name,
            r#type,
            queues,
            server,
        } => {
            let mut body = json!({"name": name, "type": r#type});
            if let Some(q) = queues {
                body["queues"] = json!(q);
            }
            let t = call(server, "POST", "/topics", Some(body))?;
            println!(
                "topic {} ({}, {} queues)",
                t["name"].as_str().unwrap_or(name),
                cell(&t["type"]),
                t["queues"]
            );
        }
        TopicCommand::List { server, json } => {
            let v = call(server, "GET", "/topics", None)?;
            if *json {
                print_json(&v);
            } else {
                println!(
                    "{:<40} {:<12} {:>6} {:>12}",
                    "TOPIC", "TYPE", "QUEUES", "MESSAGES"
                );
                for t in rows(&v) {
                    println!(
                        "{:<40} {:<12} {:>6} {:>12}",
                        cell(&t["name"]),
                        cell(&t["type"]),
                        cell(&t["queues"]),
                        cell(&t["messages"])
                    );
                }
            }
        }
    }
    Ok(())
}

/// `txmq group ...`.
pub fn group(cmd: &GroupCommand) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::Create {
            name,
            max_attempts,
            fifo,
            backoff_ms,
            server,
        } => {
            let mut body = json!({"name": name, "fifo": fifo, "backoff_ms": backoff_ms});
            if let Some(n) = max_attempts {
                body["max_attempts"] = json!(n);
            }
            let g = call(server, "POST", "/groups", Some(body))?;
            println!(
                "group {} (max attempts {}, fifo {})",
                name, g["max_attempts"], g["fifo"]
            );
        }
        GroupCommand::List { server, json } => {
            let v = call(server, "GET", "/groups", None)?;
            if *json {
                print_json(&v);
            } else {
                println!(
                    "{:<40} {:>8} {:>5} {:>10} {:>10} {:>14}",
                    "GROUP", "ATTEMPTS", "FIFO", "LAG", "IN FLIGHT", "DEAD-LETTERED"
                );
                for g in rows(&v) {
                    println!(
                        "{:<40} {:>8} {:>5} {:>10} {:>10} {:>14}",
                        cell(&g["name"]),
                        cell(&g["max_attempts"]),
                        cell(&g["fifo"]),
                        cell(&g["lag"]),
                        cell(&g["in_flight"]),
                        cell(&g["dead_lettered"])
                    );
                }
            }
        }
    }
    Ok(())
}

/// `txmq tx ...`.
pub fn tx(cmd: &TxCommand) -> anyhow::Result<()> {
    match cmd {
        TxCommand::List {
            state,
            server,
            json,
        } => {
            let v = call(server, "GET", &format!("/transactions?state={state}"), None)?;
            if *json {
                print_json(&v);
            } else {
                println!(
                    "{:<34} {:<24} {:<28} {:<11} {:>6}",
                    "TRANSACTION", "TOPIC", "MESSAGE ID", "STATE", "CHECKS"
                );
                for t in rows(&v) {
                    println!(
                        "{:<34} {:<24} {:<28} {:<11} {:>6}",
                        cell(&t["id"]),
                        cell(&t["topic"]),
                        cell(&t["message_id"]),
                        cell(&t["state"]),
                        cell(&t["checks"])
                    );
                }
            }
        }
        TxCommand::Commit { id, server }
        | TxCommand::Rollback { id, server }
        | TxCommand::Recheck { id, server } => {
            let action = match cmd {
                TxCommand::Commit { .. } => "commit",
                TxCommand::Rollback { .. } => "rollback",
                _ => "recheck",
            };
            let v = call(
                server,
                "POST",
                &format!("/transactions/{id}/{action}"),
                None,
            )?;
            println!(
                "transaction {id}: {}",
                v["state"].as_str().unwrap_or(action)
            );
        }
    }
    Ok(())
}

/// `txmq dlq ...`.
pub fn dlq(cmd: &DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List {
            group,
            server,
            json,
        } => {
            let v = call(server, "GET", &format!("/dlq/{group}"), None)?;
            if *json {
                print_json(&v);
            } else {
                println!(
                    "{} dead-lettered message(s) of group {group}, {} not redriven",
                    v["count"], v["not_redriven"]
                );
                println!(
                    "{:<36} {:<30} {:>8} {:>8}",
                    "MESSAGE ID", "FROM TOPIC", "OFFSET", "ATTEMPTS"
                );
                for m in rows(&v["messages"]) {
                    println!(
                        "{:<36} {:<30} {:>8} {:>8}",
                        cell(&m["message_id"]),
                        cell(&m["topic"]),
                        cell(&m["offset"]),
                        cell(&m["attempts"])
                    );
                }
            }
        }
        DlqCommand::Redrive { group, max, server } => {
            let v = call(
                server,
                "POST",
                &format!("/dlq/{group}/redrive"),
                Some(json!({"max": max})),
            )?;
            println!("redrove {} message(s) of group {group}", v["redriven"]);
        }
    }
    Ok(())
}
