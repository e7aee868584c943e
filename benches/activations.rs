//! CPU throughput of the activation pass: ResNet-50 forward at 224 px (random weights, same
//! shapes as torchvision's), and JPEG decode + preprocessing. The PyTorch side of the ratio is
//! `python3 tools/bench_torch_cpu.py`; docs/PERFORMANCE.md has the numbers and commands.
//!
//!     cargo bench --bench activations

use std::hint::black_box;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dnd::probe::{self, Preprocess};
use dnd::target::{random_resnet_weights, ResNet, TargetNetwork, Weights};

const BATCH: usize = 16;

fn resnet50_forward(c: &mut Criterion) {
    let w = Weights::from_tensors("resnet50 (random)", "memory", random_resnet_weights(50, 1000).unwrap()).unwrap();
    let net = ResNet::load(&w, 224, &Device::Cpu, DType::F32).unwrap();
    let fc = net.layers().len() - 1;
    let x = Tensor::randn(0f32, 1.0, (BATCH, 3, 224, 224), &Device::Cpu).unwrap();
    let mut g = c.benchmark_group("resnet50_cpu_f32");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    g.bench_function(format!("forward_b{BATCH}"), |b| b.iter(|| black_box(net.forward(&x, &[fc]).unwrap())));
    g.finish();
}

fn decode_preprocess(c: &mut Criterion) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/images/d_photo.jpg");
    let pre = Preprocess::imagenet();
    let mut out = vec![0f32; pre.len()];
    let mut g = c.benchmark_group("probe");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_preprocess_500x375_jpeg", |b| {
        b.iter(|| {
            let img = probe::decode(&path).unwrap();
            pre.apply(&img, &mut out);
            black_box(&out);
        })
    });
    g.finish();
}

criterion_group!(benches, resnet50_forward, decode_preprocess);
criterion_main!(benches);
