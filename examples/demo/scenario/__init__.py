"""The `make demo` scenario: the healthcare story through the SDK (examples/demo/run_demo.py runs it)."""

from examples.demo.scenario.run import DemoConfig, run
from examples.demo.scenario.setup import DemoError, DemoState, prepare
from examples.demo.scenario.steps import Table

__all__ = ["DemoConfig", "DemoError", "DemoState", "Table", "prepare", "run"]
