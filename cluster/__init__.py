"""Composition root: the `treelm` CLI today; the gRPC server and the Ray application later."""

__all__: list[str] = []
