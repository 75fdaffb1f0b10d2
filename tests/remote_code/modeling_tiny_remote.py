"""TinyRemote: a Llama decoder whose logits the model scales by config.logit_scale (a custom forward,
so a load that ran this file can be told from one that did not)."""
from transformers import LlamaForCausalLM

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        output.logits = output.logits * self.config.logit_scale
        return output
