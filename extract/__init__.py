"""Stage 1: run a Hugging Face model and store every head's output (z) in an HDF5 store."""
from headprobe.extract.extractor import ExtractConfig, ExtractError, extract
from headprobe.extract.hooks import ARCHITECTURES, HeadCapture, HeadLayout, HookSpec, head_layout
from headprobe.extract.models import DEFAULT_MODEL, LoadedModel, ModelLoadError, load_model
from headprobe.extract.store import SCHEMA_VERSION, Store, StoreError, StoreMeta

__all__ = ["extract", "ExtractConfig", "ExtractError", "ARCHITECTURES", "HookSpec", "HeadCapture", "HeadLayout",
           "head_layout", "load_model", "LoadedModel", "ModelLoadError", "DEFAULT_MODEL", "Store", "StoreMeta",
           "StoreError", "SCHEMA_VERSION"]
