"""fp8conv: FP8 post-training quantization, kernel tuning and release verification for
OneRec-V2-style generative recommenders."""

__version__ = "0.1.0"
