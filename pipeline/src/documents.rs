//! Reading documents out of one parquet file: only the `text` and `id` columns (a projection
//! mask), one row group at a time and in record batches inside it, so memory is bounded by the
//! batch, never by the file. The footer is read once ([`ParquetFile::open`]); row groups can then
//! be decoded on several threads at once ([`ParquetFile::row_group`]). Both columns are read as
//! Arrow string views, whatever their stored string type, so the text stays in the decoded pages
//! and is never copied ([`Batch`]).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::{Array, AsArray, StringViewArray};
use arrow::datatypes::{DataType, Schema};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};

/// Rows decoded per record batch: large enough that handing a batch over costs nothing, small
/// enough that a batch of long documents stays far below a gigabyte.
pub const BATCH_ROWS: usize = 512;

/// One row of the source, owned: its position in the file, its `id` and its `text`
/// ([`read_all`]; `prepare` reads [`Batch`]es).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// Row number within the file (0-based, across row groups).
    pub row: u64,
    pub id: String,
    /// `None` where the parquet value is null; treated like an empty text.
    pub text: Option<String>,
}

/// One parquet file with its footer read and its `text` and `id` columns found. Cheap to clone
/// (the footer is shared), so each decoding thread can hold its own.
#[derive(Clone)]
pub struct ParquetFile {
    name: String,
    path: PathBuf,
    meta: ArrowReaderMetadata,
    text_col: usize,
    id_col: usize,
}

impl std::fmt::Debug for ParquetFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetFile")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn is_string(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

impl ParquetFile {
    /// Opens `path` and reads its footer; `name` (the path inside the repo) names the file in
    /// errors.
    pub fn open(path: &Path, name: &str) -> Result<Self> {
        let file = open_file(path, name)?;
        let unreadable = |e: &dyn std::fmt::Display| {
            anyhow!(
                "{name}: not a readable parquet file ({e}); hint: the file is corrupt or truncated, delete it and fetch it again"
            )
        };
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| unreadable(&e))?;
        let schema = meta.schema().clone();
        let column = |col: &str| -> Result<usize> {
            let (i, field) = schema.column_with_name(col).ok_or_else(|| {
                anyhow!(
                    "{name}: no `{col}` column (columns: {}); hint: the source must have the FineWeb-Edu schema (text, id, ...)",
                    schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                )
            })?;
            if !is_string(field.data_type()) {
                bail!(
                    "{name}: column `{col}` is {}, expected a string (Utf8, LargeUtf8 or Utf8View); hint: the source must have the FineWeb-Edu schema",
                    field.data_type()
                );
            }
            Ok(i)
        };
        let (text_col, id_col) = (column("text")?, column("id")?);
        // Read both as string views: values point into the decoded pages instead of being copied.
        let fields: Vec<_> = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i == text_col || i == id_col {
                    Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8View))
                } else {
                    f.clone()
                }
            })
            .collect();
        let views = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
        let meta = ArrowReaderMetadata::try_new(
            meta.metadata().clone(),
            ArrowReaderOptions::new().with_schema(views),
        )
        .map_err(|e| unreadable(&e))?;
        Ok(ParquetFile {
            name: name.to_owned(),
            path: path.to_owned(),
            text_col,
            id_col,
            meta,
        })
    }

    /// Rows in the file according to its footer.
    pub fn rows(&self) -> u64 {
        self.meta.metadata().file_metadata().num_rows().max(0) as u64
    }

    pub fn row_groups(&self) -> usize {
        self.meta.metadata().num_row_groups()
    }

    /// Rows in row group `g` according to the footer.
    pub fn row_group_rows(&self, g: usize) -> u64 {
        self.meta.metadata().row_group(g).num_rows().max(0) as u64
    }

    /// A reader of row group `g`'s documents, in record batches of [`BATCH_ROWS`] rows.
    pub fn row_group(&self, g: usize) -> Result<RowGroupDocuments> {
        let groups = self.meta.metadata().row_groups();
        let first_row = groups[..g]
            .iter()
            .map(|rg| rg.num_rows().max(0) as u64)
            .sum();
        let rows = groups[g].num_rows().max(0) as u64;
        let corrupt = |e: &dyn std::fmt::Display| corrupt(&self.name, g, e);
        let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(
            open_file(&self.path, &self.name)?,
            self.meta.clone(),
        );
        let mask = ProjectionMask::roots(builder.parquet_schema(), [self.text_col, self.id_col]);
        let reader = builder
            .with_projection(mask)
            .with_row_groups(vec![g])
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| corrupt(&e))?;
        Ok(RowGroupDocuments {
            name: self.name.clone(),
            group: g,
            reader,
            next_row: first_row,
            end_row: first_row + rows,
        })
    }
}

fn open_file(path: &Path, name: &str) -> Result<File> {
    File::open(path).with_context(|| format!("{name}: cannot open {}", path.display()))
}

fn corrupt(name: &str, group: usize, e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "{name}: cannot decode row group {group} ({e}); hint: the file is corrupt or truncated, delete it and fetch it again"
    )
}

/// The documents of one row group, in file order.
pub struct RowGroupDocuments {
    name: String,
    group: usize,
    reader: ParquetRecordBatchReader,
    next_row: u64,
    end_row: u64,
}

impl RowGroupDocuments {
    /// The next batch of documents; `None` after the row group's last row.
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let Some(batch) = self.reader.next() else {
            if self.next_row != self.end_row {
                bail!(
                    "{}: row group {} ends at row {}, the footer promises {}; hint: the file is corrupt, delete it and fetch it again",
                    self.name,
                    self.group,
                    self.next_row,
                    self.end_row
                );
            }
            return Ok(None);
        };
        let batch = batch.map_err(|e| corrupt(&self.name, self.group, &e))?;
        let column = |name: &str| {
            let c = batch.column_by_name(name).expect("projected column");
            c.as_string_view().clone()
        };
        let (text, id) = (column("text"), column("id"));
        if let Some(k) = (0..id.len()).find(|&k| id.is_null(k)) {
            bail!(
                "{}: row {} has a null `id` (the eval split is chosen by id); hint: every document needs an id",
                self.name,
                self.next_row + k as u64
            );
        }
        let first_row = self.next_row;
        self.next_row += text.len() as u64;
        Ok(Some(Batch {
            first_row,
            text,
            id,
        }))
    }
}

/// Consecutive documents of one row group, in Arrow's buffers.
#[derive(Debug)]
pub struct Batch {
    first_row: u64,
    text: StringViewArray,
    id: StringViewArray,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// Row number of document `i` within the file (0-based, across row groups).
    pub fn row(&self, i: usize) -> u64 {
        self.first_row + i as u64
    }

    pub fn id(&self, i: usize) -> &str {
        self.id.value(i)
    }

    /// `None` where the parquet value is null; treated like an empty text.
    pub fn text(&self, i: usize) -> Option<&str> {
        (!self.text.is_null(i)).then(|| self.text.value(i))
    }
}

/// Every document of `path`, in file order (tests and benchmarks; `prepare` streams).
pub fn read_all(path: &Path, name: &str) -> Result<Vec<Document>> {
    let file = ParquetFile::open(path, name)?;
    let mut all = Vec::new();
    for g in 0..file.row_groups() {
        let mut docs = file.row_group(g)?;
        while let Some(batch) = docs.next_batch()? {
            all.extend((0..batch.len()).map(|i| Document {
                row: batch.row(i),
                id: batch.id(i).to_owned(),
                text: batch.text(i).map(str::to_owned),
            }));
        }
    }
    Ok(all)
}

/// Writes a small parquet file (test helper): columns `text` and `id` of the given type.
#[cfg(test)]
pub(crate) fn write_test_parquet(
    path: &Path,
    rows: &[(Option<&str>, &str)],
    text_type: DataType,
    row_group_rows: usize,
) {
    use arrow::array::{ArrayRef, LargeStringArray, RecordBatch, StringArray};
    use arrow::datatypes::Field;

    let text: ArrayRef = match text_type {
        DataType::Utf8 => Arc::new(StringArray::from_iter(rows.iter().map(|r| r.0))),
        DataType::LargeUtf8 => Arc::new(LargeStringArray::from_iter(rows.iter().map(|r| r.0))),
        DataType::Utf8View => Arc::new(StringViewArray::from_iter(rows.iter().map(|r| r.0))),
        _ => panic!("string types only"),
    };
    let id: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1)));
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", text_type, true),
    ]));
    let batch = RecordBatch::try_new(schema.clone(), vec![id, text]).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(row_group_rows))
        .build();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(File::create(path).unwrap(), schema, Some(props))
            .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path) -> Result<Vec<Document>> {
        super::read_all(path, "x.parquet")
    }

    #[test]
    fn reads_every_string_layout_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(Option<&str>, &str)> = vec![
            (Some("a"), "1"),
            (None, "2"),
            (Some(""), "3"),
            (Some("dé"), "4"),
            (Some("e"), "5"),
        ];
        for t in [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View] {
            let p = dir.path().join("x.parquet");
            write_test_parquet(&p, &rows, t.clone(), 2);
            let docs = read_all(&p).unwrap();
            assert_eq!(docs.len(), 5, "{t}");
            assert_eq!(
                docs[3],
                Document {
                    row: 3,
                    id: "4".into(),
                    text: Some("dé".into())
                }
            );
            assert_eq!(docs[1].text, None);
        }
    }

    #[test]
    fn missing_text_and_corrupt_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.parquet");
        write_test_parquet(&p, &[(Some("a"), "1")], DataType::Utf8, 10);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
        let err = read_all(&p).unwrap_err().to_string();
        assert!(
            err.starts_with("x.parquet: not a readable parquet") && err.contains("hint:"),
            "{err}"
        );
        std::fs::write(&p, b"not parquet at all").unwrap();
        assert!(read_all(&p).is_err());
    }
}
