//! What Triton's sequence batcher gives a stateful model (`sequence_batching`), as the core
//! provides it: every request names its sequence (a non-zero correlation id), a sequence
//! begins with a request flagged START and is forgotten after END or after
//! `max_sequence_idle_microseconds` without a request, and each request reaches the model
//! with the control tensors `control_input` asks for (START, END, READY and CORRID), whose
//! values follow the request's flags. A sequence's requests run in arrival order on the
//! instance that took its START, one per execution, beside those of other sequences up to
//! `max_batch_size` (`scheduler.rs`; with the Direct strategy an instance holds at most
//! `max_batch_size` sequences, and the others wait until one ends or idles out); its
//! implicit state (`state`, `seq_state.rs`) is added when it runs.
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_proto::inference::{
    model_config::SchedulingChoice, model_sequence_batching::control::Kind, ModelConfig,
};
use kiln_sdk::DataType;

use crate::error::{CoreError, CoreResult};
use crate::request::{InferRequest, InputTensor};
use crate::seq_state::ImplicitStates;

/// The request flag that starts a sequence.
pub const FLAG_START: u32 = 1;
/// The request flag that ends a sequence.
pub const FLAG_END: u32 = 2;

/// One control tensor: its name, what it signals, and its type.
#[derive(Debug)]
struct Control {
    name: String,
    kind: Kind,
    dtype: DataType,
    /// The element for false and for true (START, END, READY).
    values: [Bytes; 2],
}

/// A model's sequences and the control tensors its requests get.
#[derive(Debug)]
pub struct Sequences {
    model: String,
    controls: Vec<Control>,
    idle: Duration,
    batched: bool,
    /// Live sequences and when each last had a request.
    live: Mutex<HashMap<u64, Instant>>,
    states: ImplicitStates,
}

impl Sequences {
    /// The sequence batcher `cfg` asks for, if any (initial state files are read from
    /// `model_dir`); an error for what Kiln does not do.
    pub(crate) fn from_config(
        cfg: &ModelConfig,
        model_dir: &Path,
    ) -> CoreResult<Option<Sequences>> {
        let Some(SchedulingChoice::SequenceBatching(sb)) = &cfg.scheduling_choice else {
            return Ok(None);
        };
        let bad = |msg: String| CoreError::invalid(format!("model '{}': {msg}", cfg.name));
        let states =
            ImplicitStates::from_config(&sb.state, cfg.max_batch_size > 0, model_dir, bad)?;
        let mut controls = Vec::new();
        for ci in &sb.control_input {
            for c in &ci.control {
                let kind = Kind::try_from(c.kind)
                    .map_err(|_| bad(format!("control input '{}' has an unknown kind", ci.name)))?;
                let (dtype, values) = if kind == Kind::ControlSequenceCorrid {
                    let dtype = crate::config::data_type(c.data_type).ok_or_else(|| {
                        bad(format!("control input '{}' needs a data_type", ci.name))
                    })?;
                    (dtype, [Bytes::new(), Bytes::new()])
                } else if let [f, t] = c.int32_false_true[..] {
                    let v = |x: i32| Bytes::copy_from_slice(&x.to_le_bytes());
                    (DataType::Int32, [v(f), v(t)])
                } else if let [f, t] = c.fp32_false_true[..] {
                    let v = |x: f32| Bytes::copy_from_slice(&x.to_le_bytes());
                    (DataType::Fp32, [v(f), v(t)])
                } else if let [f, t] = c.bool_false_true[..] {
                    let v = |x: bool| Bytes::copy_from_slice(&[u8::from(x)]);
                    (DataType::Bool, [v(f), v(t)])
                } else {
                    return Err(bad(format!(
                        "control input '{}' must give exactly two values in one of int32_false_true, fp32_false_true or bool_false_true",
                        ci.name
                    )));
                };
                controls.push(Control {
                    name: ci.name.clone(),
                    kind,
                    dtype,
                    values,
                });
            }
        }
        Ok(Some(Sequences {
            model: cfg.name.clone(),
            controls,
            idle: Duration::from_micros(sb.max_sequence_idle_microseconds),
            batched: cfg.max_batch_size > 0,
            live: Mutex::new(HashMap::new()),
            states,
        }))
    }

    /// `req` with the implicit state inputs of its sequence added, at the time it runs
    /// (none when the model keeps no state).
    pub(crate) fn with_state(&self, req: &Arc<InferRequest>) -> Option<Arc<InferRequest>> {
        if self.states.is_empty() {
            return None;
        }
        let mut with = InferRequest::clone(req);
        with.inputs.extend(
            self.states
                .inputs(req.correlation_id, req.flags & FLAG_START != 0),
        );
        Some(Arc::new(with))
    }

    /// Keeps the state outputs of `req`'s response for the next request of its sequence.
    pub(crate) fn keep_state(
        &self,
        req: &InferRequest,
        produced: &crate::request::Produced,
    ) -> CoreResult<()> {
        let end = req.flags & FLAG_END != 0;
        self.states
            .keep(&self.model, req.correlation_id, end, produced)
    }

    /// The state outputs every execution must produce, requested or not.
    pub(crate) fn state_outputs(&self) -> impl Iterator<Item = &str> {
        self.states.output_names()
    }

    /// Checks `req`'s place in its sequence (Triton's errors for a batch of more than one,
    /// a missing correlation id and a sequence that did not start) and adds its control
    /// tensors.
    pub(crate) fn admit(&self, req: &mut InferRequest, batch: u64) -> CoreResult<()> {
        if batch > 1 {
            return Err(CoreError::invalid(format!(
                "inference request to model '{}' must specify batch-size 1 due to requirements of sequence batcher",
                self.model
            )));
        }
        let id = req.correlation_id;
        if id == 0 {
            return Err(CoreError::invalid(format!(
                "inference request to model '{}' must specify a non-zero or non-empty correlation ID",
                self.model
            )));
        }
        let (start, end) = (req.flags & FLAG_START != 0, req.flags & FLAG_END != 0);
        {
            let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let idle: Vec<u64> = live
                .iter()
                .filter(|(_, last)| now.duration_since(**last) > self.idle)
                .map(|(id, _)| *id)
                .collect();
            for gone in &idle {
                live.remove(gone);
            }
            self.states.forget(&idle);
            if !start && !live.contains_key(&id) {
                return Err(CoreError::invalid(format!(
                    "inference request for sequence {} to model '{}' must specify the START flag on the first request of the sequence",
                    req.sequence_name(),
                    self.model
                )));
            }
            if end {
                live.remove(&id);
            } else {
                live.insert(id, now);
            }
        }
        // One row (the batch size was checked above).
        let shape = if self.batched { vec![1, 1] } else { vec![1] };
        for c in &self.controls {
            let one = match c.kind {
                Kind::ControlSequenceStart => c.values[usize::from(start)].clone(),
                Kind::ControlSequenceEnd => c.values[usize::from(end)].clone(),
                Kind::ControlSequenceReady => c.values[1].clone(),
                Kind::ControlSequenceCorrid => corrid(c.dtype, req)?,
            };
            req.inputs.push(InputTensor {
                name: c.name.clone(),
                dtype: c.dtype,
                shape: shape.clone(),
                data: one,
            });
        }
        Ok(())
    }
}

/// The correlation id as one element of `dtype` (a string id only as BYTES).
fn corrid(dtype: DataType, req: &InferRequest) -> CoreResult<Bytes> {
    let id = req.correlation_id;
    if let Some(text) = &req.correlation_text {
        if dtype != DataType::Bytes {
            return Err(CoreError::invalid(format!(
                "sequence ID '{text}' is a string, but the CORRID control is {}",
                dtype.protocol_name()
            )));
        }
        let mut b = (text.len() as u32).to_le_bytes().to_vec();
        b.extend_from_slice(text.as_bytes());
        return Ok(Bytes::from(b));
    }
    let too_big = || {
        CoreError::invalid(format!(
            "correlation ID {id} does not fit the CORRID control's {}",
            dtype.protocol_name()
        ))
    };
    Ok(match dtype {
        DataType::UInt64 => Bytes::copy_from_slice(&id.to_le_bytes()),
        DataType::Int64 => {
            Bytes::copy_from_slice(&i64::try_from(id).map_err(|_| too_big())?.to_le_bytes())
        }
        DataType::UInt32 => {
            Bytes::copy_from_slice(&u32::try_from(id).map_err(|_| too_big())?.to_le_bytes())
        }
        DataType::Int32 => {
            Bytes::copy_from_slice(&i32::try_from(id).map_err(|_| too_big())?.to_le_bytes())
        }
        DataType::Bytes => {
            let text = id.to_string();
            let mut b = (text.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(text.as_bytes());
            Bytes::from(b)
        }
        _ => {
            return Err(CoreError::invalid(format!(
                "the CORRID control cannot be of type {}",
                dtype.protocol_name()
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sequences(controls: &str) -> Sequences {
        let text = format!(
            "name: \"s\" backend: \"x\" max_batch_size: 0\n\
             sequence_batching {{ max_sequence_idle_microseconds: 60000000 control_input [ {controls} ] }}"
        );
        let cfg = crate::config::parse_pbtxt(std::path::Path::new("s/config.pbtxt"), &text)
            .expect("config parses");
        Sequences::from_config(&cfg, Path::new("."))
            .expect("supported")
            .expect("a sequence model")
    }

    fn request(id: u64, flags: u32) -> InferRequest {
        let mut r = InferRequest::new("s");
        r.correlation_id = id;
        r.flags = flags;
        r
    }

    #[test]
    fn unbatched_controls_are_single_elements_and_corrid_may_be_text() {
        let s = sequences(
            "{ name: \"S\" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 5, 9 ] } ] },\
             { name: \"C\" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_STRING } ] }",
        );
        let mut first = request(1234, FLAG_START);
        s.admit(&mut first, 1).expect("a start is admitted");
        let [start, corrid] = &first.inputs[..] else {
            panic!("two control tensors, got {:?}", first.inputs)
        };
        assert_eq!((start.name.as_str(), &start.shape[..]), ("S", &[1][..]));
        assert_eq!(start.data.as_ref(), 9i32.to_le_bytes());
        assert_eq!(corrid.dtype, DataType::Bytes);
        assert_eq!(corrid.data.as_ref(), b"\x04\x00\x00\x001234");
        let mut next = request(1234, 0);
        s.admit(&mut next, 1).expect("the sequence goes on");
        assert_eq!(next.inputs[0].data.as_ref(), 5i32.to_le_bytes());
    }

    #[test]
    fn a_corrid_that_does_not_fit_its_type_is_refused() {
        let s = sequences(
            "{ name: \"C\" control [ { kind: CONTROL_SEQUENCE_CORRID data_type: TYPE_INT32 } ] }",
        );
        let e = s.admit(&mut request(1 << 40, FLAG_START), 1).unwrap_err();
        assert!(e.message.contains("does not fit"), "{}", e.message);
        s.admit(&mut request(77, FLAG_START), 1)
            .expect("a small id fits");
    }

    #[test]
    fn controls_need_two_values() {
        let text = "name: \"s\" backend: \"x\" sequence_batching { control_input [ \
                    { name: \"S\" control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 1 ] } ] } ] }";
        let cfg = crate::config::parse_pbtxt(std::path::Path::new("s/config.pbtxt"), text)
            .expect("config parses");
        let e = Sequences::from_config(&cfg, Path::new(".")).unwrap_err();
        assert!(e.message.contains("exactly two values"), "{}", e.message);
    }
}
