"""The engine's caches: lightning state slots and paged KV blocks, and the manager that hands them out."""
from .kv_cache import KVCache
from .manager import CacheManager, CacheUsage
from .state_pool import StatePool

__all__ = ["CacheManager", "CacheUsage", "KVCache", "StatePool"]
