//! Devices: what TensorFlow sees, and where the graph goes.

use anyhow::{bail, Context, Result};
use tensorflow::{Graph, Session, SessionOptions};

use crate::tfx::SessionConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// TensorFlow's own placement (a GPU when one is visible), with soft placement.
    Auto,
    /// Everything on the CPU.
    Cpu,
    /// Everything on the first GPU; ops without a GPU kernel fall back to the CPU.
    Gpu,
}

/// A device TensorFlow sees.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: String,
    pub memory_bytes: i64,
}

pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    let graph = Graph::new();
    let session = Session::new(&SessionOptions::new(), &graph).context("starting TensorFlow")?;
    Ok(session
        .device_list()?
        .into_iter()
        .map(|d| DeviceInfo { name: d.name, kind: d.device_type, memory_bytes: d.memory_bytes })
        .collect())
}

pub fn gpu_count(devices: &[DeviceInfo]) -> usize {
    devices.iter().filter(|d| d.kind == "GPU").count()
}

/// The device string for graph building and the session settings for a choice.
pub fn placement(choice: DeviceChoice) -> Result<(Option<String>, SessionConfig)> {
    let config = SessionConfig { allow_soft_placement: true, ..SessionConfig::default() };
    Ok(match choice {
        DeviceChoice::Auto => (None, config),
        DeviceChoice::Cpu => (Some("/device:CPU:0".into()), config),
        DeviceChoice::Gpu => {
            if gpu_count(&list_devices()?) == 0 {
                bail!("--device gpu: TensorFlow sees no GPU (a GPU needs the tensorflow[and-cuda] wheel, see the README)");
            }
            (Some("/device:GPU:0".into()), config)
        }
    })
}
