//! Triton's classification extension: top-k `"value:index[:label]"` strings per batch item.
use bytes::Bytes;
use kiln_sdk::{push_bytes_element, DataType};

use crate::error::{CoreError, CoreResult};
use crate::request::OutputTensor;

fn values_as_f64(t: &OutputTensor) -> CoreResult<Vec<f64>> {
    numbers(t.dtype, &t.data).ok_or_else(|| {
        CoreError::invalid(format!(
            "class result not available for output '{}' due to unsupported type 'BYTES'",
            t.name
        ))
    })
}

/// The elements of a numeric tensor's bytes as f64 (`None` for BYTES).
pub(crate) fn numbers(dtype: DataType, d: &[u8]) -> Option<Vec<f64>> {
    macro_rules! read {
        ($ty:ty, $n:expr) => {
            d.chunks_exact($n)
                .map(|c| <$ty>::from_le_bytes(c.try_into().unwrap_or([0; $n])) as f64)
                .collect()
        };
    }
    Some(match dtype {
        DataType::UInt8 => d.iter().map(|&b| b as f64).collect(),
        DataType::Int8 => d.iter().map(|&b| b as i8 as f64).collect(),
        DataType::Bool => d.iter().map(|&b| (b != 0) as u8 as f64).collect(),
        DataType::UInt16 => read!(u16, 2),
        DataType::Int16 => read!(i16, 2),
        DataType::UInt32 => read!(u32, 4),
        DataType::Int32 => read!(i32, 4),
        DataType::UInt64 => read!(u64, 8),
        DataType::Int64 => read!(i64, 8),
        DataType::Fp32 => read!(f32, 4),
        DataType::Fp64 => read!(f64, 8),
        DataType::Fp16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DataType::Bf16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64())
            .collect(),
        DataType::Bytes => return None,
    })
}

/// One element as text: integers as integers, floating point with six decimals.
pub(crate) fn format_value(dtype: DataType, v: f64) -> String {
    match dtype {
        DataType::Fp16 | DataType::Bf16 | DataType::Fp32 | DataType::Fp64 => format!("{v:.6}"),
        _ => format!("{}", v as i64),
    }
}

/// Replaces `t` by its top-`k` classes. With batching the first dimension is the batch.
pub fn classify(
    t: &OutputTensor,
    k: u32,
    batched: bool,
    labels: Option<&[String]>,
) -> CoreResult<OutputTensor> {
    let values = values_as_f64(t)?;
    let batch = if batched {
        t.shape.first().copied().unwrap_or(1).max(1) as usize
    } else {
        1
    };
    let per_item = values.len().checked_div(batch).unwrap_or(0);
    let k = (k as usize).min(per_item);
    let mut data = Vec::new();
    for item in 0..batch {
        let row = &values[item * per_item..(item + 1) * per_item];
        let mut idx: Vec<usize> = (0..row.len()).collect();
        // Highest value first; ties keep the lower index first.
        idx.sort_by(|&a, &b| {
            row[b]
                .partial_cmp(&row[a])
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        for &i in idx.iter().take(k) {
            let mut s = format!("{}:{}", format_value(t.dtype, row[i]), i);
            if let Some(label) = labels.and_then(|l| l.get(i)) {
                s.push(':');
                s.push_str(label);
            }
            push_bytes_element(&mut data, s.as_bytes());
        }
    }
    let shape = if batched {
        vec![batch as i64, k as i64]
    } else {
        vec![k as i64]
    };
    Ok(OutputTensor {
        name: t.name.clone(),
        dtype: DataType::Bytes,
        shape,
        data: Bytes::from(data),
        in_shared_memory: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_sdk::bytes_elements;

    fn strings(t: &OutputTensor) -> Vec<String> {
        bytes_elements(&t.data)
            .map(|e| String::from_utf8(e.unwrap().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn top_k_with_labels_per_batch_item() {
        let vals: Vec<u8> = [0.1f32, 0.7, 0.2, 3.0, 1.0, 2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = OutputTensor {
            name: "P".into(),
            dtype: DataType::Fp32,
            shape: vec![2, 3],
            data: Bytes::from(vals),
            in_shared_memory: false,
        };
        let labels = vec!["a".to_string(), "b".into(), "c".into()];
        let c = classify(&t, 2, true, Some(&labels)).unwrap();
        assert_eq!(c.shape, vec![2, 2]);
        assert_eq!(
            strings(&c),
            vec![
                "0.700000:1:b",
                "0.200000:2:c",
                "3.000000:0:a",
                "2.000000:2:c"
            ]
        );
    }

    #[test]
    fn ints_and_k_larger_than_classes() {
        let vals: Vec<u8> = [5i32, -1, 9].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = OutputTensor {
            name: "O".into(),
            dtype: DataType::Int32,
            shape: vec![3],
            data: Bytes::from(vals),
            in_shared_memory: false,
        };
        let c = classify(&t, 10, false, None).unwrap();
        assert_eq!(c.shape, vec![3]);
        assert_eq!(strings(&c), vec!["9:2", "5:0", "-1:1"]);
    }
}
