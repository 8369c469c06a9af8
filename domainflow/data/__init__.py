"""Reading, validating and splitting labelled data: the core of ingest, with no domain and no Prefect.

Modules, from the file up:

* :mod:`.problems`: :class:`DataValidationError` and the collector that reports every bad row at once;
* :mod:`.tables`: the one reader of CSV / JSON / JSONL / Parquet files, with each record's line or row;
* :mod:`.labels`: a domain's labels, or those found in the training data, and how raw values map to ids;
* :mod:`.validation`: the checks a classification dataset passes (columns, texts, labels, leakage…);
* :mod:`.splitting`: stratified subsampling and the validation split;
* :mod:`.dataset`: :func:`~.dataset.ingest_dataset`, which writes the content-addressed ``DatasetDict``;
* :mod:`.hub`: the same from a Hugging Face hub dataset (only with ``DOMAINFLOW_ONLINE=1``).

Only the light names are exported here: the reader is used by monitoring and ranking, which must
not pay for importing ``datasets`` and scikit-learn.
"""

from domainflow.data.problems import DataValidationError
from domainflow.data.tables import read_table

__all__ = ["DataValidationError", "read_table"]
