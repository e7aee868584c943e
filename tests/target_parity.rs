//! Our target networks against PyTorch (torchvision/timm) on random-weight fixtures written by
//! tools/gen_fixtures.py: pooled activations, spatial maps and logits within 1e-4 relative.

mod common;

use candle_core::DType;
use common::*;
use dnd::activations::{maps_of, pool_output, Pool};
use dnd::hub::Role;
use dnd::target::LayerKind;

const TOL: f32 = 1e-4;

/// Every layer the target lists, in order.
fn layer_names(target: &dnd::target::Target) -> Vec<String> {
    target.layers().iter().map(|l| l.name.clone()).collect()
}

fn taps_of(target: &dnd::target::Target, names: &[&str]) -> Vec<usize> {
    names
        .iter()
        .map(|n| target.layer_index(n).unwrap())
        .collect()
}

/// torchvision's (and timm's) names of the layers the ResNet fixtures' references hold.
const TORCHVISION_TAPS: [&str; 12] = [
    "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer2.0", "layer3", "layer4",
    "layer4.0", "avgpool", "fc",
];

/// A convolutional fixture's (ResNet's, ConvNeXt's) layers `names`, tapped in one pass, mean- and max-pooled, against the
/// reference; then, when given, channel 5 of layer `map.0`'s spatial map against the
/// reference's `map.1`.
fn check_cnn(name: &str, names: &[&str], map: Option<(&str, &str)>) -> dnd::target::Target {
    check_cnn_at(name, names, map, 224)
}

/// [`check_cnn`] on the fixture batch's top-left `size` pixels.
fn check_cnn_at(
    name: &str,
    names: &[&str],
    map: Option<(&str, &str)>,
    size: usize,
) -> dnd::target::Target {
    let target = load_fixture_target(name);
    let reference = reference(&format!("models/{name}.reference.safetensors"));
    let x = fixture_batch()
        .narrow(2, 0, size)
        .unwrap()
        .narrow(3, 0, size)
        .unwrap();
    let taps = taps_of(&target, names);
    // All taps in one forward pass.
    let outs = target.net.forward(&x, &taps).unwrap();
    for ((n, out), &l) in names.iter().zip(&outs).zip(&taps) {
        let kind = target.layer(l).kind;
        for pool in [Pool::Mean, Pool::Max] {
            let key = format!("{pool}/{n}");
            let Some(want) = reference.get(&key) else {
                continue;
            };
            let got = pool_output(kind, out, pool).unwrap();
            let e = rel_err(&got, want);
            assert!(e < TOL, "{name} {key}: relative error {e}");
        }
    }
    if let Some(logits) = reference.get("logits") {
        assert!(rel_err(&outs[names.len() - 1], logits) < TOL);
    }
    // The layer's spatial map equals PyTorch's feature map channel.
    let Some((layer, key)) = map else {
        return target;
    };
    let l = target.layer_index(layer).unwrap();
    let out = target.net.forward(&x, &[l]).unwrap().remove(0);
    assert_eq!(target.layer(l).kind, LayerKind::Spatial);
    let maps = maps_of(LayerKind::Spatial, &out, 5).unwrap();
    let want = reference[key].narrow(1, 5, 1).unwrap().squeeze(1).unwrap();
    let got: Vec<f32> = maps.iter().flat_map(|m| m.values.clone()).collect();
    let got = candle_core::Tensor::from_vec(got, want.dims(), &candle_core::Device::Cpu).unwrap();
    assert!(rel_err(&got, &want) < TOL);
    target
}

#[test]
fn resnet_basic_blocks_match_pytorch() {
    check_cnn(
        "resnet_basic",
        &TORCHVISION_TAPS,
        Some(("layer3", "map/layer3")),
    );
}

#[test]
fn resnet_bottleneck_blocks_match_pytorch() {
    check_cnn(
        "resnet_bottleneck",
        &TORCHVISION_TAPS,
        Some(("layer3", "map/layer3")),
    );
}

#[test]
fn a_cifar_resnet_runs_its_3x3_stem_without_stride_or_pool() {
    // conv1 replaced by a 3x3 convolution of stride 1 and the max pool by an identity, as
    // CIFAR checkpoints of timm's and torchvision's ResNets are made.
    let t = check_cnn(
        "resnet_cifar",
        &TORCHVISION_TAPS,
        Some(("layer4", "map/layer4")),
    );
    let side = |name: &str| t.layer(t.layer_index(name).unwrap()).shape[1];
    // timm's config.json: 32 px images; the stem and its "pool" keep their size.
    assert_eq!(t.preprocess.crop, 32);
    assert_eq!(
        (side("conv1"), side("maxpool"), side("layer4")),
        (32, 32, 4)
    );
}

#[test]
fn resnext_grouped_convolutions_match_pytorch() {
    // timm's (and torchvision's: the same names) ResNeXt: grouped 3x3s in every bottleneck.
    let t = check_cnn("resnext", &TORCHVISION_TAPS, Some(("layer4", "map/layer4")));
    assert!(
        t.net.info().architecture.starts_with("resnext_4x2d"),
        "{}",
        t.net.info().architecture
    );
}

#[test]
fn resnet_d_deep_stem_and_average_pool_shortcuts_match_pytorch() {
    // timm's tiered deep stem and avg_down shortcuts, at 208 px: layer4's shortcut pools a
    // 13x13 map, its last windows overhanging it (PyTorch's ceil mode).
    let t = check_cnn_at(
        "resnet_d",
        &TORCHVISION_TAPS,
        Some(("layer4", "map/layer4")),
        208,
    );
    let arch = &t.net.info().architecture;
    assert!(
        arch.contains("deep stem") && arch.contains("average-pool shortcuts"),
        "{arch}"
    );
    let side = |name: &str| t.layer(t.layer_index(name).unwrap()).shape[1];
    assert_eq!(
        (side("conv1"), side("maxpool"), side("layer4")),
        (112, 56, 7)
    );
}

#[test]
fn convnexts_v1_and_v2_match_their_libraries_under_their_own_layer_names() {
    // Depths [1, 2, 1, 1]: every layer, and channel 5 of the third stage's map.
    let timm = [
        "stem",
        "stages.0",
        "stages.0.blocks.0",
        "stages.1",
        "stages.1.blocks.0",
        "stages.1.blocks.1",
        "stages.2",
        "stages.2.blocks.0",
        "stages.3",
        "stages.3.blocks.0",
        "head.global_pool",
        "head.norm",
        "head.fc",
    ];
    let torchvision = [
        "features.0",
        "features.1",
        "features.1.0",
        "features.3",
        "features.3.0",
        "features.3.1",
        "features.5",
        "features.5.0",
        "features.7",
        "features.7.0",
        "avgpool",
        "classifier.0",
        "classifier.2",
    ];
    let transformers = |p: &str, head: bool| {
        prefixed(
            p,
            &[
                "embeddings",
                "encoder.stages.0",
                "encoder.stages.0.layers.0",
                "encoder.stages.1",
                "encoder.stages.1.layers.0",
                "encoder.stages.1.layers.1",
                "encoder.stages.2",
                "encoder.stages.2.layers.0",
                "encoder.stages.3",
                "encoder.stages.3.layers.0",
                "layernorm",
            ],
            head,
        )
    };
    let owned = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // timm's head with a hidden layer (convnext_large_mlp's) before its classifier.
    let mut with_head_mlp = owned(&timm);
    with_head_mlp.insert(timm.len() - 1, "head.pre_logits".into());
    for (name, layers, map) in [
        ("convnext_timm", owned(&timm), "stages.2"),
        ("convnext_timm_conv_mlp", owned(&timm), "stages.2"),
        ("convnext_torchvision", owned(&torchvision), "features.5"),
        (
            "convnext_transformers",
            transformers("convnext.", true),
            "convnext.encoder.stages.2",
        ),
        (
            "convnext_transformers_model",
            transformers("", false),
            "encoder.stages.2",
        ),
        ("convnextv2_timm", owned(&timm), "stages.2"),
        ("convnext_timm_head_mlp", with_head_mlp, "stages.2"),
        (
            "convnextv2_transformers",
            transformers("convnextv2.", true),
            "convnextv2.encoder.stages.2",
        ),
    ] {
        // All in one pass; the reference holds seven of the ten block and stage layers.
        let tapped: Vec<&str> = layers.iter().map(|n| n.as_str()).collect();
        let key = format!("map/{map}");
        let t = check_cnn(name, &tapped, Some((map, &key)));
        assert_eq!(layer_names(&t), layers, "{name}");
        assert_eq!(t.layer(t.layer_index(map).unwrap()).shape, [24, 14, 14]);
        let arch = &t.net.info().architecture;
        let family = name.split('_').next().unwrap();
        assert!(arch.starts_with(&format!("{family} (")), "{name}: {arch}");
    }
}

#[test]
fn vgg_and_alexnet_match_torchvision() {
    // torchvision's classes at small widths: every module of `features` a layer, the adaptive
    // pool, the classifier's linear layers and ReLUs; at 200 px the pool resamples.
    for (name, features, classifier) in [
        (
            "vgg",
            19,
            [
                "classifier.0",
                "classifier.1",
                "classifier.3",
                "classifier.4",
                "classifier.6",
            ],
        ),
        (
            "vgg_bn",
            26,
            [
                "classifier.0",
                "classifier.1",
                "classifier.3",
                "classifier.4",
                "classifier.6",
            ],
        ),
        (
            "alexnet",
            13,
            [
                "classifier.1",
                "classifier.2",
                "classifier.4",
                "classifier.5",
                "classifier.6",
            ],
        ),
    ] {
        let mut layers: Vec<String> = (0..features).map(|i| format!("features.{i}")).collect();
        layers.push("avgpool".into());
        layers.extend(classifier.iter().map(|c| c.to_string()));
        let names: Vec<&str> = layers.iter().map(|n| n.as_str()).collect();
        let last_relu = format!("features.{}", features - 2);
        let key = format!("map/{last_relu}");
        let t = check_cnn_at(name, &names, Some((&last_relu, &key)), 200);
        assert_eq!(layer_names(&t), layers, "{name}");
        // Listed at the default 224 px: VGG's five pools give 7x7, AlexNet's stride-4 stem and
        // three 3x3 pools 6x6, each its adaptive pool's own size.
        let side = if name == "alexnet" { 6 } else { 7 };
        let last = t.layer(
            t.layer_index(&format!("features.{}", features - 1))
                .unwrap(),
        );
        assert_eq!(last.shape[1..], [side, side], "{name}");
    }
}

#[test]
fn grouped_convolution_networks_in_half_precision_stay_within_its_rounding() {
    // f16 on the CPU takes the path a GPU does (candle's grouped conv2d, the GRN's sums in
    // f32): ResNeXt and ConvNeXt V2 against the f32 reference.
    for (name, layer) in [("resnext", "fc"), ("convnextv2_timm", "head.fc")] {
        let model = resolve_fixture(Role::Target, name);
        let t = dnd::target::Target::load(&model, &candle_core::Device::Cpu, DType::F16).unwrap();
        let out = t
            .net
            .forward(&fixture_batch(), &[t.layer_index(layer).unwrap()])
            .unwrap();
        let got = out[0].to_dtype(DType::F32).unwrap();
        let want = &reference(&format!("models/{name}.reference.safetensors"))["logits"];
        let e = rel_err(&got, want);
        assert!(e < 2e-2, "{name}: relative error {e}");
    }
}

/// The layers of transformers' ResNet fixtures (depths [1, 2, 1, 1]), in `dnd layers`'
/// order, under `prefix` (`resnet.` in ResNetForImageClassification).
fn transformers_resnet_layers(prefix: &str, head: bool) -> Vec<String> {
    prefixed(
        prefix,
        &[
            "embedder.embedder.convolution",
            "embedder.embedder.normalization",
            "embedder.embedder",
            "embedder",
            "encoder.stages.0",
            "encoder.stages.0.layers.0",
            "encoder.stages.1",
            "encoder.stages.1.layers.0",
            "encoder.stages.1.layers.1",
            "encoder.stages.2",
            "encoder.stages.2.layers.0",
            "encoder.stages.3",
            "encoder.stages.3.layers.0",
            "pooler",
        ],
        head,
    )
}

/// A transformers model's layers `names` under `prefix`, then its head `classifier`.
fn prefixed(prefix: &str, names: &[&str], head: bool) -> Vec<String> {
    let mut names: Vec<String> = names.iter().map(|n| format!("{prefix}{n}")).collect();
    if head {
        names.push("classifier".into());
    }
    names
}

/// The taps the transformers ResNet references hold: [`TORCHVISION_TAPS`]' layers.
fn transformers_resnet_taps(prefix: &str, head: bool) -> Vec<String> {
    let all = transformers_resnet_layers(prefix, head);
    [0, 1, 2, 3, 4, 6, 7, 9, 11, 12, 13, 14]
        .iter()
        .filter_map(|&i| all.get(i).cloned())
        .collect()
}

#[test]
fn transformers_resnets_match_transformers_under_their_own_layer_names() {
    for (name, prefix, head) in [
        ("resnet_transformers_tiny", "resnet.", true),
        ("resnet_transformers_basic", "resnet.", true),
        ("resnet_transformers_model", "", false),
    ] {
        let taps = transformers_resnet_taps(prefix, head);
        let taps: Vec<&str> = taps.iter().map(String::as_str).collect();
        // The tiny one's reference holds a feature map of its third stage.
        let map = (name == "resnet_transformers_tiny").then_some((taps[7], "map/stages.2"));
        let target = check_cnn(name, &taps, map);
        assert_eq!(
            layer_names(&target),
            transformers_resnet_layers(prefix, head),
            "{name}"
        );
        // ResNetModel's was saved with downsample_in_first_stage: its first stage halves the
        // 56 x 56 of the stem's max pool.
        let stage0 = target.layer(target.layer_index(taps[4]).unwrap());
        let side = if head { 56 } else { 28 };
        assert_eq!(stage0.shape, vec![16, side, side], "{name}");
    }
}

/// Our pixels of each fixture image under `pre`, normalised, against a transformers image
/// processor's (every 7th row and column of a 224 x 224 image): mean and largest difference.
fn pixel_differences(pre: &dnd::probe::Preprocess, want: &candle_core::Tensor) -> Vec<(f32, f32)> {
    let rows: Vec<u32> = (0..224).step_by(7).collect();
    let idx = candle_core::Tensor::new(rows.as_slice(), &candle_core::Device::Cpu).unwrap();
    fixture_images()
        .iter()
        .enumerate()
        .map(|(i, (_, img))| {
            let mut out = vec![0f32; pre.values_per_image()];
            pre.apply(img, &mut out);
            let full = candle_core::Tensor::from_vec(out, (3, 224, 224), &candle_core::Device::Cpu)
                .unwrap();
            let got = full
                .index_select(&idx, 1)
                .unwrap()
                .index_select(&idx, 2)
                .unwrap();
            let diff = (got - want.get(i).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap();
            let mean = diff.mean_all().unwrap().to_scalar::<f32>().unwrap();
            let max = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
            (mean, max)
        })
        .collect()
}

#[test]
fn a_transformers_resnet_preprocesses_as_its_convnext_processor() {
    // microsoft/resnet-*'s preprocessor_config.json: ConvNeXT's processor, shortest edge 224
    // over crop_pct 0.875, so resized to 256 and cropped to 224, bicubic, ImageNet's mean/std.
    let target = load_fixture_target("resnet_transformers_tiny");
    let pre = &target.preprocess;
    assert_eq!((pre.resize, pre.crop), (256, 224));
    let reference = reference("models/resnet_transformers_tiny.reference.safetensors");
    // transformers 5's processor (torchvision's resize) to float rounding; its PIL one
    // (transformers 4's) within one 8-bit level, 1 / 255 / 0.224 = 0.0175 after normalising.
    for (backend, mean_bound, max_bound) in [("torchvision", 1e-6, 1e-5), ("pil", 1e-3, 2e-2)] {
        let diffs = pixel_differences(pre, &reference[&format!("pixels/{backend}/every7")]);
        for ((name, _), (mean, max)) in fixture_images().iter().zip(diffs) {
            assert!(
                mean < mean_bound && max < max_bound,
                "{backend} {name}: mean {mean}, max {max}"
            );
        }
    }
}

#[test]
fn resnet_structure_is_read_from_the_weights() {
    let t = load_fixture_target("resnet_bottleneck");
    let arch = &t.net.info().architecture;
    assert!(arch.contains("bottleneck blocks [1, 2, 1, 1]"), "{arch}");
    let l4 = t.layer(t.layer_index("layer4").unwrap());
    assert_eq!((l4.neurons, l4.shape.clone()), (256, vec![256, 7, 7]));
    assert_eq!(t.layer(t.layer_index("fc").unwrap()).neurons, 10);
    // timm's config.json (resnet50.tv_in1k) gives torchvision's transform.
    assert_eq!(t.preprocess, dnd::probe::Preprocess::imagenet());
}

/// [`check_vit`] of a fixture whose layers are exactly `names`, in order.
fn check_vit_listing(
    name: &str,
    names: &[&str],
) -> (
    dnd::target::Target,
    std::collections::HashMap<String, candle_core::Tensor>,
) {
    let (target, reference, ..) = check_vit(name, names);
    assert_eq!(layer_names(&target), names, "{name}");
    (target, reference)
}

/// A ViT fixture's CLS token at each layer of `names`, tapped in one pass, and its logits
/// when the reference has them, against timm's; the outputs and taps for further checks.
fn check_vit(
    name: &str,
    names: &[&str],
) -> (
    dnd::target::Target,
    std::collections::HashMap<String, candle_core::Tensor>,
    Vec<candle_core::Tensor>,
    Vec<usize>,
) {
    let target = load_fixture_target(name);
    let reference = reference(&format!("models/{name}.reference.safetensors"));
    let taps = taps_of(&target, names);
    let outs = target.net.forward(&fixture_batch(), &taps).unwrap();
    for ((n, out), &l) in names.iter().zip(&outs).zip(&taps) {
        let got = pool_output(target.layer(l).kind, out, Pool::Mean).unwrap();
        let e = rel_err(&got, &reference[&format!("cls/{n}")]);
        assert!(e < TOL, "{name} {n}: relative error {e}");
    }
    if let Some(logits) = reference.get("logits") {
        assert!(rel_err(outs.last().unwrap(), logits) < TOL);
    }
    (target, reference, outs, taps)
}

#[test]
fn vit_matches_timm() {
    let (target, reference, outs, taps) =
        check_vit("vit_tiny", &["blocks.0", "blocks.1", "norm", "head"]);
    let b1 = taps[1];
    assert_eq!(target.layer(b1).kind, LayerKind::Tokens { grid: (14, 14) });
    let maps = maps_of(target.layer(b1).kind, &outs[1], 7).unwrap();
    let want = reference["map/blocks.1"]
        .narrow(2, 7, 1)
        .unwrap()
        .squeeze(2)
        .unwrap(); // [B, 196]
    let got: Vec<f32> = maps.iter().flat_map(|m| m.values.clone()).collect();
    let got = candle_core::Tensor::from_vec(got, want.dims(), &candle_core::Device::Cpu).unwrap();
    assert!(rel_err(&got, &want) < TOL);
}

#[test]
fn batch_of_one_equals_batch_of_four() {
    for name in ["resnet_bottleneck", "vit_tiny"] {
        let target = load_fixture_target(name);
        let x = fixture_batch();
        let last = target.layers().len() - 1;
        let all = target.net.forward(&x, &[last]).unwrap().remove(0);
        for i in 0..4 {
            let one = target
                .net
                .forward(&x.narrow(0, i, 1).unwrap(), &[last])
                .unwrap()
                .remove(0);
            let e = rel_err(&one, &all.narrow(0, i, 1).unwrap());
            assert!(
                e < 1e-5,
                "{name} image {i}: batch 1 vs batch 4 differ by {e}"
            );
        }
    }
}

#[test]
fn unknown_layer_and_neuron_errors_list_what_is_valid() {
    let t = load_fixture_target("resnet_basic");
    let msg = t.layer_index("layer9").unwrap_err().to_string();
    assert!(
        msg.contains("layer9") && msg.contains("layer4.0") && msg.contains("fc"),
        "{msg}"
    );
    let fc = t.layer_index("fc").unwrap();
    let msg = t.check_neuron(fc, 10).unwrap_err().to_string();
    assert!(msg.contains("10 neurons") && msg.contains("0..=9"), "{msg}");
}

#[test]
fn mismatched_weights_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // Weights of a ResNet with one tensor removed.
    edited_fixture_model("resnet_basic", dir.path(), |w| {
        w.remove("layer2.0.bn2.running_var");
    });
    let msg = try_load_target(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("layer2.0.bn2.running_var") && msg.contains("model.safetensors"),
        "{msg}"
    );
    // A variant with parts of its own (timm's SE-ResNets): refused, not silently half-loaded.
    let msg = refused_with_extra(
        "resnet_basic",
        "layer1.0.bn1.weight",
        "layer1.0.se.fc1.bias",
    );
    assert!(msg.contains("not part of resnet"), "{msg}");
    // A convolution whose filters see a number of channels no grouping of its input gives.
    edited_fixture_model("resnet_basic", dir.path(), |w| {
        let conv = &w["layer1.0.conv2.weight"];
        let fewer = conv.dim(1).unwrap() - 1;
        let odd = conv.narrow(1, 0, fewer).unwrap().contiguous().unwrap();
        w.insert("layer1.0.conv2.weight".into(), odd);
    });
    let msg = try_load_target(dir.path()).unwrap_err().to_string();
    assert!(
        msg.contains("layer1.0.conv2.weight") && msg.contains("no convolution of 8 input channels"),
        "{msg}"
    );
    // A ConvNeXt with a LayerNorm inside its MLP (timm's Mlp norm_layer).
    let msg = refused_with_extra(
        "convnext_timm",
        "stages.0.blocks.0.norm.weight",
        "stages.0.blocks.0.mlp.norm.weight",
    );
    assert!(msg.contains("not part of convnext"), "{msg}");
    // timm's ConvNeXt normalising before pooling (head_norm_first).
    let msg = refused_with_extra("convnext_timm", "head.norm.weight", "norm_pre.weight");
    assert!(msg.contains("head_norm_first"), "{msg}");
    // timm's anti-aliased ResNets: a plain ResNet's weights, refused by the name in config.json.
    let msg = refused_with_config("resnet_d", "\"resnet50\"", "\"resnetaa50d\"");
    assert!(
        msg.contains("resnetaa50d") && msg.contains("anti-aliased"),
        "{msg}"
    );
    // A transformers ResNet with another activation than the ReLU dnd runs.
    let msg = refused_with_config("resnet_transformers_basic", "\"relu\"", "\"gelu\"");
    assert!(msg.contains("hidden_act") && msg.contains("gelu"), "{msg}");
    // ViT variants: DeiT's distillation token and tokens averaged before the head, each named.
    for (tensor, said) in [
        ("dist_token", "distillation token"),
        ("fc_norm.weight", "averaged before the head"),
    ] {
        let msg = refused_with_extra("vit_tiny", "cls_token", tensor);
        assert!(msg.contains(said), "{msg}");
    }
    // A gated MLP (SwiGLU: fc1 twice as wide as fc2 reads), named.
    let vit = tempfile::tempdir().unwrap();
    edited_fixture_model("vit_tiny", vit.path(), |w| {
        let fc1 = &w["blocks.0.mlp.fc1.weight"];
        let wide = candle_core::Tensor::cat(&[fc1, fc1], 0).unwrap();
        let b = &w["blocks.0.mlp.fc1.bias"];
        let wide_b = candle_core::Tensor::cat(&[b, b], 0).unwrap();
        w.insert("blocks.0.mlp.fc1.weight".into(), wide);
        w.insert("blocks.0.mlp.fc1.bias".into(), wide_b);
    });
    let msg = try_load_target(vit.path()).unwrap_err().to_string();
    assert!(msg.contains("SwiGLU"), "{msg}");
    // Not a model at all.
    std::fs::write(dir.path().join("model.safetensors"), b"garbage").unwrap();
    let msg = try_load_target(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("safetensors") && msg.contains("fix"), "{msg}");
}

/// The error loading fixture `name` with a tensor `extra` added (a copy of its `like`), which
/// must name it.
fn refused_with_extra(name: &str, like: &str, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    edited_fixture_model(name, dir.path(), |w| {
        let t = w[like].clone();
        w.insert(extra.into(), t);
    });
    let msg = try_load_target(dir.path()).unwrap_err().to_string();
    assert!(msg.contains(extra), "{msg}");
    msg
}

/// The error loading fixture `name` with `from` replaced by `to` in its config.json.
fn refused_with_config(name: &str, from: &str, to: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    edited_fixture_model(name, dir.path(), |_| {});
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains(from), "{name}'s config.json has no {from}");
    std::fs::write(&config, text.replace(from, to)).unwrap();
    try_load_target(dir.path()).unwrap_err().to_string()
}

#[test]
fn weights_saved_from_data_parallel_load_under_their_own_names() {
    // Every tensor named `module.*`, as a DataParallel checkpoint (Places365's ResNets) keeps
    // them: the same layers, the same logits.
    let dir = tempfile::tempdir().unwrap();
    edited_fixture_model("resnet_basic", dir.path(), |w| {
        *w = std::mem::take(w)
            .into_iter()
            .map(|(k, t)| (format!("module.{k}"), t))
            .collect();
    });
    let wrapped = try_load_target(dir.path()).unwrap();
    let plain = load_fixture_target("resnet_basic");
    assert_eq!(layer_names(&wrapped), layer_names(&plain));
    let x = fixture_batch();
    let fc = [plain.layer_index("fc").unwrap()];
    let (a, b) = (
        wrapped.net.forward(&x, &fc).unwrap(),
        plain.net.forward(&x, &fc).unwrap(),
    );
    assert_eq!(rel_err(&a[0], &b[0]), 0.0);
}

#[test]
fn a_target_saved_in_shards_computes_what_the_single_file_does() {
    // As transformers / timm save a large checkpoint: an index naming each tensor's shard.
    let src = fixtures().join("models/vit_tiny");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let weights =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    let mut map = serde_json::Map::new();
    for (i, part) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let shard: std::collections::HashMap<_, _> = part
            .iter()
            .map(|n| ((*n).clone(), weights[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.path().join(&file)).unwrap();
        for n in part {
            map.insert((*n).clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let whole = load_fixture_target("vit_tiny");
    let sharded = try_load_target(dir.path()).unwrap();
    let x = fixture_batch();
    let taps = taps_of(&whole, &["blocks.0", "norm", "head"]);
    let (a, b) = (
        whole.net.forward(&x, &taps).unwrap(),
        sharded.net.forward(&x, &taps).unwrap(),
    );
    for (a, b) in a.iter().zip(&b) {
        assert_eq!(rel_err(a, b), 0.0);
    }
    // A lost shard is named.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let msg = try_load_target(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
}

#[test]
fn a_dinov2_vit_with_layer_scale_and_no_head_matches_timm() {
    let names = ["blocks.0", "blocks.1", "norm"];
    // No head layer.
    let (target, reference) = check_vit_listing("vit_dinov2_tiny", &names);
    assert_eq!(
        target.layer(1).kind,
        LayerKind::Tokens { grid: (16, 16) },
        "14 px patches"
    );
    check_token_map(&target, "blocks.1", 7, &reference["map/blocks.1"]);
}

#[test]
fn a_deit3_vit_without_a_class_position_matches_timm() {
    check_vit("vit_deit3_tiny", &["blocks.0", "norm", "head"]);
}

#[test]
fn a_torchvision_vit_matches_torchvision_under_its_own_layer_names() {
    let names = [
        "encoder.layers.encoder_layer_0",
        "encoder.layers.encoder_layer_1",
        "encoder.ln",
        "heads.head",
    ];
    check_vit_listing("vit_torchvision_tiny", &names);
}

#[test]
fn a_transformers_vit_matches_transformers_and_preprocesses_as_its_processor() {
    let names = [
        "vit.encoder.layer.0",
        "vit.encoder.layer.1",
        "vit.layernorm",
        "classifier",
    ];
    let (target, reference) = check_vit_listing("vit_transformers_tiny", &names);
    // Its preprocessing is ViTImageProcessor's (both sides to 224, bilinear, mean/std 0.5),
    // from preprocessor_config.json: every 7th row and column of each image.
    let diffs = pixel_differences(&target.preprocess, &reference["pixels/every7"]);
    for ((name, _), (mean, max)) in fixture_images().iter().zip(diffs) {
        // One 8-bit level is 2/255 = 7.8e-3 after normalising by 0.5.
        assert!(mean < 1e-3 && max < 2e-2, "{name}: mean {mean}, max {max}");
    }
}

#[test]
fn a_transformers_dinov2_matches_transformers_with_its_positions_resized_to_the_input() {
    let names = [
        "dinov2.encoder.layer.0",
        "dinov2.encoder.layer.1",
        "dinov2.layernorm",
        "classifier",
    ];
    // Trained at 518 px (37 x 37 positions), run at its processor's 224 (16 x 16 patches); the
    // classifier reads the class token beside the patch tokens' mean.
    let (target, reference) = check_vit_listing("vit_dinov2_transformers", &names);
    let kind = target.layer(1).kind;
    assert_eq!(kind, LayerKind::Tokens { grid: (16, 16) });
    let want = reference["map/dinov2.encoder.layer.1"]
        .narrow(2, 3, 1)
        .unwrap()
        .squeeze(2)
        .unwrap();
    check_token_map(&target, names[1], 3, &want);
    // facebook/dinov2-*'s BitImageProcessor: shortest edge 256, bicubic, crop 224.
    let pre = &target.preprocess;
    assert_eq!((pre.resize, pre.crop), (256, 224));
    for (backend, mean_bound, max_bound) in [("torchvision", 1e-6, 1e-5), ("pil", 1e-3, 2e-2)] {
        let diffs = pixel_differences(pre, &reference[&format!("pixels/{backend}/every7")]);
        for ((name, _), (mean, max)) in fixture_images().iter().zip(diffs) {
            assert!(
                mean < mean_bound && max < max_bound,
                "{backend} {name}: mean {mean}, max {max}"
            );
        }
    }
    // The same weights as a Dinov2Model (no prefix, no classifier).
    let dir = tempfile::tempdir().unwrap();
    edited_fixture_model("vit_dinov2_transformers", dir.path(), |w| {
        *w = std::mem::take(w)
            .into_iter()
            .filter_map(|(k, t)| Some((k.strip_prefix("dinov2.")?.to_string(), t)))
            .collect();
    });
    let model = try_load_target(dir.path()).unwrap();
    assert_eq!(
        layer_names(&model),
        ["encoder.layer.0", "encoder.layer.1", "layernorm"]
    );
    let out = model.net.forward(&fixture_batch(), &[2]).unwrap().remove(0);
    let cls = pool_output(model.layer(2).kind, &out, Pool::Mean).unwrap();
    assert!(rel_err(&cls, &reference["cls/dinov2.layernorm"]) < TOL);
}

/// Channel `c` of layer `layer`'s patch-token map against `want` (B, patches).
fn check_token_map(
    target: &dnd::target::Target,
    layer: &str,
    c: usize,
    want: &candle_core::Tensor,
) {
    let l = target.layer_index(layer).unwrap();
    let out = target
        .net
        .forward(&fixture_batch(), &[l])
        .unwrap()
        .remove(0);
    let maps = maps_of(target.layer(l).kind, &out, c).unwrap();
    let got: Vec<f32> = maps.iter().flat_map(|m| m.values.clone()).collect();
    let got = candle_core::Tensor::from_vec(got, want.dims(), &candle_core::Device::Cpu).unwrap();
    assert!(rel_err(&got, want) < TOL, "{layer} map");
}

#[test]
fn vits_with_register_tokens_match_their_libraries_with_the_registers_left_out_of_the_maps() {
    // timm's DINOv2 with 4 registers (position embeddings for the patches alone) and a timm
    // ViT with 2 registers whose position embeddings cover every token.
    let (target, reference, ..) = check_vit("vit_reg4_dinov2_tiny", &["blocks.0", "norm"]);
    assert_eq!(
        target.layer(target.layer_index("norm").unwrap()).kind,
        LayerKind::Tokens { grid: (16, 16) }
    );
    check_token_map(&target, "norm", 7, &reference["map/norm"]);
    let (target, reference, ..) = check_vit("vit_reg_pos_tiny", &["blocks.0", "norm", "head"]);
    check_token_map(&target, "norm", 7, &reference["map/norm"]);
    // transformers' DINOv2 with registers: positions resized antialiased, the head reading
    // the class token and the patch tokens' mean (registers left out).
    let names = [
        "dinov2_with_registers.encoder.layer.0",
        "dinov2_with_registers.encoder.layer.1",
        "dinov2_with_registers.layernorm",
        "classifier",
    ];
    let (target, reference) = check_vit_listing("vit_dinov2_registers_transformers", &names);
    check_token_map(
        &target,
        "dinov2_with_registers.layernorm",
        3,
        &reference["map/dinov2_with_registers.layernorm"],
    );
}

#[test]
fn clip_image_towers_match_timm_and_transformers() {
    // timm's OpenAI CLIP tower: a norm before the blocks, QuickGELU, LayerNorm eps 1e-5, no
    // patch bias; the projection as its head.
    check_vit("vit_clip_timm", &["blocks.0", "blocks.1", "norm", "head"]);
    // transformers' CLIPModel (its text tower unread): the class embedding and position
    // embeddings stored flat, q/k/v apart, a projection without bias.
    let names = [
        "vision_model.encoder.layers.0",
        "vision_model.encoder.layers.1",
        "vision_model.post_layernorm",
        "visual_projection",
    ];
    let (target, _) = check_vit_listing("vit_clip_transformers", &names);
    // CLIP's own preprocessing (bicubic, its mean and std), from preprocessor_config.json.
    assert_eq!(
        target.preprocess.mean,
        [0.481_454_66, 0.457_827_5, 0.408_210_73]
    );
}
