"""Inference: the batched decoder (continuous batching; plain and MTP-speculative policies), sampling
with log-probs, teacher-forced scoring, the generation engine (text, stops, streaming), chat
templates, and the OpenAI-compatible server. The server imports FastAPI, so ``create_app`` loads it
only when first used."""

from kinetic.infer.chat_template import ChatTemplate
from kinetic.infer.decoder import Decoder, Token
from kinetic.infer.engine import Delta, Engine, GenerationResult, Usage
from kinetic.infer.sampling import SamplingParams
from kinetic.infer.scoring import score, sequence_logprobs


def create_app(engine, model_name, limits=None):
    """The OpenAI-compatible FastAPI app (see :mod:`kinetic.infer.server`)."""
    from kinetic.infer.server import create_app as _create_app

    return _create_app(engine, model_name, limits)


__all__ = ["ChatTemplate", "Decoder", "Delta", "Engine", "GenerationResult", "SamplingParams", "Token",
           "Usage", "create_app", "score", "sequence_logprobs"]
