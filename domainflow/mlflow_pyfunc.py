"""The MLflow ``python_function`` model of an exported champion: domainflow's own loader behind MLflow's interface.

``mlflow.pyfunc.load_model("models:/domainflow-<domain>@champion").predict(texts)`` answers a list of
texts (or a pandas Series, or a DataFrame with a ``text`` column or a single column) with a DataFrame of
``label`` and ``score`` (the top label's probability), the same labels as ``domainflow predict``.

Why pyfunc around :func:`domainflow.modeling.load_classifier` and not MLflow's ``transformers`` flavor:
a champion is often a compressed candidate (the default recipe is ONNX Runtime int8, or a torch dynamic
int8 model re-quantized at load time), which transformers cannot load (see ``domainflow.hf_export``), and
even an fp32 folder is of domainflow's own model type, registered by ``import domainflow``. One wrapper
over the loader serving uses runs every kind of champion exactly as it was evaluated. The price: the
environment that loads the model needs the domainflow package (this project, installed), besides the
requirements MLflow records.

This module imports mlflow at import time (the class subclasses ``PythonModel``). The logged model does not
pickle it: :mod:`domainflow.mlflow_model_code` is the model's code, which imports this class when loaded.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from mlflow.pyfunc.model import PythonModel

#: the name of the classifier folder among the MLflow model's artifacts
CLASSIFIER_ARTIFACT = "classifier"
TEXT_COLUMN = "text"


def texts_of(model_input: Any) -> list[str]:
    """The texts of a predict call: a list, a Series, or a DataFrame with a ``text`` column or one column."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN in model_input.columns:
            column = model_input[TEXT_COLUMN]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"a DataFrame of texts needs a {TEXT_COLUMN!r} column or a single column, "
                f"got columns {list(model_input.columns)}"
            )
        return [str(text) for text in column.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(text) for text in list(model_input)]


class ChampionModel(PythonModel):
    """A domainflow classifier folder (any candidate kind), loaded by domainflow, answering label and score."""

    def load_context(self, context: Any) -> None:
        from domainflow.modeling import load_classifier

        self._loaded = load_classifier(context.artifacts[CLASSIFIER_ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Label and score per text. MLflow hands a one-column DataFrame (the signature turns a list or a
        Series into one); a direct call may pass a list."""
        from domainflow.modeling import predict_proba

        texts = texts_of(model_input)
        if not texts:
            return pd.DataFrame({"label": pd.Series(dtype=str), "score": pd.Series(dtype=float)})
        scores, indices = predict_proba(self._loaded, texts).max(dim=1)
        names = self._loaded.label_names
        return pd.DataFrame({"label": [names[i] for i in indices.tolist()], "score": scores.tolist()})
