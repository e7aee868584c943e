//! The results store: one SQLite file (WAL) holding each neuron's description, every LLM
//! answer and an index of the synthetic images made per concept, with the crops and synthetic
//! images as small PNG files in a folder beside it.
//!
//! A neuron's row is written in one transaction after its image files are on disk, so a
//! kill at any moment loses at most the neuron in flight; its files are simply rewritten by
//! the rerun.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use crate::error::{Error, Result};
use crate::summarise::AnswerCache;

/// Bumped when the tables change; older files are migrated or refused by number.
/// 2: curation (review state, curated label, history). The image index (`synthetic`) came
/// later without a bump: it is a cache, which an older dnd neither reads nor misses.
const SCHEMA_VERSION: i64 = 2;

/// One concept's synthetic images as the index knows them: their files (relative to
/// [`Store::images_root`]) and the blake3 hash of each file's bytes as written.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageSet {
    pub files: Vec<String>,
    pub hashes: Vec<String>,
    /// `--decoder hybrid`: the file holding the images' latents, and its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latents: Option<(String, String)>,
}

/// Whether a neuron got a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Described,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Described => "described",
            Status::Failed => "failed",
        }
    }
}

/// What a person made of a neuron's label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Review {
    #[default]
    Unreviewed,
    Accepted,
    Edited,
    Rejected,
}

impl Review {
    pub fn as_str(self) -> &'static str {
        match self {
            Review::Unreviewed => "unreviewed",
            Review::Accepted => "accepted",
            Review::Edited => "edited",
            Review::Rejected => "rejected",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "accepted" => Review::Accepted,
            "edited" => Review::Edited,
            "rejected" => Review::Rejected,
            _ => Review::Unreviewed,
        }
    }
}

/// A curation decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Curation {
    Accept,
    /// A new label: typed, or a runner-up or candidate chosen.
    Edit(String),
    Reject,
}

/// One line of a neuron's curation history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Review,
    pub previous: Option<String>,
    pub label: Option<String>,
    /// Unix seconds.
    pub at: i64,
}

/// One neuron's stored outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub target: String,
    pub layer: String,
    pub neuron: usize,
    /// Identifies the models, probing set and parameters that made it: a rerun with the same
    /// key skips the neuron.
    pub settings_key: String,
    pub status: Status,
    /// The winning label; `None` when failed.
    pub label: Option<String>,
    /// Everything the pipeline knows about the neuron (the `describe --format json` line).
    pub record: serde_json::Value,
    pub error: Option<String>,
    /// Set by curation; a new description of the neuron starts unreviewed again.
    pub review: Review,
    /// The label a person gave (edited or chosen); the pipeline's stays in `label`.
    pub curated_label: Option<String>,
}

impl Row {
    /// The label in force: the curated one, else the pipeline's.
    pub fn current_label(&self) -> Option<&str> {
        self.curated_label.as_deref().or(self.label.as_deref())
    }
}

pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
    images: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating when needed) the store at `path`; images live in `<path>.images/`.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::Store {
                path: path.to_path_buf(),
                reason: format!(
                    "cannot create its folder {}: {e}. fix: point --db at a file in a writable folder",
                    dir.display()
                ),
            })?;
        }
        let err = |e: rusqlite::Error| Error::Store {
            path: path.to_path_buf(),
            reason: format!(
                "{e}. fix: point --db at a writable SQLite file, or move this one aside"
            ),
        };
        let conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if version > SCHEMA_VERSION {
            return Err(Error::Store {
                path: path.to_path_buf(),
                reason: format!("it was written by a newer dnd (schema {version}, this one knows {SCHEMA_VERSION}). fix: upgrade dnd, or use another --db"),
            });
        }
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS descriptions (
                target TEXT NOT NULL,
                layer TEXT NOT NULL,
                neuron INTEGER NOT NULL,
                settings_key TEXT NOT NULL,
                status TEXT NOT NULL,
                label TEXT,
                record TEXT NOT NULL,
                error TEXT,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (target, layer, neuron)
            );
            CREATE TABLE IF NOT EXISTS curation (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                target TEXT NOT NULL,
                layer TEXT NOT NULL,
                neuron INTEGER NOT NULL,
                action TEXT NOT NULL,
                previous TEXT,
                label TEXT,
                at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS llm_cache (
                model TEXT NOT NULL,
                prompt TEXT NOT NULL,
                answer TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                PRIMARY KEY (model, prompt)
            );
            CREATE TABLE IF NOT EXISTS synthetic (
                images_key TEXT NOT NULL,
                prompt TEXT NOT NULL,
                images TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                PRIMARY KEY (images_key, prompt)
            );",
        )
        .map_err(err)?;
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('descriptions')")
            .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect())
            .map_err(err)?;
        if !columns.iter().any(|c| c == "review") {
            conn.execute_batch(
                "ALTER TABLE descriptions ADD COLUMN review TEXT NOT NULL DEFAULT 'unreviewed';
                 ALTER TABLE descriptions ADD COLUMN curated_label TEXT;",
            )
            .map_err(err)?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(err)?;
        let mut images = path.as_os_str().to_owned();
        images.push(".images");
        Ok(Self {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            images: PathBuf::from(images),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder that image paths in records are relative to.
    pub fn images_root(&self) -> &Path {
        &self.images
    }

    fn error(&self, e: impl std::fmt::Display) -> Error {
        Error::Store {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (transactions roll back).
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `img` as PNG at `rel` under [`Store::images_root`] ([`Store::save_file`]);
    /// returns the hash of the file's bytes.
    pub fn save_image(&self, rel: &Path, img: &image::RgbImage) -> Result<String> {
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| self.error(format!("cannot encode {} as PNG: {e}", rel.display())))?;
        self.save_file(rel, &png)
    }

    /// Writes `bytes` at `rel` under [`Store::images_root`]: to a temporary file, renamed into
    /// place, so a reader never sees half a file (the process id in its name keeps two
    /// processes on one store apart). Returns their blake3 hash, by which [`Store::take_file`]
    /// knows them.
    pub fn save_file(&self, rel: &Path, bytes: &[u8]) -> Result<String> {
        let path = self.images.join(rel);
        let dir = path.parent().expect("image paths have a folder");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(blake3::hash(bytes).to_hex().to_string())
    }

    /// Copies the image at `from` to `to` (both relative to [`Store::images_root`]), atomically
    /// as [`Store::save_file`] writes.
    pub fn copy_image(&self, from: &Path, to: &Path) -> Result<()> {
        let src = self.images.join(from);
        let bytes = std::fs::read(&src).map_err(|e| {
            let to = self.images.join(to);
            let (from, to) = (src.display(), to.display());
            self.error(format!("cannot copy {from} to {to}: {e}"))
        })?;
        self.save_file(to, &bytes).map(drop)
    }

    /// The bytes of the file at `from` (relative to [`Store::images_root`]), copied to `to`, if
    /// they are still those whose blake3 hash is `hash`; `None` when the file is gone or was
    /// written again since (its neuron described anew).
    pub fn take_file(&self, from: &Path, hash: &str, to: &Path) -> Result<Option<Vec<u8>>> {
        let Ok(bytes) = std::fs::read(self.images.join(from)) else {
            return Ok(None);
        };
        if blake3::hash(&bytes).to_hex().as_str() != hash {
            return Ok(None);
        }
        // A neuron described again may find its own files indexed: they are already in place.
        if from != to {
            self.save_file(to, &bytes)?;
        }
        Ok(Some(bytes))
    }

    /// [`Store::take_file`] of an image, decoded.
    pub fn take_image(
        &self,
        from: &Path,
        hash: &str,
        to: &Path,
    ) -> Result<Option<image::RgbImage>> {
        let png = self.take_file(from, hash, to)?;
        Ok(png
            .and_then(|b| image::load_from_memory_with_format(&b, image::ImageFormat::Png).ok())
            .map(|img| img.into_rgb8()))
    }

    /// The synthetic images last made (or copied) for `prompt` under images key `key`, so
    /// that a later job, in this process or another, copies them rather than making them
    /// again. The index is a cache: a failure to read it is a miss, logged.
    pub fn recall_images(&self, key: &str, prompt: &str) -> Option<ImageSet> {
        let sql = "SELECT images FROM synthetic WHERE images_key = ?1 AND prompt = ?2";
        let found = self.cache_read(sql, [key, prompt], "image index read failed")?;
        serde_json::from_str(&found).ok()
    }

    /// Records where the images of `prompt` now are (see [`Store::recall_images`]). A failure
    /// to write costs only the reuse: it is logged.
    pub fn remember_images(&self, key: &str, prompt: &str, set: &ImageSet) {
        let json = serde_json::to_string(set).expect("plain data serialises");
        self.cache_write(
            "INSERT OR REPLACE INTO synthetic (images_key, prompt, images, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![key, prompt, json, now()],
            "image index write failed (the images are kept, not indexed)",
        );
    }

    /// Drops the index entry of `prompt`, whose files no longer hold its images.
    pub fn forget_images(&self, key: &str, prompt: &str) {
        let sql = "DELETE FROM synthetic WHERE images_key = ?1 AND prompt = ?2";
        self.cache_write(sql, params![key, prompt], "image index write failed");
    }

    /// The text `sql` selects by two keys from a table used as a cache (the LLM answers, the
    /// image index): a failure to read is a miss, logged with `what`.
    fn cache_read(&self, sql: &str, keys: [&str; 2], what: &str) -> Option<String> {
        self.conn()
            .query_row(sql, keys, |r| r.get(0))
            .optional()
            .unwrap_or_else(|e| {
                tracing::warn!("{what}: {e}");
                None
            })
    }

    /// Runs `sql` on a table used as a cache: a failure costs only the cache, and is logged
    /// with `what`.
    fn cache_write(&self, sql: &str, params: impl rusqlite::Params, what: &str) {
        if let Err(e) = self.conn().execute(sql, params) {
            tracing::warn!("{what}: {e}");
        }
    }

    /// Whether the neuron is already described with these settings.
    pub fn is_described(
        &self,
        target: &str,
        layer: &str,
        neuron: usize,
        settings_key: &str,
    ) -> Result<bool> {
        let found: Option<String> = self
            .conn()
            .query_row(
                "SELECT status FROM descriptions WHERE target = ?1 AND layer = ?2 AND neuron = ?3 AND settings_key = ?4",
                params![target, layer, neuron as i64, settings_key],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.error(e))?;
        Ok(found.as_deref() == Some(Status::Described.as_str()))
    }

    /// Stores one neuron's outcome in one transaction, replacing an earlier one.
    pub fn put(&self, row: &Row) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.error(e))?;
        tx.execute(
            "INSERT OR REPLACE INTO descriptions
                (target, layer, neuron, settings_key, status, label, record, error, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                row.target,
                row.layer,
                row.neuron as i64,
                row.settings_key,
                row.status.as_str(),
                row.label,
                row.record.to_string(),
                row.error,
                now(),
            ],
        )
        .map_err(|e| self.error(e))?;
        tx.commit().map_err(|e| self.error(e))
    }

    /// Stored rows, ordered by target, layer and neuron; `None` filters nothing.
    /// Every target with stored results, and how many of its neurons are described.
    pub fn targets(&self) -> Result<Vec<(String, usize)>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT target, SUM(status = 'described') FROM descriptions
                 GROUP BY target ORDER BY target",
            )
            .map_err(|e| self.error(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))
            .map_err(|e| self.error(e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| self.error(e))?;
        Ok(rows)
    }

    pub fn rows(&self, target: Option<&str>, layer: Option<&str>) -> Result<Vec<Row>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT target, layer, neuron, settings_key, status, label, record, error,
                        review, curated_label
                 FROM descriptions
                 WHERE (?1 IS NULL OR target = ?1) AND (?2 IS NULL OR layer = ?2)
                 ORDER BY target, layer, neuron",
            )
            .map_err(|e| self.error(e))?;
        let rows = stmt
            .query_map(params![target, layer], |r| {
                let status: String = r.get(4)?;
                let record: String = r.get(6)?;
                Ok(Row {
                    target: r.get(0)?,
                    layer: r.get(1)?,
                    neuron: r.get::<_, i64>(2)? as usize,
                    settings_key: r.get(3)?,
                    status: if status == "described" {
                        Status::Described
                    } else {
                        Status::Failed
                    },
                    label: r.get(5)?,
                    record: serde_json::from_str(&record).unwrap_or(serde_json::Value::Null),
                    error: r.get(7)?,
                    review: Review::parse(&r.get::<_, String>(8)?),
                    curated_label: r.get(9)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<Row>>>()
            .map_err(|e| self.error(e))
    }
}

impl Store {
    /// Records a curation decision on a stored neuron, with its history, in one transaction.
    pub fn curate(
        &self,
        target: &str,
        layer: &str,
        neuron: usize,
        decision: &Curation,
    ) -> Result<Row> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(|e| self.error(e))?;
        let current: Option<(Option<String>, Option<String>)> = tx
            .query_row(
                "SELECT label, curated_label FROM descriptions WHERE target = ?1 AND layer = ?2 AND neuron = ?3",
                params![target, layer, neuron as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.error(e))?;
        let Some((label, curated)) = current else {
            return Err(self.error(format!(
                "neuron {neuron} of {layer} has no description to curate; describe it first"
            )));
        };
        let previous = curated.or(label);
        let (review, new_label) = match decision {
            Curation::Accept => (Review::Accepted, previous.clone()),
            Curation::Edit(text) => (Review::Edited, Some(text.trim().to_string())),
            Curation::Reject => (Review::Rejected, previous.clone()),
        };
        // An edit keeps its own label; accept and reject keep the one in force.
        let curated_label = match decision {
            Curation::Edit(_) => new_label.clone(),
            _ => previous.clone(),
        };
        tx.execute(
            "UPDATE descriptions SET review = ?4, curated_label = ?5, updated_at = ?6
             WHERE target = ?1 AND layer = ?2 AND neuron = ?3",
            params![
                target,
                layer,
                neuron as i64,
                review.as_str(),
                curated_label,
                now()
            ],
        )
        .map_err(|e| self.error(e))?;
        tx.execute(
            "INSERT INTO curation (target, layer, neuron, action, previous, label, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                target,
                layer,
                neuron as i64,
                review.as_str(),
                previous,
                new_label,
                now()
            ],
        )
        .map_err(|e| self.error(e))?;
        tx.commit().map_err(|e| self.error(e))?;
        drop(conn);
        self.rows(Some(target), Some(layer))?
            .into_iter()
            .find(|r| r.neuron == neuron)
            .ok_or_else(|| self.error("the curated row vanished"))
    }

    /// A neuron's curation decisions, oldest first.
    pub fn history(&self, target: &str, layer: &str, neuron: usize) -> Result<Vec<Decision>> {
        let conn = self.conn();
        let mut st = conn
            .prepare(
                "SELECT action, previous, label, at FROM curation
                 WHERE target = ?1 AND layer = ?2 AND neuron = ?3 ORDER BY id",
            )
            .map_err(|e| self.error(e))?;
        let rows = st
            .query_map(params![target, layer, neuron as i64], |r| {
                Ok(Decision {
                    action: Review::parse(&r.get::<_, String>(0)?),
                    previous: r.get(1)?,
                    label: r.get(2)?,
                    at: r.get(3)?,
                })
            })
            .map_err(|e| self.error(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.error(e))
    }
}

impl AnswerCache for Store {
    fn get(&self, model: &str, prompt: &str) -> Option<String> {
        let sql = "SELECT answer FROM llm_cache WHERE model = ?1 AND prompt = ?2";
        self.cache_read(sql, [model, prompt], "LLM cache read failed")
    }

    fn put(&self, model: &str, prompt: &str, answer: &str) {
        self.cache_write(
            "INSERT OR REPLACE INTO llm_cache (model, prompt, answer, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![model, prompt, answer, now()],
            "LLM cache write failed (the answer is used, not remembered)",
        );
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(neuron: usize, key: &str, status: Status) -> Row {
        Row {
            target: "t".into(),
            layer: "layer4".into(),
            neuron,
            settings_key: key.into(),
            status,
            label: (status == Status::Described).then(|| format!("label {neuron}")),
            record: serde_json::json!({ "neuron": neuron }),
            error: (status == Status::Failed).then(|| "boom".to_string()),
            review: Review::Unreviewed,
            curated_label: None,
        }
    }

    #[test]
    fn a_schema_1_store_is_migrated_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("dnd.sqlite");
        {
            let c = Connection::open(&db).unwrap();
            c.execute_batch(
                "CREATE TABLE descriptions (target TEXT NOT NULL, layer TEXT NOT NULL,
                    neuron INTEGER NOT NULL, settings_key TEXT NOT NULL, status TEXT NOT NULL,
                    label TEXT, record TEXT NOT NULL, error TEXT, updated_at INTEGER NOT NULL,
                    PRIMARY KEY (target, layer, neuron));
                 INSERT INTO descriptions VALUES ('t', 'layer4', 3, 'k1', 'described', 'old', '{}', NULL, 0);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let store = Store::open(&db).unwrap();
        let r = &store.rows(None, None).unwrap()[0];
        assert_eq!(
            (r.label.as_deref(), r.review),
            (Some("old"), Review::Unreviewed)
        );
        store.curate("t", "layer4", 3, &Curation::Accept).unwrap();
        drop(store);
        assert_eq!(
            Store::open(&db)
                .unwrap()
                .history("t", "layer4", 3)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn curation_is_recorded_with_history_and_reset_by_a_new_description() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("dnd.sqlite")).unwrap();
        store.put(&row(3, "k1", Status::Described)).unwrap();
        let r = store.curate("t", "layer4", 3, &Curation::Accept).unwrap();
        assert_eq!(
            (r.review, r.current_label()),
            (Review::Accepted, Some("label 3"))
        );
        let r = store
            .curate("t", "layer4", 3, &Curation::Edit(" red stripes ".into()))
            .unwrap();
        assert_eq!(
            (r.review, r.current_label()),
            (Review::Edited, Some("red stripes"))
        );
        assert_eq!(
            r.label.as_deref(),
            Some("label 3"),
            "the pipeline's label is kept"
        );
        let r = store.curate("t", "layer4", 3, &Curation::Reject).unwrap();
        assert_eq!(r.review, Review::Rejected);
        let h = store.history("t", "layer4", 3).unwrap();
        let actions: Vec<Review> = h.iter().map(|d| d.action).collect();
        assert_eq!(
            actions,
            [Review::Accepted, Review::Edited, Review::Rejected]
        );
        assert_eq!(h[1].previous.as_deref(), Some("label 3"));
        assert_eq!(h[2].previous.as_deref(), Some("red stripes"));
        assert!(store.curate("t", "layer4", 9, &Curation::Accept).is_err());
        store.put(&row(3, "k2", Status::Described)).unwrap();
        let r = &store.rows(None, None).unwrap()[0];
        assert_eq!(
            (r.review, r.curated_label.as_deref()),
            (Review::Unreviewed, None)
        );
        assert_eq!(
            store.history("t", "layer4", 3).unwrap().len(),
            3,
            "history is kept"
        );
    }

    #[test]
    fn rows_round_trip_replace_and_skip_by_settings() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub/dnd.sqlite");
        let store = Store::open(&db).unwrap();
        store.put(&row(3, "k1", Status::Described)).unwrap();
        store.put(&row(1, "k1", Status::Failed)).unwrap();
        assert!(store.is_described("t", "layer4", 3, "k1").unwrap());
        assert!(!store.is_described("t", "layer4", 3, "k2").unwrap());
        assert!(!store.is_described("t", "layer4", 1, "k1").unwrap());
        store.put(&row(1, "k1", Status::Described)).unwrap();
        drop(store);
        let store = Store::open(&db).unwrap();
        let rows = store.rows(None, Some("layer4")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], row(1, "k1", Status::Described));
        assert_eq!(rows[1].label.as_deref(), Some("label 3"));
        assert!(store.rows(Some("other"), None).unwrap().is_empty());
    }

    #[test]
    fn answers_are_cached_per_model_and_prompt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("dnd.sqlite")).unwrap();
        assert_eq!(store.get("m", "p"), None);
        AnswerCache::put(&store, "m", "p", "red cars");
        assert_eq!(store.get("m", "p").as_deref(), Some("red cars"));
        assert_eq!(store.get("other", "p"), None);
    }

    #[test]
    fn images_land_beside_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("dnd.sqlite")).unwrap();
        let img = image::RgbImage::from_pixel(4, 3, image::Rgb([1, 2, 3]));
        store.save_image(Path::new("a/b/c.png"), &img).unwrap();
        let back = image::open(dir.path().join("dnd.sqlite.images/a/b/c.png"))
            .unwrap()
            .to_rgb8();
        assert_eq!(back, img);
    }

    #[test]
    fn an_indexed_image_is_taken_only_while_its_file_holds_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dnd.sqlite");
        let store = Store::open(&path).unwrap();
        let img = image::RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let hash = store.save_image(Path::new("n1/a.png"), &img).unwrap();
        let set = ImageSet {
            files: vec!["n1/a.png".into()],
            hashes: vec![hash.clone()],
            latents: None,
        };
        store.remember_images("k", "a cat", &set);
        // Another process on the same file finds it.
        let again = Store::open(&path).unwrap();
        assert_eq!(again.recall_images("k", "a cat"), Some(set));
        assert_eq!(again.recall_images("k2", "a cat"), None);
        let (from, to) = (Path::new("n1/a.png"), Path::new("n2/a.png"));
        assert_eq!(
            again.take_image(from, &hash, to).unwrap(),
            Some(img.clone())
        );
        let copied = std::fs::read(dir.path().join("dnd.sqlite.images/n2/a.png")).unwrap();
        assert_eq!(blake3::hash(&copied).to_hex().as_str(), hash);
        // Its own file, for a neuron described again: taken where it is.
        assert_eq!(again.take_image(to, &hash, to).unwrap(), Some(img.clone()));
        // Written again (its neuron described anew): no longer the indexed image.
        let other = image::RgbImage::from_pixel(5, 4, image::Rgb([9, 9, 9]));
        store.save_image(from, &other).unwrap();
        assert_eq!(again.take_image(from, &hash, to).unwrap(), None);
        std::fs::remove_file(dir.path().join("dnd.sqlite.images/n1/a.png")).unwrap();
        assert_eq!(again.take_image(from, &hash, to).unwrap(), None);
        again.forget_images("k", "a cat");
        assert_eq!(store.recall_images("k", "a cat"), None);
    }

    #[test]
    fn unwritable_location_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let err = Store::open(&file.join("dnd.sqlite")).unwrap_err();
        assert!(err.to_string().contains("file"), "{err}");
    }
}
