//! `pipeline prepare` from the Hugging Face hub, against the loopback hub of `e2e::hub` (real HTTP
//! on 127.0.0.1, no network). One test per property:
//! 1 shards equal `--source DIR`; 2 Range resume + Retry-After; 3 sha mismatch; 4 offline;
//! 5 budget stops downloads; 6 gated tokenizer.
//!
//! The prepare runs go through the same two calls the CLI makes (`fetch::cli::tokenizer_path`,
//! `fetch::cli::open_source`) with an explicit `HubEnv`, because tests share one process and
//! must not race on `HF_ENDPOINT` & co (`HubEnv::from_env` is unit-tested in `fetch::env`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use e2e::hub::HubServer;
use pipeline::fetch::cache::{RepoCache, RepoType};
use pipeline::fetch::client::{Client, HubRepo, Wanted};
use pipeline::fetch::{self, Budget, FetchError, HubArgs, HubEnv};
use pipeline::prepare::{self, Outcome, PrepareConfig};
use pipeline::source::{LocalSource, Source, processing_order};
use pipeline::tokenize::Tokenizer;

const DATASET: &str = "HuggingFaceFW/fineweb-edu";
const TOKENIZER_REPO: &str = "meta-llama/Llama-2-7b-hf";
/// Small enough that one fixture file (about 1.7M tokens) covers it.
const SMALL: u64 = 100_000;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn sample_dir() -> PathBuf {
    fixtures().join("fineweb-edu-sample")
}

fn tokenizer_file() -> PathBuf {
    fixtures().join("tokenizer/tokenizer.json")
}

fn server() -> HubServer {
    HubServer::builder()
        .dataset(DATASET, &sample_dir())
        .model_file(TOKENIZER_REPO, "tokenizer.json", &tokenizer_file())
        .page_size(2)
        .start()
}

fn hub_env(hub: Option<&HubServer>, cache: &Path, offline: bool) -> HubEnv {
    HubEnv {
        // Offline runs get a port nothing listens on: any request would fail loudly.
        endpoint: hub.map_or("http://127.0.0.1:9".into(), |h| h.url().to_owned()),
        token: None,
        cache_dir: cache.to_owned(),
        offline,
    }
}

fn hub_args(keep_downloads: bool) -> HubArgs {
    HubArgs {
        dataset: DATASET.into(),
        subset: "sample/10BT".into(),
        revision: "main".into(),
        keep_downloads,
    }
}

fn config(out: &Path, tokens: u64) -> PrepareConfig {
    e2e::fixtures::prepare_config(out, tokens, 256)
}

/// `pipeline prepare --source hub`, wired as the CLI wires it.
fn prepare_hub(
    env: &HubEnv,
    args: &HubArgs,
    cfg: &PrepareConfig,
    hub_tokenizer: bool,
) -> anyhow::Result<Outcome> {
    let tok_path = if hub_tokenizer {
        fetch::cli::tokenizer_path(env, TOKENIZER_REPO)?
    } else {
        tokenizer_file()
    };
    let tok = Tokenizer::load(&tok_path)?;
    let budget = Budget {
        train_tokens: cfg.train_sequences() * cfg.seq_len as u64,
        eval_tokens: cfg.eval_sequences * cfg.seq_len as u64,
        seed: cfg.seed,
        out: cfg.out.clone(),
    };
    let mut source = fetch::cli::open_source(env, args, &budget, &tok)?;
    prepare::prepare(cfg, &mut source, &tok)
}

/// Every shard file (`*.bin`) of a dataset folder, by name.
fn shards(out: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".bin"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn manifest(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap()
}

fn manifest_files(out: &Path) -> Vec<String> {
    manifest(out)["dataset"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_owned())
        .collect()
}

/// The fixture files in the pipeline's processing order for seed 42.
fn order() -> Vec<String> {
    let files = LocalSource::open(&sample_dir()).unwrap().files().to_vec();
    processing_order(&files, 42)
        .into_iter()
        .map(|i| files[i].path.clone())
        .collect()
}

/// Blobs of the dataset in the cache (downloads still on disk).
fn cached_blobs(cache: &Path) -> Vec<String> {
    let dir = cache.join("datasets--HuggingFaceFW--fineweb-edu/blobs");
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The `pipeline` CLI (built by this package), with the hub environment of one test only.
const BIN: &str = env!("CARGO_BIN_EXE_pipeline-e2e");

fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env("RUST_LOG", "info");
    for k in [
        "HF_ENDPOINT",
        "HF_TOKEN",
        "HF_TOKEN_PATH",
        "HF_HOME",
        "HF_HUB_CACHE",
        "HF_HUB_OFFLINE",
    ] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn small_args<'a>(out: &'a str, tokens: &'a str) -> Vec<&'a str> {
    vec![
        "prepare",
        "--out",
        out,
        "--tokens",
        tokens,
        "--seq-len",
        "128",
        "--eval-sequences",
        "16",
        "--threads",
        "2",
    ]
}

/// Point 1, through the CLI: `pipeline prepare` with no source flag reads the hub named by
/// `HF_ENDPOINT` (cache under `HF_HOME`, default tokenizer from the hub) and writes shards equal
/// to `--source DIR` on the same files; the manifest pins the commit; every request names the
/// commit; downloads are deleted after use. Two files are needed, so the second downloads while
/// the first is tokenized, and the third (beyond the budget) is never requested.
#[test]
fn hub_shards_equal_local_folder_shards() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("hf-home");
    let out_hub = tmp.path().join("hub-shards");
    let out_dir = tmp.path().join("dir-shards");
    let (out_hub_s, out_dir_s) = (out_hub.to_str().unwrap(), out_dir.to_str().unwrap());
    let tokens = "3M";

    let o = cli(
        &small_args(out_hub_s, tokens),
        &[
            ("HF_ENDPOINT", hub.url()),
            ("HF_HOME", home.to_str().unwrap()),
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        !log.contains("NOT the LLaMA-2"),
        "the hub tokenizer is the known one: {log}"
    );
    assert!(
        log.contains("plan:") && log.contains("disk needed"),
        "the download plan is printed: {log}"
    );
    let (sample, tok) = (sample_dir(), tokenizer_file());
    let mut local = small_args(out_dir_s, tokens);
    local.extend(["--source", sample.to_str().unwrap()]);
    local.extend(["--tokenizer", tok.to_str().unwrap()]);
    let o = cli(&local, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let a = shards(&out_hub);
    assert!(a.len() >= 2, "train and eval shards: {:?}", a.keys());
    assert_eq!(a, shards(&out_dir), "hub and --source DIR shards differ");

    let commit = hub.commit(DATASET);
    let m = manifest(&out_hub);
    assert_eq!(m["dataset"]["repo"], DATASET);
    assert_eq!(m["dataset"]["revision"], commit.as_str());
    let used = manifest_files(&out_hub);
    assert_eq!(used, order()[..2], "two files, in the pipeline's order");
    for f in m["dataset"]["files"].as_array().unwrap() {
        let path = f["path"].as_str().unwrap();
        assert_eq!(f["sha256"], hub.sha256(DATASET, path).as_str());
    }

    // Pinned: after the one revision lookup, every dataset request names the commit sha.
    for r in hub.requests() {
        let pinned = r.target.contains(&commit)
            || r.target.starts_with("/signed/")
            || r.target
                .starts_with(&format!("/api/datasets/{DATASET}/revision/main"))
            || r.target.starts_with(&format!("/{TOKENIZER_REPO}/"));
        assert!(pinned, "unpinned request {r:?}");
    }
    let pages = hub
        .requests()
        .iter()
        .filter(|r| r.target.contains("/tree/"))
        .count();
    assert_eq!(pages, 2, "3 files at 2 per page");
    assert!(
        hub.requests_for(&order()[2]).is_empty(),
        "the third file is beyond need"
    );
    // Deleted after use (no --keep-downloads): no parquet blob left in the cache.
    assert_eq!(cached_blobs(&home.join("hub")), Vec::<String>::new());
}

/// Killed (abort, like `kill -9`) after the first file's documents are safe, then re-run: the
/// finished file is not downloaded again, the shards equal an uninterrupted run, and the file
/// the killed run had downloaded for later is still deleted after use.
#[test]
fn killed_hub_run_resumes_without_refetching_finished_files() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (tmp.path().join("home-a"), tmp.path().join("home-b"));
    let (out_a, out_b) = (tmp.path().join("a"), tmp.path().join("b"));
    let env_a = [
        ("HF_ENDPOINT", hub.url()),
        ("HF_HOME", home_a.to_str().unwrap()),
    ];
    let o = cli(&small_args(out_a.to_str().unwrap(), "3M"), &env_a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let env_b = [
        ("HF_ENDPOINT", hub.url()),
        ("HF_HOME", home_b.to_str().unwrap()),
    ];
    // Crash points count tokenizer batches too: find the one after the first work file.
    let mut crashed = false;
    for n in 1..=64 {
        std::fs::remove_dir_all(&out_b).ok();
        std::fs::remove_dir_all(&home_b).ok();
        let n = n.to_string();
        let mut killed = env_b.to_vec();
        killed.push(("PIPELINE_TEST_ABORT_AFTER", &n));
        let o = cli(&small_args(out_b.to_str().unwrap(), "3M"), &killed);
        assert!(!o.status.success(), "crash point {n} aborts");
        if String::from_utf8_lossy(&o.stderr).contains("aborting at `work file finished`") {
            crashed = true;
            break;
        }
    }
    assert!(crashed, "no crash point after the first work file");
    assert!(!out_b.join("manifest.json").exists());

    let before = hub.requests().len();
    let o = cli(&small_args(out_b.to_str().unwrap(), "3M"), &env_b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(shards(&out_b), shards(&out_a));
    let rerun: Vec<_> = hub.requests().into_iter().skip(before).collect();
    let first = order()[0].clone();
    assert!(
        rerun
            .iter()
            .all(|r| r.file.as_deref() != Some(first.as_str())),
        "{first} was tokenized before the kill but fetched again: {rerun:?}"
    );
    assert_eq!(cached_blobs(&home_b.join("hub")), Vec::<String>::new());
}

/// Point 2a: a connection cut mid-file resumes with `Range` from the bytes on disk, after
/// re-resolving the (single-use, so expired) signed URL; the file is byte-identical.
#[test]
fn cut_connection_resumes_with_range_and_reresolves_expired_url() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let env = hub_env(Some(&hub), tmp.path(), false);
    let file = "sample/10BT/001_00000.parquet";
    let size = std::fs::metadata(sample_dir().join(file)).unwrap().len();
    let cut = size / 2;
    hub.cut_once(file, cut);
    hub.single_use_signed_urls();

    let client = Client::new(&env);
    let cache = RepoCache::new(tmp.path(), RepoType::Dataset, DATASET);
    let got = client
        .download(
            &cache,
            &Wanted {
                repo: HubRepo::dataset(DATASET),
                revision: hub.commit(DATASET),
                path: file.into(),
                size: Some(size),
                sha256: Some(hub.sha256(DATASET, file)),
            },
        )
        .unwrap();
    assert_eq!(
        std::fs::read(&got.path).unwrap(),
        std::fs::read(sample_dir().join(file)).unwrap()
    );
    let log = hub.requests_for(file);
    let downloads: Vec<_> = log
        .iter()
        .filter(|r| r.method == "GET" && r.target.starts_with("/signed/"))
        .collect();
    assert_eq!(downloads[0].range, None, "first GET is the whole file");
    let resumed = downloads
        .iter()
        .find(|r| r.status == 206)
        .expect("a ranged GET");
    assert_eq!(
        resumed.range.as_deref(),
        Some(format!("bytes={cut}-").as_str())
    );
    let resolves = log
        .iter()
        .filter(|r| r.target.contains("/resolve/"))
        .count();
    assert!(
        resolves >= 2,
        "the expired signed URL was re-resolved: {log:?}"
    );
}

/// Point 2a, across runs: the partial file a killed run left behind is continued with `Range`,
/// not downloaded again.
#[test]
fn partial_download_from_an_earlier_run_is_resumed() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let file = "sample/10BT/002_00000.parquet";
    let bytes = std::fs::read(sample_dir().join(file)).unwrap();
    let sha = hub.sha256(DATASET, file);
    let cache = RepoCache::new(tmp.path(), RepoType::Dataset, DATASET);
    std::fs::create_dir_all(cache.blob(&sha).parent().unwrap()).unwrap();
    let kept = 1_000_000;
    std::fs::write(cache.partial(&sha), &bytes[..kept]).unwrap();

    let got = Client::new(&hub_env(Some(&hub), tmp.path(), false))
        .download(
            &cache,
            &Wanted {
                repo: HubRepo::dataset(DATASET),
                revision: hub.commit(DATASET),
                path: file.into(),
                size: Some(bytes.len() as u64),
                sha256: Some(sha.clone()),
            },
        )
        .unwrap();
    assert_eq!(std::fs::read(&got.path).unwrap(), bytes);
    assert!(!cache.partial(&sha).exists());
    let gets: Vec<_> = hub
        .requests_for(file)
        .into_iter()
        .filter(|r| r.target.starts_with("/signed/"))
        .collect();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert_eq!(
        gets[0].range.as_deref(),
        Some(format!("bytes={kept}-").as_str())
    );
}

/// Point 2b: a 429 with `Retry-After: 1` is waited out (about a second), then succeeds.
#[test]
fn too_many_requests_waits_for_retry_after() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let env = hub_env(Some(&hub), tmp.path(), false);
    hub.throttle_once("tokenizer.json", 1);
    let start = Instant::now();
    let (path, source) = fetch::fetch_tokenizer(&env, TOKENIZER_REPO, "main").unwrap();
    let waited = start.elapsed();
    assert!(waited.as_secs_f64() >= 1.0, "waited only {waited:?}");
    assert!(
        waited.as_secs_f64() < 5.0,
        "waited {waited:?}: Retry-After is 1 s"
    );
    assert_eq!(
        source,
        format!("{TOKENIZER_REPO}@{}", hub.commit(TOKENIZER_REPO))
    );
    assert_eq!(
        std::fs::read(path).unwrap(),
        std::fs::read(tokenizer_file()).unwrap()
    );
    let statuses: Vec<u16> = hub
        .requests_for("tokenizer.json")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses[..2], [429, 302], "{statuses:?}");
}

/// Point 2b, without `Retry-After`: 5xx answers are retried with growing, jittered backoff;
/// a hub that stays down is given up on with a hint, naming the file.
#[test]
fn server_errors_are_retried_with_backoff_then_given_up() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let mut client = Client::new(&hub_env(Some(&hub), tmp.path(), false));
    client.retry.base = std::time::Duration::from_millis(100);
    let file = "sample/10BT/001_00000.parquet";
    let wanted = Wanted {
        repo: HubRepo::dataset(DATASET),
        revision: hub.commit(DATASET),
        path: file.into(),
        size: None,
        sha256: Some(hub.sha256(DATASET, file)),
    };
    let cache = RepoCache::new(tmp.path(), RepoType::Dataset, DATASET);

    // Two failures, then success: waits of 50-100 ms and 100-200 ms.
    hub.outage(file, 503, 2);
    let start = Instant::now();
    client.download(&cache, &wanted).unwrap();
    let waited = start.elapsed().as_secs_f64();
    assert!(waited >= 0.15, "backoff waited only {waited} s");
    let statuses: Vec<u16> = hub.requests_for(file).iter().map(|r| r.status).collect();
    assert_eq!(statuses[..3], [503, 503, 302], "{statuses:?}");

    // Down for longer than the policy allows: a clear error, nothing left in the cache.
    client.retry.attempts = 3;
    hub.outage("sample/10BT/002_00000.parquet", 500, 10);
    let err = client
        .download(
            &cache,
            &Wanted {
                path: "sample/10BT/002_00000.parquet".into(),
                sha256: Some(hub.sha256(DATASET, "sample/10BT/002_00000.parquet")),
                ..wanted.clone()
            },
        )
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("sample/10BT/002_00000.parquet")
            && msg.contains("giving up after 3")
            && msg.contains("HTTP 500")
            && msg.contains("hint:"),
        "{msg}"
    );
}

/// Point 3: bytes that do not match the listed sha256 are rejected: a one-line error naming the
/// file, the download deleted, no manifest written.
#[test]
fn sha_mismatch_is_rejected_and_no_manifest_is_written() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let env = hub_env(Some(&hub), &cache, false);
    let first = order()[0].clone();
    hub.corrupt(&first);
    let out = tmp.path().join("shards");

    let err = prepare_hub(&env, &hub_args(false), &config(&out, SMALL), false).unwrap_err();
    let fetch_err = err.downcast_ref::<FetchError>().expect("a FetchError");
    assert!(
        matches!(fetch_err, FetchError::ShaMismatch { file, .. } if *file == first),
        "{err:#}"
    );
    let msg = format!("{err:#}");
    assert!(msg.contains(&first) && msg.contains("hint:"), "{msg}");
    assert!(!out.join("manifest.json").exists());
    assert_eq!(
        cached_blobs(&cache),
        Vec::<String>::new(),
        "bad bytes deleted"
    );
}

/// Point 4: offline with a warm cache needs no server and gives the same shards; with a cold
/// cache it names what is missing (tokenizer, revision, a parquet file).
#[test]
fn offline_uses_only_the_cache_and_names_missing_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out_online = tmp.path().join("online");
    {
        let hub = server();
        let env = hub_env(Some(&hub), &cache, false);
        prepare_hub(&env, &hub_args(true), &config(&out_online, SMALL), true).unwrap();
    } // the server is gone from here on

    let offline = hub_env(None, &cache, true);
    let out_offline = tmp.path().join("offline");
    prepare_hub(
        &offline,
        &hub_args(false),
        &config(&out_offline, SMALL),
        true,
    )
    .unwrap();
    assert_eq!(shards(&out_offline), shards(&out_online));
    assert_eq!(
        manifest(&out_offline)["dataset"],
        manifest(&out_online)["dataset"]
    );
    assert_eq!(
        cached_blobs(&cache).len(),
        1,
        "an offline run deletes nothing"
    );

    // Warm but too small: the budget needs the second file, which was never downloaded.
    let out_more = tmp.path().join("more");
    let err = prepare_hub(
        &offline,
        &hub_args(false),
        &config(&out_more, 3_000_000),
        true,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        matches!(
            err.downcast_ref::<FetchError>(),
            Some(FetchError::OfflineMissing { .. })
        ),
        "{msg}"
    );
    assert!(
        msg.contains(&order()[1]) && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
    assert!(!out_more.join("manifest.json").exists());

    // A cache filled by Python `huggingface_hub` has no listing of ours: its snapshot is used.
    std::fs::remove_dir_all(cache.join("datasets--HuggingFaceFW--fineweb-edu/.pipeline-listings"))
        .unwrap();
    let out_snapshot = tmp.path().join("from-snapshot");
    prepare_hub(
        &offline,
        &hub_args(false),
        &config(&out_snapshot, SMALL),
        true,
    )
    .unwrap();
    assert_eq!(shards(&out_snapshot), shards(&out_online));

    // Cold cache: the hub tokenizer is the first thing missing, then the dataset revision.
    let cold = hub_env(None, &tmp.path().join("cold"), true);
    let out_cold = tmp.path().join("cold-out");
    let msg = format!(
        "{:#}",
        prepare_hub(&cold, &hub_args(false), &config(&out_cold, SMALL), true).unwrap_err()
    );
    assert!(
        msg.contains(&format!("{TOKENIZER_REPO}/tokenizer.json")),
        "{msg}"
    );
    let msg = format!(
        "{:#}",
        prepare_hub(&cold, &hub_args(false), &config(&out_cold, SMALL), false).unwrap_err()
    );
    assert!(
        msg.contains(&format!("{DATASET} revision main")) && msg.contains("refs/main"),
        "{msg}"
    );
}

/// Point 5: with a small budget, files beyond need are never requested, not even listed-then-
/// probed: the server's log has no request for them.
#[test]
fn small_budget_never_requests_files_beyond_need() {
    let hub = server();
    let tmp = tempfile::tempdir().unwrap();
    let env = hub_env(Some(&hub), &tmp.path().join("hub"), false);
    let out = tmp.path().join("shards");
    prepare_hub(&env, &hub_args(false), &config(&out, SMALL), false).unwrap();

    let used = manifest_files(&out);
    assert_eq!(used, order()[..1], "one file covers {SMALL} tokens");
    for f in &order() {
        let requests = hub.requests_for(f);
        if used.contains(f) {
            assert!(!requests.is_empty(), "{f} was used but never requested");
        } else {
            assert!(
                requests.is_empty(),
                "{f} is beyond need but was requested: {requests:?}"
            );
        }
    }

    // Re-running the finished dataset finds it complete without downloading anything.
    let before = hub.requests().len();
    let again = prepare_hub(&env, &hub_args(false), &config(&out, SMALL), false).unwrap();
    assert!(matches!(again, Outcome::AlreadyComplete(_)));
    let after: Vec<_> = hub.requests().into_iter().skip(before).collect();
    assert!(after.iter().all(|r| r.file.is_none()), "{after:?}");
}

/// Point 6: a gated tokenizer (401 anonymous, 403 without access) explains HF_TOKEN and
/// `--tokenizer PATH`; with an accepted token it downloads.
#[test]
fn gated_tokenizer_explains_hf_token_and_local_path() {
    for status in [401u16, 403] {
        let hub = server();
        hub.gate(TOKENIZER_REPO, status, Some("hf_granted"));
        let tmp = tempfile::tempdir().unwrap();
        let mut env = hub_env(Some(&hub), tmp.path(), false);
        let err = fetch::cli::tokenizer_path(&env, TOKENIZER_REPO).unwrap_err();
        assert!(
            matches!(err.downcast_ref::<FetchError>(), Some(FetchError::Gated { status: s, .. }) if *s == status),
            "{err:#}"
        );
        let msg = format!("{err:#}");
        for needle in [
            TOKENIZER_REPO,
            "HF_TOKEN",
            "--tokenizer PATH",
            "hint:",
            &status.to_string(),
        ] {
            assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
        }

        env.token = Some("hf_granted".into());
        let path = fetch::cli::tokenizer_path(&env, TOKENIZER_REPO).unwrap();
        assert_eq!(
            std::fs::read(path).unwrap(),
            std::fs::read(tokenizer_file()).unwrap()
        );
        // The same through the CLI naming the repo: one `error:` line, non-zero exit, no dataset
        // (a repo named with --tokenizer is never replaced by the bundled copy).
        let out = tmp.path().join("shards");
        let mut args = small_args(out.to_str().unwrap(), "100K");
        args.extend(["--tokenizer", TOKENIZER_REPO]);
        let o = cli(
            &args,
            &[
                ("HF_ENDPOINT", hub.url()),
                ("HF_HOME", tmp.path().join("cli-home").to_str().unwrap()),
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success());
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_default();
        assert!(
            line.contains("HF_TOKEN") && line.contains("--tokenizer PATH"),
            "{err}"
        );
        assert!(!out.join("manifest.json").exists());

        let sent = hub.requests_for("tokenizer.json");
        assert!(
            sent.iter()
                .any(|r| r.authorization.as_deref() == Some("Bearer hf_granted")),
            "HF_TOKEN was passed on"
        );
        assert!(
            sent.iter()
                .filter(|r| r.target.starts_with("/signed/"))
                .all(|r| r.authorization.is_none()),
            "the token never goes to the signed CDN URL"
        );
    }
}

/// Without `--tokenizer`, a default repo that cannot be read (gated without HF_TOKEN, or
/// HF_HUB_OFFLINE with an empty cache) gives way to the bundled copy: said in one line, recorded
/// as `tokenizer.bundled`, and the shards are those of the same file passed with `--tokenizer`.
/// A readable repo is used as before, with no `bundled` key.
#[test]
fn an_unreadable_default_tokenizer_falls_back_to_the_bundled_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let sample = sample_dir();
    let run = |name: &str, extra: &[&str], env: &[(&str, &str)]| {
        let out = tmp.path().join(name);
        let mut args = small_args(out.to_str().unwrap(), "100K");
        args.extend(["--source", sample.to_str().unwrap()]);
        args.extend(extra);
        let o = cli(&args, env);
        let log = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{name}: {log}");
        let said: Vec<String> = log
            .lines()
            .filter(|l| l.contains("built into pipeline"))
            .map(str::to_owned)
            .collect();
        (out, said)
    };
    let fixture = tokenizer_file();
    let (reference, said) = run("by-path", &["--tokenizer", fixture.to_str().unwrap()], &[]);
    assert!(said.is_empty(), "{said:?}");
    assert!(manifest(&reference)["tokenizer"].get("bundled").is_none());

    let hub = server();
    hub.gate(TOKENIZER_REPO, 401, Some("hf_granted"));
    let home = tmp.path().join("home");
    let home = home.to_str().unwrap();
    let (gated, said) = run(
        "gated",
        &[],
        &[("HF_ENDPOINT", hub.url()), ("HF_HOME", home)],
    );
    assert_eq!(said.len(), 1, "one line says so: {said:?}");
    assert!(
        said[0].contains(TOKENIZER_REPO) && said[0].contains("401"),
        "{said:?}"
    );
    assert!(
        !hub.requests_for("tokenizer.json").is_empty(),
        "the hub was asked first"
    );
    let m = manifest(&gated);
    assert_eq!(m["tokenizer"]["bundled"], true);
    assert_eq!(m["tokenizer"]["source"], TOKENIZER_REPO);
    assert_eq!(m["tokenizer"]["sha256"], fetch::LLAMA2_TOKENIZER_SHA256);
    assert_eq!(
        std::fs::read(gated.join("tokenizer.json")).unwrap(),
        std::fs::read(&fixture).unwrap()
    );
    assert_eq!(shards(&gated), shards(&reference));
    assert_eq!(m["fingerprint"], manifest(&reference)["fingerprint"]);

    let (offline, said) = run(
        "offline",
        &[],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", tmp.path().join("empty").to_str().unwrap()),
        ],
    );
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("HF_HUB_OFFLINE"), "{said:?}");
    assert_eq!(manifest(&offline)["tokenizer"]["bundled"], true);

    // With access, the hub's file is used and nothing is said.
    let open = server();
    let (hubbed, said) = run(
        "open",
        &[],
        &[
            ("HF_ENDPOINT", open.url()),
            ("HF_HOME", tmp.path().join("home2").to_str().unwrap()),
        ],
    );
    assert!(said.is_empty(), "{said:?}");
    assert!(manifest(&hubbed)["tokenizer"].get("bundled").is_none());
    assert_eq!(shards(&hubbed), shards(&reference));

    // The file the bundled copy is checked against is the one the run configs require.
    for config in ["bitnet-95m.toml", "tiny.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../configs")
            .join(config);
        let c = trainer::config::Config::load(&path).unwrap();
        assert_eq!(
            c.data.tokenizer_sha256,
            fetch::LLAMA2_TOKENIZER_SHA256,
            "{config}"
        );
    }
}

/// Whatever its source, a tokenizer.json that is not the known LLaMA-2 file is warned about
/// (here: the same JSON plus one trailing newline, so the ids are unchanged but the bytes differ).
#[test]
fn a_tokenizer_other_than_llama2_is_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("tokenizer.json");
    let mut json = std::fs::read(tokenizer_file()).unwrap();
    json.push(b'\n');
    std::fs::write(&other, json).unwrap();
    let out = tmp.path().join("shards");
    let sample = sample_dir();
    let mut args = small_args(out.to_str().unwrap(), "100K");
    args.extend(["--source", sample.to_str().unwrap()]);
    args.extend(["--tokenizer", other.to_str().unwrap()]);
    let o = cli(&args, &[]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    let warning = log
        .lines()
        .find(|l| l.contains("is NOT the LLaMA-2 tokenizer"))
        .unwrap_or_else(|| panic!("no warning in: {log}"));
    assert!(warning.contains("WARN") && warning.contains(fetch::LLAMA2_TOKENIZER_SHA256));
}

/// The listing follows `Link: rel="next"` pages and carries sizes and LFS sha256.
#[test]
fn tree_listing_is_paginated_with_sizes_and_sha256() {
    let hub = HubServer::builder()
        .dataset(DATASET, &sample_dir())
        .page_size(1)
        .start();
    let tmp = tempfile::tempdir().unwrap();
    let client = Client::new(&hub_env(Some(&hub), tmp.path(), false));
    let repo = HubRepo::dataset(DATASET);
    let commit = client.resolve_revision(&repo, "main").unwrap();
    assert_eq!(commit, hub.commit(DATASET));
    let files = client.list_tree(&repo, &commit, "sample/10BT").unwrap();
    let mut expected = order();
    expected.sort();
    let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, expected);
    for f in &files {
        assert_eq!(
            f.size,
            std::fs::metadata(sample_dir().join(&f.path)).unwrap().len()
        );
        assert_eq!(
            f.sha256.as_deref(),
            Some(hub.sha256(DATASET, &f.path).as_str())
        );
    }
    let pages = hub
        .requests()
        .iter()
        .filter(|r| r.target.contains("/tree/"))
        .count();
    assert_eq!(pages, 3, "one page per file");
    let err = client
        .resolve_revision(&repo, "no-such-branch")
        .unwrap_err();
    assert!(format!("{err:#}").contains("--revision"), "{err:#}");
}
