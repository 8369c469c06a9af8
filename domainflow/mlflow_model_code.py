"""The model code of an exported champion (MLflow's "models from code"): MLflow copies this file into the
logged model and runs it when the model is loaded; it names the model object, so nothing is pickled.

Loading needs the domainflow package importable (see :mod:`domainflow.mlflow_pyfunc`).
"""

from mlflow.models import set_model

from domainflow.mlflow_pyfunc import ChampionModel

set_model(ChampionModel())
