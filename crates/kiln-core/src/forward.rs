//! Header forwarding (`--http-header-forward-pattern`, `--grpc-header-forward-pattern`):
//! request headers whose names match the pattern become string parameters of the
//! inference request, as tritonserver forwards them to backends.
use crate::error::CoreError;
use crate::request::InferRequest;

/// Parameter names the protocol reserves; a header may not stand for one.
const RESERVED: &[&str] = &[
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "priority",
    "timeout",
    "headers",
    "binary_data_output",
];

/// A compiled forward pattern.
#[derive(Debug, Clone)]
pub struct HeaderForward {
    pattern: regex::Regex,
}

impl HeaderForward {
    /// Compiles `pattern` (a regular expression matched anywhere in a header's name,
    /// case-sensitively, as RE2's PartialMatch in tritonserver).
    pub fn new(flag: &str, pattern: &str) -> Result<Self, String> {
        regex::Regex::new(pattern)
            .map(|pattern| HeaderForward { pattern })
            .map_err(|e| format!("invalid {flag} '{pattern}': {e}"))
    }

    /// Adds the matching `headers` (name, value) to `req`'s parameters.
    pub fn apply<'a>(
        &self,
        req: &mut InferRequest,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), CoreError> {
        for (name, value) in headers {
            if !self.pattern.is_match(name) {
                continue;
            }
            if RESERVED.contains(&name) || name.starts_with("triton_") {
                return Err(CoreError::invalid(format!(
                    "header '{name}' names a parameter reserved for Triton usage and cannot be forwarded"
                )));
            }
            req.parameters.insert(
                name.to_string(),
                serde_json::Value::String(value.to_string()),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_headers_become_string_parameters() {
        let f = HeaderForward::new("--http-header-forward-pattern", "my_.*").unwrap();
        let mut req = InferRequest::new("m");
        f.apply(
            &mut req,
            [
                ("my_header_1", "v1"),
                ("header_2", "v2"),
                ("MY_HEADER", "v3"),
            ],
        )
        .unwrap();
        assert_eq!(req.parameters.len(), 1);
        assert_eq!(req.parameters["my_header_1"], "v1");
        let all = HeaderForward::new("x", ".*").unwrap();
        let e = all.apply(&mut req, [("priority", "1")]).unwrap_err();
        assert!(
            e.message.contains("reserved for Triton usage"),
            "{}",
            e.message
        );
        assert!(all.apply(&mut req, [("triton_x", "1")]).is_err());
        assert!(HeaderForward::new("--x", "(").is_err());
    }
}
