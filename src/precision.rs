//! Keras' dtype policies (`float32`, `mixed_bfloat16`, `mixed_float16`): a model's choice, kept
//! with its configuration, which the session may override for a run directory it loads.

use serde::{Deserialize, Serialize};
use tensorflow::DataType;

/// Keras' dtype policies: what the variables are kept in and what the layers compute in.
/// Variables stay float32 in every policy (checkpoints and SavedModels are the same whichever
/// was used); under a mixed policy the layers compute in the low precision, LayerNorm's
/// statistics, the loss and the logits handed to sampling in float32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Float32,
    /// Computes in bfloat16 (float32's range, 8 bits of mantissa).
    MixedBfloat16,
    /// Computes in float16; training scales the loss (Keras' `LossScaleOptimizer`).
    MixedFloat16,
}

impl Precision {
    /// The dtype the layers compute in, for variables of `dtype` (a mixed policy's low precision
    /// applies to float32 variables; float64 ones, the gradient checks', stay float64).
    pub fn compute(self, dtype: DataType) -> DataType {
        match (self, dtype) {
            (Precision::MixedBfloat16, DataType::Float) => DataType::BFloat16,
            (Precision::MixedFloat16, DataType::Float) => DataType::Half,
            _ => dtype,
        }
    }

    /// Keras' name of the policy.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::MixedBfloat16 => "mixed_bfloat16",
            Precision::MixedFloat16 => "mixed_float16",
        }
    }

    /// Whether training scales the loss (float16's range is too narrow for small gradients).
    pub fn scales_loss(self) -> bool {
        self == Precision::MixedFloat16
    }

    /// How far (relative to the largest) two computations of the same logits by different op
    /// orders may differ under this policy: eight units in the last place of its low precision
    /// (float32's: 1e-4).
    pub fn logits_tolerance(self) -> f32 {
        match self {
            Precision::Float32 => 1e-4,
            Precision::MixedBfloat16 => 8.0 * 2f32.powi(-8),
            Precision::MixedFloat16 => 8.0 * 2f32.powi(-11),
        }
    }

    /// Bytes of one computed element (attention caches are kept in it).
    pub fn compute_bytes(self) -> u64 {
        match self {
            Precision::Float32 => 4,
            _ => 2,
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
