//! Whole-layer activation extraction and its on-disk cache.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use dnd::activations::{self, ActivationCache, ExtractOptions, LayerActivations, Pool, Report};
use dnd::probe::ProbeSet;
use dnd::target::Target;

fn probe_copy(dir: &Path) -> ProbeSet {
    let src = fixtures().join("images");
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    ProbeSet::open(dir).unwrap()
}

fn run(
    target: &Target,
    probe: &ProbeSet,
    layers: &[&str],
    cache: Option<&ActivationCache>,
) -> (Vec<LayerActivations>, Report) {
    let idx: Vec<usize> = layers
        .iter()
        .map(|l| target.layer_index(l).unwrap())
        .collect();
    activations::extract(
        target,
        probe,
        &idx,
        ExtractOptions {
            pool: Pool::Mean,
            batch_size: 3,
            cache,
        },
        &mut |_| {},
        &AtomicBool::new(false),
    )
    .unwrap()
}

#[test]
fn activations_equal_a_direct_forward_pass_and_layers_share_one_pass() {
    let dir = tempfile::tempdir().unwrap();
    let probe = probe_copy(dir.path());
    let target = load_fixture_target("resnet_basic");
    let (together, _) = run(&target, &probe, &["layer3", "fc", "layer4"], None);
    let (alone, _) = run(&target, &probe, &["layer4"], None);
    assert_eq!(together[2], alone[0]);
    assert_eq!(
        together
            .iter()
            .map(|a| a.layer.as_str())
            .collect::<Vec<_>>(),
        ["layer3", "fc", "layer4"]
    );
    // The fixture images in probe order are exactly the torchvision-preprocessed batch, so fc
    // activations equal the PyTorch logits (up to the f16 rounding of the stored inputs).
    let reference = reference("models/resnet_basic.reference.safetensors");
    let logits = reference["logits"].to_vec2::<f32>().unwrap();
    let fc = &together[1];
    assert_eq!(
        fc.images,
        [
            "a_landscape.png",
            "b_portrait.png",
            "c_small.png",
            "d_photo.jpg"
        ]
    );
    for (img, row) in logits.iter().enumerate() {
        for (n, want) in row.iter().enumerate() {
            let got = fc.neuron(n)[img];
            assert!(
                (got - want).abs() < 2e-2,
                "image {img} neuron {n}: {got} vs {want}"
            );
        }
    }
    // Top-K comes from the same numbers.
    let top = fc.top_k(3, 2);
    let mut col: Vec<(usize, f32)> = logits.iter().enumerate().map(|(i, r)| (i, r[3])).collect();
    col.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_eq!(
        top.iter().map(|t| t.0).collect::<Vec<_>>(),
        col[..2].iter().map(|t| t.0).collect::<Vec<_>>()
    );
}

#[test]
fn second_run_is_served_from_the_cache_and_changes_invalidate_it() {
    let probe_dir = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ActivationCache::new(cache_dir.path());
    let mut probe = probe_copy(probe_dir.path());
    let target = load_fixture_target("resnet_basic");

    let (first, report) = run(&target, &probe, &["layer4"], Some(&cache));
    assert!(report.cached.is_empty());
    let (again, report) = run(&target, &probe, &["layer4"], Some(&cache));
    assert_eq!(report.cached, ["layer4"]);
    assert_eq!(first, again);
    // A different layer or pooling is its own entry.
    let (_, report) = run(&target, &probe, &["layer3", "layer4"], Some(&cache));
    assert_eq!(report.cached, ["layer4"]);

    // The probing set changes: a new image.
    std::fs::copy(
        fixtures().join("images/c_small.png"),
        probe_dir.path().join("e_copy.png"),
    )
    .unwrap();
    probe = ProbeSet::open(probe_dir.path()).unwrap();
    let (changed, report) = run(&target, &probe, &["layer4"], Some(&cache));
    assert!(report.cached.is_empty());
    assert_eq!(changed[0].images.len(), 5);

    // The weights change.
    let model_dir = tempfile::tempdir().unwrap();
    edited_fixture_model("resnet_basic", model_dir.path(), |w| {
        let scaled = (w["layer4.0.conv2.weight"].clone() * 1.5).unwrap();
        w.insert("layer4.0.conv2.weight".into(), scaled);
    });
    let other = try_load_target(model_dir.path()).unwrap();
    assert_ne!(other.weights_hash, target.weights_hash);
    let (_, report) = run(&other, &probe, &["layer4"], Some(&cache));
    assert!(report.cached.is_empty());
}

#[test]
fn interrupted_runs_leave_no_cache_and_damaged_files_are_recomputed() {
    let probe_dir = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ActivationCache::new(cache_dir.path());
    let probe = probe_copy(probe_dir.path());
    let target = load_fixture_target("resnet_basic");
    let l4 = target.layer_index("layer4").unwrap();
    let path = cache.path_for(&target, "layer4", Pool::Mean, &probe);

    // Cancelled after the first batch (as Ctrl-C does): an error, and nothing on disk.
    let cancel = AtomicBool::new(false);
    let r = activations::extract(
        &target,
        &probe,
        &[l4],
        ExtractOptions {
            pool: Pool::Mean,
            batch_size: 1,
            cache: Some(&cache),
        },
        &mut |p: activations::Progress| {
            if p.done >= 1 {
                cancel.store(true, Ordering::SeqCst);
            }
        },
        &cancel,
    );
    assert!(matches!(r, Err(dnd::Error::Cancelled)), "{r:?}");
    assert!(!path.exists());

    // A process killed mid-write leaves only a temporary file, which is never read as a cache.
    std::fs::create_dir_all(cache.dir()).unwrap();
    let tmp = path.with_extension("safetensors.tmp.99999");
    std::fs::write(&tmp, b"half a file").unwrap();
    let (good, report) = run(&target, &probe, &["layer4"], Some(&cache));
    assert!(report.cached.is_empty());
    assert!(path.exists());

    // A damaged cache file (truncated) is detected, removed and recomputed.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (recomputed, report) = run(&target, &probe, &["layer4"], Some(&cache));
    assert!(report.cached.is_empty());
    assert_eq!(recomputed, good);
    let (_, report) = run(&target, &probe, &["layer4"], Some(&cache));
    assert_eq!(report.cached, ["layer4"]);
}

#[test]
fn skipped_images_are_reported_and_excluded() {
    let dir = tempfile::tempdir().unwrap();
    let _ = probe_copy(dir.path());
    std::fs::write(dir.path().join("broken.jpg"), b"\xFF\xD8\xFF garbage").unwrap();
    let probe = ProbeSet::open(dir.path()).unwrap();
    let target = load_fixture_target("vit_tiny");
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = ActivationCache::new(cache_dir.path());
    let (acts, report) = run(&target, &probe, &["norm"], Some(&cache));
    assert_eq!(acts[0].images.len(), 4);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].0, "broken.jpg");
    // The cache remembers what was skipped.
    let (_, report) = run(&target, &probe, &["norm"], Some(&cache));
    assert_eq!(report.cached, ["norm"]);
    assert_eq!(report.skipped.len(), 1);
}

#[test]
fn neuron_maps_on_chosen_images() {
    let target = load_fixture_target("resnet_bottleneck");
    let imgs = vec![
        fixtures().join("images/a_landscape.png"),
        fixtures().join("images/d_photo.jpg"),
    ];
    let l3 = target.layer_index("layer3").unwrap();
    let reference =
        reference("models/resnet_bottleneck.reference.safetensors")["map/layer3"].clone();
    // A channel that is not all zero after ReLU on both images, so the comparison means something.
    let neuron = (0..reference.dim(1).unwrap())
        .find(|&c| {
            [0, 3].iter().all(|&i| {
                let m = reference
                    .get(i)
                    .unwrap()
                    .get(c)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                m.to_scalar::<f32>().unwrap() > 0.1
            })
        })
        .unwrap();
    let maps = activations::neuron_maps(&target, l3, neuron, &imgs, 8).unwrap();
    assert_eq!(maps.len(), 2);
    assert_eq!((maps[0].height, maps[0].width), (14, 14));
    // Same numbers as the PyTorch feature map of those images.
    let want = reference
        .narrow(1, neuron, 1)
        .unwrap()
        .flatten_from(1)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (got, want) in [(&maps[0], &want[0]), (&maps[1], &want[3])] {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = got
            .values
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err / scale < 1e-2, "map error {err} of {scale}");
    }
    let fc = target.layer_index("fc").unwrap();
    assert!(activations::neuron_maps(&target, fc, 0, &imgs, 8)
        .unwrap()
        .is_empty());
    assert!(activations::neuron_maps(&target, l3, 10_000, &imgs, 8).is_err());
}
