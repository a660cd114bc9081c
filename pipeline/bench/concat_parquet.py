"""One parquet file holding COPIES copies of every row of the sample, in the sample's schema,
snappy and row-group size (end-to-end benchmark): real FineWeb-Edu files are
gigabytes each, and the part of the last file's assembly left after its tokenizing ends only
shows on a file that large.

usage: concat_parquet.py OUT_PARQUET COPIES SAMPLE_DIR
"""

import pathlib
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    out, copies, sample = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3])
    files = sorted(sample.rglob("*.parquet"))
    first = pq.ParquetFile(files[0]).metadata
    table = pa.concat_tables([pq.read_table(f) for f in files] * copies)
    pq.write_table(
        table,
        out,
        compression="snappy",
        row_group_size=first.row_group(0).num_rows,
    )


if __name__ == "__main__":
    main()
