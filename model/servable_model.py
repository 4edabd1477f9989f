"""The logged pyfunc as code (MLflow models-from-code), not as a pickled object.

``log_servable`` passes this file as ``python_model``; MLflow stores it with the model and runs
it at load time (after the model's ``code/`` folder is put on ``sys.path``), so loading a model
imports reviewed source and unpickles no ``python_model.pkl``. Only MLflow runs this file.
"""

from mlflow.models import set_model

from model.servable import ClassifierModel

set_model(ClassifierModel())
