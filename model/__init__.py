"""The servable model: what a registered model ships and runs (networks, the fitted
preprocessor, the pyfunc, its input contract, metrics, variants, artifact checks).

It imports nothing from stages/, serving/ or flows/: train, evaluate, register and serving
import it, and MLflow ships this package, and only it, as the model's code.
"""
