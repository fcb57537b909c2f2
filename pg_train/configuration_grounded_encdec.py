"""Configurations of the grounded encoder–decoder VLMs: HF's BLIP-2 / InstructBLIP configs, and a LLaVA-style one
(vision tower → plain projector, no Q-Former), each with ``bypass_encoder``.

Imports only transformers (and, through ``.grounding``, torch): ``save_pretrained`` copies this file beside the
weights, so the configs load with ``trust_remote_code=True`` in a Python without this project.
"""

from __future__ import annotations

from transformers import Blip2Config, InstructBlipConfig

from .configuration_grounded_llava import GroundedLlavaConfig
from .grounding import GroundingError


def _check_bypass(config, text_config) -> None:
    if not isinstance(config.bypass_encoder, bool):
        raise GroundingError(f"bypass_encoder must be True or False, got {config.bypass_encoder!r}")
    if config.bypass_encoder and not getattr(text_config, "is_encoder_decoder", False):
        raise GroundingError(f"bypass_encoder needs an encoder-decoder language model (T5, FlanT5); "
                             f"{text_config.model_type!r} is decoder-only: ground it with insert_layer instead")


class GroundedBlip2Config(Blip2Config):
    """``Blip2Config`` plus ``bypass_encoder``: the Q-Former's projected query rows skip the LM's encoder and enter
    the decoder's cross-attention memory beside the encoded prompt (True, the paper's Sec. 5.1), or go through the
    encoder as in BLIP-2 (False: exactly ``Blip2ForConditionalGeneration``)."""

    model_type = "pg_blip2"
    bypass_encoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_bypass(self, self.text_config)


class GroundedInstructBlipConfig(InstructBlipConfig):
    """``InstructBlipConfig`` plus ``bypass_encoder`` (as :class:`GroundedBlip2Config`)."""

    model_type = "pg_instructblip"
    bypass_encoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _check_bypass(self, self.text_config)


class GroundedVisionT5Config(GroundedLlavaConfig):
    """A vision tower, LLaVA's plain projector (no Q-Former) and an encoder–decoder LM: the fields of
    :class:`GroundedLlavaConfig` (feature layer and selection, pooling, projector type) plus ``bypass_encoder``.
    ``insert_layer`` and ``exit_layer`` concern decoder-only LMs and stay 0 / None."""

    model_type = "pg_vision_t5"
    bypass_encoder: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.insert_layer != 0 or self.exit_layer is not None:
            raise GroundingError("an encoder-decoder VLM is grounded with bypass_encoder, not insert_layer / "
                                 "exit_layer")
        _check_bypass(self, self.text_config)
