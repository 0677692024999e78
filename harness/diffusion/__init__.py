"""The Stable Diffusion LoRA pipeline that ``Object_Generation/`` and ``Mix-of-Show/`` share.

Experiment plumbing, not the method: the optimizers come from :func:`core.build_optimizer`. By concern:

* :mod:`.data` -- the concept images (:class:`ConceptDataset`), :func:`tokenize`, :func:`make_collate`;
* :mod:`.models` -- Stable Diffusion, its architecture with random weights, or a tiny random one
  (:func:`load_components`), new concept tokens, LoRA (:func:`add_lora`, :func:`fuse_lora`), the training loss
  (:class:`LoraDiffusionModel`), the optimizer's groups (:func:`optimizer_settings`), :func:`trainable_counts`;
* :mod:`.sampling` -- seeded generation, the black-image measure, CLIP scores (:func:`sample_and_score`);
* :mod:`.figures` -- sample strips, the LR x optimizer figure, the records table, the ``make_figure.py`` command
  line (:func:`figure_main`);
* :mod:`.runs` -- what the two ``train.py`` do with their config: :func:`start_run`, :func:`load_lora_components`,
  :func:`concept_folder`, :func:`make_recorder`, :func:`fuse_sample_and_finish`.

Importing it imports diffusers, transformers and PEFT.
"""

from .data import IMAGE_SUFFIXES, ConceptDataset, color_jitter, make_collate, tokenize
from .figures import black_share_figure, figure_main, image_grid, load_strip, records_table, save_strip, select_records
from .models import (
    EmbeddingRowGuard, LoraDiffusionModel, SDComponents, add_concept_tokens, add_lora, build_tiny_tokenizer,
    fuse_lora, keep_original_embedding_rows, load_components, lora_delta_norm, lora_layers, optimizer_settings,
    tiny_text_encoder_config, tiny_unet_config, tiny_vae_config, trainable_counts,
)  # fmt: skip
from .runs import (
    AFTER_TRAINING, SETTINGS, concept_folder, fuse_sample_and_finish, load_lora_components, make_recorder, start_run,
)
from .sampling import black_image_mask, clip_similarity, generate, make_sampler, sample_and_score, to_pil

__all__ = [
    "IMAGE_SUFFIXES", "ConceptDataset", "color_jitter", "tokenize", "make_collate",
    "build_tiny_tokenizer", "tiny_unet_config", "tiny_vae_config", "tiny_text_encoder_config", "SDComponents",
    "load_components", "add_concept_tokens", "keep_original_embedding_rows", "EmbeddingRowGuard", "add_lora",
    "lora_layers", "lora_delta_norm", "fuse_lora", "optimizer_settings", "trainable_counts", "LoraDiffusionModel",
    "make_sampler", "generate", "black_image_mask", "to_pil", "clip_similarity", "sample_and_score",
    "image_grid", "save_strip", "load_strip", "black_share_figure", "records_table", "select_records", "figure_main",
    "start_run", "load_lora_components", "concept_folder", "make_recorder", "fuse_sample_and_finish", "AFTER_TRAINING",
    "SETTINGS",
]  # fmt: skip
