"""The model registry: SQL schema and migrations, repository functions, matching, CLI."""

__all__: list[str] = []
