//! DenseNet's feature chains without their quadratic copying. Each layer of a dense block
//! concatenates its new channels after all of the block's earlier ones,
//! `c_i = Concat(c_{i-1}, conv_i)` along the channels, so a block of n layers copies its
//! growing features n times (DenseNet-121: about 40 MB per image).
//!
//! The planner links such chains ([`mark`]): every Concat of a chain but the last also
//! outputs the chain's *buffer*, a tensor with room for the channels still to come, and
//! the next Concat reads it as its last input. Each `c_i` is a view of the buffer's first
//! channels, and the next Concat writes only its new channels after them, image by image
//! ([`run`]). At batch 1 the view is contiguous; at larger batches its images lie a
//! buffer's image apart, and the convolution that reads a dense block's features (BN,
//! ReLU, 1×1 Conv) reads them in place (`ops_fast::conv`); other readers copy.
//!
//! Nothing is ever written where a view already exists: a link is made only where the
//! chain value is read by no other Concat than the next one of the chain (so only that
//! one ever appends after it), and each buffer is read by that Concat alone; everything
//! else that reads a chain value reads at most its own channels. A Concat of a chain
//! whose buffer has no room starts a new one; on tensors that are not f32 on the CPU it
//! concatenates as any Concat does.
use std::collections::{HashMap, HashSet};

use candle_core::{Result, Tensor};
use candle_onnx::onnx::NodeProto;

use crate::attrs;
use crate::ops_fast::{cpu_f32, f32_from_start, on_cpu_f32};

/// Attribute (1) of a chain's Concat whose last input is the previous one's buffer. (A
/// Concat whose buffer the next one reads has it as a second output.)
pub const CHAINED: &str = "kiln_chained";
/// Attribute of a chain's first Concat: the channels the rest of the chain appends (the
/// room its buffer leaves), when every one of them is a Conv's output.
pub const RESERVE: &str = "kiln_reserve";

/// Whether `n` (a Concat) is in a chain [`mark`] linked: it reads a buffer or hands one on.
pub fn in_chain(n: &NodeProto) -> bool {
    attrs::int(n, CHAINED, 0) != 0 || n.output.len() > 1
}

/// A Concat along the channels (axis 1) of one output that could be a link of a chain.
fn linkable(n: &NodeProto) -> bool {
    n.op_type == "Concat"
        && (n.domain.is_empty() || n.domain == "ai.onnx")
        && attrs::int(n, "axis", 0) == 1
        && n.input.len() >= 2
        && n.input.iter().all(|i| !i.is_empty())
        && n.output.len() == 1
}

/// Links the chains of `nodes` (in execution order) by the rule in the module's
/// documentation; `outputs` are the graph's outputs, `conv_channels` the output channels
/// of a Conv node, where its weight tells them.
pub fn mark(
    nodes: &mut [NodeProto],
    outputs: &[String],
    conv_channels: impl Fn(&NodeProto) -> Option<usize>,
) {
    let producer: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .flat_map(|(k, n)| n.output.iter().map(move |o| (o.as_str(), k)))
        .collect();
    // Each value's Concat readers (node, input slot).
    let mut concat_readers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
    for (k, n) in nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Concat")
    {
        for (slot, i) in n.input.iter().enumerate() {
            concat_readers
                .entry(i.as_str())
                .or_default()
                .push((k, slot));
        }
    }
    let graph_outputs: HashSet<&str> = outputs.iter().map(String::as_str).collect();
    // (earlier, later) Concat pairs.
    let links: Vec<(usize, usize)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, b)| linkable(b))
        .filter_map(|(kb, b)| {
            let prev = b.input[0].as_str();
            let ka = *producer.get(prev)?;
            let sole_reader = concat_readers.get(prev).is_some_and(|r| r == &[(kb, 0)]);
            (linkable(&nodes[ka]) && sole_reader && !graph_outputs.contains(prev))
                .then_some((ka, kb))
        })
        .collect();
    let next: HashMap<usize, usize> = links.iter().copied().collect();
    let chained: HashSet<usize> = links.iter().map(|&(_, b)| b).collect();
    // The channels each chain appends after its first Concat (what the Concats after it
    // add, none of them the buffer).
    let reserve = |head: usize| -> Option<usize> {
        let mut total = 0;
        let mut at = head;
        while let Some(&k) = next.get(&at) {
            for v in &nodes[k].input[1..] {
                let conv = producer.get(v.as_str()).map(|&p| &nodes[p]);
                total += conv
                    .filter(|c| c.op_type == "Conv")
                    .and_then(&conv_channels)?;
            }
            at = k;
        }
        Some(total)
    };
    let heads: Vec<(usize, Option<usize>)> = next
        .keys()
        .filter(|k| !chained.contains(k))
        .map(|&k| (k, reserve(k)))
        .collect();
    for (a, b) in links {
        let buffer = format!("{}::kiln_buffer", nodes[a].output[0]);
        nodes[a].output.push(buffer.clone());
        nodes[b].input.push(buffer);
        nodes[b].attribute.push(attrs::new_int(CHAINED, 1));
    }
    for (head, channels) in heads {
        if let Some(c) = channels {
            nodes[head]
                .attribute
                .push(attrs::new_int(RESERVE, c as i64));
        }
    }
}

/// Runs a Concat of a chain: `c` and, when the node has a second output, the buffer.
pub(crate) fn run(
    node: &NodeProto,
    ins: &[Option<Tensor>],
    concat: impl Fn(&[&Tensor]) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let chained = attrs::int(node, CHAINED, 0) != 0;
    let (parts, buffer) = match (chained, ins.split_last()) {
        (true, Some((buffer, parts))) => (parts, buffer.as_ref()),
        _ => (ins, None),
    };
    let parts: Vec<&Tensor> = parts.iter().flatten().collect();
    let hands_on = node.output.len() > 1;
    let room = if hands_on {
        usize::try_from(attrs::int(node, RESERVE, -1)).ok()
    } else {
        Some(0)
    };
    if let Some((c, buffer)) = append(&parts, buffer, room)? {
        return Ok(if hands_on { vec![c, buffer] } else { vec![c] });
    }
    let c = concat(&parts)?;
    Ok(if hands_on {
        vec![c.clone(), c]
    } else {
        vec![c]
    })
}

/// `Concat(parts)` along the channels of rank-4 f32 CPU tensors, written after `parts[0]`
/// in `buffer` where that is a view of its first channels (in every image) with room after
/// them, else into a new buffer with room for `room` more channels (as many again as it
/// holds when unknown); returns (the result, a view of the buffer; the buffer). `None`
/// for other tensors.
fn append(
    parts: &[&Tensor],
    buffer: Option<&Tensor>,
    room: Option<usize>,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some(&first) = parts.first() else {
        return Ok(None);
    };
    let fits = |t: &Tensor| {
        cpu_f32(t)
            && t.rank() == 4
            && t.dims()[0] == first.dims()[0]
            && t.dims()[2..] == first.dims()[2..]
    };
    if !parts.iter().all(|t| fits(t)) {
        return Ok(None);
    }
    let (images, plane) = (first.dims()[0], first.dims()[2] * first.dims()[3]);
    let channels: usize = parts.iter().map(|t| t.dims()[1]).sum();
    // Where a tensor's first element lies.
    let start = |t: &Tensor| {
        let (s, l) = t.storage_and_layout();
        f32_from_start(&s, l).map(<[f32]>::as_ptr)
    };
    let others: Vec<Option<&Tensor>> = parts[1..].iter().map(|t| Some(*t)).collect();
    if let Some(buffer) = buffer.filter(|b| {
        fits(b)
            && b.is_contiguous()
            && b.dims()[1] >= channels
            && start(b).is_some_and(|p| start(first) == Some(p))
            && first.stride() == b.stride()
            && !crate::ops_fast::shares_memory(b, &others)
    }) {
        let write = |srcs: &[&[f32]]| {
            buffer.inplace_op1(&WriteAfter {
                srcs,
                at: first.dims()[1] * plane,
                image: buffer.dims()[1] * plane,
                images,
            })
        };
        if let Some(done) = on_cpu_f32(&others, write)? {
            done?;
            return Ok(Some((buffer.narrow(1, 0, channels)?, buffer.clone())));
        }
    }
    let capacity = channels + room.unwrap_or(channels);
    let all: Vec<Option<&Tensor>> = parts.iter().map(|t| Some(*t)).collect();
    let filled = on_cpu_f32(&all, |srcs| {
        let mut v: Vec<f32> = Vec::with_capacity(images * capacity * plane);
        for bi in 0..images {
            for s in srcs {
                let run = s.len() / images;
                v.extend_from_slice(&s[bi * run..][..run]);
            }
            // The room stays zero until the chain writes it.
            v.resize((bi + 1) * capacity * plane, 0.0);
        }
        v
    })?;
    let Some(v) = filled else {
        return Ok(None);
    };
    let dims = first.dims();
    let buffer = Tensor::from_vec(v, (images, capacity, dims[2], dims[3]), first.device())?;
    Ok(Some((buffer.narrow(1, 0, channels)?, buffer)))
}

/// Writes `srcs` (each `images` equal runs), one after another, from element `at` of each
/// of a buffer's images (`image` elements apart).
struct WriteAfter<'a> {
    srcs: &'a [&'a [f32]],
    at: usize,
    image: usize,
    images: usize,
}

impl candle_core::InplaceOp1 for WriteAfter<'_> {
    fn name(&self) -> &'static str {
        "kiln-append"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<()> {
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("a chain's buffer is not f32")
        };
        let run: usize = self.srcs.iter().map(|s| s.len() / self.images).sum();
        if self.at + run > self.image || self.images * self.image > v.len() {
            candle_core::bail!("a chain's buffer has no room for {run} more values an image")
        }
        for bi in 0..self.images {
            let mut at = bi * self.image + self.at;
            for s in self.srcs {
                let n = s.len() / self.images;
                v[at..at + n].copy_from_slice(&s[bi * n..][..n]);
                at += n;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(op: &str, ins: &[&str], out: &str) -> NodeProto {
        let mut n = NodeProto {
            op_type: op.into(),
            input: ins.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            ..Default::default()
        };
        if op == "Concat" {
            n.attribute.push(attrs::new_int("axis", 1));
        }
        n
    }

    /// A dense block: `c1 = [x, k1]`, `c2 = [c1, k2]`, `c3 = [c2, k3]`, each `k` a Conv
    /// of the chain value before it; the Convs have 32 channels.
    fn block() -> Vec<NodeProto> {
        vec![
            node("Conv", &["x", "w"], "k1"),
            node("Concat", &["x", "k1"], "c1"),
            node("Conv", &["c1", "w"], "k2"),
            node("Concat", &["c1", "k2"], "c2"),
            node("Conv", &["c2", "w"], "k3"),
            node("Concat", &["c2", "k3"], "c3"),
            node("Conv", &["c3", "w"], "y"),
        ]
    }

    fn marked(outputs: &[&str], nodes: &mut [NodeProto]) {
        let outputs: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
        mark(nodes, &outputs, |n| (n.op_type == "Conv").then_some(32));
    }

    #[test]
    fn links_a_dense_block_and_reserves_its_channels() {
        let mut nodes = block();
        marked(&["y"], &mut nodes);
        let (c1, c2, c3) = (&nodes[1], &nodes[3], &nodes[5]);
        assert!([c1, c2, c3].iter().all(|n| in_chain(n)));
        assert_eq!(c1.output, ["c1", "c1::kiln_buffer"]);
        assert_eq!(c2.input, ["c1", "k2", "c1::kiln_buffer"]);
        assert_eq!(c2.output, ["c2", "c2::kiln_buffer"]);
        assert_eq!(c3.input, ["c2", "k3", "c2::kiln_buffer"]);
        assert_eq!(c3.output, ["c3"], "the last one hands on no buffer");
        assert_eq!(attrs::int(c1, RESERVE, -1), 64, "k2 and k3");
        assert_eq!(attrs::int(c1, CHAINED, 0), 0);
        assert_eq!(attrs::int(c3, CHAINED, 0), 1);
    }

    #[test]
    fn a_chain_value_another_concat_reads_or_the_graph_returns_ends_the_chain() {
        // c1 read by a second Concat: two would append after it.
        let mut nodes = block();
        nodes.push(node("Concat", &["c1", "y"], "z"));
        marked(&["z"], &mut nodes);
        assert_eq!(nodes[3].input, ["c1", "k2"]);
        assert_eq!(nodes[5].input, ["c2", "k3", "c2::kiln_buffer"]);
        // c2 a graph output.
        let mut nodes = block();
        marked(&["y", "c2"], &mut nodes);
        assert_eq!(nodes[3].input, ["c1", "k2", "c1::kiln_buffer"]);
        assert_eq!(nodes[5].input, ["c2", "k3"]);
        // Along another axis.
        let mut nodes = block();
        nodes[3].attribute = vec![attrs::new_int("axis", 2)];
        marked(&["y"], &mut nodes);
        assert!(!in_chain(&nodes[3]));
        assert!(!in_chain(&nodes[1]), "c1 links to nothing");
    }

    #[test]
    fn no_reserve_when_a_later_part_is_no_conv() {
        let mut nodes = block();
        nodes[4].op_type = "Relu".into();
        marked(&["y"], &mut nodes);
        assert!(in_chain(&nodes[5]));
        assert_eq!(attrs::int(&nodes[1], RESERVE, -1), -1);
    }
}
