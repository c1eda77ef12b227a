"""Each training's final model in MLflow's model format, registered under its variant's name, with
the alias ``@best`` on the best version, so MLflow's loading and serving tools take it:

    mlflow.pytorch.load_model("models:/t2t_vit_7@best")     # with MLFLOW_TRACKING_URI set

The model is pickled (``serialization_format="pickle"``): loading it needs this repository's
``pipeline.models`` importable, and nothing is traced. (MLflow 3's default, ``pt2``, runs
``torch.export``, which costs seconds per model and does not take every architecture here.)
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch

log = logging.getLogger(__name__)

#: The alias on each variant's best version (by the final validation top-1 of its run).
BEST = "best"
#: The run metrics that pick it: the EMA weights' top-1 where the run kept an EMA (those are the
#: weights logged), else the raw weights'.
BEST_BY = ("ema_val_top1", "val_top1")
#: The model's folder in the run's artifacts.
NAME = "model"


def log_model(uri: str, run_id: str, variant: str, weights: dict[str, Any], config: dict[str, Any]) -> str:
    """Log the trained model into run ``run_id`` and register it as a new version of model ``variant``;
    then move ``@best`` to the variant's best version. Returns the registered version's URI.

    Args:
        uri: the tracking (and registry) URI.
        weights: the state dict to log (the EMA's when EMA is on, as evaluated).
        config: the :class:`~pipeline.train.loop.RunSpec` as a dict (the checkpoint's ``config``).
    """
    import mlflow
    import mlflow.pytorch
    import timm
    from mlflow.models import infer_signature
    from mlflow.tracking import MlflowClient

    from pipeline.train.loop import RunSpec, build_model

    spec = RunSpec.from_dict(config)
    model = build_model(spec)
    model.load_state_dict(weights)
    model.eval()
    size = spec.train.img_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(example)
    logits = out[-1] if isinstance(out, (list, tuple)) else out  # a cascade: its last exit
    signature = infer_signature(example.numpy(), logits.numpy())
    with _fluent_uris(uri):
        info = mlflow.pytorch.log_model(
            model,
            name=NAME,
            run_id=run_id,
            signature=signature,
            input_example=example[:1].numpy(),
            serialization_format="pickle",
            # Given, so MLflow does not load the model in a subprocess to infer them (seconds each).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
            registered_model_name=variant,
            await_registration_for=0,
        )
    client = MlflowClient(uri, registry_uri=uri)
    version = info.registered_model_version
    best = promote_best(client, variant)
    log.info("%s: model logged, version %s of models:/%s (@%s: %s)", variant, version, variant, BEST, best)
    return f"models:/{variant}/{version}"


@contextlib.contextmanager
def _fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (which ``log_model`` uses) at ``uri`` for tracking and registry, and
    put everything back afterwards. ``mlflow.set_tracking_uri``/``set_registry_uri`` also write
    ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` into ``os.environ``; left there, every later
    ``MlflowClient`` of the process, and every child process, would read and write this study's
    registry whatever URI it was given."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)  # None when unset
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # resets MLflow's tracer as well
        registry_utils._registry_uri = saved[1]  # set_registry_uri(None) would keep the variable
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def promote_best(client: Any, variant: str) -> str | None:
    """Point ``models:/<variant>@best`` at the version whose run has the highest final top-1 of the
    logged weights (:data:`BEST_BY`; the first registered wins a tie); returns that version, or None."""
    scored = []
    for mv in client.search_model_versions(f"name = '{variant}'"):
        if not mv.run_id:
            continue
        metrics = client.get_run(mv.run_id).data.metrics
        value = next((metrics[k] for k in BEST_BY if k in metrics), None)
        if value is not None:
            scored.append((value, -int(mv.version), mv.version))
    if not scored:
        return None
    version = max(scored)[2]
    client.set_registered_model_alias(variant, BEST, version)
    return version
