"""Ray Serve deployment graph for trimodal: Speech, Vision, LanguageModel and an OpenAI-compatible HTTP Ingress.

    serve run serve_app:graph                          # the environment picks the preset and the run
    serve run serve_app:build_app preset=test run=DIR  # or arguments do
    serve deploy serve_app/serve_config.yaml           # a production example (one A100)

Modules: one plain class per model deployment, `speech` (Speech), `vision` (Vision) and `language_model`
(LanguageModel, and VllmLanguageModel for serving.engine=vllm), with what they share in `replica`; `ingress`
(the HTTP front door) and `registry` (the models a request may name); `metrics`; `settings` resolves
env/preset/run. None of them builds a Serve deployment: `app` is the builder (the only module calling
serve.deployment). `graph` and `build_app` load lazily, so importing the plain classes (replicas, unit tests)
neither imports Ray Serve nor builds anything.
"""

from __future__ import annotations

__all__ = ["build_app", "graph"]


def __getattr__(name: str):
    if name in __all__:
        from serve_app.app import build_app

        return build_app if name == "build_app" else build_app({})
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
