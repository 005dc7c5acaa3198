"""MLflow 3.17 resolves some registry calls with its *global* tracking and registry URIs, whatever the client or call
was given: `create_model_version` with a `models:/<model_id>` source, and `download_artifacts("models:/<name>@<alias>",
tracking_uri=...)`. `global_uris` sets both for one block and then puts back exactly what was there, the environment
included: `mlflow.set_registry_uri` also exports MLFLOW_REGISTRY_URI (and `set_tracking_uri` MLFLOW_TRACKING_URI) so
that child processes inherit it, so a plain set-and-set-back leaves the variables behind, pointing every later client
and child of the process that did not name a registry at that store."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextmanager
def global_uris(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs set to `uri` for the block, then restored with the environment."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = tracking_utils._tracking_uri, registry_utils._registry_uri, {k: os.environ.get(k) for k in ENV}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # also resets the tracer provider, as any change of it does
        registry_utils._registry_uri = saved[1]  # set_registry_uri(None) would leave its variable set
        for key, value in saved[2].items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
