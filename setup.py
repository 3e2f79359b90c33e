from setuptools import find_packages, setup

# the lmms-eval model "lavis_lite" (lavis_lite/integrations/lmms_eval.py); lmms-eval 0.7.3's evaluator imports
# filelock._api, which filelock 4 removed
LMMS_EVAL = ["lmms_eval==0.7.3", "filelock<4"]

setup(
    name="lavis_lite",
    version="0.1.0",
    description="A small, fast, honest research framework for Q-Former vision-language models (BLIP-2)",
    python_requires=">=3.10",
    packages=find_packages(include=["lavis_lite", "lavis_lite.*"]),
    py_modules=["lavis_lite_lmms_eval"],  # the lmms-eval entry point, importable without importing lavis_lite
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "transformers==5.23.0",  # InternLM2 is loaded natively as Llama: no remote code
        "timm==1.0.31",
        "peft==0.21.2",
        "omegaconf>=2.3,<2.5",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.22",
        "pycocotools>=2.0.8",
        "pycocoevalcap>=1.2",
        "jieba==0.42.1",  # Chinese word-level caption metrics: the dictionary is part of the metric
        "pillow>=10",
        "numpy>=1.26",
        "webdataset>=0.2.100",
        "braceexpand>=0.1.7",  # shard patterns like {00000..00099}.tar
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "lmms": LMMS_EVAL,
        "test": ["pytest>=8", *LMMS_EVAL],  # CI runs the lmms-eval adapter's tests too
    },
    entry_points={
        "console_scripts": [
            "lavis-lite-train=lavis_lite.train:main",
            "lavis-lite-evaluate=lavis_lite.evaluate:main",
        ],
        "lmms_eval.models": ["lavis_lite=lavis_lite_lmms_eval:MANIFEST"],  # lmms-eval's model plug-ins
    },
)
