//! `dnd probe fetch`: a default, openly licensed probing set from the Hub.
//!
//! Hub datasets store images inside parquet shards (the `datasets` Image feature: a struct
//! column with the encoded file as `bytes`). We download a few shards through hf-hub and write
//! every image out as a plain file, so the probing set is an ordinary folder like any other.

use std::fs;
use std::path::{Path, PathBuf};

use hf_hub::{Repo, RepoType};
use parquet::column::reader::ColumnReader;
use parquet::data_type::ByteArray;
use parquet::file::reader::{FileReader, SerializedFileReader};

use crate::error::{Error, Result};
use crate::hub::HubOptions;

/// Open Images V7 validation photos (images CC BY 2.0, as Open Images lists them), packed
/// in parquet by a Hub user; two shards hold about 3,100 diverse photos (~950 MB).
pub const DEFAULT_DATASET: &str = "vikhyatk/openimages-bbox";
pub const DEFAULT_PATTERN: &str = "validation-";
pub const DEFAULT_SHARDS: usize = 2;

#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Hub dataset repo id.
    pub dataset: String,
    /// Only parquet files whose path contains this (a split name).
    pub pattern: String,
    /// How many shards, in name order.
    pub shards: usize,
    /// The probing-set folder to fill.
    pub dest: PathBuf,
    pub hub: HubOptions,
}

/// Downloads the shards and writes their images under `dest/<shard name>/`. Shards already
/// extracted are skipped, so an interrupted fetch resumes. Returns the images written.
pub async fn fetch(opts: &FetchOptions) -> Result<usize> {
    let fail = |reason: String| Error::Download {
        model: format!("probing set ({})", opts.dataset),
        file: "the dataset".into(),
        flag: "--probe".into(),
        reason,
    };
    if opts.hub.offline {
        return Err(fail(
            "offline mode is on (--offline or HF_HUB_OFFLINE)".into(),
        ));
    }
    let api = crate::hub::api(&opts.hub).map_err(fail)?;
    let repo = api.repo(Repo::new(opts.dataset.clone(), RepoType::Dataset));
    let info = repo.info().await.map_err(|e| fail(e.to_string()))?;
    let mut shards: Vec<String> = info
        .siblings
        .into_iter()
        .map(|s| s.rfilename)
        .filter(|f| f.ends_with(".parquet") && f.contains(&opts.pattern))
        .collect();
    shards.sort();
    shards.truncate(opts.shards);
    if shards.is_empty() {
        return Err(fail(format!(
            "no parquet files matching {:?} in the dataset; pick another --dataset or --pattern",
            opts.pattern
        )));
    }
    fs::create_dir_all(&opts.dest).map_err(|e| Error::io(&opts.dest, e))?;
    let mut total = 0;
    for shard in &shards {
        let stem = Path::new(shard)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("shard")
            .to_string();
        let out = opts.dest.join(&stem);
        if out.is_dir() {
            tracing::info!("{}: already extracted", out.display());
            continue;
        }
        let file = repo
            .download_with_progress(shard, opts.hub.progress.bar())
            .await
            .map_err(|e| fail(format!("{shard}: {e}")))?;
        total += extract_images(&file, &out)?;
    }
    Ok(total)
}

/// Writes every image of a parquet file (the first binary column named `bytes`, as the
/// `datasets` Image feature stores them) into `out` as `00000.jpg`, `00001.png`, ...
/// The folder appears only once complete.
pub fn extract_images(parquet_file: &Path, out: &Path) -> Result<usize> {
    let bad = |reason: String| Error::Probe {
        path: parquet_file.to_path_buf(),
        reason,
    };
    let file = fs::File::open(parquet_file).map_err(|e| Error::io(parquet_file, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| bad(format!("not a readable parquet file: {e}")))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let (col, max_def) = schema
        .columns()
        .iter()
        .enumerate()
        .find(|(_, c)| {
            c.physical_type() == parquet::basic::Type::BYTE_ARRAY
                && c.path().parts().last().is_some_and(|p| p == "bytes")
        })
        .map(|(i, c)| (i, c.max_def_level()))
        .ok_or_else(|| {
            bad(
                "no image column (a binary field named `bytes`, as in the datasets Image feature)"
                    .into(),
            )
        })?;
    let partial = out.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    let mut written = 0;
    let mut index = 0;
    for rg in 0..reader.num_row_groups() {
        let group = reader.get_row_group(rg).map_err(|e| bad(e.to_string()))?;
        let ColumnReader::ByteArrayColumnReader(mut column) = group
            .get_column_reader(col)
            .map_err(|e| bad(e.to_string()))?
        else {
            return Err(bad("the image column is not binary".into()));
        };
        loop {
            let mut values: Vec<ByteArray> = Vec::new();
            let mut defs: Vec<i16> = Vec::new();
            let (records, _, _) = column
                .read_records(256, Some(&mut defs), None, &mut values)
                .map_err(|e| bad(e.to_string()))?;
            if records == 0 {
                break;
            }
            // Null images (definition level below the maximum) have no value.
            let mut vals = values.iter();
            for r in 0..records {
                let this = index;
                index += 1;
                // No definition levels at all when the column is required.
                if defs.get(r).is_some_and(|&d| d < max_def) {
                    continue;
                }
                let Some(v) = vals.next() else { break };
                let bytes = v.data();
                let Some(ext) = image::guess_format(bytes)
                    .ok()
                    .and_then(|f| f.extensions_str().first().copied())
                else {
                    tracing::warn!(
                        "{}: row {this} is not an image, skipped",
                        parquet_file.display()
                    );
                    continue;
                };
                let p = partial.join(format!("{this:05}.{ext}"));
                fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
                written += 1;
            }
        }
    }
    fs::rename(&partial, out).map_err(|e| Error::io(out, e))?;
    Ok(written)
}
