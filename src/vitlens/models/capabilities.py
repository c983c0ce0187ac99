"""What a model adapter provides, named once: methods declare the capabilities they need at registration
(``needs=``), :func:`vitlens.explain` checks them before running, and the contract tests read them to
know which model families each method must run on.

``adapter.provides(cap)`` answers for one capability; :meth:`describe_need` is the phrase an error
message uses for it.
"""
from __future__ import annotations

import enum


class Capability(str, enum.Enum):
    """A part of the adapter contract that not every model has."""

    BLOCKS = "blocks"                    # canonical transformer blocks: attention probabilities, hook sites
    CLS = "cls"                          # a CLS token whose attention row can be read
    TEXT = "text"                        # a text tower: prompts as targets (CLIP-style models)
    TOKEN_SUBSETS = "token_subsets"      # the encoder run on prefix + a subset of patch tokens (TIS)
    FEATURE_MAPS = "feature_maps"        # per-block token features on the patch grid (ViT-CX)
    PATCH_EMBEDDING = "patch_embedding"  # the patch embedding's pieces (relevance down to the pixels)

    def __str__(self) -> str:
        return self.value


_PHRASES = {
    Capability.BLOCKS: "transformer blocks with readable attention",
    Capability.CLS: "a CLS token (its attention row is the explanation)",
    Capability.TEXT: "a text tower (CLIP-style prompts)",
    Capability.TOKEN_SUBSETS: "an encoder that runs on token subsets (a ViT encoder)",
    Capability.FEATURE_MAPS: "per-block token feature maps",
    Capability.PATCH_EMBEDDING: "an exposed patch embedding (relevance at the input pixels)",
}


def describe_need(cap: Capability) -> str:
    """The phrase naming ``cap`` in an error message."""
    return _PHRASES[Capability(cap)]
