//! tritonserver flags that Kiln accepts so that an existing command line (a Kubernetes
//! manifest, a Helm chart) starts it unchanged. Tuning flags for machinery Kiln does not
//! have (memory pools, thread counts) have no effect and are listed in the
//! log at start. Flags that ask for something Kiln does not do and whose absence would
//! change what clients see or may reach (namespacing, SageMaker or Vertex AI front
//! ends) stop the start with a reason instead.

/// Declares the flags: each takes any value, and may be given more than once (as
/// tritonserver's repeatable ones are).
macro_rules! triton_flags {
    ($( $field:ident = $flag:literal ;)*) => {
        /// tritonserver flags accepted for compatibility.
        #[derive(Debug, Default, clap::Args)]
        pub struct TritonFlags {
            $(
                #[arg(long = $flag, hide = true)]
                pub $field: Vec<String>,
            )*
        }

        impl TritonFlags {
            /// The flags given, with their values.
            pub fn given(&self) -> Vec<(&'static str, String)> {
                let mut out = Vec::new();
                $( out.extend(self.$field.iter().map(|v| ($flag, v.clone()))); )*
                out
            }
        }
    };
}

triton_flags! {
    model_load_retry_count = "model-load-retry-count";
    http_thread_count = "http-thread-count";
    buffer_manager_thread_count = "buffer-manager-thread-count";
    pinned_memory_pool_byte_size = "pinned-memory-pool-byte-size";
    cuda_memory_pool_byte_size = "cuda-memory-pool-byte-size";
    cuda_virtual_address_size = "cuda-virtual-address-size";
    min_supported_compute_capability = "min-supported-compute-capability";
    metrics_interval_ms = "metrics-interval-ms";
    allow_gpu_metrics = "allow-gpu-metrics";
    allow_cpu_metrics = "allow-cpu-metrics";
    grpc_infer_allocation_pool_size = "grpc-infer-allocation-pool-size";
    grpc_keepalive_permit_without_calls = "grpc-keepalive-permit-without-calls";
    grpc_http2_max_pings_without_data = "grpc-http2-max-pings-without-data";
    grpc_http2_min_recv_ping_interval_without_data = "grpc-http2-min-recv-ping-interval-without-data";
    grpc_http2_max_ping_strikes = "grpc-http2-max-ping-strikes";
    grpc_max_connection_age = "grpc-max-connection-age";
    grpc_max_connection_age_grace = "grpc-max-connection-age-grace";
    repoagent_directory = "repoagent-directory";
    cache_directory = "cache-directory";
    host_policy = "host-policy";
    exit_on_error = "exit-on-error";
    reuse_http_port = "reuse-http-port";
    reuse_grpc_port = "reuse-grpc-port";
    sagemaker_port = "sagemaker-port";
    sagemaker_safe_port_range = "sagemaker-safe-port-range";
    sagemaker_thread_count = "sagemaker-thread-count";
    vertex_ai_port = "vertex-ai-port";
    vertex_ai_thread_count = "vertex-ai-thread-count";
    vertex_ai_default_model = "vertex-ai-default-model";
    model_namespacing = "model-namespacing";
    allow_sagemaker = "allow-sagemaker";
    allow_vertex_ai = "allow-vertex-ai";
}

/// Whether a flag's value turns a feature on (tritonserver's boolean spellings).
fn is_true(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "true" | "1" | "on" | "yes"
    )
}

impl TritonFlags {
    /// The flags given that have no effect in Kiln (for the start-up log), or why Kiln
    /// cannot start as asked.
    pub fn check(&self) -> Result<Vec<String>, String> {
        let mut ignored = Vec::new();
        for (flag, value) in self.given() {
            let refuse = match flag {
                "model-namespacing" if is_true(&value) => {
                    Some("Kiln does not namespace models by repository; give models unique names")
                }
                "allow-sagemaker" | "allow-vertex-ai" if is_true(&value) => {
                    Some("Kiln has no SageMaker or Vertex AI front end")
                }
                _ => None,
            };
            if let Some(why) = refuse {
                return Err(format!("--{flag}={value}: {why}"));
            }
            let note = match flag {
                "exit-on-error" => " (Kiln keeps serving when a model fails to load; the model is UNAVAILABLE with the reason)",
                _ => "",
            };
            ignored.push(format!("--{flag}={value}{note}"));
        }
        Ok(ignored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: TritonFlags,
    }

    fn check(args: &[&str]) -> Result<Vec<String>, String> {
        let cli = Cli::try_parse_from(std::iter::once("kiln").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.flags.check()
    }

    #[test]
    fn tuning_flags_are_accepted_and_listed() {
        let notes = check(&[
            "--pinned-memory-pool-byte-size=268435456",
            "--cuda-memory-pool-byte-size=0:67108864",
            "--cuda-memory-pool-byte-size=1:67108864",
            "--exit-on-error=false",
        ])
        .expect("accepted");
        assert_eq!(notes.len(), 4);
        assert!(notes[3].contains("keeps serving"), "{notes:?}");
    }

    #[test]
    fn flags_asking_for_missing_features_are_refused() {
        for args in [&["--model-namespacing=true"][..], &["--allow-sagemaker=1"]] {
            assert!(check(args).is_err(), "{args:?}");
        }
    }
}
