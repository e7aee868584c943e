//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use dnd::hub::{self, HubOptions, ModelSource, Role};
use dnd::target::Target;

pub mod llm;
pub mod mock_hub;

/// Copies the folder `from`, with everything in it, to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// The dnd binary with its config, cache, data and HF folders inside `home`, offline.
pub fn dnd_command(home: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dnd"));
    c.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("HF_HOME", home.join("hf"))
        .env("HF_HUB_OFFLINE", "1");
    c
}

/// Flags for a small, quick describe on the fixtures, the store at `home/out/dnd.sqlite`; `llm` is the mock's URL, or "local" for no
/// endpoint at all and the tiny local Qwen2.
pub fn describe_flags(home: &Path, llm: &str, target: &str) -> Vec<String> {
    let endpoint = if llm == "local" {
        ["--llm-local".to_string(), fixture_model("qwen2_tiny")]
    } else {
        ["--llm-url".to_string(), llm.to_string()]
    };
    let probe = fixtures().join("images");
    [
        "--device",
        "cpu",
        "--target",
        &fixture_model(target),
        "--captioner",
        &fixture_model("blip_tiny"),
        "--synthesiser",
        &fixture_model("sd_tiny"),
        "--clip",
        &fixture_model("clip_tiny"),
        "--probe",
        &probe.display().to_string(),
        "--db",
        &home.join("out/dnd.sqlite").display().to_string(),
        &endpoint[0],
        &endpoint[1],
        "--llm-model",
        "mock",
        "--llm-timeout",
        "1",
        "--llm-backoff",
        "0.05",
        "--top-k",
        "3",
        "--top-images",
        "4",
        "--candidates",
        "3",
        "--images-per-concept",
        "2",
        "--caption-tokens",
        "8",
        "--wave",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Runs dnd as [`dnd_command`] sets it up and waits for it.
pub fn dnd(home: &Path, args: &[&str]) -> Output {
    dnd_command(home, args).output().unwrap()
}

/// (stdout, stderr) as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// A fixture model folder as a flag value.
pub fn fixture_model(name: &str) -> String {
    fixtures().join("models").join(name).display().to_string()
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
        .collect()
}

/// max |a - b| / max |b|: the relative error of a whole tensor.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    // NaN would pass every comparison below.
    assert!(
        a.iter().chain(&b).all(|v| v.is_finite()),
        "non-finite values"
    );
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

pub fn load_fixture_target(name: &str) -> Target {
    try_load_target(&fixtures().join("models").join(name)).unwrap()
}

/// Loads the target in a local model folder, on the CPU in f32.
pub fn try_load_target(dir: &Path) -> dnd::Result<Target> {
    let src = ModelSource::Local(dir.to_path_buf());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let model = rt.block_on(hub::resolve(Role::Target, &src, &HubOptions::default()))?;
    Target::load(&model, &Device::Cpu, DType::F32)
}

/// A copy of a fixture model folder in `dir` whose weights `edit` changed.
pub fn edited_fixture_model(
    name: &str,
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) {
    let src = fixtures().join("models").join(name);
    std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
    let mut w =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut w);
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
}

/// The four fixture images as torchvision preprocessed them (f16-rounded), batched.
pub fn fixture_batch() -> Tensor {
    let pre = reference("preprocess.safetensors");
    let names = [
        "a_landscape.png",
        "b_portrait.png",
        "c_small.png",
        "d_photo.jpg",
    ];
    let ts: Vec<Tensor> = names
        .iter()
        .map(|n| pre[&format!("torchvision/{n}")].clone())
        .collect();
    Tensor::stack(&ts, 0).unwrap()
}

/// A fixture model folder resolved for `role`, offline.
pub fn resolve_fixture(role: Role, name: &str) -> hub::ResolvedModel {
    resolve_dir(role, &fixtures().join("models").join(name))
}

/// A local model folder resolved for `role`, offline.
pub fn resolve_dir(role: Role, dir: &Path) -> hub::ResolvedModel {
    let src = ModelSource::Local(dir.to_path_buf());
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(hub::resolve(role, &src, &HubOptions::default()))
        .unwrap()
}

/// The fixture images, decoded, in name order.
pub fn fixture_images() -> Vec<(String, image::RgbImage)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(fixtures().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, dnd::probe::decode(&p).unwrap())
        })
        .collect()
}
