"""Token constants shared by the model, the data pipeline, the loss and inference.

The ids ``IMAGE_TOKEN_INDEX`` and ``IGNORE_INDEX`` are LLaVA's (``llava/constants.py``); the special token
strings are GLaMM's, in its order (``train.py::setup_tokenizer_and_special_tokens``): on a 32000-token LLaMA
vocabulary they get ids 32000..32006. The tokenizer that adds them is :mod:`calico_jax.data.tokenize`.
"""

IMAGE_TOKEN_INDEX = -200   # an image slot in input_ids: the model splices the image's tokens there
IGNORE_INDEX = -100        # label of a position without a target (prompt, image, padding); the loss skips it
DEFAULT_IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
SEG_TOKEN = "[SEG]"
SPECIAL_TOKENS = (IM_START, IM_END, "<bbox>", "<point>", SEG_TOKEN, "<p>", "</p>")
