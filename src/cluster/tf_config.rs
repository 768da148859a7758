//! TF_CONFIG, the environment variable by which tf.distribute and cluster managers (Kubernetes'
//! TFJob, Vertex AI, SageMaker) tell each process of a job the whole cluster and its own task:
//!
//! ```text
//! TF_CONFIG='{"cluster": {"chief": ["h0:2222"], "worker": ["h1:2222", "h2:2222"]},
//!             "task": {"type": "worker", "index": 0}}'
//! ```
//!
//! minigpt runs two kinds of task: the chief (`minigpt train`, which holds the variables and
//! runs the loop) and workers (`minigpt server`, or `minigpt train` on a worker task, so that
//! every task can run the same command). A cluster without a chief makes worker 0 the chief, as
//! tf.distribute does (which also computes on it: here the chief holds the variables and runs
//! the loop, and the other workers compute).

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

use super::parse_address;

/// What TF_CONFIG makes of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The chief: its own address (as the cluster reaches it) and its workers' addresses in
    /// task order.
    Chief { address: String, workers: Vec<String> },
    /// A worker: its task in TF_CONFIG (`worker`, `index`) and its address.
    Worker { index: usize, address: String },
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    cluster: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    task: Option<Task>,
    #[serde(default)]
    rpc_layer: Option<String>,
}

#[derive(Deserialize)]
struct Task {
    #[serde(rename = "type")]
    kind: String,
    index: usize,
}

/// This process's role from the environment's TF_CONFIG, if it is set (and not empty).
pub fn from_env() -> Result<Option<Role>> {
    match std::env::var("TF_CONFIG") {
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => bail!("TF_CONFIG is not UTF-8"),
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => parse(&text),
    }
}

/// The role a TF_CONFIG text gives this process; none for an empty cluster (`{}`), which
/// tf.distribute also takes as not distributed.
pub fn parse(text: &str) -> Result<Option<Role>> {
    let raw: Raw = serde_json::from_str(text).map_err(|e| {
        anyhow::anyhow!(
            "TF_CONFIG is not the JSON expected ({e}): {{\"cluster\": {{\"chief\": [\"HOST:PORT\"], \"worker\": \
             [\"HOST:PORT\", ...]}}, \"task\": {{\"type\": \"worker\", \"index\": 0}}}}"
        )
    })?;
    if let Some(layer) = raw.rpc_layer.as_deref() {
        ensure!(layer == "grpc", "TF_CONFIG's rpc_layer is {layer:?}: minigpt speaks TensorFlow's \"grpc\" only");
    }
    if raw.cluster.values().all(Vec::is_empty) {
        return Ok(None);
    }
    for (job, tasks) in &raw.cluster {
        match job.as_str() {
            "chief" | "worker" => {}
            "ps" => bail!(
                "TF_CONFIG has a \"ps\" job: minigpt runs no parameter servers (the chief holds the variables); \
                 remove it"
            ),
            "evaluator" => bail!(
                "TF_CONFIG has an \"evaluator\" job: minigpt runs no evaluator task (`minigpt eval` evaluates a run); \
                 remove it"
            ),
            other => bail!("TF_CONFIG has a job {other:?}: minigpt runs only \"chief\" and \"worker\" tasks"),
        }
        for address in tasks {
            parse_address(address).with_context(|| format!("TF_CONFIG's {job} list"))?;
        }
    }
    let chiefs = raw.cluster.get("chief").cloned().unwrap_or_default();
    let workers = raw.cluster.get("worker").cloned().unwrap_or_default();
    ensure!(chiefs.len() <= 1, "TF_CONFIG lists {} chiefs: a cluster has one", chiefs.len());
    ensure!(!chiefs.is_empty() || !workers.is_empty(), "TF_CONFIG's cluster lists no chief and no worker");
    let Task { kind, index } =
        raw.task.context("TF_CONFIG has a cluster but no \"task\" saying which one this process is")?;
    let tasks = match kind.as_str() {
        "chief" => &chiefs,
        "worker" => &workers,
        other => bail!("TF_CONFIG's task type is {other:?}: minigpt runs \"chief\" and \"worker\" tasks"),
    };
    ensure!(
        index < tasks.len(),
        "TF_CONFIG's task is {kind} {index}, but its cluster lists {} {kind} task{}",
        tasks.len(),
        if tasks.len() == 1 { "" } else { "s" }
    );
    let address = parse_address(&tasks[index])?;
    Ok(Some(match (chiefs.first(), kind.as_str(), index) {
        (Some(_), "chief", _) => Role::Chief { address, workers },
        // No chief: worker 0 is the chief.
        (None, _, 0) => Role::Chief { address, workers: workers[1..].to_vec() },
        _ => Role::Worker { index, address },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles() {
        let cluster = r#""cluster": {"chief": ["h0:2222"], "worker": ["h1:2222", "h2:2222"]}"#;
        let of = |task: &str| parse(&format!("{{{cluster}, \"task\": {task}}}")).map(Option::unwrap);
        let workers = vec!["h1:2222".to_string(), "h2:2222".to_string()];
        let chief = Role::Chief { address: "h0:2222".into(), workers: workers.clone() };
        assert_eq!(of(r#"{"type": "chief", "index": 0}"#).unwrap(), chief);
        assert_eq!(
            of(r#"{"type": "worker", "index": 1}"#).unwrap(),
            Role::Worker { index: 1, address: "h2:2222".into() }
        );
        let no_chief = r#"{"cluster": {"worker": ["h1:1", "h2:2"]}, "task": {"type": "worker", "index": 0}}"#;
        assert_eq!(
            parse(no_chief).unwrap().unwrap(),
            Role::Chief { address: "h1:1".into(), workers: vec!["h2:2".into()] }
        );
        assert_eq!(parse("{}").unwrap(), None);
        assert_eq!(parse(r#"{"cluster": {}, "task": {"type": "worker", "index": 0}}"#).unwrap(), None);
        for (task, needle) in [
            (r#"{"type": "worker", "index": 2}"#, "cluster lists 2 worker tasks"),
            (r#"{"type": "chief", "index": 1}"#, "cluster lists 1 chief task"),
            (r#"{"type": "ps", "index": 0}"#, "task type is \"ps\""),
            (r#"{"type": "worker"}"#, "missing field `index`"),
        ] {
            let e = of(task).unwrap_err().to_string();
            assert!(e.contains(needle), "{task}: {e}");
        }
        for (text, needle) in [
            ("{not json", "not the JSON expected"),
            (
                r#"{"cluster": {"ps": ["a:1"], "worker": ["b:1"]}, "task": {"type": "worker", "index": 0}}"#,
                "\"ps\" job",
            ),
            (r#"{"cluster": {"evaluator": ["a:1"]}, "task": {"type": "worker", "index": 0}}"#, "evaluator"),
            (r#"{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}"#, "port is missing"),
            (r#"{"cluster": {"chief": ["a:1", "b:1"]}, "task": {"type": "chief", "index": 0}}"#, "2 chiefs"),
            (r#"{"cluster": {"worker": ["a:1"]}}"#, "no \"task\""),
        ] {
            let e = format!("{:#}", parse(text).unwrap_err());
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
