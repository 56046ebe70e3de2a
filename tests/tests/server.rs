//! End-to-end: real backends, broken libraries and panics against the kiln binary.
use std::time::Duration;

use kiln_tests::*;
use serde_json::json;

fn state_of(k: &Kiln, name: &str) -> (String, String) {
    let idx = k.index();
    let e = idx
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in index {idx:?}"));
    (
        e["state"].as_str().unwrap_or("").to_string(),
        e["reason"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn c_backend_and_broken_libraries() {
    if !have_dist() {
        return;
    }
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    // A C backend found in the model directory (Triton's search order).
    let d = add_model(r, "c_identity", &fp32_config("c_identity", ""));
    compile_c_backend(
        &c_source("identity_backend.c"),
        &d.join("libkiln_c_identity.so"),
        &[],
    );
    // Major mismatch, newer minor, a Triton backend, and a file that is not ELF.
    let d = add_model(r, "abi_major", &fp32_config("abi_major", ""));
    compile_c_backend(
        &c_source("identity_backend.c"),
        &d.join("libkiln_abi_major.so"),
        &["-DTEST_ABI_MAJOR=2"],
    );
    let d = add_model(r, "abi_minor", &fp32_config("abi_minor", ""));
    compile_c_backend(
        &c_source("identity_backend.c"),
        &d.join("libkiln_abi_minor.so"),
        &["-DTEST_ABI_MINOR=99"],
    );
    // A backend built against ABI 1.0 (shorter table, no model_autocomplete) still serves.
    let d = add_model(r, "abi_1_0", &fp32_config("abi_1_0", ""));
    compile_c_backend(
        &c_source("identity_backend.c"),
        &d.join("libkiln_abi_1_0.so"),
        &["-DTEST_ABI_1_0", "-DTEST_ABI_MINOR=0"],
    );
    // And one built against ABI 1.1 (no backend_configure), with backend settings given.
    let d = add_model(r, "abi_1_1", &fp32_config("abi_1_1", ""));
    compile_c_backend(
        &c_source("identity_backend.c"),
        &d.join("libkiln_abi_1_1.so"),
        &["-DTEST_ABI_1_1", "-DTEST_ABI_MINOR=1"],
    );
    let d = add_model(r, "triton_so", &fp32_config("triton_so", ""));
    compile_c_backend(
        &c_source("triton_backend.c"),
        &d.join("libkiln_triton_so.so"),
        &[],
    );
    let d = add_model(r, "not_elf", &fp32_config("not_elf", ""));
    std::fs::write(d.join("libkiln_not_elf.so"), "this is not a shared library").unwrap();
    add_model(r, "missing_backend", &fp32_config("nonexistent", ""));
    add_model(
        r,
        "bad_config",
        "backend: \"identity\"\nmax_batch_size: 8\nbogus_field: 3\n",
    );
    // A healthy Rust backend from the backend directory.
    add_model(r, "good", &fp32_config("identity", ""));

    let k = Kiln::start(
        r,
        &[
            "--strict-readiness",
            "false",
            "--backend-config",
            "abi_1_1,some-setting=1",
        ],
    );
    let (s, v) = k.post("/v2/models/c_identity/infer", &fp32_request(&[1.5, -2.0]));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["outputs"][0]["data"], json!([1.5, -2.0]));
    // Response parameters set through the C header's ABI 1.4 call.
    assert_eq!(v["parameters"], json!({"backend": "c", "scale": 0.5}));

    let (s, v) = k.post("/v2/models/abi_1_0/infer", &fp32_request(&[4.0]));
    assert_eq!(s, 200, "an ABI 1.0 backend must load: {v}");
    let (s, v) = k.post("/v2/models/abi_1_1/infer", &fp32_request(&[5.0]));
    assert_eq!(s, 200, "an ABI 1.1 backend must load: {v}");
    let (st, why) = state_of(&k, "abi_major");
    assert_eq!(st, "UNAVAILABLE");
    assert!(
        why.contains(&format!("ABI 2.{}", kiln_abi::KILN_ABI_MINOR))
            && why.contains(&format!("speaks ABI 1.{}", kiln_abi::KILN_ABI_MINOR)),
        "{why}"
    );
    let (_, why) = state_of(&k, "abi_minor");
    assert!(why.contains("ABI 1.99"), "{why}");
    let (_, why) = state_of(&k, "triton_so");
    assert!(why.contains("Triton C++ backend"), "{why}");
    let (_, why) = state_of(&k, "not_elf");
    assert!(why.contains("failed to open backend library"), "{why}");
    let (_, why) = state_of(&k, "missing_backend");
    assert!(why.contains("libkiln_nonexistent.so"), "{why}");
    let (_, why) = state_of(&k, "bad_config");
    assert!(
        why.contains("config.pbtxt:3:") && why.contains("bogus_field"),
        "{why}"
    );

    // Everything else keeps serving.
    let (s, v) = k.post("/v2/models/good/infer", &fp32_request(&[3.0]));
    assert_eq!((s, v["outputs"][0]["data"].clone()), (200, json!([3.0])));
    let (s, v) = k.post("/v2/models/abi_major/infer", &fp32_request(&[3.0]));
    assert_eq!(s, 503, "{v}");
    assert_eq!(k.get("/v2/models/abi_major/ready").0, 400);
}

#[test]
fn panics_never_cross_the_boundary() {
    if !have_dist() {
        return;
    }
    let repo = tempfile::tempdir().unwrap();
    let r = repo.path();
    for (name, fail) in [
        ("p_model_init", "model_init"),
        ("p_instance_init", "instance_init"),
        ("p_execute", "execute"),
        ("p_once", "execute_once"),
        ("p_error", "execute_error"),
    ] {
        add_model(
            r,
            name,
            &fp32_config(
                "faulty",
                &format!("parameters {{ key: \"fail_in\" value {{ string_value: \"{fail}\" }} }}"),
            ),
        );
    }
    add_model(r, "fine", &fp32_config("faulty", ""));
    let k = Kiln::start(r, &["--strict-readiness", "false"]);

    let (st, why) = state_of(&k, "p_model_init");
    assert_eq!(st, "UNAVAILABLE");
    assert!(
        why.contains("panicked") && why.contains("model_init"),
        "{why}"
    );
    let (st, why) = state_of(&k, "p_instance_init");
    assert_eq!(st, "UNAVAILABLE");
    assert!(why.contains("panicked"), "{why}");

    for _ in 0..3 {
        let (s, v) = k.post("/v2/models/p_execute/infer", &fp32_request(&[1.0]));
        assert_eq!(s, 500, "{v}");
        assert!(v["error"].as_str().unwrap().contains("panicked"), "{v}");
    }
    let (s, v) = k.post("/v2/models/p_error/infer", &fp32_request(&[1.0]));
    assert_eq!(s, 500);
    assert!(
        v["error"].as_str().unwrap().contains("execute failed"),
        "{v}"
    );

    // First execution panics; the instance is recreated and the next request succeeds.
    let (s, _) = k.post("/v2/models/p_once/infer", &fp32_request(&[1.0]));
    assert_eq!(s, 500);
    let (s, v) = k.post("/v2/models/p_once/infer", &fp32_request(&[4.0]));
    assert_eq!((s, v["outputs"][0]["data"].clone()), (200, json!([4.0])));

    let (s, v) = k.post("/v2/models/fine/infer", &fp32_request(&[2.0]));
    assert_eq!((s, v["outputs"][0]["data"].clone()), (200, json!([2.0])));
    // Failures are counted as failures, not successes.
    let (_, stats) = k.get("/v2/models/p_execute/stats");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["fail"]["count"],
        3
    );
    assert_eq!(
        stats["model_stats"][0]["inference_stats"]["success"]["count"],
        0
    );
}

#[test]
fn sigterm_finishes_in_flight_requests() {
    if !have_dist() {
        return;
    }
    let repo = tempfile::tempdir().unwrap();
    add_model(
        repo.path(),
        "slow",
        &fp32_config(
            "identity",
            "parameters { key: \"execute_delay_ms\" value { string_value: \"1500\" } }",
        ),
    );
    let mut k = Kiln::start(repo.path(), &[]);
    let url = k.url("/v2/models/slow/infer");
    let req = std::thread::spawn(move || {
        let r = reqwest::blocking::Client::new()
            .post(url)
            .json(&fp32_request(&[9.0]))
            .send()
            .unwrap();
        (r.status().as_u16(), r.text().unwrap())
    });
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(k.child.id() as i32, libc::SIGTERM) };
    let (status, body) = req.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("9.0"), "{body}");
    let exit = k.child.wait().unwrap();
    assert!(exit.success(), "kiln exited with {exit}");
}

#[test]
fn explicit_mode_load_unload_and_config_override() {
    if !have_dist() {
        return;
    }
    let repo = tempfile::tempdir().unwrap();
    add_model(repo.path(), "m", &fp32_config("identity", ""));
    let k = Kiln::start(repo.path(), &["--model-control-mode", "explicit"]);
    let idx = k.index();
    assert_eq!(
        idx,
        vec![json!({"name": "m"})],
        "unloaded models are listed by name only"
    );
    assert_eq!(k.post("/v2/models/m/infer", &fp32_request(&[1.0])).0, 404);
    assert_eq!(k.post("/v2/repository/models/m/load", &json!({})).0, 200);
    assert_eq!(k.get("/v2/models/m/ready").0, 200);
    assert_eq!(k.post("/v2/models/m/infer", &fp32_request(&[1.0])).0, 200);
    assert_eq!(k.post("/v2/repository/models/m/unload", &json!({})).0, 200);
    let (st, why) = state_of(&k, "m");
    assert_eq!((st.as_str(), why.as_str()), ("UNAVAILABLE", "unloaded"));
    // Load with a JSON config instead of config.pbtxt: max_batch_size 2.
    let cfg = json!({"backend": "identity", "max_batch_size": 2,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [-1]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [-1]}]});
    let (s, v) = k.post(
        "/v2/repository/models/m/load",
        &json!({"parameters": {"config": cfg.to_string()}}),
    );
    assert_eq!(s, 200, "{v}");
    let (_, c) = k.get("/v2/models/m/config");
    assert!(c.contains("\"max_batch_size\":2"), "{c}");
    let big = json!({"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [3, 1], "data": [1, 2, 3]}]});
    let (s, v) = k.post("/v2/models/m/infer", &big);
    assert_eq!(s, 400);
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("batch-size must be <= 2"),
        "{v}"
    );
    assert_eq!(k.post("/v2/repository/models/nope/load", &json!({})).0, 400);
}
