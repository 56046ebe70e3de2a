//! Where the planner lets an operator write its result over one of its inputs instead of
//! into a new buffer: a `Conv` with a fused residual (ResNet's `Relu(Add(Conv, shortcut))`,
//! `fuse.rs`) adds the residual element by element just before it writes there, so the
//! result can replace it. That saves a buffer the size of the output and the traffic of
//! reading one and writing another (at batch 8 ResNet-50's 56×56 outputs are 25 MiB each).
//!
//! It is safe only when nothing can read the residual afterwards, through its name or
//! through a view of its memory. A view comes from operators such as Reshape, Identity or
//! a same-type Cast, which hand out the input's storage; so the rule is conservative:
//! * the residual is the output of another `Conv` (fresh memory, shared by no other value);
//! * every reader of it is a `Conv` (which keeps no view of its inputs);
//! * the fused Conv is its last reader and reads it once;
//! * it is not a graph output.
use std::collections::{HashMap, HashSet};

use candle_onnx::onnx::NodeProto;

/// Attribute (1) of a `Conv` that may write its result over its residual (input 3).
pub const RESIDUAL_IN_PLACE: &str = "kiln_residual_in_place";

/// Whether `n` is the ONNX `Conv` operator.
fn is_conv(n: &NodeProto) -> bool {
    n.op_type == "Conv" && (n.domain.is_empty() || n.domain == "ai.onnx")
}

/// Marks with [`RESIDUAL_IN_PLACE`] each Conv of `nodes` (in execution order) that may
/// overwrite its residual, by the rule in the module's documentation; `outputs` are the
/// graph's outputs.
pub fn mark(nodes: &mut [NodeProto], outputs: &[String]) {
    let marked: Vec<usize> = {
        let made_by_conv: HashSet<&str> = nodes
            .iter()
            .filter(|n| is_conv(n))
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        // Each value's readers, once per input slot.
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (k, n) in nodes.iter().enumerate() {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                readers.entry(i.as_str()).or_default().push(k);
            }
        }
        let may_overwrite = |k: usize, r: &str| {
            let Some(ks) = readers.get(r) else {
                return false;
            };
            made_by_conv.contains(r)
                && !outputs.iter().any(|o| o == r)
                && ks.iter().all(|&j| is_conv(&nodes[j]))
                && ks.last() == Some(&k)
                && ks.iter().filter(|&&j| j == k).count() == 1
        };
        nodes
            .iter()
            .enumerate()
            .filter(|(k, n)| {
                is_conv(n)
                    && n.input
                        .get(3)
                        .is_some_and(|r| !r.is_empty() && may_overwrite(*k, r))
            })
            .map(|(k, _)| k)
            .collect()
    };
    for k in marked {
        nodes[k]
            .attribute
            .push(crate::attrs::new_int(RESIDUAL_IN_PLACE, 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, ins: &[&str], out: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            ..Default::default()
        }
    }

    fn marked(nodes: &[NodeProto]) -> Vec<bool> {
        nodes
            .iter()
            .map(|n| crate::attrs::int(n, RESIDUAL_IN_PLACE, 0) == 1)
            .collect()
    }

    /// A ResNet block (`r` read by the block's first Conv and, last, as the residual) is
    /// marked; each reason not to is not.
    #[test]
    fn marks_only_a_residual_nothing_else_can_read() {
        // `r` made by `first`, read by a Conv, then `middle`, then as the residual by
        // `last` (`end` after it); whether `last` is marked.
        let check = |first: &str,
                     middle: &[NodeProto],
                     last: &[&str],
                     end: &[NodeProto],
                     outputs: &[&str]| {
            let mut nodes = vec![
                node(first, &["x", "w"], "r"),
                node("Conv", &["r", "w"], "a"),
            ];
            nodes.extend(middle.iter().cloned());
            nodes.push(node("Conv", last, "y"));
            nodes.extend(end.iter().cloned());
            let at = nodes.len() - 1 - end.len();
            let outputs: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
            mark(&mut nodes, &outputs);
            let m = marked(&nodes);
            assert_eq!(m.iter().filter(|&&b| b).count(), m[at] as usize);
            m[at]
        };
        let res = ["a", "w", "b", "r"];
        assert!(check("Conv", &[], &res, &[], &["y"]));
        // Read by another Conv in between: still the last reader.
        assert!(check(
            "Conv",
            &[node("Conv", &["r", "w"], "c")],
            &res,
            &[],
            &["y", "c"]
        ));
        // A graph output.
        assert!(!check("Conv", &[], &res, &[], &["y", "r"]));
        // Read after the fused Conv.
        assert!(!check(
            "Conv",
            &[],
            &res,
            &[node("Conv", &["r", "w"], "z")],
            &["y", "z"]
        ));
        // A reader that may keep a view of it, read later.
        let view = [node("Reshape", &["r", "s"], "v")];
        assert!(!check(
            "Conv",
            &view,
            &res,
            &[node("Relu", &["v"], "z")],
            &["y", "z"]
        ));
        // Not made by a Conv.
        assert!(!check("Relu", &[], &res, &[], &["y"]));
        // Read twice by the fused Conv.
        assert!(!check("Conv", &[], &["r", "w", "b", "r"], &[], &["y"]));
        // A graph input as the residual.
        let mut nodes = vec![node("Conv", &["a", "w", "b", "x"], "y")];
        mark(&mut nodes, &["y".into()]);
        assert_eq!(marked(&nodes), [false]);
    }
}
