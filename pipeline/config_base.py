"""The base of every params.yaml section, and the error a bad params file raises (imports nothing heavy)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """params.yaml is invalid. The message names the file and every offending key."""


class _Section(BaseModel):
    """Base for every section: unknown keys are errors, values are immutable once loaded."""

    # strict: ``epochs: true``, ``epochs: "3"`` and ``use_gpu: "yes"`` are errors, not coerced (an int
    # is still a valid float). load_config reads ``1e-3`` as a float, as YAML 1.2 and DVC do.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
