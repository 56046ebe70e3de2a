//! Triton's endpoint restrictions (`--http-restricted-api`, `--grpc-restricted-protocol`):
//! groups of APIs that answer only requests carrying a given header with a given value
//! (for gRPC, the header `triton-grpc-protocol-<key>`).
use std::collections::HashMap;

/// The API groups Triton names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// Server and model liveness/readiness.
    Health,
    /// Server and model metadata.
    Metadata,
    /// Inference.
    Inference,
    /// System and CUDA shared memory.
    SharedMemory,
    /// Model configuration.
    ModelConfig,
    /// Repository index, load and unload.
    ModelRepository,
    /// Statistics.
    Statistics,
    /// Trace settings.
    Trace,
    /// Log settings.
    Logging,
}

impl Api {
    fn parse(name: &str) -> Option<Api> {
        Some(match name {
            "health" => Api::Health,
            "metadata" => Api::Metadata,
            "inference" => Api::Inference,
            "shared-memory" => Api::SharedMemory,
            "model-config" => Api::ModelConfig,
            "model-repository" => Api::ModelRepository,
            "statistics" => Api::Statistics,
            "trace" => Api::Trace,
            "logging" => Api::Logging,
            _ => return None,
        })
    }
}

/// The restricted APIs of one front end and the header each one needs.
#[derive(Debug, Clone, Default)]
pub struct Restrictions {
    needs: HashMap<Api, (String, String)>,
}

impl Restrictions {
    /// Reads `<api>,<api>,...:<key>=<value>` settings (`flag` names the option in errors);
    /// `prefix` is put before the key of the header to look for (gRPC's
    /// `triton-grpc-protocol-`). An API may be in one group only.
    pub fn parse(flag: &str, prefix: &str, settings: &[String]) -> Result<Restrictions, String> {
        let mut needs = HashMap::new();
        for s in settings {
            let bad = || format!("{flag} expects <api>,<api>,...:<key>=<value>, got '{s}'");
            let (apis, kv) = s.rsplit_once(':').ok_or_else(bad)?;
            let (key, value) = kv.split_once('=').ok_or_else(bad)?;
            if key.is_empty() {
                return Err(bad());
            }
            for name in apis.split(',').map(str::trim) {
                let api = Api::parse(name).ok_or_else(|| {
                    format!("{flag}: unknown API '{name}' (known: health, metadata, inference, shared-memory, model-config, model-repository, statistics, trace, logging)")
                })?;
                let header = format!("{prefix}{key}").to_ascii_lowercase();
                if needs.insert(api, (header, value.to_string())).is_some() {
                    return Err(format!("{flag}: API '{name}' is in more than one group"));
                }
            }
        }
        Ok(Restrictions { needs })
    }

    /// Whether a request to `api` may proceed, given how to read its headers; the error
    /// is the message for the client.
    pub fn check(&self, api: Api, header: impl Fn(&str) -> Option<String>) -> Result<(), String> {
        let Some((key, value)) = self.needs.get(&api) else {
            return Ok(());
        };
        if header(key).as_deref() == Some(value.as_str()) {
            Ok(())
        } else {
            Err(format!("This API is restricted, expecting header '{key}'"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_need_their_header_and_others_pass() {
        let r = Restrictions::parse(
            "--http-restricted-api",
            "",
            &["model-repository,statistics:Admin-Key=secret".into()],
        )
        .expect("valid");
        let with = |v: &'static str| move |k: &str| (k == "admin-key").then(|| v.to_string());
        assert!(r.check(Api::ModelRepository, with("secret")).is_ok());
        let e = r.check(Api::Statistics, with("guess")).unwrap_err();
        assert!(e.contains("'admin-key'"), "{e}");
        assert!(r.check(Api::Inference, |_| None).is_ok());
        let twice = ["trace:a=1".to_string(), "trace:b=2".to_string()];
        assert!(Restrictions::parse("f", "", &twice).is_err());
        assert!(Restrictions::parse("f", "", &["bogus:a=1".into()]).is_err());
        assert!(Restrictions::parse("f", "", &["trace".into()]).is_err());
        let g = Restrictions::parse("f", "triton-grpc-protocol-", &["inference:k=v".into()])
            .expect("valid");
        let e = g.check(Api::Inference, |_| None).unwrap_err();
        assert!(e.contains("triton-grpc-protocol-k"), "{e}");
    }
}
