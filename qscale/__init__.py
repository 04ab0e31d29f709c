"""qscale: run Qiskit circuit simulations across a cluster of machines.

The public surface::

    qscale.Client, qscale.Job          talk to a coordinator
    qscale.LocalCluster                an embedded coordinator and local nodes
    qscale.TLSConfig                   TLS / mutual TLS files for Client and LocalCluster
    qscale.SamplerV2, EstimatorV2      Qiskit primitives on the cluster
    qscale.QScaleBackend               a Qiskit BackendV2 on the cluster
    qscale.JobResult, CircuitResult, JobStatus, PlanInfo, Progress, JobState, NodeStatus, UserStatus
    qscale.QScaleError and its subclasses (see qscale.errors)

Attributes that need Qiskit are imported on first use, so the node daemon, which imports
``qscale.node``, stays light (its simulations run in worker processes).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from qscale._version import __version__
from qscale.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    JobCancelledError,
    JobError,
    JobFailedError,
    JobTimeoutError,
    NoCapableNodeError,
    NotFoundError,
    QScaleError,
    UnavailableError,
)

if TYPE_CHECKING:
    from qscale.backend import QScaleBackend, QScaleBackendJob
    from qscale.client import Client, Job
    from qscale.estimator import EstimatorOptions, EstimatorV2
    from qscale.primitives import SamplerOptions, SamplerV2
    from qscale.local import LocalCluster
    from qscale.security import TLSConfig
    from qscale.results import (CircuitResult, JobResult, JobState, JobStatus, NodeStatus, PlanInfo, Progress,
                                SetResult, UserStatus)
    from qscale.outcomes import Outcomes

_LAZY = {
    "Client": "qscale.client",
    "Job": "qscale.client",
    "LocalCluster": "qscale.local",
    "TLSConfig": "qscale.security",
    "SamplerV2": "qscale.primitives",
    "SamplerOptions": "qscale.primitives",
    "EstimatorV2": "qscale.estimator",
    "EstimatorOptions": "qscale.estimator",
    "QScaleBackend": "qscale.backend",
    "QScaleBackendJob": "qscale.backend",
    "SetResult": "qscale.results",
    "JobResult": "qscale.results",
    "CircuitResult": "qscale.results",
    "JobStatus": "qscale.results",
    "PlanInfo": "qscale.results",
    "JobState": "qscale.results",
    "Progress": "qscale.results",
    "NodeStatus": "qscale.results",
    "UserStatus": "qscale.results",
    "Outcomes": "qscale.outcomes",
}

__all__ = [
    "__version__",
    *_LAZY,
    "QScaleError",
    "InvalidArgumentError",
    "NotFoundError",
    "FailedPreconditionError",
    "NoCapableNodeError",
    "UnavailableError",
    "JobError",
    "JobFailedError",
    "JobCancelledError",
    "JobTimeoutError",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'qscale' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
