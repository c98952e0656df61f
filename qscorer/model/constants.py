"""The model's conventions, shared with the data pipeline (values of the original code)."""

IGNORE_INDEX = -100
"""Label value that the cross-entropy loss ignores."""

IMAGE_TOKEN_INDEX = -200
"""Input id that marks where an image's visual tokens are spliced into the text sequence."""

NUM_VISUAL_TOKENS = 65
"""Rows one image contributes to the LLM sequence: 64 abstractor queries + the vit_eos embedding."""

IMAGE_BACKGROUND = (122, 116, 104)
"""Padding colour of expand2square: int(255 * CLIP mean) per channel."""

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
