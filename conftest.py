"""Tests never download: force the Hugging Face libraries offline before any test imports them."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
