"""A FastGen-style engine: Dynamic SplitFuse scheduling over a fixed token budget, continuous
batching of ragged sequences, a paged KV cache with MMCA modality tags, streaming."""

from serving.engine.config import EngineConfig
from serving.engine.engine import Engine, RequestOutput
from serving.engine.loop import EngineBackend, EngineLoop

__all__ = ["Engine", "EngineBackend", "EngineConfig", "EngineLoop", "RequestOutput"]
