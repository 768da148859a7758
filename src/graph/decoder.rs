//! Cached decoding for many streams at once (`minigpt serve`): the model's keys and values of
//! each stream's window kept in a slot of the graph's cache variables between steps, so that a
//! step computes one position of each stream that continues (and a new stream's prompt once),
//! not a pass over every window.

use anyhow::{ensure, Context, Result};
use tensorflow::{ops, DataType, Operation, Output, Scope, Session, SessionRunArgs, Tensor};

use super::build::Setters;
use crate::device::SessionConfig;
use crate::model::{ModelConfig, Rows};
use crate::tfx;

/// A model's decoding step ([`crate::model::LanguageModel::decode_rows`]) in a session of its own,
/// with its weights set and its caches zero.
pub struct Decoder {
    session: Session,
    tokens: Operation,
    positions: Operation,
    slots: Operation,
    last: Operation,
    logits: Output,
    /// `decode/clear` [K] int32: the slots `clear` zeroes.
    clear: (Operation, Operation),
    /// How many streams keep caches at once.
    pub capacity: usize,
    /// The model's context: positions per slot.
    pub context: usize,
    vocab: usize,
}

/// One stream's part of a step: `tokens` at positions `from`.. of its window, in slot `slot`.
pub struct Part<'a> {
    pub slot: usize,
    pub from: usize,
    pub tokens: &'a [i32],
}

impl Decoder {
    /// The decoder of `model` with `weights` (its variables' values, in their order) and
    /// `capacity` slots; `None` for a model that keeps no caches.
    pub fn new(
        model: &ModelConfig,
        weights: &[Tensor<f32>],
        capacity: usize,
        session: SessionConfig,
    ) -> Result<Option<Self>> {
        ensure!(capacity > 0, "a decoder needs a slot at least");
        let root = Scope::new_root_scope();
        let device = session.graph_device()?;
        let mut placed = root.with_device(device.as_deref().unwrap_or(""));
        let scope = &mut placed;
        let lm = model.build(DataType::Float, 0, scope).context("building the model")?;
        let input = |name: &str, scope: &mut Scope| tfx::placeholder(name, DataType::Int32, &[-1], scope);
        let (tokens, positions, slots, last) = (
            input("decode/tokens", scope)?,
            input("decode/positions", scope)?,
            input("decode/slots", scope)?,
            input("decode/last", scope)?,
        );
        let rows = Rows {
            tokens: tokens.clone().into(),
            positions: positions.clone().into(),
            slots: slots.clone().into(),
            last: last.clone().into(),
        };
        let Some(decoded) = lm.decode_rows(&rows, capacity as u64, scope).context("building the decoding step")? else {
            return Ok(None);
        };
        // Zeroes the fed slots of every cache: a new stream's slot holds no other stream's numbers.
        let cleared = input("decode/clear", scope)?;
        let mut zeroes = Vec::with_capacity(decoded.caches.len());
        for cache in &decoded.caches {
            let shape = tfx::concat(
                &[
                    ops::shape(cleared.clone(), scope)?.into(),
                    tfx::shape_const(&cache.shape[1..].iter().map(|&d| d as i64).collect::<Vec<_>>(), scope)?,
                ],
                0,
                scope,
            )?;
            let zeros = ops::fill(shape, tfx::scalar(cache.dtype, 0.0, scope)?, scope)?; // [K, H, W, D]
            zeroes.push(ops::resource_scatter_update(cache.handle.clone(), cleared.clone(), zeros, scope)?);
        }
        let clear = (cleared, tfx::group("decode/clear_slots", &zeroes, scope)?);
        let setters = Setters::new(&lm.variables(), scope)?;
        // Not compiled: XLA would compile again for every new number of rows.
        let session = Session::new(&session.for_graph(false).session_options()?, &scope.graph())
            .context("creating the decoder's session")?;
        let mut args = SessionRunArgs::new();
        setters.feed(&mut args, weights)?;
        for cache in &decoded.caches {
            args.add_target(&cache.initializer);
        }
        session.run(&mut args).context("setting the decoder's weights")?;
        Ok(Some(Self {
            session,
            tokens,
            positions,
            slots,
            last,
            logits: decoded.logits,
            clear,
            capacity,
            context: model.block_size as usize,
            vocab: model.vocab_size as usize,
        }))
    }

    /// Zeroes `slots`' keys and values.
    pub fn clear(&self, slots: &[usize]) -> Result<()> {
        let slots: Vec<i32> = slots.iter().map(|&s| s as i32).collect();
        let slots = Tensor::new(&[slots.len() as u64]).with_values(&slots)?;
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.clear.0, 0, &slots);
        args.add_target(&self.clear.1);
        self.session.run(&mut args).context("clearing attention caches")
    }

    /// One step: each part's tokens written to its slot at its positions; the next-character
    /// logits [V] after each part's last token, in order.
    pub fn step(&self, parts: &[Part]) -> Result<Vec<Vec<f32>>> {
        let n: usize = parts.iter().map(|p| p.tokens.len()).sum();
        let (mut tokens, mut positions, mut slots, mut last) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(parts.len()));
        for part in parts {
            ensure!(!part.tokens.is_empty(), "a part of a decoding step has no tokens");
            ensure!(part.slot < self.capacity, "slot {} of {}", part.slot, self.capacity);
            ensure!(part.from + part.tokens.len() <= self.context, "a window longer than the model's context");
            for (i, &t) in part.tokens.iter().enumerate() {
                tokens.push(t);
                positions.push((part.from + i) as i32);
                slots.push(part.slot as i32);
            }
            last.push(tokens.len() as i32 - 1);
        }
        let vector = |v: &[i32]| Tensor::new(&[v.len() as u64]).with_values(v);
        let (tokens, positions, slots, last) = (vector(&tokens)?, vector(&positions)?, vector(&slots)?, vector(&last)?);
        let mut args = SessionRunArgs::new();
        args.add_feed(&self.tokens, 0, &tokens);
        args.add_feed(&self.positions, 0, &positions);
        args.add_feed(&self.slots, 0, &slots);
        args.add_feed(&self.last, 0, &last);
        let fetch = args.request_fetch(&self.logits.operation, self.logits.index);
        self.session.run(&mut args).context("decoding")?;
        let logits = args.fetch::<f32>(fetch)?;
        ensure!(logits.len() == parts.len() * self.vocab, "the decoder returned {} logits", logits.len());
        Ok(logits.chunks(self.vocab).map(<[f32]>::to_vec).collect())
    }
}
