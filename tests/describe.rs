//! `dnd describe` and `dnd export` end to end on the tiny fixtures (ResNet target, BLIP,
//! Stable Diffusion, CLIP written by the reference libraries) against an in-process
//! OpenAI-compatible mock: labels reach the store, LLM faults are retried or fail one neuron
//! while the batch goes on, and a kill -9 mid-batch loses nothing.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::llm::{Fault, MockLlm};
use common::{describe_flags, dnd, dnd_command, fixture_model, text};
use dnd::store::{Curation, Status, Store};

fn describe(home: &Path, llm: &str, extra: &[&str]) -> std::process::Output {
    describe_on("resnet_basic", home, llm, extra)
}

fn describe_on(target: &str, home: &Path, llm: &str, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["describe".to_string()];
    args.extend(describe_flags(home, llm, target));
    args.extend(extra.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    dnd(home, &refs)
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn describe_stores_labels_and_export_reads_them() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    let o = describe(
        home.path(),
        &llm.url(),
        &["--layer", "layer4", "--neurons", "0-2", "--format", "json"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3, "{out}");
    let images_root = home.path().join("out/dnd.sqlite.images");
    for (i, d) in lines.iter().enumerate() {
        assert_eq!(d["neuron"], i, "{d}");
        assert_eq!(d["layer"], "layer4");
        assert_eq!(d["status"], "described", "{d}");
        let labels = d["labels"].as_array().unwrap();
        assert!(!labels.is_empty() && labels.len() <= 3, "{d}");
        let candidates = d["candidates"].as_array().unwrap();
        assert!(!candidates.is_empty());
        // The label is the best-scored candidate, every candidate is cleaned.
        assert_eq!(labels[0]["label"], candidates[0]["concept"]);
        for c in candidates {
            let c = c["concept"].as_str().unwrap();
            assert_eq!(c, c.to_lowercase());
            assert!(
                !c.ends_with('.') && !c.contains(':') && !c.contains(','),
                "{c}"
            );
        }
        let top = d["top_images"].as_array().unwrap();
        assert!(!top.is_empty() && top.len() <= 4, "{d}");
        let acts: Vec<f64> = top
            .iter()
            .map(|t| t["activation"].as_f64().unwrap())
            .collect();
        assert!(
            acts.windows(2).all(|w| w[0] >= w[1]),
            "top images sorted: {acts:?}"
        );
        for c in d["crops"].as_array().unwrap() {
            let b: Vec<u64> = serde_json::from_value(c["box"].clone()).unwrap();
            assert!(b[0] < b[2] && b[1] < b[3], "{c}");
            assert!(images_root.join(c["file"].as_str().unwrap()).is_file());
        }
        assert_eq!(d["captions"].as_array().unwrap().len(), top.len());
        assert_eq!(d["simplified"].as_array().unwrap().len(), top.len());
        for set in d["synthetic"].as_array().unwrap() {
            let files = set["files"].as_array().unwrap();
            assert_eq!(files.len(), 2);
            for f in files {
                assert!(images_root.join(f.as_str().unwrap()).is_file());
            }
        }
        for stage in ["crops", "captions", "concepts", "synthesis", "scoring"] {
            assert!(d["timings"][stage].as_f64().is_some(), "{stage}: {d}");
        }
        assert!(d["models"]["synthesiser"]["source"]
            .as_str()
            .unwrap()
            .ends_with("sd_tiny"));
        assert_eq!(d["models"]["llm"], "mock");
        assert_eq!(d["seed"], 0);
    }

    // A concept two neurons share is generated once; `describe` says how many images it
    // copied (2 images a concept here).
    let mut concepts: Vec<&str> = lines
        .iter()
        .flat_map(|d| d["synthetic"].as_array().unwrap())
        .map(|s| s["concept"].as_str().unwrap())
        .collect();
    let sets = concepts.len();
    concepts.sort();
    concepts.dedup();
    let (made, copied) = (concepts.len() * 2, (sets - concepts.len()) * 2);
    assert!(
        copied > 0,
        "the mock's concepts for neurons 0-2 no longer repeat"
    );
    let said = format!("{made} synthetic images generated, {copied} copied");
    assert!(err.contains(&said), "{said} not in\n{err}");

    // The store has them; a rerun skips them and asks the LLM nothing.
    let asked = llm.requests();
    let again = describe(
        home.path(),
        &llm.url(),
        &["--layer", "layer4", "--neurons", "0-2"],
    );
    let (out2, err2) = text(&again);
    assert!(again.status.success(), "{err2}");
    assert_eq!(out2.matches("(stored)").count(), 3, "{out2}");
    assert!(err2.contains("3 already described"), "{err2}");
    assert_eq!(llm.requests(), asked);

    // --force recomputes everything, yet every LLM answer comes from the cache: same labels.
    let forced = describe(
        home.path(),
        &llm.url(),
        &[
            "--layer",
            "layer4",
            "--neurons",
            "0-2",
            "--format",
            "json",
            "--force",
        ],
    );
    assert!(forced.status.success());
    assert_eq!(
        llm.requests(),
        asked,
        "answers are cached by (model, prompt)"
    );
    let (forced_out, forced_err) = text(&forced);
    let relabelled = json_lines(&forced_out);
    for (a, b) in lines.iter().zip(&relabelled) {
        assert_eq!(a["labels"], b["labels"]);
    }
    // And every synthetic image from the store's index: a later invocation copies the images
    // of a concept any earlier one made.
    let said = format!("0 synthetic images generated, {} copied", sets * 2);
    assert!(forced_err.contains(&said), "{said} not in\n{forced_err}");
    // Unless their files are gone: then they are made again.
    std::fs::remove_dir_all(&images_root).unwrap();
    let remade = describe(
        home.path(),
        &llm.url(),
        &["--layer", "layer4", "--neurons", "0-2", "--force"],
    );
    let remade_err = text(&remade).1;
    assert!(remade.status.success(), "{remade_err}");
    let said = format!("{made} synthetic images generated, {copied} copied");
    assert!(remade_err.contains(&said), "{said} not in\n{remade_err}");

    let db = home.path().join("out/dnd.sqlite").display().to_string();
    let csv = dnd(home.path(), &["export", "--db", &db, "--format", "csv"]);
    let (csv_out, csv_err) = text(&csv);
    assert!(csv.status.success(), "{csv_err}");
    let rows: Vec<&str> = csv_out.lines().collect();
    assert_eq!(rows[0], "Neuron ID,Label 1,Label 2,Label 3");
    assert_eq!(rows.len(), 4, "{csv_out}");
    let first_label = lines[0]["labels"][0]["label"].as_str().unwrap();
    assert!(
        rows[1].starts_with(&format!("0,{first_label}")),
        "{csv_out}"
    );
    let json = dnd(
        home.path(),
        &[
            "export", "--db", &db, "--format", "json", "--layer", "layer4",
        ],
    );
    assert_eq!(json_lines(&text(&json).0).len(), 3);

    // Curation: a rejected label leaves the CSV unless asked for, an edited one leads it,
    // and a Status column appears.
    let store = Store::open(&home.path().join("out/dnd.sqlite")).unwrap();
    let target = lines[0]["target"].as_str().unwrap();
    store
        .curate(target, "layer4", 1, &Curation::Reject)
        .unwrap();
    store
        .curate(target, "layer4", 2, &Curation::Edit("my label".into()))
        .unwrap();
    let csv = dnd(home.path(), &["export", "--db", &db]);
    let out = text(&csv).0;
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows[0], "Neuron ID,Label 1,Label 2,Label 3,Status");
    assert_eq!(rows.len(), 3, "{out}");
    assert!(
        rows[1].starts_with("0,") && rows[1].ends_with(",unreviewed"),
        "{out}"
    );
    assert!(
        rows[2].starts_with("2,my label,") && rows[2].ends_with(",edited"),
        "{out}"
    );
    let all = dnd(home.path(), &["export", "--db", &db, "--include-rejected"]);
    assert!(text(&all)
        .0
        .lines()
        .any(|l| l.starts_with("1,") && l.ends_with(",rejected")));
    let json = dnd(
        home.path(),
        &[
            "export",
            "--db",
            &db,
            "--format",
            "json",
            "--include-rejected",
        ],
    );
    let records = json_lines(&text(&json).0);
    assert_eq!(records[2]["review"], "edited");
    assert_eq!(records[2]["curated_label"], "my label");
}

/// Layers without a spatial map (a classifier's fc, a ViT block's CLS dimension) skip the
/// crops and describe the same way.
#[test]
fn fc_and_vit_layers_describe_without_crops() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    for (target, layer) in [("resnet_bottleneck", "fc"), ("vit_tiny", "blocks.1")] {
        let o = describe_on(
            target,
            home.path(),
            &llm.url(),
            &["--layer", layer, "--neurons", "0,3", "--format", "json"],
        );
        let (out, err) = text(&o);
        assert!(o.status.success(), "{target} {layer}: {err}");
        let lines = json_lines(&out);
        assert_eq!(lines.len(), 2);
        for d in lines {
            assert_eq!(d["status"], "described", "{d}");
            assert!(d["crops"].as_array().unwrap().is_empty());
            assert!(d["top_images"]
                .as_array()
                .unwrap()
                .iter()
                .all(|t| t["crop"].is_null()));
        }
    }
}

#[test]
fn without_an_endpoint_the_local_llm_writes_the_concepts() {
    let home = tempfile::tempdir().unwrap();
    let o = describe(
        home.path(),
        "local",
        &["--layer", "layer4", "--neurons", "1", "--format", "json"],
    );
    let (out, err) = text(&o);
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{err}");
    let d = &lines[0];
    assert!(
        d["models"]["llm"].as_str().unwrap().starts_with("local:"),
        "{d}"
    );
    // A random tiny model writes gibberish: either it survives clean-up and the neuron is
    // labelled, or the neuron fails saying the answers were empty. Both are handled.
    match d["status"].as_str().unwrap() {
        "described" => assert!(o.status.success(), "{err}"),
        _ => assert!(d["error"].as_str().unwrap().contains("empty"), "{d}"),
    }
    // Its gibberish holds control characters (escape codes, line breaks); none may reach a
    // label, a candidate or a simplified caption, which terminals and files show.
    let texts = [&d["labels"], &d["candidates"], &d["simplified"]];
    for t in texts.iter().flat_map(|v| v.as_array().unwrap()) {
        let t = t.get("label").unwrap_or(t).as_str().unwrap_or_default();
        assert!(!t.chars().any(char::is_control), "{t:?}");
    }
}

#[test]
fn llm_faults_are_retried_and_the_batch_goes_on() {
    let home = tempfile::tempdir().unwrap();
    let faults = [
        (0, Fault::RateLimited),
        (1, Fault::ServerError),
        (2, Fault::Hang(Duration::from_secs(3))),
        (3, Fault::Malformed),
        (4, Fault::Empty),
    ];
    let llm = MockLlm::start(&faults, None, Duration::ZERO);
    let key = "sk-very-secret-key-123456";
    let o = describe(
        home.path(),
        &llm.url(),
        &[
            "--layer",
            "layer4",
            "--neurons",
            "0,1",
            "--format",
            "json",
            "--llm-concurrency",
            "1",
            "--llm-api-key",
            key,
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(!out.contains(key) && !err.contains(key));
    let db = std::fs::read(home.path().join("out/dnd.sqlite")).unwrap();
    assert!(!String::from_utf8_lossy(&db).contains(key));
    for d in json_lines(&out) {
        assert_eq!(d["status"], "described", "{d}");
    }
    for seen in [
        "HTTP 429",
        "HTTP 500",
        "no answer within",
        "not a chat completion",
        "no text",
    ] {
        assert!(
            err.contains(seen),
            "warning about {seen:?} expected in:\n{err}"
        );
    }
}

#[test]
fn a_down_endpoint_fails_each_neuron_clearly_and_the_batch_finishes() {
    let home = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/v1");
    let o = describe(
        home.path(),
        &url,
        &[
            "--layer",
            "layer4",
            "--neurons",
            "0-2",
            "--llm-retries",
            "1",
        ],
    );
    let (out, err) = text(&o);
    assert!(!o.status.success());
    assert_eq!(out.matches("FAILED").count(), 3, "{out}");
    assert!(out.contains("unreachable") && out.contains(&url), "{out}");
    assert!(err.contains("3 neuron(s) failed"), "{err}");
    let store = Store::open(&home.path().join("out/dnd.sqlite")).unwrap();
    let rows = store.rows(None, Some("layer4")).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r.status == Status::Failed && r.error.is_some()));
    // Captions were kept with the failure, for a look at what the LLM was asked.
    assert!(!rows[0].record["captions"].as_array().unwrap().is_empty());
}

#[test]
fn garbage_answers_fail_the_neuron_with_the_reason() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], Some(Fault::Malformed), Duration::ZERO);
    let o = describe(
        home.path(),
        &llm.url(),
        &["--layer", "layer4", "--neurons", "0", "--llm-retries", "1"],
    );
    let (out, _) = text(&o);
    assert!(!o.status.success());
    assert!(
        out.contains("FAILED") && out.contains("no usable answer"),
        "{out}"
    );
}

#[test]
fn missing_api_key_for_openai_is_refused_before_any_work() {
    let home = tempfile::tempdir().unwrap();
    let o = describe(
        home.path(),
        "https://api.openai.com/v1",
        &["--layer", "layer4", "--neurons", "0"],
    );
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("OPENAI_API_KEY"), "{err}");
}

#[test]
fn kill_mid_batch_then_rerun_loses_and_duplicates_nothing() {
    let home = tempfile::tempdir().unwrap();
    // Slow answers, so the batch is still running when it is killed.
    let llm = MockLlm::start(&[], None, Duration::from_millis(150));
    let mut args = vec!["describe".to_string()];
    args.extend(describe_flags(home.path(), &llm.url(), "resnet_basic"));
    args.extend(["--layer", "layer4", "--neurons", "0-5"].map(String::from));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = dnd_command(home.path(), &refs)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut finished = 0;
    while finished < 2 {
        let line = lines.next().expect("dnd ended before two neurons").unwrap();
        if !line.starts_with('#') && !line.trim_start().starts_with("neuron") {
            finished += 1;
        }
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let stored = Store::open(&home.path().join("out/dnd.sqlite"))
        .unwrap()
        .rows(None, None)
        .unwrap()
        .len();
    assert!(
        (2..6).contains(&stored),
        "killed mid-batch: {stored} stored"
    );

    let o = describe(
        home.path(),
        &llm.url(),
        &["--layer", "layer4", "--neurons", "0-5"],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.matches("(stored)").count() >= 2, "{out}");
    let store = Store::open(&home.path().join("out/dnd.sqlite")).unwrap();
    let rows = store.rows(None, Some("layer4")).unwrap();
    let neurons: Vec<usize> = rows.iter().map(|r| r.neuron).collect();
    assert_eq!(neurons, (0..6).collect::<Vec<_>>());
    assert!(rows
        .iter()
        .all(|r| r.status == Status::Described && r.label.is_some()));
}

/// Neuron 0 of layer4 described with `extra` flags: its JSON line.
fn describe_neuron_0(home: &Path, llm: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--layer", "layer4", "--neurons", "0", "--format", "json"];
    args.extend_from_slice(extra);
    let o = describe(home, llm, &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    json_lines(&out).remove(0)
}

#[test]
fn tiny_decoder_decodes_in_place_of_the_vae_and_is_part_of_the_key() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    let taesd = fixture_model("taesd_tiny");
    let line = describe_neuron_0(
        home.path(),
        &llm.url(),
        &["--decoder", "tiny", "--tiny-vae", &taesd],
    );
    assert_eq!(line["models"]["tiny_vae"]["source"], taesd.as_str());
    // The tiny decoder upsamples 8x where the fixture's VAE does 2x: its images are its own.
    let file = line["synthetic"][0]["files"][0].as_str().unwrap();
    let img = image::open(home.path().join("out/dnd.sqlite.images").join(file)).unwrap();
    assert_eq!(img.width(), 128, "{file}");
    // The same neuron with the VAE is another setting: described again, not skipped.
    let line = describe_neuron_0(home.path(), &llm.url(), &[]);
    assert!(line["models"].get("tiny_vae").is_none(), "{line}");
    let file = line["synthetic"][0]["files"][0].as_str().unwrap();
    let img = image::open(home.path().join("out/dnd.sqlite.images").join(file)).unwrap();
    assert_eq!(img.width(), 32);
}

#[test]
fn hybrid_decoder_ranks_the_tiny_decoders_images_and_shows_clip_the_vaes_of_the_top() {
    let home = tempfile::tempdir().unwrap();
    let llm = MockLlm::start(&[], None, Duration::ZERO);
    let taesd = fixture_model("taesd_tiny");
    let flags = |decoder| {
        [
            "--tiny-vae",
            &taesd,
            "--clip-top",
            "3",
            "--decoder",
            decoder,
        ]
    };
    let hybrid = describe_neuron_0(home.path(), &llm.url(), &flags("hybrid"));
    assert_eq!(hybrid["models"]["tiny_vae"]["source"], taesd.as_str());
    assert_eq!(hybrid["models"]["hybrid"], true);
    let root = home.path().join("out/dnd.sqlite.images");
    let width = |f: &serde_json::Value| {
        let f = f.as_str().unwrap();
        image::open(root.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .width()
    };
    // Every image the target ranked is the tiny decoder's (8x upsampling: 128 px); the VAE
    // (2x: 32 px) decoded again exactly the overall top 3 by activation.
    let sets = hybrid["synthetic"].as_array().unwrap();
    let mut all = Vec::new();
    let mut again = Vec::new();
    for (c, set) in sets.iter().enumerate() {
        let files = set["files"].as_array().unwrap();
        assert!(files.iter().all(|f| width(f) == 128), "{set}");
        for (i, a) in set["activations"].as_array().unwrap().iter().enumerate() {
            all.push((a.as_f64().unwrap(), c, i));
        }
        for (i, f) in set
            .get("vae_files")
            .and_then(|v| v.as_object())
            .into_iter()
            .flatten()
        {
            let i: usize = i.parse().unwrap();
            assert!(f.as_str().unwrap().ends_with(".vae.png"), "{f}");
            assert_eq!(width(f), 32, "{f}");
            assert!(files[i].as_str().unwrap() != f.as_str().unwrap());
            again.push((c, i));
        }
    }
    all.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut top: Vec<(usize, usize)> = all[..3].iter().map(|&(_, c, i)| (c, i)).collect();
    top.sort();
    again.sort();
    assert_eq!(again, top, "{hybrid}");

    // The tiny decoder alone is another setting (described again, not skipped): the same
    // images ranked the same, but CLIP saw the tiny decoder's images, so weights differ.
    let tiny = describe_neuron_0(home.path(), &llm.url(), &flags("tiny"));
    assert!(tiny["models"].get("hybrid").is_none(), "{tiny}");
    // `field` of each of `list`'s entries, by concept.
    let by_concept = |d: &serde_json::Value, list: &str, field: &str| {
        d[list]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["concept"].as_str().unwrap().to_string(), c[field].clone()))
            .collect::<BTreeMap<_, _>>()
    };
    let acts = |d| by_concept(d, "synthetic", "activations");
    let weights = |d| by_concept(d, "candidates", "weight");
    assert_eq!(acts(&hybrid), acts(&tiny));
    assert_ne!(weights(&hybrid), weights(&tiny));

    // A later invocation copies the hybrid run's images and, from the file kept beside them,
    // their latents: the VAE decodes them again to the same pixels.
    let vae_pixels = |d: &serde_json::Value| -> Vec<Vec<u8>> {
        let files = d["synthetic"].as_array().unwrap().iter();
        let files = files.flat_map(|s| s["vae_files"].as_object().into_iter().flatten());
        files
            .map(|(_, f)| {
                let img = image::open(root.join(f.as_str().unwrap())).unwrap();
                img.into_rgb8().into_raw()
            })
            .collect()
    };
    let before = vae_pixels(&hybrid);
    let mut args = vec!["--layer", "layer4", "--neurons", "0", "--format", "json"];
    args.extend_from_slice(&flags("hybrid"));
    args.push("--force");
    let o = describe(home.path(), &llm.url(), &args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let images = sets.len() * 2;
    let said = format!("0 synthetic images generated, {images} copied");
    assert!(err.contains(&said), "{said} not in\n{err}");
    let again = json_lines(&out).remove(0);
    assert_eq!(again["labels"], hybrid["labels"]);
    assert!(
        vae_pixels(&again) == before,
        "the VAE decoded other latents"
    );
}
