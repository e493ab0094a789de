"""Users' own data: text records from plain text, JSONL and parquet files (``records``) and the
grain pipeline that packs them for language-model training (``text``)."""

from jaxlab.data.records import RecordError as RecordError
from jaxlab.data.records import iter_records as iter_records
from jaxlab.data.records import record_texts as record_texts
