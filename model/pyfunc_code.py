"""The registered pyfunc as MLflow's "models from code" file (mlflow.org/docs/latest/ml/model/models-from-code/).

``model.registry.register_bundle`` logs this file as the pyfunc's ``python_model`` instead of a pickled
`WinbackPyfunc`: MLflow copies it into the version and runs it when it loads one, taking the model it sets. Loading
a version then runs the installed winback's code and unpickles nothing (a pickle can run arbitrary code, which is
why MLflow warned on every registration that logged one). MLflow alone runs this file; no winback module imports it.
"""

from model.registry import set_pyfunc_model

set_pyfunc_model()
