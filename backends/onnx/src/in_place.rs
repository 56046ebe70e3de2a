//! Where the planner lets an operator write its result over one of its inputs instead of
//! into a new buffer, saving that buffer and the traffic of reading one and writing
//! another:
//! * a `Conv` with a fused residual (ResNet's `Relu(Add(Conv, shortcut))`, `fuse.rs`)
//!   adds the residual element by element just before it writes there, so the result can
//!   replace it (at batch 8 ResNet-50's 56×56 outputs are 25 MiB each);
//! * attention's fused masked `Softmax` (input 1 the mask) works row by row, so it can
//!   replace its scores.
//!
//! It is safe only when nothing can read that input afterwards, through its name or
//! through a view of its memory. A view comes from operators such as Reshape, Identity or
//! a same-type Cast, which hand out the input's storage; so the rule is conservative:
//! * the input is the output of a `Conv` or a `MatMul` (fresh memory, shared by no other
//!   value);
//! * every reader of it is a `Conv`, `MatMul` or `Softmax` (which keep no view of their
//!   inputs);
//! * the operator is its last reader and reads it once;
//! * it is not a graph output.
use std::collections::{HashMap, HashSet};

use candle_onnx::onnx::NodeProto;

/// Attribute (1) of a `Conv` that may write its result over its residual (input 3), or
/// of a masked `Softmax` that may write over its scores (input 0).
pub const IN_PLACE: &str = "kiln_in_place";

/// Whether `n` is the standard operator `op`.
fn is(n: &NodeProto, op: &str) -> bool {
    n.op_type == op && (n.domain.is_empty() || n.domain == "ai.onnx")
}

/// The input of `n` it could write its result over.
fn target(n: &NodeProto) -> Option<usize> {
    let present = |i: usize| n.input.get(i).is_some_and(|v| !v.is_empty());
    if is(n, "Conv") && present(3) {
        Some(3)
    } else if is(n, "Softmax") && present(0) && present(1) {
        Some(0)
    } else {
        None
    }
}

/// Marks with [`IN_PLACE`] each node of `nodes` (in execution order) that may overwrite
/// its [`target`] input, by the rule in the module's documentation; `outputs` are the
/// graph's outputs.
pub fn mark(nodes: &mut [NodeProto], outputs: &[String]) {
    let marked: Vec<usize> = {
        let fresh: HashSet<&str> = nodes
            .iter()
            .filter(|n| is(n, "Conv") || is(n, "MatMul"))
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let keeps_no_view = |n: &NodeProto| is(n, "Conv") || is(n, "MatMul") || is(n, "Softmax");
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
            fresh.contains(r)
                && !outputs.iter().any(|o| o == r)
                && ks.iter().all(|&j| keeps_no_view(&nodes[j]))
                && ks.last() == Some(&k)
                && ks.iter().filter(|&&j| j == k).count() == 1
        };
        nodes
            .iter()
            .enumerate()
            .filter(|(k, n)| target(n).is_some_and(|t| may_overwrite(*k, &n.input[t])))
            .map(|(k, _)| k)
            .collect()
    };
    for k in marked {
        nodes[k].attribute.push(crate::attrs::new_int(IN_PLACE, 1));
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
            .map(|n| crate::attrs::int(n, IN_PLACE, 0) == 1)
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
        // Attention: scores made by a MatMul, read only by the masked Softmax; not when
        // the Softmax has no mask, or the scores are read again.
        let scores = |softmax: &[&str], after: &[NodeProto]| {
            let mut nodes = vec![
                node("MatMul", &["q", "k"], "s"),
                node("Softmax", softmax, "p"),
            ];
            nodes.extend(after.iter().cloned());
            mark(&mut nodes, &["p".into()]);
            marked(&nodes)[1]
        };
        assert!(scores(&["s", "mask"], &[]));
        assert!(!scores(&["s"], &[]));
        assert!(!scores(&["s", "mask"], &[node("MatMul", &["s", "v"], "o")]));
        // A graph input as the residual.
        let mut nodes = vec![node("Conv", &["a", "w", "b", "x"], "y")];
        mark(&mut nodes, &["y".into()]);
        assert_eq!(marked(&nodes), [false]);
    }
}
