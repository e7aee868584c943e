//! CLIP image embeddings against transformers' `get_image_features` on the tiny CLIP.

mod common;

use candle_core::{DType, Device};
use common::{fixture_images, reference, rel_err, resolve_fixture};
use dnd::clip::ClipVision;
use dnd::hub::Role;

fn clip() -> ClipVision {
    ClipVision::load(
        &resolve_fixture(Role::Clip, "clip_tiny"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn image_embeddings_equal_transformers() {
    let refs = reference("models/clip_tiny.reference.safetensors");
    let model = clip();
    let ours = model.embed(&refs["pixel_values"]).unwrap();
    let err = rel_err(&ours, &refs["image_embeds"]);
    assert!(err < 1e-4, "relative error {err}");
    // batch 1 gives the same rows as the batch
    let one = model
        .embed(&refs["pixel_values"].narrow(0, 2, 1).unwrap())
        .unwrap();
    assert!(rel_err(&one, &ours.narrow(0, 2, 1).unwrap()) < 1e-5);
}

/// The image tower alone, as `CLIPVisionModelWithProjection` saves it: its config.json is the
/// vision config itself.
#[test]
fn a_vision_model_with_projection_folder_embeds_as_transformers() {
    let pixels = &reference("models/clip_tiny.reference.safetensors")["pixel_values"];
    let want = &reference("models/clip_vision_tiny.reference.safetensors")["image_embeds"];
    let model = ClipVision::load(
        &resolve_fixture(Role::Clip, "clip_vision_tiny"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let err = rel_err(&model.embed(pixels).unwrap(), want);
    assert!(err < 1e-4, "relative error {err}");
}

#[test]
fn preprocessing_and_embedding_from_decoded_images() {
    let refs = reference("models/clip_tiny.reference.safetensors");
    let model = clip();
    let images: Vec<_> = fixture_images().into_iter().map(|(_, i)| i).collect();
    let px = model.pixels(&images).unwrap();
    let err = rel_err(&px, &refs["pixel_values"]);
    assert!(err < 2e-2, "pixel relative error {err}");
    let emb = model.embed_images(&images, 3).unwrap();
    assert_eq!(emb.len(), 4);
    let want = refs["image_embeds"].to_vec2::<f32>().unwrap();
    for (a, b) in emb.iter().zip(&want) {
        let cos = dnd::score::clip_weight(std::slice::from_ref(a), std::slice::from_ref(b));
        assert!(cos > 0.999, "cosine {cos}");
    }
}
