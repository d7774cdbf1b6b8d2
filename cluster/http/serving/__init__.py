"""The OpenAI-compatible routes' translations, one module per resource (chat, completions, models,
distribution, feedback): HTTP bodies in, the engine's and the services' calls, HTTP bodies out."""

__all__: list[str] = []
