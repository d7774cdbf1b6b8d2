"""Protocol buffers of the public gRPC API (``treelm.v1``) and the code generated from them."""

__all__: list[str] = []
