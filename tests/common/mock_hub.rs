//! An in-process stand-in for the Hugging Face Hub (`HF_ENDPOINT`) serving model folders as
//! repos: the repo listing (with sizes for `?blobs=true`) and file downloads with the headers
//! and byte ranges hf-hub asks for. Lets downloads be tested with no network.

use std::path::Path;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Files of one repo: (name relative to the repo, bytes).
type Files = Vec<(String, Vec<u8>)>;

struct Repos(Vec<(String, Files)>);

fn files_of(dir: &Path, prefix: &str, out: &mut Files) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = format!("{prefix}{}", e.file_name().to_string_lossy());
        if e.file_type().unwrap().is_dir() {
            files_of(&e.path(), &format!("{name}/"), out);
        } else {
            out.push((name, std::fs::read(e.path()).unwrap()));
        }
    }
}

impl Respond for Repos {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let path = req.url.path();
        for (repo, files) in &self.0 {
            // The listing: /api/models/{repo}/revision/{rev}
            if path.starts_with(&format!("/api/models/{repo}/revision/")) {
                let siblings: Vec<_> = files
                    .iter()
                    .map(|(n, b)| serde_json::json!({"rfilename": n, "size": b.len()}))
                    .collect();
                return ResponseTemplate::new(200).set_body_json(
                    serde_json::json!({"id": repo, "sha": COMMIT, "siblings": siblings}),
                );
            }
            // A file: /{repo}/resolve/{rev}/{file}, asked for in byte ranges.
            let Some(rest) = path.strip_prefix(&format!("/{repo}/resolve/")) else {
                continue;
            };
            let file = rest.split_once('/').map_or("", |(_, f)| f);
            let Some((_, bytes)) = files.iter().find(|(n, _)| n == file) else {
                return ResponseTemplate::new(404);
            };
            let len = bytes.len();
            let (start, stop) = req
                .headers
                .get("range")
                .and_then(|r| {
                    r.to_str()
                        .ok()?
                        .strip_prefix("bytes=")?
                        .split_once('-')
                        .map(|(a, b)| (a.parse::<usize>().ok(), b.parse::<usize>().ok()))
                })
                .map_or((0, len - 1), |(a, b)| {
                    (a.unwrap_or(0), b.unwrap_or(len - 1).min(len - 1))
                });
            return ResponseTemplate::new(206)
                .insert_header("etag", format!("\"etag-{repo}-{file}\"").replace('/', "-"))
                .insert_header("x-repo-commit", COMMIT)
                .insert_header("content-range", format!("bytes {start}-{stop}/{len}"))
                .set_body_bytes(bytes[start..=stop].to_vec());
        }
        ResponseTemplate::new(404)
    }
}

pub struct MockHub {
    server: MockServer,
    _rt: tokio::runtime::Runtime,
}

impl MockHub {
    /// Serves each (repo id, local model folder) pair.
    pub fn start(repos: &[(&str, &Path)]) -> Self {
        let repos = Repos(
            repos
                .iter()
                .map(|(id, dir)| {
                    let mut files = Vec::new();
                    files_of(dir, "", &mut files);
                    (id.to_string(), files)
                })
                .collect(),
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt.block_on(async {
            let server = MockServer::start().await;
            Mock::given(method("GET"))
                .respond_with(repos)
                .mount(&server)
                .await;
            server
        });
        Self { server, _rt: rt }
    }

    /// The value for `HF_ENDPOINT`.
    pub fn url(&self) -> String {
        self.server.uri()
    }
}
