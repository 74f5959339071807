"""The model deployments are plain classes (no base class: what they share is held, `MediaEncoding`, or called,
`request_prompt`), and the builder's `with_batching` still finds and wraps the methods their `BATCHED` names."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # serve_app lives at the repo root

from serve_app.app import with_batching  # noqa: E402
from serve_app.language_model import LanguageModel, VllmLanguageModel  # noqa: E402
from serve_app.speech import Speech  # noqa: E402
from serve_app.vision import Vision  # noqa: E402


def test_the_deployment_classes_inherit_nothing_and_answer_serves_calls_themselves():
    for cls in (Speech, Vision, LanguageModel, VllmLanguageModel):
        assert cls.__bases__ == (object,), cls
        assert all(name in vars(cls) for name in ("describe", "stats")), cls
    assert all("prepare" in vars(cls) and "generate" in vars(cls) for cls in (LanguageModel, VllmLanguageModel))


def test_the_builder_wraps_each_batched_method_that_the_class_itself_defines():
    """`with_batching` reads `BATCHED` and wraps methods found on the class (serve.batch itself runs only inside a
    replica: tests/integration/test_serve_app.py drives it)."""
    for cls in (Speech, Vision, LanguageModel):
        batched = with_batching(cls, 4, 0.01)
        assert batched.__bases__ == (cls,)
        for single, many in cls.BATCHED.items():
            assert single in vars(cls) and many in vars(cls)
            assert vars(batched)[single] is not vars(cls)[single] and vars(batched)[many] is not vars(cls)[many]
