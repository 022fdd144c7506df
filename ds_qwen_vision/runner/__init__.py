"""Running step plans on this rank's shard: slot state (slot_state.py), the step and its CUDA graphs
(model_runner.py)."""
from .model_runner import ModelRunner, follower_loop
from .slot_state import CacheView, SlotState

__all__ = ["CacheView", "ModelRunner", "SlotState", "follower_loop"]
