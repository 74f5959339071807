"""Ray Serve deployment graph for trimodal: Speech, Vision, LanguageModel and an OpenAI-compatible HTTP Ingress.

    serve run serve_app:graph                          # the environment picks the preset and the run
    serve run serve_app:build_app preset=test run=DIR  # or arguments do
    serve deploy serve_app/serve_config.yaml           # a production example (one A100)

Modules: `deployments` and `ingress` hold plain classes (no Ray), `settings` resolves env/preset/run (no Ray),
`app` is the builder (the only module importing ray.serve). `graph` and `build_app` load lazily, so importing
the plain classes (replicas, unit tests) neither imports Ray Serve nor builds anything.
"""

from __future__ import annotations

__all__ = ["build_app", "graph"]


def __getattr__(name: str):
    if name in __all__:
        from serve_app.app import build_app

        return build_app if name == "build_app" else build_app({})
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
