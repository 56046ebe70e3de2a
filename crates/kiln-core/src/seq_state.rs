//! Implicit state of a sequence model (`sequence_batching { state [...] }`), kept by the
//! core as Triton keeps it: each request of a sequence gets the state input that the
//! previous request's state output left, the first one (START) gets the initial state
//! (`initial_state` zeros or `<model>/initial_state/<data_file>`, or zeros with every
//! variable dimension 1), and the state is dropped when the sequence ends. The state output
//! reaches the client only when the config lists it as an output.
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use kiln_proto::inference::model_sequence_batching::{initial_state::StateData, State};
use kiln_sdk::DataType;

use crate::error::{CoreError, CoreResult};
use crate::request::InputTensor;

/// Triton's folder (inside the model's folder) of initial state files.
pub const DATA_FOLDER: &str = "initial_state";

/// One state: the input the model reads it from, the output it writes the next value to,
/// and the value a sequence starts with.
#[derive(Debug)]
struct Slot {
    input: String,
    output: String,
    dtype: DataType,
    start: Value,
}

/// A state value: shape and row-major bytes.
type Value = (Vec<i64>, Bytes);

/// The states a model declares and each live sequence's current values.
#[derive(Debug, Default)]
pub(crate) struct ImplicitStates {
    slots: Vec<Slot>,
    values: Mutex<HashMap<u64, Vec<Value>>>,
}

impl ImplicitStates {
    /// Reads the `state` entries of a sequence model's config (`batched` when its
    /// `max_batch_size` is above 0, which puts a batch dimension of 1 before the state's).
    pub(crate) fn from_config(
        states: &[State],
        batched: bool,
        model_dir: &Path,
        bad: impl Fn(String) -> CoreError,
    ) -> CoreResult<Self> {
        let mut slots: Vec<Slot> = Vec::new();
        for s in states {
            if s.input_name.is_empty() || s.output_name.is_empty() {
                return Err(bad(
                    "a sequence_batching state needs an input_name and an output_name".into(),
                ));
            }
            if slots
                .iter()
                .any(|o| o.input == s.input_name || o.output == s.output_name)
            {
                return Err(bad(format!(
                    "sequence_batching state '{}' / '{}' repeats another state's input or output name",
                    s.input_name, s.output_name
                )));
            }
            let dtype = crate::config::data_type(s.data_type).ok_or_else(|| {
                bad(format!(
                    "sequence_batching state '{}' needs a data_type",
                    s.input_name
                ))
            })?;
            let start = match &s.initial_state[..] {
                [] => {
                    let dims: Vec<i64> =
                        s.dims.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
                    let size = byte_size(dtype, &dims);
                    (dims, Bytes::from(vec![0u8; size]))
                }
                [init] => initial_value(s, init, dtype, model_dir, &bad)?,
                _ => {
                    return Err(bad(format!(
                        "sequence_batching state '{}' may have only one initial_state",
                        s.input_name
                    )))
                }
            };
            let mut shape = if batched { vec![1] } else { Vec::new() };
            shape.extend(start.0);
            slots.push(Slot {
                input: s.input_name.clone(),
                output: s.output_name.clone(),
                dtype,
                start: (shape, start.1),
            });
        }
        Ok(ImplicitStates {
            slots,
            values: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the model declares no state.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The state outputs the backend must always produce.
    pub(crate) fn output_names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.output.as_str())
    }

    /// The state inputs of sequence `id`'s next request: the start values when `start`,
    /// else what its last request left.
    pub(crate) fn inputs(&self, id: u64, start: bool) -> Vec<InputTensor> {
        let values = self.lock();
        let kept = values.get(&id).filter(|_| !start);
        self.slots
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                let (shape, data) = kept.map_or(&slot.start, |v| &v[i]).clone();
                InputTensor {
                    name: slot.input.clone(),
                    dtype: slot.dtype,
                    shape,
                    data,
                }
            })
            .collect()
    }

    /// Keeps the state outputs among `produced` as sequence `id`'s next input state, or
    /// drops the sequence's state when `end`.
    pub(crate) fn keep(
        &self,
        model: &str,
        id: u64,
        end: bool,
        produced: &crate::request::Produced,
    ) -> CoreResult<()> {
        if self.slots.is_empty() {
            return Ok(());
        }
        if end {
            self.lock().remove(&id);
            return Ok(());
        }
        let next = self
            .slots
            .iter()
            .map(|slot| {
                let (_, _, shape, data) = produced
                    .iter()
                    .find(|(name, ..)| *name == slot.output)
                    .ok_or_else(|| {
                    CoreError::internal(format!(
                        "model '{model}' did not produce its state output '{}'",
                        slot.output
                    ))
                })?;
                Ok((shape.clone(), Bytes::copy_from_slice(data)))
            })
            .collect::<CoreResult<Vec<_>>>()?;
        self.lock().insert(id, next);
        Ok(())
    }

    /// Drops the state of sequences that are no longer live.
    pub(crate) fn forget(&self, ids: &[u64]) {
        if ids.is_empty() || self.slots.is_empty() {
            return;
        }
        let mut values = self.lock();
        for id in ids {
            values.remove(id);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Vec<Value>>> {
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bytes of a tensor of `dims` (a BYTES element of zero length is its 4-byte prefix).
fn byte_size(dtype: DataType, dims: &[i64]) -> usize {
    let count: usize = dims.iter().map(|&d| d.max(0) as usize).product();
    count * dtype.element_size().unwrap_or(4)
}

/// The start value an `initial_state` gives: zeros, or the bytes of its data file.
fn initial_value(
    s: &State,
    init: &kiln_proto::inference::model_sequence_batching::InitialState,
    dtype: DataType,
    model_dir: &Path,
    bad: &impl Fn(String) -> CoreError,
) -> CoreResult<Value> {
    let name = &s.input_name;
    if init.data_type != s.data_type {
        return Err(bad(format!(
            "the initial_state of state '{name}' must have the state's data_type"
        )));
    }
    if init.dims.iter().any(|&d| d < 0) {
        return Err(bad(format!(
            "the initial_state of state '{name}' cannot have variable-size dimensions"
        )));
    }
    let size = byte_size(dtype, &init.dims);
    let data = match &init.state_data {
        Some(StateData::ZeroData(true)) => Bytes::from(vec![0u8; size]),
        Some(StateData::DataFile(file)) => {
            let path = model_dir.join(DATA_FOLDER).join(file);
            let bytes = std::fs::read(&path).map_err(|e| {
                bad(format!(
                    "cannot read the initial state file '{}' of state '{name}': {e}",
                    path.display()
                ))
            })?;
            if dtype != DataType::Bytes && bytes.len() != size {
                return Err(bad(format!(
                    "the initial state file '{}' of state '{name}' holds {} bytes, but dims {:?} of {} take {size}",
                    path.display(),
                    bytes.len(),
                    init.dims,
                    dtype.protocol_name()
                )));
            }
            Bytes::from(bytes)
        }
        _ => {
            return Err(bad(format!(
                "the initial_state of state '{name}' needs zero_data: true or a data_file"
            )))
        }
    };
    Ok((init.dims.clone(), data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(text: &str, dir: &Path) -> CoreResult<ImplicitStates> {
        let cfg_text = format!(
            "name: \"s\" backend: \"x\" max_batch_size: 2\nsequence_batching {{ state [ {text} ] }}"
        );
        let cfg = crate::config::parse_pbtxt(Path::new("s/config.pbtxt"), &cfg_text)
            .expect("config parses");
        let Some(kiln_proto::inference::model_config::SchedulingChoice::SequenceBatching(sb)) =
            &cfg.scheduling_choice
        else {
            panic!("a sequence model")
        };
        ImplicitStates::from_config(&sb.state, true, dir, CoreError::invalid)
    }

    fn produced(name: &str, v: i32) -> Vec<(String, DataType, Vec<i64>, Vec<u8>)> {
        vec![(
            name.into(),
            DataType::Int32,
            vec![1, 1],
            v.to_le_bytes().to_vec(),
        )]
    }

    #[test]
    fn a_sequence_reads_what_its_last_request_wrote_and_starts_again_at_start() {
        let s = states(
            "{ input_name: \"IN\" output_name: \"OUT\" data_type: TYPE_INT32 dims: [ -1, 3 ] }",
            Path::new("."),
        )
        .expect("valid");
        let first = s.inputs(7, true);
        assert_eq!(first[0].shape, vec![1, 1, 3], "variable dims start at 1");
        assert_eq!(first[0].data.as_ref(), [0u8; 12]);
        s.keep("s", 7, false, &produced("OUT", 41)).expect("kept");
        s.keep("s", 8, false, &produced("OUT", 5)).expect("kept");
        assert_eq!(s.inputs(7, false)[0].data.as_ref(), 41i32.to_le_bytes());
        assert_eq!(s.inputs(7, false)[0].shape, vec![1, 1]);
        assert_eq!(s.inputs(8, false)[0].data.as_ref(), 5i32.to_le_bytes());
        assert_eq!(
            s.inputs(7, true)[0].data.len(),
            12,
            "START ignores the old value"
        );
        s.keep("s", 7, true, &Vec::new())
            .expect("an end drops the state");
        assert_eq!(s.inputs(7, false)[0].data.len(), 12);
        let e = s.keep("s", 8, false, &produced("OTHER", 1)).unwrap_err();
        assert!(e.message.contains("state output 'OUT'"), "{}", e.message);
    }

    #[test]
    fn initial_state_from_zeros_and_from_a_file() {
        let dir = std::env::temp_dir().join(format!("kiln-state-{}", std::process::id()));
        std::fs::create_dir_all(dir.join(DATA_FOLDER)).expect("dir");
        std::fs::write(dir.join(DATA_FOLDER).join("init"), 9i32.to_le_bytes()).expect("file");
        let zero = "{ input_name: \"IN\" output_name: \"OUT\" data_type: TYPE_INT32 dims: [ -1 ] \
                    initial_state { data_type: TYPE_INT32 dims: [ 2 ] zero_data: true name: \"z\" } }";
        let s = states(zero, &dir).expect("zeros");
        assert_eq!(s.inputs(1, true)[0].shape, vec![1, 2]);
        let file = "{ input_name: \"IN\" output_name: \"OUT\" data_type: TYPE_INT32 dims: [ -1 ] \
                    initial_state { data_type: TYPE_INT32 dims: [ 1 ] data_file: \"init\" name: \"f\" } }";
        let s = states(file, &dir).expect("file");
        assert_eq!(s.inputs(1, true)[0].data.as_ref(), 9i32.to_le_bytes());
        let short = file.replace("dims: [ 1 ] data_file", "dims: [ 2 ] data_file");
        let e = states(&short, &dir).unwrap_err();
        assert!(e.message.contains("holds 4 bytes"), "{}", e.message);
        let variable = zero.replace("dims: [ 2 ] zero", "dims: [ -1 ] zero");
        assert!(states(&variable, &dir).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
