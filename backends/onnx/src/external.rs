//! ONNX external data: tensors whose bytes live in files beside the model (large models,
//! `torch.onnx.export(..., external_data=True)`). They are read once at load and put in
//! the tensors' `raw_data`, so the planner sees ordinary tensors.
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path};

use candle_onnx::onnx::{GraphProto, ModelProto, TensorProto};

/// Reads every external tensor of `model` (initializers and tensor attributes, subgraphs
/// included) from its file, relative to `dir` (the model file's folder).
pub fn inline(model: &mut ModelProto, dir: &Path) -> Result<(), String> {
    let mut files = HashMap::new();
    match model.graph.as_mut() {
        Some(g) => inline_graph(g, dir, &mut files),
        None => Ok(()),
    }
}

fn inline_graph(
    g: &mut GraphProto,
    dir: &Path,
    files: &mut HashMap<String, File>,
) -> Result<(), String> {
    for t in &mut g.initializer {
        inline_tensor(t, dir, files)?;
    }
    for n in &mut g.node {
        for a in &mut n.attribute {
            for t in a.t.iter_mut().chain(a.tensors.iter_mut()) {
                inline_tensor(t, dir, files)?;
            }
            for sub in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                inline_graph(sub, dir, files)?;
            }
        }
    }
    Ok(())
}

/// ONNX's `DataLocation::EXTERNAL`.
const EXTERNAL: i32 = 1;

fn inline_tensor(
    t: &mut TensorProto,
    dir: &Path,
    files: &mut HashMap<String, File>,
) -> Result<(), String> {
    if t.data_location != EXTERNAL && t.external_data.is_empty() {
        return Ok(());
    }
    let name = t.name.clone();
    let field = |key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == key)
            .map(|e| e.value.clone())
    };
    let location = field("location")
        .ok_or_else(|| format!("tensor '{name}': external data without a 'location'"))?;
    let number = |key: &str| -> Result<Option<u64>, String> {
        field(key)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    format!("tensor '{name}': external data {key} '{v}' is not a number")
                })
            })
            .transpose()
    };
    let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
    // Only files inside the model's folder, as onnxruntime requires.
    let rel = Path::new(&location);
    if !rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "tensor '{name}': external data location '{location}' must be a relative path inside the model's folder"
        ));
    }
    let path = dir.join(rel);
    if !files.contains_key(&location) {
        let f = File::open(&path).map_err(|e| {
            format!(
                "tensor '{name}': cannot open external data {}: {e}",
                path.display()
            )
        })?;
        files.insert(location.clone(), f);
    }
    let Some(file) = files.get_mut(&location) else {
        return Err(format!("tensor '{name}': external data file missing"));
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let length = length.unwrap_or(size.saturating_sub(offset));
    if offset.checked_add(length).is_none_or(|end| end > size) {
        return Err(format!(
            "tensor '{name}': external data {}..{} is past the end of {} ({size} bytes)",
            offset,
            offset.saturating_add(length),
            path.display()
        ));
    }
    let mut data = vec![0u8; length as usize];
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(&mut data))
        .map_err(|e| format!("tensor '{name}': reading {}: {e}", path.display()))?;
    t.raw_data = data;
    t.external_data.clear();
    t.data_location = 0;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_onnx::onnx::StringStringEntryProto;

    fn external(name: &str, location: &str, offset: u64, length: u64) -> TensorProto {
        let kv = |k: &str, v: String| StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        TensorProto {
            name: name.into(),
            data_type: 1,
            dims: vec![2],
            data_location: EXTERNAL,
            external_data: vec![
                kv("location", location.into()),
                kv("offset", offset.to_string()),
                kv("length", length.to_string()),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn reads_tensors_from_files_beside_the_model() {
        let dir = std::env::temp_dir().join(format!("kiln-external-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = [1.5f32, -2.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(dir.join("weights.bin"), &bytes).unwrap();
        let mut m = ModelProto {
            graph: Some(GraphProto {
                initializer: vec![external("w", "weights.bin", 4, 8)],
                ..Default::default()
            }),
            ..Default::default()
        };
        inline(&mut m, &dir).unwrap();
        let w = &m.graph.as_ref().unwrap().initializer[0];
        let t = crate::convert::tensor_from_proto(w).unwrap();
        assert_eq!(t.to_vec1::<f32>().unwrap(), vec![-2.0, 4.0]);

        let load = |t: TensorProto| {
            let mut m = ModelProto {
                graph: Some(GraphProto {
                    initializer: vec![t],
                    ..Default::default()
                }),
                ..Default::default()
            };
            inline(&mut m, &dir).unwrap_err()
        };
        assert!(load(external("w", "weights.bin", 8, 8)).contains("past the end"));
        assert!(load(external("w", "missing.bin", 0, 8)).contains("cannot open"));
        assert!(load(external("w", "../weights.bin", 0, 8)).contains("relative path"));
        assert!(load(external("w", "/etc/passwd", 0, 8)).contains("relative path"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
