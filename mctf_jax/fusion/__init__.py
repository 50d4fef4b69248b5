"""The fusion engine: multi-criteria token fusion for any pre-norm ViT.

This package knows no backbone; backbones (``mctf_jax.models``) use it. From the bottom up:

    config.py    FusionConfig: the validated fusion settings
    schedule.py  the static per-block plan (r, token counts), given the protected tokens
    scores.py    the three criteria -> the score matrix            } the algorithm, as pure
    matching.py  bipartite matching (exact and padded, one core)   } functions of arrays
    merge.py     merges, one-step-ahead attention, source maps     }
    padded.py    padded layouts: array widths of the train step's paths
    steps.py     one block's fusion step (ExactStep, PaddedStep), TokenState
    block.py     the block driver: a block protocol, the three one-step-ahead modes
    stack.py     the stack driver: exact, padded, scanned runs of blocks
    scopes.py    named scopes that mark the parts in compiled programs and profiles
"""

from mctf_jax.fusion.block import run_block
from mctf_jax.fusion.config import FusionConfig, normalize_r
from mctf_jax.fusion.matching import Matching, bipartite_matching, bipartite_matching_padded
from mctf_jax.fusion.merge import (attend, fuse_tokens, merge_max, merge_sum,
                                   merged_attention_output, pooling_weights, source_map,
                                   update_token_map)
from mctf_jax.fusion.schedule import LayerPlan, Schedule, compute_schedule, effective_r
from mctf_jax.fusion.scores import attention_received, matching_scores
from mctf_jax.fusion.steps import ExactStep, Merge, PaddedStep, TokenState

__all__ = [
    "FusionConfig", "normalize_r", "LayerPlan", "Schedule", "compute_schedule",
    "effective_r", "attention_received", "matching_scores", "Matching",
    "bipartite_matching", "bipartite_matching_padded", "merge_sum", "merge_max",
    "pooling_weights", "fuse_tokens", "attend", "merged_attention_output",
    "update_token_map", "source_map", "TokenState", "Merge", "ExactStep", "PaddedStep",
    "run_block",
]
