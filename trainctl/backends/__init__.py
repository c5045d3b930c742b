"""Built-in backends, registered through the same hook as third-party ones."""

from trainctl.backends.gpt.config import DataConfig as GPTDataConfig
from trainctl.backends.gpt.config import ModelConfig as GPTModelConfig
from trainctl.hooks import BackendSpec, hookimpl


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(
        name="gpt",
        factory="trainctl.backends.gpt.backend:GPTBackend",
        model_config=GPTModelConfig,
        data_config=GPTDataConfig,
        description="nanoGPT-style GPT in plain PyTorch (character, byte or GPT-2 BPE tokens).",
    ))
