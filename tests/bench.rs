//! `dnd bench --quick`: every measurement of the GPU bench runs on the CPU at reduced sizes,
//! through the same code, and reports sane numbers as a table and as JSON.

mod common;

use common::{dnd, text};

#[test]
fn quick_bench_measures_every_stage_and_writes_json() {
    let home = tempfile::tempdir().unwrap();
    let json = home.path().join("bench.json");
    let o = dnd(
        home.path(),
        &[
            "bench",
            "--quick",
            "--device",
            "cpu",
            "--runs",
            "1",
            // A row whose warm-up takes over a second reports it rather than running again.
            "--budget",
            "1",
            // Each LLM answer of the end-to-end runs after 50 ms.
            "--llm-latency",
            "0.05",
            // ... always with the same concept, so the batch's second neuron repeats the first's.
            "--llm-concepts",
            "1",
            "--json",
            &json.display().to_string(),
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["quick"], true);
    assert_eq!(report["kernels"], "dnd's fused ops");
    assert!(report["cpu_threads"].as_u64().unwrap() >= 1);
    // Whether the decoder has its SIMD code depends on nasm at build time, which CI may lack.
    assert!(report["jpeg_simd"].is_boolean());
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    for want in [
        "resnet50.forward.b8",
        "resnet50.jpeg.b8",
        "resnet50.jpeg.decode.b8",
        "resnet50.first_call.b3",
        "resnet50.first_call.b4",
        "resnet50.forward.b4",
        "blip-large.vision.b2",
        "blip-large.captions.b2",
        "blip-large.captions.b4",
        "blip-base.captions.b2",
        "sd-turbo.unet.b8",
        "sd-turbo.vae.b8",
        "taesd.decode.b8",
        "sd-turbo.generate.steps1.b2",
        "sd-turbo.generate.steps4.b4",
        "sd-turbo.generate.steps50.b4",
        "sd-v1-4.unet.b16",
        "sd-v1-4.unet.b20",
        "sd-v1-4.unet.b20.unshared",
        "sd-v1-4.generate.steps50.b2",
        "clip-vit-b16.embed.b4",
        "e2e.fast.one",
        "e2e.fast.batch2",
        "e2e.fast-taesd.one",
        "e2e.fast-hybrid.one",
        "e2e.paper.one",
        "e2e.paper.batch2",
        "ops.input_pixels.dnd",
        "ops.input_pixels.candle",
        "ops.group_norm_silu.dnd",
        "ops.group_norm_silu.candle",
        "ops.group_norm_silu_channels_last.dnd",
        "ops.conv3x3_residual_relu.dnd",
        "ops.conv3x3_residual_relu.candle",
        "ops.conv3x3_channels_last.dnd",
        "ops.conv3x3_channels_last.candle",
        "ops.upsample_conv3x3.dnd",
        "ops.upsample_conv3x3.candle",
        "ops.layer_norm.dnd",
        "ops.layer_norm.candle",
        "ops.geglu.dnd",
        "ops.geglu.candle",
        "ops.linear_geglu.dnd",
        "ops.linear_geglu.separate",
        "ops.attention.dnd",
        "ops.attention.candle",
        "ops.attention_d64.dnd",
        "ops.attention_d64.candle",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
        assert!(out.contains(want), "{want} missing from the table:\n{out}");
    }
    let stage_names = [
        "activations",
        "crops",
        "captions",
        "concepts",
        "synthesis",
        "scoring",
    ];
    let is_stage = |name: &str| stage_names.iter().any(|s| name.ends_with(&format!(".{s}")));
    for r in rows {
        let v = r["value"].as_f64().unwrap();
        assert!(v.is_finite() && v > 0.0, "{r}");
        assert_eq!(r["runs"], 1, "{r}");
        let name = r["name"].as_str().unwrap();
        if name.ends_with(".reused") {
            assert!(v <= 1.0 && r["unit"] == "share", "{r}");
        } else if !is_stage(name) {
            assert!(r["peak_memory_bytes"].as_u64().unwrap() > 1 << 20, "{r}");
        }
    }
    // More denoising steps take longer; seconds per neuron are per neuron.
    let secs = |n: &str| {
        rows.iter().find(|r| r["name"] == n).unwrap()["seconds"]
            .as_f64()
            .unwrap()
    };
    assert!(secs("sd-turbo.generate.steps50.b4") > secs("sd-turbo.generate.steps1.b4"));
    let batch = rows
        .iter()
        .find(|r| r["name"] == "e2e.fast.batch2")
        .unwrap();
    assert!(
        (batch["value"].as_f64().unwrap() * 2.0 - batch["seconds"].as_f64().unwrap()).abs() < 1e-6
    );
    let row = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap();
    // A batch whose neurons share a concept copies its images rather than generating them
    // again: the second neuron's are all copies.
    let reused = row("e2e.fast.batch2.reused")["value"].as_f64().unwrap();
    assert_eq!(reused, 0.5, "{}", row("e2e.fast.batch2.reused"));
    // The mock LLM answered after its latency: a neuron's concepts wait for two rounds of calls
    // (simplifications, then summaries), none cached (each run has a store of its own).
    assert!(
        row("e2e.fast.one")["note"]
            .as_str()
            .unwrap()
            .contains("answering after 0.05 s"),
        "{}",
        row("e2e.fast.one")
    );
    let concepts = row("e2e.fast.one.concepts")["value"].as_f64().unwrap();
    assert!(concepts >= 0.09, "concepts took {concepts} s");
    // Each end-to-end row is split by stage (its one timed run here): the stages of the models'
    // work take most of a neuron's time and no more than all of it (the LLM's calls overlap
    // them).
    for e2e in ["e2e.fast.one", "e2e.fast.batch2", "e2e.paper.one"] {
        let per_neuron = rows.iter().find(|r| r["name"] == e2e).unwrap()["value"]
            .as_f64()
            .unwrap();
        let staged: f64 = stage_names
            .iter()
            .filter(|&&s| s != "concepts")
            .map(|s| {
                let name = format!("{e2e}.{s}");
                assert!(out.contains(&name), "{name} missing from the table:\n{out}");
                rows.iter().find(|r| r["name"] == name).unwrap()["value"]
                    .as_f64()
                    .unwrap()
            })
            .sum();
        assert!(
            staged <= per_neuron + 1e-9 && staged > 0.5 * per_neuron,
            "{e2e}: stages {staged} s of {per_neuron} s a neuron"
        );
    }

    // --only picks measurements by prefix.
    let o = dnd(
        home.path(),
        &[
            "bench", "--quick", "--runs", "1", "--only", "clip", "--device", "cpu",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("clip-vit-b16.embed.b4") && !out.contains("resnet50"),
        "{out}"
    );
}

#[test]
fn check_compares_every_model_family_from_seeded_weights() {
    // The CPU in f16 stands in for a device: every output differs from f32 a little (a real
    // comparison) and within the f16 tolerance (the seeded random weights are the same on every
    // load; different weights would differ by about 100%).
    let home = tempfile::tempdir().unwrap();
    let json = home.path().join("check.json");
    let o = dnd(
        home.path(),
        &[
            "bench",
            "--check",
            "--quick",
            "--device",
            "cpu",
            "--dtype",
            "f16",
            "--json",
            &json.display().to_string(),
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let checks: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for want in [
        "resnet50.layer4.b3",
        "resnet50.fc.b3",
        "clip-vit-b16.embed.b3",
        "blip-large.logits.b3",
        "blip-base.logits.b3",
        "sd-turbo.text.b3",
        "sd-turbo.unet.b3",
        "sd-turbo.vae.b5",
        "sd-v1-4.unet.b3",
        "sd-v1-4.vae.b5",
        "taesd.decode.b3",
        "ops.conv_channels_last",
        "ops.conv_grouped",
        "ops.conv_depthwise_channels_last",
        "ops.upsample_conv_channels_last",
        "ops.normalise_pixels",
        "ops.group_norm_silu_channels_last",
        "ops.layer_norm",
        "ops.attention",
        "ops.attention_d64",
        "ops.attention_d160",
        "ops.max_pool_channels_last",
        "ops.upsample_nearest2x_channels_last",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
        assert!(err.contains(want), "{want} missing from the lines:\n{err}");
    }
    for c in &checks {
        let e = c["error"].as_f64().unwrap();
        assert!(e > 0.0 && e <= 2e-2, "{c}");
        assert_eq!(c["tolerance"].as_f64(), Some(2e-2), "{c}");
        // Each fused op's check names the kernel family it isolates; a model's runs many.
        let name = c["name"].as_str().unwrap();
        assert_eq!(c.get("kernel").is_some(), name.starts_with("ops."), "{c}");
    }
    // The fused ops come first, so the first failure on a device names a kernel family.
    let first_model = names.iter().position(|n| !n.starts_with("ops.")).unwrap();
    assert!(
        names[first_model..].iter().all(|n| !n.starts_with("ops.")),
        "{names:?}"
    );
    assert_eq!(checks[0]["kernel"], "group_norm");
    assert!(
        out.contains(&format!("all {} checks passed", checks.len())),
        "{out}"
    );
}
