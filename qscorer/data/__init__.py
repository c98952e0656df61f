"""The text and image pipeline: everything that turns a meta record or an image into model inputs.

- ``tokenization``: :func:`load_tokenizer` (LLaMA-2 + score tokens), :func:`encode_text`, :func:`tokenizer_image_token`
  (exact original ids on every transformers version), :func:`save_tokenizer`, :func:`score_token_ids`.
- ``conversation``: the templates and prompts (:func:`build_scoring_prompt`, :func:`scoring_prompt_ids`,
  :func:`build_training_prompt`).
- the image path, defined with the model in :mod:`qscorer.model.image_processing` (a merged folder ships it):
  :func:`load_image`, :func:`image_from_array`, :func:`to_rgb`, :func:`expand2square`, :func:`process_images`,
  :class:`ImageProcessor`.
- ``datasets``: :func:`preprocess` (label masking), meta loading, :func:`load_video_frames`
  (PyAV), :class:`SingleDataset`, :class:`PairDataset` and their collators.

Names are imported lazily, so importing one module does not pull in the others.
"""

_LAZY = {
    "build_demo_tokenizer": ".demo_tokenizer",
    "SentencePieceTextEncoder": ".tokenization",
    "encode_text": ".tokenization",
    "load_tokenizer": ".tokenization",
    "save_tokenizer": ".tokenization",
    "score_token_ids": ".tokenization",
    "text_encoder": ".tokenization",
    "tokenizer_image_token": ".tokenization",
    "ANSWER_PREFIX": ".conversation",
    "SCORING_QUESTION": ".conversation",
    "TEMPLATES": ".conversation",
    "ConversationTemplate": ".conversation",
    "build_scoring_prompt": ".conversation",
    "build_training_prompt": ".conversation",
    "get_template": ".conversation",
    "place_images_first": ".conversation",
    "score_processor": ".conversation",
    "scoring_prompt_ids": ".conversation",
    "IMAGE_SIZE": "..model.image_processing",
    "ImageProcessor": "..model.image_processing",
    "UnreadableImageError": "..model.image_processing",
    "expand2square": "..model.image_processing",
    "image_from_array": "..model.image_processing",
    "load_image": "..model.image_processing",
    "process_images": "..model.image_processing",
    "to_rgb": "..model.image_processing",
    "MetaRecord": ".datasets",
    "PairCollator": ".datasets",
    "PairDataset": ".datasets",
    "SingleCollator": ".datasets",
    "SingleDataset": ".datasets",
    "load_meta": ".datasets",
    "read_json_records": ".records",
    "load_metas": ".datasets",
    "load_video_frames": ".datasets",
    "mask_targets": ".datasets",
    "preprocess": ".datasets",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
