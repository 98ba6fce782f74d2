"""Warnings from megatron-core / torch that say nothing about a run, silenced before they are imported.

The fallbacks megatron reports (no TransformerEngine / apex) are stated once in the trainer's log instead.
"""

import warnings

_KNOWN = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "Please use DTensor instead",
    r"`torch\.distributed\.\w+` is deprecated",
    "full scope is deprecated",
    "`load_state_dict` is deprecated",
    "The .grad attribute of a Tensor that is not a leaf Tensor",
    "Warning: Profiler clears events at the end of each cycle",  # train.profile records one window, one cycle
)


def silence_known_warnings() -> None:
    for pattern in _KNOWN:
        warnings.filterwarnings("ignore", message=pattern)
