"""Kimi-VL's processor as remote code for transformers' AutoProcessor (trust_remote_code), for vLLM's Kimi-VL:
the image processor (image_processing_kimi_vl.py) and the tokenizer, with each `<|media_pad|>` of the prompt
expanded to the image's token count (h // merge_h) * (w // merge_w), as data/processor.py's KimiProcessor does.
Written for this repository; copied into the checkpoint by tools/train_tiny.py.
"""

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin


class KimiVLProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]
    image_token = "<|media_pad|>"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, images=None, text=None, **kwargs):
        kwargs.pop("return_tensors", None)
        texts = [text] if isinstance(text, str) else list(text or [])
        image_inputs = {}
        if images is not None and (not isinstance(images, (list, tuple)) or len(images)):
            image_inputs = dict(self.image_processor.preprocess(images))
            kh, kw = self.image_processor.merge_kernel_size
            counts = iter([(h // kh) * (w // kw) for h, w in image_inputs["image_grid_hws"].tolist()])
            expanded = []
            for t in texts:
                parts = t.split(self.image_token)
                expanded.append(parts[0] + "".join(self.image_token * next(counts) + p for p in parts[1:]))
            texts = expanded
        text_inputs = self.tokenizer(texts, add_special_tokens=False) if texts else {}
        return BatchFeature({**text_inputs, **image_inputs}, tensor_type="pt" if image_inputs else None)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hws"]
