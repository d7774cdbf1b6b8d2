"""One error tree per package, every error picklable with its type, message and fields, and every
error of the server side mapped to a precise wire status in one table (cluster/service/status.py).

Errors cross processes: Ray actor calls (the update desk), Serve replicas, worker processes. A
TreeLM error must come back as the same type with the same message and attributes, whatever its
constructor takes.
"""

from __future__ import annotations

import inspect
import pickle
from types import ModuleType

import grpc
import pytest

from cluster import errors as cluster_errors
from cluster.service.status import HTTP_STATUS, wire_status
from hierarchy import errors as hierarchy_errors
from hierarchy.errors import PicklableError, SpecProblem
from nodes import errors as nodes_errors
from registry import errors as registry_errors
from treelm import _errors as sdk_errors

PACKAGES: dict[ModuleType, type[Exception]] = {
    hierarchy_errors: hierarchy_errors.HierarchyError,
    nodes_errors: nodes_errors.NodesError,
    registry_errors: registry_errors.RegistryError,
    cluster_errors: cluster_errors.ClusterError,
    sdk_errors: sdk_errors.TreeLMError,
}


def _errors_of(module: ModuleType) -> list[type[Exception]]:
    return [
        obj
        for name in module.__all__
        if isinstance(obj := getattr(module, name), type) and issubclass(obj, BaseException)
    ]


ALL_ERRORS = [(module, cls) for module in PACKAGES for cls in _errors_of(module)]

_SAMPLES = {
    "field": "params.top_p",
    "file": "cluster.yaml",
    "node": "demo/en",
    "update_id": "ab" * 16,
    "idle_s": 30.0,  # numbers where a message formats them
    "retry_after_s": 1.5,
}


def _instance(cls: type[Exception]) -> Exception:
    """An instance built through the class's own constructor, with a sample for each parameter."""
    if cls is hierarchy_errors.SpecError:
        return cls([SpecProblem("tree.yaml", "en", "lora.r", "must be a positive integer")])
    params = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if not params:  # Exception's own constructor
        error = cls(f"{cls.__name__} happened")
    else:
        error = cls(*[_SAMPLES.get(p.name, f"{p.name} of {cls.__name__}") for p in params if p.default is p.empty])
    if isinstance(error, hierarchy_errors.UpdateError):
        error.details.update(field="version", seen=3)
    return error


def test_every_package_has_one_error_module_whose_errors_share_its_root():
    for module, root in PACKAGES.items():
        assert issubclass(root, PicklableError)
        for cls in _errors_of(module):
            assert cls is PicklableError or issubclass(cls, root), f"{cls.__qualname__} is outside {root.__name__}"


@pytest.mark.parametrize(("module", "cls"), ALL_ERRORS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_every_error_pickles_with_its_type_message_and_fields(module, cls):
    error = _instance(cls)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error) and again.args == error.args
    assert vars(again) == vars(error)  # field, file, node, details, problems, ...


@pytest.mark.parametrize(
    ("module", "cls"),
    [
        (m, c)
        for m, c in ALL_ERRORS
        if m is not sdk_errors and (m is not hierarchy_errors or issubclass(c, hierarchy_errors.UpdateError))
    ],
    ids=lambda x: getattr(x, "__name__", str(x)),
)
def test_every_server_side_error_has_a_precise_status_and_its_http_twin(module, cls):
    server_faults = (nodes_errors.AdapterError, nodes_errors.BaseModelError, nodes_errors.BuildError)
    internal_only = (
        nodes_errors.ExportError,
        nodes_errors.EngineConfigError,
        nodes_errors.CacheFull,
        nodes_errors.GateTextMissing,
        nodes_errors.EngineError,
        cluster_errors.ServeError,
        cluster_errors.ClusterConfigError,
        cluster_errors.RayStartError,
        cluster_errors.DeployError,
        cluster_errors.PolicyError,
    )
    status = wire_status(_instance(cls))
    if cls in (PicklableError, *PACKAGES.values()) or issubclass(cls, server_faults) or cls in internal_only:
        return  # raised at start-up or by the operator's own tools; a call never sees them as themselves
    if issubclass(cls, (cluster_errors.CallError, cluster_errors.CoordinatorError)) and cls in (
        cluster_errors.CallError,
        cluster_errors.CoordinatorError,
    ):
        return  # abstract bases
    assert status.code is not grpc.StatusCode.INTERNAL, f"{cls.__name__} would be answered INTERNAL"
    # Two kinds have an HTTP status other than their gRPC code's: a body over the limit (413, not
    # 429) and an unsatisfiable Range (416, not 400).
    twin = {"request-too-large": 413, "range-not-satisfiable": 416}.get(status.kind or "", HTTP_STATUS[status.code])
    assert status.http_status == twin and status.http_status >= 400
    assert status.openai_type and status.openai_code
