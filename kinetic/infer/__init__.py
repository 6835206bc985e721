"""Inference: the generation engine (batched prompts, greedy/sampled decoding, stop tokens and
strings, streaming), chat templates, and the OpenAI-compatible server. The server imports FastAPI,
so ``create_app`` loads it only when first used."""

from kinetic.infer.chat_template import ChatTemplate
from kinetic.infer.engine import Delta, Engine, GenerationResult, SamplingParams, Usage


def create_app(engine, model_name, limits=None):
    """The OpenAI-compatible FastAPI app (see :mod:`kinetic.infer.server`)."""
    from kinetic.infer.server import create_app as _create_app

    return _create_app(engine, model_name, limits)


__all__ = ["ChatTemplate", "Delta", "Engine", "GenerationResult", "SamplingParams", "Usage", "create_app"]
