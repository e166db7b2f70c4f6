import os

# Tests never touch the network: every model, tokenizer and vision tower is built in-process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The test models are tiny: intra-op threads only add synchronisation cost (on a busy 2-core
# machine a 32-wide forward takes ~0.3 s with 2 threads and ~4 ms with one).
torch.set_num_threads(int(os.environ.get("VISUALCHAT_TEST_THREADS", "1")))
