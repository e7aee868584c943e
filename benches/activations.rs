//! CPU throughput of the activation pass: ResNet-50 forward at 224 px (random weights, same
//! shapes as torchvision's), and JPEG decode + preprocessing. The PyTorch side of the ratio is
//! `python3 tools/bench_torch_cpu.py`; docs/PERFORMANCE.md has the numbers and commands.
//!
//!     cargo bench --bench activations

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::atomic::AtomicBool;

use dnd::activations::{extract, ActivationCache, ExtractOptions, LayerActivations, Pool};
use dnd::probe::{self, Preprocess, ProbeSet};
use dnd::target::{random_resnet_weights, ResNet, Target, TargetNetwork, Weights};

const BATCH: usize = 16;

fn resnet50_forward(c: &mut Criterion) {
    let w = Weights::from_tensors(
        "resnet50 (random)",
        "memory",
        random_resnet_weights(50, 1000).unwrap(),
    )
    .unwrap();
    let net = ResNet::load(&w, 224, &Device::Cpu, DType::F32).unwrap();
    let fc = net.info().layers.len() - 1;
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 224, 224), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("resnet50_cpu_f32");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function(format!("forward_b{BATCH}"), |b| {
        b.iter(|| black_box(net.forward(&x, &[fc]).unwrap()))
    });
    g.finish();
}

/// One JPEG decoded, resized, cropped and normalised on one thread, as the activation pass does
/// on the CPU: the fixture photo (landscape) and the same photo turned (portrait).
fn decode_preprocess(c: &mut Criterion) {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/d_photo.jpg");
    let dir = tempfile::tempdir().unwrap();
    let portrait = dir.path().join("portrait.jpg");
    let turned = image::imageops::rotate90(&probe::decode(&path).unwrap());
    let mut file = std::fs::File::create(&portrait).unwrap();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut file, 92)
        .encode_image(&turned)
        .unwrap();
    let pre = Preprocess::imagenet();
    let mut pixels = vec![0u8; pre.values_per_image()];
    let mut out = vec![0f32; pre.values_per_image()];
    let mut g = c.benchmark_group("probe");
    g.throughput(Throughput::Elements(1));
    for (name, file) in [("500x375", &path), ("375x500", &portrait)] {
        g.bench_function(format!("decode_preprocess_{name}_jpeg"), |b| {
            b.iter(|| {
                pre.load_into(file, &mut pixels).unwrap();
                pre.normalise(&pixels, &mut out);
                black_box(&out);
            })
        });
    }
    g.finish();
}

/// The probing set's batches as `extract` takes them on the CPU: 128 photo-sized JPEGs decoded,
/// resized and cropped on every core, 32 a batch, each normalised into the network's input.
fn decode_batches(c: &mut Criterion) {
    let src =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/d_photo.jpg");
    let dir = tempfile::tempdir().unwrap();
    for i in 0..128 {
        std::fs::copy(&src, dir.path().join(format!("{i:03}.jpg"))).unwrap();
    }
    let set = ProbeSet::open(dir.path()).unwrap();
    let pre = Preprocess::imagenet();
    let cancel = AtomicBool::new(false);
    let mut g = c.benchmark_group("probe");
    g.throughput(Throughput::Elements(set.len() as u64));
    g.sample_size(10);
    g.bench_function("batches_128_jpegs_b32", |b| {
        b.iter(|| {
            probe::for_each_batch(&set.images, &pre, 32, &cancel, |batch| {
                black_box(pre.input(&batch.pixels, &Device::Cpu, DType::F32)?);
                Ok(())
            })
            .unwrap()
        })
    });
    g.finish();
}

/// A cache hit at full scale: 50,000 images x 2,048 neurons (ResNet-50 layer4): listing the
/// probing set, reading the cached matrix and every neuron's top 10.
fn cache_hit_50k(c: &mut Criterion) {
    const IMAGES: usize = 50_000;
    let root = std::env::temp_dir().join("dnd-bench-cache-hit");
    let probe_dir = root.join("probe");
    if !probe_dir.join("complete.txt").exists() {
        for d in 0..50 {
            std::fs::create_dir_all(probe_dir.join(format!("{d:02}"))).unwrap();
        }
        // Listing and fingerprinting never decode, so empty files stand in for photos here.
        for i in 0..IMAGES {
            std::fs::write(probe_dir.join(format!("{:02}/{i:05}.jpg", i % 50)), b"").unwrap();
        }
        std::fs::write(
            probe_dir.join("complete.txt"),
            b"not an image: marks the set as written",
        )
        .unwrap();
    }
    let w = Weights::from_tensors(
        "resnet50 (random)",
        "memory",
        random_resnet_weights(50, 1000).unwrap(),
    )
    .unwrap();
    let target = Target {
        net: Box::new(ResNet::load(&w, 224, &Device::Cpu, DType::F32).unwrap()),
        preprocess: Preprocess::imagenet(),
        name: "resnet50 (random)".into(),
        weights_hash: "bench".into(),
    };
    let layer = target.layer_index("layer4").unwrap();
    let cache = ActivationCache::new(&root.join("cache"));
    let probe_set = ProbeSet::open(&probe_dir).unwrap();
    let path = cache.path_for(&target, "layer4", Pool::Mean, &probe_set);
    if !path.exists() {
        let images: Vec<String> = probe_set.images.iter().map(|i| i.rel.clone()).collect();
        let values = Tensor::randn(0f32, 1.0, 2048 * IMAGES, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let acts = LayerActivations::new("layer4".into(), Pool::Mean, images, 2048, values);
        cache.store(&path, &acts, &[]).unwrap();
    }
    let mut g = c.benchmark_group("cache_hit");
    g.sample_size(10);
    g.bench_function("list_load_top10_50000x2048", |b| {
        b.iter(|| {
            let probe_set = ProbeSet::open(&probe_dir).unwrap();
            let opts = ExtractOptions {
                pool: Pool::Mean,
                batch_size: 32,
                cache: Some(&cache),
            };
            let (acts, report) = extract(
                &target,
                &probe_set,
                &[layer],
                opts,
                &mut |_| {},
                &AtomicBool::new(false),
            )
            .unwrap();
            assert_eq!(report.cached.len(), 1);
            black_box(acts[0].top_k_all(10));
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    resnet50_forward,
    decode_preprocess,
    decode_batches,
    cache_hit_50k
);
criterion_main!(benches);
