"""Fine-tuning a pretrained GPT.

classify.py    text classifier: labelled data, balancing, splits, last-real-token head, training, metrics
instruct.py    instruction following: records, collate (targets, masking), training, responses, scoring
templates.py   prompt templates (alpaca, phi3); the model records its own in metadata["template"]
lora.py        low-rank adapters: LoRALinear, apply_lora, merge_lora, adapter files
trainable.py   what learns (--trainable last-n / all / lora), the same for every task
checkpoint.py  loading the starting model; saving classifiers (head + labels) and instruction models
files.py       reading user files with errors that name file and line; atomic writes
"""
