"""Stage 5: the checkpoint hub. Find, fetch, verify and publish checkpoints; ``load(ref)`` turns a reference (a
folder, a registry id ``release/name``, a static hub URL or a Hugging Face repo) into a verified module.

    registry.py   registry files and their validation, references, load, push
    download.py   bounded HTTP downloads from static hubs (size, time and redirect limits)
    cli.py        `headprobe hub list | show | push`
"""
from headprobe.probes.hub.registry import (FromPretrained, Registry, RegistryEntry, bundled_registry, load,
                                           push_to_folder, push_to_hf, resolve)

__all__ = ["FromPretrained", "Registry", "RegistryEntry", "bundled_registry", "load", "push_to_folder", "push_to_hf",
           "resolve"]
