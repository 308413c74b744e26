"""Test-wide settings: no network, one torch thread, a private Hugging Face cache."""

import os
import tempfile

# Set before transformers / datasets are imported anywhere: a Hub lookup offline would otherwise retry for a minute.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="trl-onpolicy-hf-"))
os.environ.setdefault("TRL_ONPOLICY_CACHE", tempfile.mkdtemp(prefix="trl-onpolicy-cache-"))

import torch  # noqa: E402

# On a busy 2-core machine two threads made tiny-model generation 14-75x slower than one.
torch.set_num_threads(1)
