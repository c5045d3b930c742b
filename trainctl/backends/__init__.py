"""Built-in backends, registered through the same hook as third-party ones."""

from trainctl.backends.gpt.config import DataConfig as GPTDataConfig
from trainctl.backends.gpt.config import ModelConfig as GPTModelConfig
from trainctl.backends.hf.config import DataConfig as HFDataConfig
from trainctl.backends.hf.config import HFConfig
from trainctl.backends.hf.config import ModelConfig as HFModelConfig
from trainctl.hooks import BackendSpec, hookimpl


@hookimpl
def trainctl_register_backends(register):
    register(BackendSpec(
        name="gpt",
        factory="trainctl.backends.gpt.backend:GPTBackend",
        model_config=GPTModelConfig,
        data_config=GPTDataConfig,
        memory="trainctl.backends.gpt.memory:estimate",
        description="nanoGPT-style GPT in plain PyTorch (character, byte or GPT-2 BPE tokens).",
    ))
    register(BackendSpec(
        name="hf",
        factory="trainctl.backends.hf.backend:HFBackend",
        model_config=HFModelConfig,
        data_config=HFDataConfig,
        sections={"hf": HFConfig},
        memory="trainctl.backends.hf.memory:estimate",
        extra="hf",
        description="Hugging Face causal LMs fine-tuned with TRL's SFT data pipeline and loss (LoRA optional).",
    ))
