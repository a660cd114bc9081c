//! A loopback Hugging Face hub for tests: real HTTP/1.1 on 127.0.0.1 (a free port, an in-process
//! thread), serving folders in the hub's URL layout, with fault injection and a request log.
//!
//! Routes (the subset of the hub API `pipeline::fetch` uses):
//! - `GET /api/{datasets|models}/{owner}/{name}/revision/{rev}` -> `{"id", "sha", "siblings"}`
//! - `GET /api/datasets/{owner}/{name}/tree/{rev}/{folder}?recursive=true[&cursor=N]` -> file
//!   entries with `size` and `lfs.oid` (sha256), `page_size` per page, `Link: <...>; rel="next"`
//! - `HEAD|GET /datasets/{owner}/{name}/resolve/{rev}/{path}` and `/{owner}/{name}/resolve/...`
//!   (models) -> `302` with `X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`, `ETag` and
//!   `Location: /signed/<token>`, a stand-in for the CDN's signed URL (it can expire)
//! - `GET /signed/<token>` -> the bytes, honouring `Range: bytes=N-` (206 + `Content-Range`)
//!
//! `rev` may be `main` or the repo's commit sha; anything else is 404 `RevisionNotFound`.
//! Written on `std::net` rather than tiny_http because the faults need the raw socket: cutting
//! a connection mid-body must really close it, which tiny_http's keep-alive writer does not.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use sha2::{Digest, Sha256};

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    /// The repo file the request is about (resolve and signed downloads), if any.
    pub file: Option<String>,
    /// The `Range` header, if any.
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dataset,
    Model,
}

struct Blob {
    bytes: Arc<Vec<u8>>,
    sha256: String,
}

struct RepoData {
    kind: Kind,
    id: String,
    commit: String,
    files: BTreeMap<String, Blob>,
}

#[derive(Default)]
struct Faults {
    /// file -> close the connection after sending this many bytes of the file (once).
    cut: HashMap<String, u64>,
    /// file -> answer its next resolve with 429 and this `Retry-After` (once).
    throttle: HashMap<String, u32>,
    /// file -> answer its next resolves with this status (a 5xx outage), this many times.
    outage: HashMap<String, (u16, u32)>,
    /// Files whose bytes are served altered (headers still give the true sha256).
    corrupt: HashSet<String>,
    /// repo id -> (status, token that is let through).
    gated: HashMap<String, (u16, Option<String>)>,
    /// Signed URLs work once; later uses answer 403 like an expired S3 URL.
    single_use: bool,
}

struct Signed {
    repo: usize,
    file: String,
    uses: u32,
}

struct Shared {
    base: String,
    repos: Vec<RepoData>,
    page_size: usize,
    bytes_per_sec: Option<u64>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<Logged>>,
    signed: Mutex<HashMap<String, Signed>>,
    next_token: AtomicU64,
}

/// Builds a [`HubServer`] from folders on disk.
#[derive(Default)]
pub struct HubBuilder {
    repos: Vec<(Kind, String, BTreeMap<String, Vec<u8>>)>,
    page_size: usize,
    bytes_per_sec: Option<u64>,
}

impl HubBuilder {
    /// A dataset repo holding every file below `folder`, named relative to it.
    pub fn dataset(mut self, id: &str, folder: &Path) -> Self {
        let mut files = BTreeMap::new();
        collect(folder, folder, &mut files);
        self.repos.push((Kind::Dataset, id.to_owned(), files));
        self
    }

    /// A model repo holding one file `name` with the bytes of `path`.
    pub fn model_file(mut self, id: &str, name: &str, path: &Path) -> Self {
        let bytes = std::fs::read(path).expect("model file readable");
        let mut files = BTreeMap::new();
        files.insert(name.to_owned(), bytes);
        self.repos.push((Kind::Model, id.to_owned(), files));
        self
    }

    /// Tree entries per listing page (default 2, so pagination is always exercised).
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n;
        self
    }

    /// Serve file bytes at about this rate (to watch progress bars in a manual run).
    pub fn bytes_per_sec(mut self, rate: u64) -> Self {
        self.bytes_per_sec = Some(rate);
        self
    }

    pub fn start(self) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("bound address");
        let base = format!("http://{addr}");
        let repos = self
            .repos
            .into_iter()
            .map(|(kind, id, files)| {
                let mut commit = Sha256::new();
                commit.update(id.as_bytes());
                let files: BTreeMap<String, Blob> = files
                    .into_iter()
                    .map(|(path, bytes)| {
                        let sha256 = hex::encode(Sha256::digest(&bytes));
                        commit.update(path.as_bytes());
                        commit.update(sha256.as_bytes());
                        (
                            path,
                            Blob {
                                bytes: Arc::new(bytes),
                                sha256,
                            },
                        )
                    })
                    .collect();
                RepoData {
                    kind,
                    id,
                    commit: hex::encode(commit.finalize())[..40].to_owned(),
                    files,
                }
            })
            .collect();
        let shared = Arc::new(Shared {
            base: base.clone(),
            repos,
            page_size: if self.page_size == 0 {
                2
            } else {
                self.page_size
            },
            bytes_per_sec: self.bytes_per_sec,
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
            signed: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let shared = shared.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(stream) = conn {
                        let shared = shared.clone();
                        std::thread::spawn(move || handle(&shared, stream));
                    }
                }
            })
        };
        HubServer {
            url: base,
            addr,
            shared,
            stop,
            thread: Some(thread),
        }
    }
}

fn collect(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("fixture folder readable")
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            collect(root, &path, out);
        } else if !e.file_name().to_string_lossy().ends_with(".md") {
            // Provenance notes sit next to fixtures; they are not repo content.
            let rel = path.strip_prefix(root).expect("below root");
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.insert(rel.join("/"), std::fs::read(&path).expect("readable"));
        }
    }
}

/// The running server; stops when dropped.
pub struct HubServer {
    url: String,
    addr: std::net::SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HubServer {
    pub fn builder() -> HubBuilder {
        HubBuilder::default()
    }

    /// `http://127.0.0.1:<port>`, for `HF_ENDPOINT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The commit sha `main` resolves to in repo `id`.
    pub fn commit(&self, id: &str) -> String {
        self.repo(id).commit.clone()
    }

    /// sha256 of a served file.
    pub fn sha256(&self, id: &str, file: &str) -> String {
        self.repo(id).files[file].sha256.clone()
    }

    fn repo(&self, id: &str) -> &RepoData {
        self.shared
            .repos
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("no repo {id}"))
    }

    fn faults(&self) -> MutexGuard<'_, Faults> {
        self.shared.faults.lock().expect("faults lock")
    }

    /// The next download of `file` closes the connection after `after` bytes of the file.
    pub fn cut_once(&self, file: &str, after: u64) {
        self.faults().cut.insert(file.to_owned(), after);
    }

    /// The next `times` resolves of `file` answer `status` (e.g. 503) without `Retry-After`.
    pub fn outage(&self, file: &str, status: u16, times: u32) {
        self.faults()
            .outage
            .insert(file.to_owned(), (status, times));
    }

    /// The next resolve of `file` answers 429 with `Retry-After: secs`.
    pub fn throttle_once(&self, file: &str, secs: u32) {
        self.faults().throttle.insert(file.to_owned(), secs);
    }

    /// `file` is served with one byte changed; its listed sha256 stays the true one.
    pub fn corrupt(&self, file: &str) {
        self.faults().corrupt.insert(file.to_owned());
    }

    /// Resolves in repo `id` answer `status` (401/403) unless `Bearer <token>` is sent.
    pub fn gate(&self, id: &str, status: u16, token: Option<&str>) {
        self.faults()
            .gated
            .insert(id.to_owned(), (status, token.map(str::to_owned)));
    }

    /// Each signed URL serves one request; later ones get 403 (expired).
    pub fn single_use_signed_urls(&self) {
        self.faults().single_use = true;
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.log.lock().expect("log lock").clone()
    }

    /// Requests about one repo file (resolve and download).
    pub fn requests_for(&self, file: &str) -> Vec<Logged> {
        self.requests()
            .into_iter()
            .filter(|r| r.file.as_deref() == Some(file))
            .collect()
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Req {
    method: String,
    target: String,
    headers: HashMap<String, String>,
}

fn read_request(stream: &TcpStream) -> Option<Req> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            break;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    Some(Req {
        method,
        target,
        headers,
    })
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Close the connection after this many body bytes (a cut).
    cut_at: Option<usize>,
    file: Option<String>,
}

impl Reply {
    fn new(status: u16) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            cut_at: None,
            file: None,
        }
    }

    fn json(status: u16, value: serde_json::Value) -> Self {
        let mut r = Reply::new(status);
        r.body = value.to_string().into_bytes();
        r.header("Content-Type", "application/json");
        r
    }

    fn error(status: u16, code: &str, message: &str) -> Self {
        let mut r = Reply::json(status, serde_json::json!({ "error": message }));
        r.header("X-Error-Code", code);
        r
    }

    fn header(&mut self, k: &str, v: &str) {
        self.headers.push((k.to_owned(), v.to_owned()));
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        _ => "Other",
    }
}

fn handle(shared: &Shared, mut stream: TcpStream) {
    let Some(req) = read_request(&stream) else {
        return;
    };
    let reply = route(shared, &req);
    shared.log.lock().expect("log lock").push(Logged {
        method: req.method.clone(),
        target: req.target.clone(),
        file: reply.file.clone(),
        range: req.headers.get("range").cloned(),
        authorization: req.headers.get("authorization").cloned(),
        status: reply.status,
    });
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        reply.status,
        reason(reply.status),
        reply.body.len()
    );
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let body: &[u8] = if req.method == "HEAD" {
        &[]
    } else {
        match reply.cut_at {
            Some(n) => &reply.body[..n.min(reply.body.len())],
            None => &reply.body,
        }
    };
    let _ = stream.write_all(head.as_bytes());
    match shared.bytes_per_sec {
        None => {
            let _ = stream.write_all(body);
        }
        Some(rate) => {
            // Ten chunks a second.
            let chunk = (rate / 10).max(1) as usize;
            for part in body.chunks(chunk) {
                if stream.write_all(part).is_err() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len() + 1
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn route(shared: &Shared, req: &Req) -> Reply {
    let (path, query) = req.target.split_once('?').unwrap_or((&req.target, ""));
    let seg: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(decode)
        .collect();
    let seg: Vec<&str> = seg.iter().map(String::as_str).collect();
    let find = |kind: Kind, owner: &str, name: &str| {
        let id = format!("{owner}/{name}");
        shared
            .repos
            .iter()
            .position(|r| r.kind == kind && r.id == id)
    };
    match seg.as_slice() {
        [
            "api",
            kind @ ("datasets" | "models"),
            owner,
            name,
            "revision",
            rev @ ..,
        ] => {
            let kind = if *kind == "datasets" {
                Kind::Dataset
            } else {
                Kind::Model
            };
            let Some(r) = find(kind, owner, name) else {
                return Reply::error(404, "RepoNotFound", "Repository not found");
            };
            let repo = &shared.repos[r];
            let rev = rev.join("/");
            if rev != "main" && rev != repo.commit {
                return Reply::error(404, "RevisionNotFound", "Invalid rev id");
            }
            let siblings: Vec<_> = repo
                .files
                .keys()
                .map(|f| serde_json::json!({ "rfilename": f }))
                .collect();
            Reply::json(
                200,
                serde_json::json!({ "id": repo.id, "sha": repo.commit, "siblings": siblings }),
            )
        }
        ["api", "datasets", owner, name, "tree", rev, folder @ ..] => {
            let Some(r) = find(Kind::Dataset, owner, name) else {
                return Reply::error(404, "RepoNotFound", "Repository not found");
            };
            tree(shared, r, rev, &folder.join("/"), query)
        }
        ["datasets", owner, name, "resolve", rev, file @ ..] => {
            match find(Kind::Dataset, owner, name) {
                Some(r) => resolve(shared, r, rev, &file.join("/"), req),
                None => Reply::error(404, "RepoNotFound", "Repository not found"),
            }
        }
        [owner, name, "resolve", rev, file @ ..] => match find(Kind::Model, owner, name) {
            Some(r) => resolve(shared, r, rev, &file.join("/"), req),
            None => Reply::error(404, "RepoNotFound", "Repository not found"),
        },
        ["signed", token] => signed(shared, token, req),
        _ => Reply::error(404, "NotFound", "no such route"),
    }
}

fn tree(shared: &Shared, r: usize, rev: &str, folder: &str, query: &str) -> Reply {
    let repo = &shared.repos[r];
    if rev != "main" && rev != repo.commit {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    }
    let recursive = query.split('&').any(|kv| kv == "recursive=true");
    let cursor: usize = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("cursor="))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let prefix = if folder.is_empty() {
        String::new()
    } else {
        format!("{folder}/")
    };
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (path, blob) in &repo.files {
        let Some(rest) = path.strip_prefix(&prefix) else {
            continue;
        };
        // Directory entries as the hub lists them (the client must skip them).
        let mut acc = prefix.trim_end_matches('/').to_owned();
        let parts: Vec<&str> = rest.split('/').collect();
        for d in &parts[..parts.len() - 1] {
            acc = if acc.is_empty() {
                (*d).to_owned()
            } else {
                format!("{acc}/{d}")
            };
            if dirs.insert(acc.clone()) {
                entries.push(serde_json::json!({ "type": "directory", "oid": "0".repeat(40), "size": 0, "path": acc }));
            }
            if !recursive {
                break;
            }
        }
        if parts.len() > 1 && !recursive {
            continue;
        }
        entries.push(serde_json::json!({
            "type": "file",
            "oid": &blob.sha256[..40],
            "size": blob.bytes.len(),
            "path": path,
            "lfs": { "oid": blob.sha256, "size": blob.bytes.len(), "pointerSize": 134 },
        }));
    }
    if entries.is_empty() {
        return Reply::error(404, "EntryNotFound", "no such folder");
    }
    let end = (cursor + shared.page_size).min(entries.len());
    let page: Vec<_> = entries.get(cursor..end).unwrap_or(&[]).to_vec();
    let mut reply = Reply::json(200, serde_json::Value::Array(page));
    if end < entries.len() {
        let kind = "datasets";
        reply.header(
            "Link",
            &format!(
                "<{}/api/{kind}/{}/tree/{rev}/{folder}?recursive={recursive}&cursor={end}>; rel=\"next\"",
                shared.base, repo.id
            ),
        );
    }
    reply
}

fn resolve(shared: &Shared, r: usize, rev: &str, file: &str, req: &Req) -> Reply {
    let repo = &shared.repos[r];
    let mut faults = shared.faults.lock().expect("faults lock");
    if let Some((status, token)) = faults.gated.get(&repo.id) {
        let sent = req.headers.get("authorization");
        let allowed = token
            .as_ref()
            .is_some_and(|t| sent.is_some_and(|s| *s == format!("Bearer {t}")));
        if !allowed {
            let mut reply = Reply::error(
                *status,
                "GatedRepo",
                &format!("Access to model {} is restricted.", repo.id),
            );
            reply.file = Some(file.to_owned());
            return reply;
        }
    }
    if let Some((status, times)) = faults.outage.get_mut(file)
        && *times > 0
    {
        *times -= 1;
        let mut reply = Reply::error(*status, "Unavailable", "try again later");
        reply.file = Some(file.to_owned());
        return reply;
    }
    if let Some(secs) = faults.throttle.remove(file) {
        let mut reply = Reply::error(429, "TooManyRequests", "slow down");
        reply.header("Retry-After", &secs.to_string());
        reply.file = Some(file.to_owned());
        return reply;
    }
    drop(faults);
    if rev != "main" && rev != repo.commit {
        let mut reply = Reply::error(404, "RevisionNotFound", "Invalid rev id");
        reply.file = Some(file.to_owned());
        return reply;
    }
    let Some(blob) = repo.files.get(file) else {
        let mut reply = Reply::error(404, "EntryNotFound", "Entry not found");
        reply.file = Some(file.to_owned());
        return reply;
    };
    let token = format!("t{}", shared.next_token.fetch_add(1, Ordering::SeqCst));
    shared.signed.lock().expect("signed lock").insert(
        token.clone(),
        Signed {
            repo: r,
            file: file.to_owned(),
            uses: 0,
        },
    );
    let mut reply = Reply::new(302);
    reply.header("X-Repo-Commit", &repo.commit);
    reply.header("X-Linked-Etag", &format!("\"{}\"", blob.sha256));
    reply.header("X-Linked-Size", &blob.bytes.len().to_string());
    reply.header("ETag", &format!("\"{}\"", blob.sha256));
    reply.header("Location", &format!("{}/signed/{token}", shared.base));
    reply.file = Some(file.to_owned());
    reply
}

fn signed(shared: &Shared, token: &str, req: &Req) -> Reply {
    let (r, file) = {
        let mut signed = shared.signed.lock().expect("signed lock");
        let Some(s) = signed.get_mut(token) else {
            return Reply::error(403, "AccessDenied", "Request has expired");
        };
        s.uses += 1;
        let single = shared.faults.lock().expect("faults lock").single_use;
        if single && s.uses > 1 {
            let mut reply = Reply::error(403, "AccessDenied", "Request has expired");
            reply.file = Some(s.file.clone());
            return reply;
        }
        (s.repo, s.file.clone())
    };
    let blob = &shared.repos[r].files[&file];
    let mut bytes: Vec<u8> = blob.bytes.as_ref().clone();
    let mut faults = shared.faults.lock().expect("faults lock");
    if faults.corrupt.contains(&file) {
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
    }
    let len = bytes.len() as u64;
    let start = req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse::<u64>().ok());
    let mut reply = match start {
        Some(s) if s >= len => {
            let mut reply = Reply::new(416);
            reply.header("Content-Range", &format!("bytes */{len}"));
            reply.file = Some(file);
            return reply;
        }
        Some(s) => {
            let mut reply = Reply::new(206);
            reply.header("Content-Range", &format!("bytes {s}-{}/{len}", len - 1));
            reply.body = bytes[s as usize..].to_vec();
            reply
        }
        None => {
            let mut reply = Reply::new(200);
            reply.body = bytes;
            reply
        }
    };
    let from = start.unwrap_or(0);
    if let Some(&after) = faults.cut.get(&file)
        && after > from
    {
        faults.cut.remove(&file);
        reply.cut_at = Some((after - from) as usize);
    }
    reply.header("Accept-Ranges", "bytes");
    reply.header("Content-Type", "application/octet-stream");
    reply.file = Some(file);
    reply
}
