//! The header of a safetensors file, read and checked against the file without loading a
//! tensor: what `fetch-adapter` refuses a file by (an HTML error page, a pickle, a truncated
//! or padded download all fail here, each with the reason).
//!
//! The checks are those of the format: an 8-byte little-endian header length, a JSON object
//! header of at most 100 MiB, every tensor with a known dtype, a shape and `data_offsets`
//! whose byte count matches its shape, the tensors' data laid end to end from the first byte
//! after the header to the last byte of the file.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;

/// The largest header the format allows (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100 << 20;

/// One tensor of a header.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TensorEntry {
    /// The dtype as the file names it (`BF16`, `F8_E4M3`, …).
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Where its bytes are, relative to the first byte after the header.
    pub data_offsets: [u64; 2],
}

/// A checked header.
#[derive(Clone, Debug, PartialEq)]
pub struct SafetensorsHeader {
    /// The tensors by name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// The `__metadata__` entry, when there is one.
    pub metadata: Option<serde_json::Value>,
    /// Byte offset of the tensors' data in the file.
    pub data_start: u64,
}

/// Bits of one element of a dtype the format defines; `None` for a name it does not.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

/// Reads and checks the header of the safetensors file at `path`. The error says why the file
/// is not one, in words for a person (the caller names the file).
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader, String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let size = file
        .metadata()
        .map_err(|e| format!("cannot read it: {e}"))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| format!("{size} bytes are too few for a safetensors header"))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "its first 8 bytes give a header of {header_len} bytes, more than the format's \
             {MAX_HEADER_BYTES}: it is not a safetensors file"
        ));
    }
    if 8 + header_len > size {
        return Err(format!(
            "its header of {header_len} bytes does not fit in the file's {size} bytes: it is \
             not a safetensors file, or it is cut short"
        ));
    }
    let mut header = vec![0u8; usize::try_from(header_len).unwrap_or(0)];
    file.read_exact(&mut header)
        .map_err(|e| format!("cannot read its header: {e}"))?;
    parse_header(&header, size - 8 - header_len).map(|(tensors, metadata)| SafetensorsHeader {
        tensors,
        metadata,
        data_start: 8 + header_len,
    })
}

type Parsed = (BTreeMap<String, TensorEntry>, Option<serde_json::Value>);

/// Parses a header's JSON and checks its tensors against `data_len`, the bytes after it.
fn parse_header(header: &[u8], data_len: u64) -> Result<Parsed, String> {
    let mut entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| format!("its header is not a JSON object: {e}"))?;
    let metadata = entries.remove("__metadata__");
    let mut tensors = BTreeMap::new();
    for (name, value) in entries {
        let entry: TensorEntry = serde_json::from_value(value)
            .map_err(|e| format!("tensor `{name}` in its header: {e}"))?;
        let bits = dtype_bits(&entry.dtype)
            .ok_or_else(|| format!("tensor `{name}` has the unknown dtype `{}`", entry.dtype))?;
        let [begin, end] = entry.data_offsets;
        let elements = entry
            .shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}` has an impossible shape {:?}", entry.shape))?;
        let bytes = elements
            .checked_mul(bits)
            .map(|b| b.div_ceil(8))
            .ok_or_else(|| format!("tensor `{name}` has an impossible shape {:?}", entry.shape))?;
        if begin > end || end - begin != bytes {
            return Err(format!(
                "tensor `{name}` ({} {:?}) needs {bytes} bytes but its data_offsets \
                 [{begin}, {end}] give {}",
                entry.dtype,
                entry.shape,
                end.saturating_sub(begin)
            ));
        }
        tensors.insert(name, entry);
    }
    if tensors.is_empty() {
        return Err("its header lists no tensor".to_owned());
    }
    // The data is the tensors end to end, nothing before, between or after them.
    let mut spans: Vec<(u64, u64, &str)> = tensors
        .iter()
        .map(|(name, t)| (t.data_offsets[0], t.data_offsets[1], name.as_str()))
        .collect();
    spans.sort_unstable();
    let mut at = 0u64;
    for (begin, end, name) in spans {
        if begin != at {
            return Err(format!(
                "tensor `{name}` starts at byte {begin} of the data where the one before it \
                 ends at {at}: the tensors overlap or leave a gap"
            ));
        }
        at = end;
    }
    if at != data_len {
        return Err(format!(
            "its tensors hold {at} bytes of data but the file has {data_len} after the header: \
             it is cut short or has bytes appended"
        ));
    }
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A safetensors file of `tensors` (`name`, dtype, shape), zero-filled.
    fn file(tensors: &[(&str, &str, &[u64])]) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        let mut at = 0u64;
        for (name, dtype, shape) in tensors {
            let bytes = shape.iter().product::<u64>() * dtype_bits(dtype).unwrap() / 8;
            header.insert(
                (*name).to_owned(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, at + bytes]}),
            );
            at += bytes;
        }
        header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
        let json = serde_json::to_vec(&header).unwrap();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json);
        out.extend(std::iter::repeat_n(0u8, usize::try_from(at).unwrap()));
        out
    }

    /// Writes `bytes` to a file of its own and reads its header back.
    fn check(bytes: &[u8]) -> Result<SafetensorsHeader, String> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sd35-contract-st-{}-{n}.safetensors",
            std::process::id()
        ));
        std::fs::write(&path, bytes).unwrap();
        let header = read_safetensors_header(&path);
        let _ = std::fs::remove_file(&path);
        header
    }

    #[test]
    fn a_lora_file_reads_with_its_tensors() {
        let bytes = file(&[
            ("transformer.a.lora_A.weight", "BF16", &[4, 64]),
            ("transformer.a.lora_B.weight", "F32", &[64, 4]),
        ]);
        let h = check(&bytes).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors["transformer.a.lora_A.weight"].shape, [4, 64]);
        assert_eq!(h.metadata.unwrap()["format"], "pt");
    }

    #[test]
    fn what_is_not_a_safetensors_file_is_refused_with_the_reason() {
        let good = file(&[("w", "F16", &[2, 3])]);
        let mut cut = good.clone();
        cut.pop();
        let mut padded = good.clone();
        padded.push(0);
        let html = b"<!DOCTYPE html><html>404 Not Found</html>".to_vec();
        let mut bad_json = good.clone();
        bad_json[8] = b'[';
        for (bytes, why) in [
            (html, "more than the format's"),
            (b"abc".to_vec(), "too few"),
            (cut, "cut short"),
            (padded, "bytes appended"),
            (bad_json, "not a JSON object"),
            (file(&[]), "no tensor"),
        ] {
            let err = check(&bytes).unwrap_err();
            assert!(err.contains(why), "{why:?} not in {err}");
        }
    }

    #[test]
    fn offsets_must_match_shapes_and_lie_end_to_end() {
        let header = |json: &str, data: u64| parse_header(json.as_bytes(), data);
        let err = header(
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
            4,
        )
        .unwrap_err();
        assert!(err.contains("needs 8 bytes"), "{err}");
        let err = header(
            r#"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[3,5]}}"#,
            5,
        )
        .unwrap_err();
        assert!(err.contains("gap"), "{err}");
        let err = header(
            r#"{"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#,
            1,
        )
        .unwrap_err();
        assert!(err.contains("unknown dtype `Q4`"), "{err}");
        assert!(
            header(
                r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
                2
            )
            .is_ok()
        );
    }
}
