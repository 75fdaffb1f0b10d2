"""Configuration of TinyRemote, an architecture transformers does not know: it loads only through
the Auto classes with trust_remote_code=True, from this file copied into the checkpoint."""
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny_remote"

    def __init__(self, logit_scale: float = 1.0, **kwargs):
        self.logit_scale = logit_scale  # what the custom forward adds to Llama's
        super().__init__(**kwargs)
