//! The `dnd` binary end to end on the fixtures: settings, layers, activations, errors.

mod common;

use std::path::Path;

use common::{dnd, fixture_model as model, fixtures, text};

#[test]
fn config_show_reports_sources_and_masks_secrets() {
    let home = tempfile::tempdir().unwrap();
    let o = dnd(home.path(), &["config", "path"]);
    let (path, _) = text(&o);
    let path = path.trim();
    assert!(
        path.ends_with("config.toml") && path.starts_with(&home.path().display().to_string()),
        "{path}"
    );
    std::fs::create_dir_all(Path::new(path).parent().unwrap()).unwrap();
    std::fs::write(
        path,
        "batch_size = 7\nhf_token = \"hf_secretsecretsecret\"\n",
    )
    .unwrap();
    let o = dnd(home.path(), &["config", "show", "--device", "cpu"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("batch_size") && out.contains("7") && out.contains(&format!("file {path}")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("device") && l.contains("cpu") && l.ends_with("# flag")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("offline") && l.contains("env HF_HUB_OFFLINE")),
        "{out}"
    );
    assert!(!out.contains("secretsecret"), "{out}");
}

#[test]
fn layers_lists_names_neurons_and_shapes() {
    let home = tempfile::tempdir().unwrap();
    let o = dnd(home.path(), &["layers", "--target", &model("vit_tiny")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("blocks.1") && out.contains("CLS + 14x14"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("head") && l.contains(" 10 ")),
        "{out}"
    );
}

#[test]
fn activations_json_lines_and_cache_hit() {
    let home = tempfile::tempdir().unwrap();
    let probe = fixtures().join("images").display().to_string();
    let args = [
        "activations",
        "--target",
        &model("resnet_basic"),
        "--probe",
        &probe,
        "--layer",
        "layer4",
        "--top",
        "3",
        "--format",
        "json",
    ];
    let o = dnd(home.path(), &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 64, "one line per neuron of layer4");
    assert_eq!(lines[5]["neuron"], 5);
    let top = lines[5]["top"].as_array().unwrap();
    assert_eq!(top.len(), 3);
    let vals: Vec<f64> = top
        .iter()
        .map(|t| t["activation"].as_f64().unwrap())
        .collect();
    assert!(vals.windows(2).all(|w| w[0] >= w[1]), "{vals:?}");
    assert!(
        top[0]["image"].as_str().unwrap().ends_with(".png")
            || top[0]["image"].as_str().unwrap().ends_with(".jpg")
    );
    assert!(!err.contains("from cache"), "{err}");
    let o2 = dnd(home.path(), &args);
    let (out2, err2) = text(&o2);
    assert_eq!(out, out2);
    assert!(err2.contains("from cache: layer4"), "{err2}");
}

#[test]
fn bad_inputs_give_one_clear_error() {
    let home = tempfile::tempdir().unwrap();
    let probe = fixtures().join("images").display().to_string();
    let mut cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec![
                "activations".into(),
                "--target".into(),
                model("resnet_basic"),
                "--probe".into(),
                probe.clone(),
                "--layer".into(),
                "layer7".into(),
            ],
            vec!["layer7", "layer4.0", "fc"],
        ),
        (
            vec![
                "activations".into(),
                "--target".into(),
                model("resnet_basic"),
                "--probe".into(),
                probe.clone(),
                "--layer".into(),
                "fc".into(),
                "--neuron".into(),
                "99".into(),
            ],
            vec!["neuron 99", "10 neurons"],
        ),
        (
            vec![
                "activations".into(),
                "--target".into(),
                model("resnet_basic"),
                "--probe".into(),
                "/no/such/dir".into(),
                "--layer".into(),
                "fc".into(),
            ],
            vec!["/no/such/dir", "--probe"],
        ),
        (
            vec!["layers".into(), "--target".into(), "/no/such/model".into()],
            vec!["/no/such/model", "--target"],
        ),
        (
            vec![
                "layers".into(),
                "--target".into(),
                "someone/some-model".into(),
            ],
            vec!["someone/some-model", "offline", "dnd models fetch"],
        ),
        (
            vec!["layers".into(), "--device".into(), "tpu".into()],
            vec!["tpu", "cuda:N"],
        ),
    ];
    // A folder of pickled PyTorch weights (a torchvision .pth, a training checkpoint .pth.tar):
    // the conversion to run.
    let pickled: Vec<_> = ["resnet18.pth", "resnet18_places365.pth.tar"]
        .into_iter()
        .map(|name| {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(name), b"pickle").unwrap();
            (name, dir)
        })
        .collect();
    for (name, dir) in &pickled {
        cases.push((
            vec![
                "layers".into(),
                "--target".into(),
                dir.path().display().to_string(),
            ],
            vec![
                "model.safetensors",
                name,
                "safetensors only",
                "save_file",
                "state_dict",
            ],
        ));
    }
    for (args, words) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = dnd(home.path(), &args);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        for w in words {
            assert!(err.contains(w), "{args:?}: {w:?} missing from: {err}");
        }
    }
    // A misspelt kernel family would turn nothing off, silently: refused with the names.
    let o = common::dnd_command(home.path(), &["layers", "--target", &model("resnet_basic")])
        .env("DND_GPU_KERNELS_OFF", "layer_norm, flash")
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    for w in [
        "DND_GPU_KERNELS_OFF",
        "\"flash\"",
        "flash_attention",
        "group_norm",
    ] {
        assert!(err.contains(w), "{w:?} missing from: {err}");
    }
}

#[test]
fn models_lists_every_model_with_status() {
    let home = tempfile::tempdir().unwrap();
    let o = dnd(home.path(), &["models", "--target", &model("resnet_basic")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("target") && l.contains("on disk") && l.contains("KiB")),
        "{out}"
    );
    for role in ["captioner", "synthesiser", "clip"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with(role) && l.contains("missing")),
            "{out}"
        );
    }
}

#[test]
fn hub_ids_resolve_from_the_standard_hf_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    // The layout huggingface_hub and hf-hub share: refs/<revision> holds a commit, and
    // snapshots/<commit>/ the files.
    let repo = home.path().join("hf/hub/models--someone--tiny-resnet");
    for (rev, commit) in [("main", "c0ffee"), ("v2", "beef01")] {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(rev), commit).unwrap();
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for f in ["model.safetensors", "config.json"] {
            std::fs::copy(
                fixtures().join("models/resnet_bottleneck").join(f),
                snap.join(f),
            )
            .unwrap();
        }
    }
    for id in ["someone/tiny-resnet", "someone/tiny-resnet@v2"] {
        let o = dnd(home.path(), &["layers", "--target", id]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{id}: {err}");
        assert!(
            out.contains(&format!("# {id}")) && out.contains("layer4.0"),
            "{out}"
        );
    }
    let o = dnd(
        home.path(),
        &["layers", "--target", "someone/tiny-resnet@v3"],
    );
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("someone/tiny-resnet@v3"),
        "{err}"
    );
}

/// A Stable Diffusion repo as transformers 5 saves a pipeline (tokenizer.json, no vocab.json
/// or merges.txt) downloads, counts as on disk in the HF cache, and loads offline.
/// `describe` of neuron 0 of layer4 on the fixtures (`llm` as [`common::describe_flags`] takes
/// it), with `flag` set to `value` instead.
fn one_neuron_with(home: &std::path::Path, llm: &str, flag: &str, value: &str) -> Vec<String> {
    let mut args = vec!["describe".to_string()];
    args.extend(common::describe_flags(home, llm, "resnet_basic"));
    let at = args.iter().position(|a| a == flag).unwrap();
    args[at + 1] = value.into();
    args.extend(["--layer", "layer4", "--neurons", "0"].map(String::from));
    args
}

#[test]
fn a_synthesiser_with_tokenizer_json_alone_downloads_and_loads() {
    let home = tempfile::tempdir().unwrap();
    let repo = tempfile::tempdir().unwrap();
    common::copy_dir(&fixtures().join("models/sd_tiny"), repo.path());
    let tokenizer = repo.path().join("tokenizer");
    std::fs::remove_dir_all(&tokenizer).unwrap();
    common::copy_dir(&fixtures().join("models/sd_tokenizer_json"), &tokenizer);
    let hub = common::mock_hub::MockHub::start(&[("org/sd-json", repo.path())]);
    let flags = [
        "--target",
        &model("resnet_basic"),
        "--captioner",
        &model("blip_tiny"),
        "--synthesiser",
        "org/sd-json",
        "--clip",
        &model("clip_tiny"),
        "--llm",
        "api",
    ];
    let mut fetch = common::dnd_command(home.path(), &[&["models", "fetch"][..], &flags].concat());
    fetch
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", hub.url());
    let o = fetch.output().unwrap();
    let (_, err) = text(&o);
    assert!(err.contains("synthesiser (org/sd-json): ready"), "{err}");
    // Offline now: the cache alone has what the folder needs.
    let o = dnd(home.path(), &[&["models"][..], &flags].concat());
    let (out, err) = text(&o);
    let line = out.lines().find(|l| l.starts_with("synthesiser")).unwrap();
    assert!(line.contains("on disk"), "{out}{err}");
    // And a neuron is described with it, offline.
    let llm = common::llm::MockLlm::start(&[], None, std::time::Duration::ZERO);
    let args = one_neuron_with(home.path(), &llm.url(), "--synthesiser", "org/sd-json");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = dnd(home.path(), &refs);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("1 described, 0 failed"), "{err}");
}

#[test]
fn a_sharded_local_llm_downloads_every_shard_and_describes_offline() {
    // llama_tiny is saved as transformers saves a large checkpoint: an index and four shards.
    let home = tempfile::tempdir().unwrap();
    let llama = fixtures().join("models/llama_tiny");
    let hub = common::mock_hub::MockHub::start(&[("org/llama-sharded", &llama)]);
    let flags = [
        "--target",
        &model("resnet_basic"),
        "--captioner",
        &model("blip_tiny"),
        "--synthesiser",
        &model("sd_tiny"),
        "--clip",
        &model("clip_tiny"),
        "--llm",
        "local",
        "--llm-local",
        "org/llama-sharded",
    ];
    let run = |args: &[&str]| {
        let mut c = common::dnd_command(home.path(), args);
        c.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", hub.url());
        c.output().unwrap()
    };
    // Before: the shards count in what is left to download.
    let shards: u64 = std::fs::read_dir(&llama)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name().to_string_lossy().starts_with("model-"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(shards > 400_000);
    let o = run(&[&["models"][..], &flags].concat());
    let (out, err) = text(&o);
    let line = out.lines().find(|l| l.starts_with("llm_local")).unwrap();
    assert!(line.contains("to download"), "{out}{err}");
    let o = run(&[&["models", "fetch"][..], &flags].concat());
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("llm_local (org/llama-sharded): ready"),
        "{err}"
    );
    let snapshot = home.path().join(
        "hf/hub/models--org--llama-sharded/snapshots/0123456789abcdef0123456789abcdef01234567",
    );
    for i in 1..=4 {
        let name = format!("model-0000{i}-of-00004.safetensors");
        assert_eq!(
            std::fs::read(snapshot.join(&name)).unwrap(),
            std::fs::read(llama.join(&name)).unwrap(),
            "{name}"
        );
    }
    // Offline now: `dnd models` counts the shards as on disk, and a neuron is described with
    // the model loaded from them.
    let o = dnd(home.path(), &[&["models"][..], &flags].concat());
    let (out, err) = text(&o);
    let line = out.lines().find(|l| l.starts_with("llm_local")).unwrap();
    assert!(line.contains("on disk"), "{out}{err}");
    let args = one_neuron_with(home.path(), "local", "--llm-local", "org/llama-sharded");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = dnd(home.path(), &refs);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("1 described, 0 failed"), "{err}");
    // Losing a shard is named, with the fix.
    std::fs::remove_file(
        std::fs::canonicalize(snapshot.join("model-00003-of-00004.safetensors")).unwrap(),
    )
    .unwrap();
    std::fs::remove_file(snapshot.join("model-00003-of-00004.safetensors")).unwrap();
    let o = dnd(home.path(), &refs);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}{err}");
    assert!(
        err.contains("model-00003-of-00004.safetensors") && err.contains("dnd models fetch"),
        "{err}"
    );
}

#[test]
fn models_lists_sizes_and_fetch_downloads_from_the_hub() {
    let home = tempfile::tempdir().unwrap();
    let blip = fixtures().join("models/blip_tiny");
    let hub = common::mock_hub::MockHub::start(&[("org/blip-tiny", &blip)]);
    let run = |args: &[&str]| {
        let mut c = common::dnd_command(home.path(), args);
        c.env_remove("HF_HUB_OFFLINE").env("HF_ENDPOINT", hub.url());
        c.output().unwrap()
    };
    let flags = [
        "--target",
        &model("resnet_basic"),
        "--captioner",
        "org/blip-tiny",
        "--synthesiser",
        &model("sd_tiny"),
        "--clip",
        &model("clip_tiny"),
        "--llm",
        "api",
    ];
    let o = run(&[&["models"][..], &flags].concat());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let line = out.lines().find(|l| l.starts_with("captioner")).unwrap();
    assert!(
        line.contains("missing") && line.contains("KiB to download"),
        "{out}"
    );

    let o = run(&[&["models", "fetch"][..], &flags].concat());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("captioner (org/blip-tiny): ready"), "{err}");
    let line = out.lines().find(|l| l.starts_with("captioner")).unwrap();
    assert!(line.contains("on disk"), "{out}");
    // What came down is the folder, byte for byte.
    let cached = std::fs::read(
        home.path()
            .join("hf/hub/models--org--blip-tiny/snapshots/0123456789abcdef0123456789abcdef01234567/model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        cached,
        std::fs::read(blip.join("model.safetensors")).unwrap()
    );
}
