//! Where parquet files come from: the [`Source`] trait (a stream of parquet files) and the local
//! folder source (`--source DIR`). The hub source (`pipeline::fetch`) implements the same trait.
//!
//! A source only lists and delivers files. The *order* in which they are read is decided by the
//! pipeline ([`processing_order`]: a seeded shuffle of the sorted relative paths), so a hub source
//! and a folder holding the same files give byte-identical shards.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::shuffle;

/// One candidate parquet file of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Path relative to the repo root with `/` separators, e.g. `sample/10BT/000_00000.parquet`.
    /// It names the file in the manifest, the documents index and the work files.
    pub path: String,
    /// Size in bytes as listed by the source.
    pub size: u64,
    /// sha256 if the source knows it before fetching (the hub's LFS oid); `None` for a folder.
    pub sha256: Option<String>,
}

/// Identity of a source as recorded in the manifest (`dataset.repo`, `dataset.revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceInfo {
    pub repo: String,
    /// A pinned commit sha for the hub; `local` for a folder.
    pub revision: String,
}

/// A stream of parquet files. The pipeline calls [`Source::files`] once, then, in its own order,
/// [`Source::prefetch`] for the file it will need next, [`Source::fetch`] for the file it reads
/// now and [`Source::release`] once that file's documents are safely in a work file. It stops
/// asking as soon as the token budget is covered, so a lazy source downloads only what is needed.
pub trait Source: Send {
    /// `repo` and pinned `revision`, recorded in the manifest and compared on re-runs.
    fn describe(&self) -> SourceInfo;
    /// Every candidate parquet file, in any order (the pipeline sorts and shuffles them).
    fn files(&self) -> &[SourceFile];
    /// Makes file `i` of [`Source::files`] available locally and returns its path; may block.
    fn fetch(&mut self, i: usize) -> Result<PathBuf>;
    /// Hint that file `i` will be fetched next (a downloading source starts it in the background).
    fn prefetch(&mut self, _i: usize) -> Result<()> {
        Ok(())
    }
    /// The sha256 that file `i`'s bytes were checked against when [`Source::fetch`] made it
    /// available (a verified download), so the pipeline need not hash the file again; `None`
    /// (the default) when the pipeline must hash it.
    fn verified_sha256(&self, _i: usize) -> Option<String> {
        None
    }
    /// Whether reading file `i` early costs nothing but CPU: the pipeline then starts on it
    /// before it knows the files ahead of it fall short of the budget (and drops that work if
    /// they do not). A local folder says yes. A downloading source says no (the default): an
    /// early fetch would move its downloads ahead of a crash point, and files are large enough
    /// that waiting at their boundary costs nothing.
    fn fetch_is_free(&self, _i: usize) -> bool {
        false
    }
    /// File `i` is no longer needed: its documents are in a finished work file, made by this
    /// run or by an earlier one (a downloading source may delete its copy).
    fn release(&mut self, _i: usize) -> Result<()> {
        Ok(())
    }
}

/// `--source DIR`: every `*.parquet` below `DIR` (recursively), named relative to `DIR`.
#[derive(Debug)]
pub struct LocalSource {
    root: PathBuf,
    files: Vec<SourceFile>,
}

impl LocalSource {
    pub fn open(root: &Path) -> Result<Self> {
        let meta = std::fs::metadata(root).with_context(|| {
            format!(
                "--source {}: cannot read the folder; hint: pass a folder laid out like the hub repo, e.g. DIR/sample/10BT/000_00000.parquet",
                root.display()
            )
        })?;
        if !meta.is_dir() {
            bail!(
                "--source {}: not a folder; hint: pass the folder that holds the parquet files (searched recursively)",
                root.display()
            );
        }
        let mut files = Vec::new();
        collect_parquet(root, root, &mut files)?;
        if files.is_empty() {
            bail!(
                "--source {}: no *.parquet file in this folder or below; hint: point --source at a folder laid out like the hub repo (DIR/sample/10BT/*.parquet)",
                root.display()
            );
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(LocalSource {
            root: root.to_owned(),
            files,
        })
    }
}

fn collect_parquet(root: &Path, dir: &Path, out: &mut Vec<SourceFile>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("--source: cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("--source: cannot list {}", dir.display()))?;
        let path = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("--source: cannot stat {}", path.display()))?;
        // Skip hidden entries (`.cache`, editors' temporaries): they are never dataset files.
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if kind.is_dir() {
            collect_parquet(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "parquet") {
            let size = std::fs::metadata(&path)
                .with_context(|| format!("--source: cannot stat {}", path.display()))?
                .len();
            let rel = path.strip_prefix(root).expect("walked below root");
            let rel: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(SourceFile {
                path: rel.join("/"),
                size,
                sha256: None,
            });
        }
    }
    Ok(())
}

impl Source for LocalSource {
    fn describe(&self) -> SourceInfo {
        SourceInfo {
            repo: self.root.display().to_string(),
            revision: "local".into(),
        }
    }

    fn files(&self) -> &[SourceFile] {
        &self.files
    }

    fn fetch(&mut self, i: usize) -> Result<PathBuf> {
        Ok(self.root.join(&self.files[i].path))
    }

    fn fetch_is_free(&self, _i: usize) -> bool {
        true
    }
}

/// The order in which the pipeline reads the files of a source: indices into `files`, a seeded
/// shuffle of the files sorted by path. Depends only on the set of paths and the seed.
pub fn processing_order(files: &[SourceFile], seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..files.len()).collect();
    order.sort_by(|&a, &b| files[a].path.cmp(&files[b].path));
    shuffle::shuffle(&mut order, shuffle::key(seed, "files"));
    order
}

/// The texts of every document of a local source folder, files in path order, rows in file
/// order (null texts as empty strings): the input of the tokenizer benchmark and of the
/// exactness tests, read with the same reader `prepare` uses.
pub fn read_all_texts(root: &Path) -> Result<Vec<String>> {
    let source = LocalSource::open(root)?;
    let mut texts = Vec::new();
    for file in source.files() {
        let docs = crate::documents::read_all(&root.join(&file.path), &file.path)?;
        texts.extend(docs.into_iter().map(|d| d.text.unwrap_or_default()));
    }
    Ok(texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> SourceFile {
        SourceFile {
            path: path.into(),
            size: 1,
            sha256: None,
        }
    }

    #[test]
    fn order_depends_on_paths_and_seed_not_on_listing_order() {
        let a: Vec<SourceFile> = (0..20)
            .map(|i| file(&format!("d/{i:03}.parquet")))
            .collect();
        let mut b = a.clone();
        b.reverse();
        let names = |fs: &[SourceFile], o: Vec<usize>| -> Vec<String> {
            o.into_iter().map(|i| fs[i].path.clone()).collect()
        };
        let na = names(&a, processing_order(&a, 42));
        assert_eq!(na, names(&b, processing_order(&b, 42)));
        assert_ne!(na, names(&a, processing_order(&a, 43)));
        let mut sorted = na.clone();
        sorted.sort();
        assert_ne!(na, sorted, "the order is shuffled");
    }

    #[test]
    fn local_source_lists_parquet_recursively_with_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sample/10BT")).unwrap();
        std::fs::write(dir.path().join("sample/10BT/001_00000.parquet"), b"xy").unwrap();
        std::fs::write(dir.path().join("sample/10BT/000_00000.parquet"), b"x").unwrap();
        std::fs::write(dir.path().join("README.md"), b"not data").unwrap();
        let s = LocalSource::open(dir.path()).unwrap();
        let paths: Vec<&str> = s.files().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "sample/10BT/000_00000.parquet",
                "sample/10BT/001_00000.parquet"
            ]
        );
        assert_eq!(s.files()[1].size, 2);
    }

    #[test]
    fn empty_folder_is_an_error_naming_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalSource::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("--source") && err.contains("no *.parquet"),
            "{err}"
        );
        assert!(err.contains("hint:"), "{err}");
    }
}
