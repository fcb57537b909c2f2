"""The grounded LLaVA's configuration: a ``LlavaConfig`` plus the insert layer and the vision-row options.

Imports only transformers (and, through ``.grounding``, torch): ``save_pretrained`` copies this file beside the
weights, so ``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` reads it without this project.
"""

from __future__ import annotations

from transformers import LlavaConfig

from .grounding import MODES, GroundingError

PROJECTOR_TYPES = ("mlp", "linear")


class GroundedLlavaConfig(LlavaConfig):
    """``LlavaConfig`` (``vision_config``, ``text_config``, ``image_token_index``, ``vision_feature_layer`` (−2),
    ``vision_feature_select_strategy`` (``"default"`` drops CLS and register tokens)) plus:

    - ``insert_layer`` L: the vision rows are the input of decoder block L (0 = an ordinary LLaVA);
    - ``exit_layer`` K (``L ≤ K ≤ N``; None = N): from block K on the vision rows are gone again;
    - ``vision_pool``: average-pool the patch grid with this kernel (1 = off);
    - ``projector_type``: ``"mlp"`` (LLaVA's Linear–GELU–Linear) or ``"linear"``;
    - ``grounding_mode``: ``"splice"`` (vision rows absent below L) or ``"mask"`` (present, masked);
    - ``vision_image_size``: pixels the processor feeds the tower when not ``vision_config.image_size`` (DINOv2);
    - ``vision_slots``: 0 for an image tower (rows = its patch grid); S > 0 for a tower over tokens (a SMILES
      encoder, MolCA-style): ``pixel_values`` then holds its input ids, and each input's token states are
      mean-pooled into S slots (the encoder's ``[CLS]`` and ``[SEP]`` left out).

    Validates itself; no I/O.
    """

    model_type = "pg_llava"
    insert_layer: int = 0
    exit_layer: int | None = None
    vision_pool: int = 1
    projector_type: str = "mlp"
    grounding_mode: str = "splice"
    vision_image_size: int = 0
    vision_slots: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.text_config.num_hidden_layers
        if isinstance(self.insert_layer, bool) or not isinstance(self.insert_layer, int) \
                or not 0 <= self.insert_layer <= n:
            raise GroundingError(f"insert_layer must be an integer in [0, {n}] for a {n}-layer LM, "
                                 f"got {self.insert_layer!r}")
        if self.exit_layer is not None and (isinstance(self.exit_layer, bool) or not isinstance(self.exit_layer, int)
                                            or not self.insert_layer <= self.exit_layer <= n):
            raise GroundingError(f"exit_layer must be None or an integer in [insert_layer, {n}] = "
                                 f"[{self.insert_layer}, {n}], got {self.exit_layer!r}")
        if self.vision_pool < 1:
            raise GroundingError(f"vision_pool must be >= 1, got {self.vision_pool}")
        if isinstance(self.vision_slots, bool) or not isinstance(self.vision_slots, int) or self.vision_slots < 0:
            raise GroundingError(f"vision_slots must be an integer >= 0, got {self.vision_slots!r}")
        if self.projector_type not in PROJECTOR_TYPES:
            raise GroundingError(f"projector_type must be one of {PROJECTOR_TYPES}, got {self.projector_type!r}")
        if self.grounding_mode not in MODES:
            raise GroundingError(f"grounding_mode must be one of {MODES}, got {self.grounding_mode!r}")
        if not isinstance(self.vision_feature_layer, int):
            raise GroundingError("GroundedLlavaConfig supports a single vision_feature_layer (an int)")

    @property
    def n_prefix_tokens(self) -> int:
        """Tokens before the patch grid in the vision tower's output (CLS + registers)."""
        return 1 + int(getattr(self.vision_config, "num_register_tokens", 0) or 0)

    @property
    def num_image_tokens(self) -> int:
        """Vision rows per image after selection and pooling (per input of a token tower: its slots)."""
        if self.vision_slots:
            return self.vision_slots
        vc = self.vision_config
        side = (self.vision_image_size or vc.image_size) // vc.patch_size
        pooled = (side // self.vision_pool) ** 2
        return pooled + (self.n_prefix_tokens if self.vision_feature_select_strategy == "full" else 0)
