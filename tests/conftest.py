import os

# A forgotten model-hub download must fail at once, not hang or pass by luck.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
